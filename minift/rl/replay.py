"""Recorded completions: train on what another run (or TRL) sampled instead of sampling anew.

A completions file is JSON Lines, one object per completion, in the order they were generated:

    {"step": 1, "prompt": "what a day sentiment:", "completion_ids": [3967, 50256]}

``step``: the generation round, from 1, in order, every round present; ``prompt``: the prompt text;
``completion_ids``: the sampled token ids, up to and including the first EOS (or as many as
``max_completion_length`` allowed). Within a round, each prompt's ``num_generations`` completions
are consecutive (a group). Optional keys: ``prompt_ids`` (the prompt's token ids, to replay without
the tokenizer) and ``position`` (the completion's row in the round's shuffled training order; all
or none of a round's records carry it; without it the reader of the round shuffles it itself).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

from ..errors import InputError

REQUIRED = ("step", "prompt", "completion_ids")
OPTIONAL = ("prompt_ids", "position")


class ReplayError(InputError):
    """A completions file minift cannot replay; the message names the file and line."""


@dataclass
class ReplayRound:
    """One generation round of a completions file, in generation order."""

    step: int
    prompts: list[str]
    completion_ids: list[list[int]]
    prompt_ids: list[list[int]] | None = None
    permutation: list[int] | None = None  # training row k is round row permutation[k] (TRL's shuffle)

    def __len__(self) -> int:
        return len(self.prompts)


def _token_ids(value, where: str, key: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and t >= 0 for t in value):
        raise ReplayError(f"{where}: {key!r} must be a non-empty list of token ids (integers >= 0)")
    return value


def _record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ReplayError(f"{where}: not JSON ({err.msg}); write one JSON object per line") from None
    if not isinstance(record, dict):
        raise ReplayError(f"{where}: expected a JSON object with keys {list(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ReplayError(f"{where}: missing {missing} (a completion record needs {list(REQUIRED)})")
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ReplayError(f"{where}: unknown key(s) {unknown}; known: {list(REQUIRED + OPTIONAL)}")
    if not isinstance(record["step"], int) or record["step"] < 1:
        raise ReplayError(f"{where}: 'step' must be an integer >= 1 (the generation round)")
    if not isinstance(record["prompt"], str):
        raise ReplayError(f"{where}: 'prompt' must be a string")
    _token_ids(record["completion_ids"], where, "completion_ids")
    if "prompt_ids" in record:
        _token_ids(record["prompt_ids"], where, "prompt_ids")
    if "position" in record and (not isinstance(record["position"], int) or record["position"] < 0):
        raise ReplayError(f"{where}: 'position' must be an integer >= 0")
    return record


def _finish_round(path: Path, records: list[tuple[int, dict]], num_generations: int | None) -> ReplayRound:
    step, first_line = records[0][1]["step"], records[0][0]
    where = f"{path} round {step} (lines {first_line}-{records[-1][0]})"
    if num_generations is not None:
        if len(records) % num_generations:
            raise ReplayError(f"{where}: {len(records)} completions is not a multiple of num_generations = "
                              f"{num_generations}")
        for start in range(0, len(records), num_generations):
            group = records[start:start + num_generations]
            if len({r["prompt"] for _, r in group}) != 1:
                found = len({r["prompt"] for _, r in group})
                raise ReplayError(f"{path}:{group[0][0]}: the {num_generations} completions from this line "
                                  f"on must share one prompt (a group); found {found}")
    for key in OPTIONAL:
        present = [key in r for _, r in records]
        if any(present) and not all(present):
            line = records[present.index(not present[0])][0]
            raise ReplayError(f"{path}:{line}: {key!r} must be on every record of round {step} or on none")
    permutation = None
    if "position" in records[0][1]:
        positions = [r["position"] for _, r in records]
        if sorted(positions) != list(range(len(records))):
            raise ReplayError(f"{where}: 'position' must number the round's {len(records)} completions "
                              f"0..{len(records) - 1}, each once")
        permutation = [0] * len(records)
        for row, position in enumerate(positions):
            permutation[position] = row
    return ReplayRound(step=step, prompts=[r["prompt"] for _, r in records],
                       completion_ids=[r["completion_ids"] for _, r in records],
                       prompt_ids=([r["prompt_ids"] for _, r in records] if "prompt_ids" in records[0][1]
                                   else None),
                       permutation=permutation)


def read_replay(path: str | Path, num_generations: int | None = None) -> list[ReplayRound]:
    """The rounds of a completions file, checked: steps 1, 2, ... in order with none missing, and (given
    ``num_generations``) each round made of whole groups of one prompt."""
    path = Path(path)
    if not path.is_file():
        raise ReplayError(f"{path}: no such completions file")
    rounds: list[ReplayRound] = []
    current: list[tuple[int, dict]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = _record(line, f"{path}:{number}")
            if current and record["step"] != current[0][1]["step"]:
                rounds.append(_finish_round(path, current, num_generations))
                current = []
            expected = current[0][1]["step"] if current else (rounds[-1].step + 1 if rounds else 1)
            if record["step"] != expected:
                raise ReplayError(f"{path}:{number}: step {record['step']} where step {expected} was "
                                  f"expected (rounds are numbered 1, 2, ... in order, each one's completions "
                                  f"together)")
            current.append((number, record))
    if current:
        rounds.append(_finish_round(path, current, num_generations))
    if not rounds:
        raise ReplayError(f"{path}: no completions")
    return rounds


class ReplayWriter:
    """Appends rounds to a completions file as they are generated (``with ReplayWriter(path) as w:``)."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self._handle: IO[str] | None = self.path.open("a" if append else "w", encoding="utf-8")

    def write_round(self, step: int, prompts: list[str], completion_ids: list[list[int]],
                    prompt_ids: list[list[int]] | None = None, permutation: list[int] | None = None) -> None:
        """One round, rows in generation order; ``permutation`` (training row k = round row
        permutation[k]) is written as each row's ``position``."""
        if len(prompts) != len(completion_ids):
            raise ValueError(f"{len(prompts)} prompts for {len(completion_ids)} completions")
        position = None
        if permutation is not None:
            position = [0] * len(permutation)
            for k, row in enumerate(permutation):
                position[row] = k
        for i, (prompt, ids) in enumerate(zip(prompts, completion_ids)):
            record = {"step": step, "prompt": prompt, "completion_ids": [int(t) for t in ids]}
            if prompt_ids is not None:
                record["prompt_ids"] = [int(t) for t in prompt_ids[i]]
            if position is not None:
                record["position"] = position[i]
            self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_replay(path: str | Path, rounds: list[ReplayRound]) -> None:
    """Write whole rounds (e.g. ones read back) as a completions file."""
    with ReplayWriter(path) as writer:
        for r in rounds:
            writer.write_round(r.step, r.prompts, r.completion_ids, r.prompt_ids, r.permutation)
