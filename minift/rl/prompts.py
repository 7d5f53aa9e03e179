"""Prompts for the RL stage, and the order they are drawn in.

The stages, each a function or class:

    tweet_prompts        [data] rows -> prompt = the template's prompt part (``"{text} sentiment:"``),
                         ``label`` = the gold label word (a column the reward functions receive), ``row``
    load_prompt_dataset  a TRL-format prompt dataset: hub id, local JSONL/Parquet file, glob or folder
                         (``train.jsonl`` ...); a string ``prompt`` column, any other columns
    tokenize_prompts     prompt ids; prompts that leave no room for ``max_completion_length`` new tokens
                         within the model's positions are DROPPED AND COUNTED (the report says how many
                         and which rows), as the preference pairs drop a prompt that fills max_length.
                         TRL 1.16 has no prompt truncation (it removed ``max_prompt_length``): such a
                         prompt would fail inside ``generate``. Cutting a prompt would change the task,
                         so minift does not. A set left empty is refused.
    PromptSampler        TRL's ``RepeatSampler`` order: each epoch a seeded permutation cut into
                         generation batches of ``prompts_per_generation`` prompts (an incomplete last one
                         is left out), every prompt repeated ``num_generations`` times in a row; under
                         torchrun each rank takes a contiguous slice of whole groups

Every column but ``prompt`` reaches the reward functions as a keyword list (TRL passes the dataset's
other columns the same way).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch

from ..data import DataError, clean_split, format_prompt, load_splits
from ..errors import InputError

PROMPT_COLUMN = "prompt"
LABEL_COLUMN = "label"  # the gold label of a tweet prompt, read by the ``label_match`` reward
SAMPLER_SETTINGS = ("seed", "shuffle", "n_prompts", "num_generations", "prompts_per_generation", "world_size")


# -- sources -------------------------------------------------------------------------------------------
def tweet_prompts(split: datasets.Dataset, name: str, template: str, labels: Sequence[str],
                  text_column: str = "text", label_column: str = "label_text") -> datasets.Dataset:
    """Prompts from labelled texts: ``prompt`` = the template up to ``{label}`` (``"{text} sentiment:"``),
    ``label`` = the gold label, ``row`` = the source row. Empty texts are skipped as ``minift train``
    skips them; a label outside ``labels`` is an error naming the row."""
    cleaned, _ = clean_split(split, name, text_column, label_column, tuple(labels))
    columns = cleaned.select_columns([text_column, label_column, "row"]).to_dict()
    return datasets.Dataset.from_dict({
        PROMPT_COLUMN: [format_prompt(text, template) for text in columns[text_column]],
        LABEL_COLUMN: columns[label_column],
        "row": columns["row"],
    })


def load_prompt_dataset(source: str, split: str = "train", seed: int = 0) -> datasets.Dataset:
    """One split of a TRL-format prompt dataset (``prompt`` column of plain text; other columns kept
    for the reward functions) from a hub id, a local folder (``train.jsonl`` / ``train.parquet`` ...),
    file or glob (a single file or glob is the ``train`` split)."""
    splits = load_splits(source, seed=seed)
    if split not in splits:
        raise DataError(f"{source}: no {split!r} split of prompts (found {sorted(splits)})")
    return checked_prompt_split(splits[split], source, split)


def checked_prompt_split(dataset: datasets.Dataset, source: str, split: str) -> datasets.Dataset:
    """``dataset`` when it is a prompt-only split (a ``prompt`` column of plain text), else one line
    why not."""
    if PROMPT_COLUMN not in dataset.column_names:
        raise DataError(f"{source}: split {split!r} has no {PROMPT_COLUMN!r} column (TRL's prompt-only "
                        f"format); columns are {dataset.column_names}")
    for row, prompt in enumerate(dataset[PROMPT_COLUMN]):
        if not isinstance(prompt, str):
            raise DataError(f"{source}: split {split!r} row {row}: 'prompt' must be plain text, got "
                            f"{type(prompt).__name__} (conversational prompts are not supported)")
    return dataset


# -- tokenization --------------------------------------------------------------------------------------
@dataclass
class PromptReport:
    """What tokenizing did to one set of prompts (printed at the start of a run)."""

    split: str
    rows_read: int = 0
    prompts: int = 0
    max_prompt_tokens: int = 0
    dropped_rows: list[int] = field(default_factory=list)  # too long for the model's positions, or empty
    longest: int = 0

    def line(self) -> str:
        shown = ", ".join(str(r) for r in self.dropped_rows[:5])
        more = "..." if len(self.dropped_rows) > 5 else ""
        dropped = f" (rows {shown}{more})" if self.dropped_rows else ""
        return (f"{self.split}: {self.rows_read} prompts read, {self.prompts} kept (longest {self.longest} "
                f"tokens), {len(self.dropped_rows)} dropped{dropped}: no tokens, or more than "
                f"{self.max_prompt_tokens} (the model's positions minus max_completion_length)")


@dataclass
class PromptSet:
    """Tokenized prompts with their text and the other columns (python lists, one entry per prompt)."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    columns: dict[str, list[Any]]  # every column but "prompt": passed to the reward functions

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, indices: Sequence[int]) -> PromptSet:
        """The prompts at ``indices`` (repeats allowed: a generation batch), columns alike."""
        return PromptSet([self.prompts[i] for i in indices], [self.prompt_ids[i] for i in indices],
                         {name: [values[i] for i in indices] for name, values in self.columns.items()})


def max_prompt_tokens(n_positions: int, max_completion_length: int) -> int:
    """The longest prompt that leaves room for ``max_completion_length`` new tokens."""
    room = n_positions - max_completion_length
    if room < 1:
        raise InputError(f"max_completion_length {max_completion_length} leaves no room for a prompt in the "
                         f"model's {n_positions} positions; lower it below {n_positions}")
    return room


def tokenize_prompts(dataset: datasets.Dataset, tokenizer, max_tokens: int, name: str = "train"
                     ) -> tuple[PromptSet, PromptReport]:
    """Encode every ``prompt`` (no special tokens added, as minift's tokenizer and TRL's
    ``processing_class(text=prompts)`` for GPT-1/GPT-2); prompts with no tokens or more than
    ``max_tokens`` are dropped and counted."""
    report = PromptReport(name, rows_read=len(dataset), max_prompt_tokens=max_tokens)
    rows = dataset.to_dict()
    texts = rows.pop(PROMPT_COLUMN)
    keep, encoded = [], tokenizer.encode_batch(texts)
    for row, ids in enumerate(encoded):
        if 0 < len(ids) <= max_tokens:
            keep.append(row)
        else:
            report.dropped_rows.append(row)
    if not keep:
        raise DataError(f"split {name!r}: no prompt left ({report.line()})")
    prompts = PromptSet([texts[i] for i in keep], [encoded[i] for i in keep],
                        {column: [values[i] for i in keep] for column, values in rows.items()})
    report.prompts, report.longest = len(prompts), max(map(len, prompts.prompt_ids))
    return prompts, report


# -- the order of prompts ------------------------------------------------------------------------------
def prompts_per_generation(generation_batch_size: int, num_generations: int) -> int:
    """Distinct prompts in a generation batch of ``generation_batch_size`` completions (TRL's name: all
    processes together), refusing a batch that does not hold whole groups."""
    if num_generations < 2:
        raise InputError(f"num_generations must be >= 2 (a group needs a baseline), got {num_generations}")
    if generation_batch_size < num_generations or generation_batch_size % num_generations:
        raise InputError(f"generation_batch_size {generation_batch_size} is not a multiple of "
                         f"num_generations {num_generations}: a generation batch holds whole groups of "
                         f"completions")
    return generation_batch_size // num_generations


class PromptSampler:
    """Which prompts each generation round samples completions for, reproducibly and resumably.

    Epoch ``e`` is the (e+1)-th ``randperm(n)`` of one ``torch.Generator`` seeded ``seed`` (TRL's
    ``RepeatSampler`` keeps one generator across epochs) or dataset order without ``shuffle``; it is
    cut into generation batches of ``prompts_per_generation`` distinct prompts, an incomplete last one
    left out. ``next_batch()`` returns this rank's prompt indices of the next batch, each repeated
    ``num_generations`` times in a row (a group), and moves on (to the next epoch after the last).
    Under torchrun the global batch is cut into ``world_size`` contiguous slices of whole groups.
    The state is ``{"epoch", "position"}`` (batches of the epoch already returned)."""

    def __init__(self, n_prompts: int, num_generations: int, prompts_per_generation: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if num_generations < 2:
            raise InputError(f"num_generations must be >= 2 (a group needs a baseline), "
                             f"got {num_generations}")
        if prompts_per_generation < 1:
            raise InputError(f"a generation batch needs at least one prompt, got {prompts_per_generation}")
        if prompts_per_generation % world_size:
            raise InputError(f"{prompts_per_generation} prompts per generation batch cannot be split into "
                             f"whole groups over {world_size} processes: make it a multiple of {world_size}")
        if n_prompts < prompts_per_generation:
            raise InputError(f"{n_prompts} prompts cannot fill one generation batch of "
                             f"{prompts_per_generation}")
        self.n_prompts = n_prompts
        self.num_generations = num_generations
        self.prompts_per_generation = prompts_per_generation
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0
        self._cached: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """Generation batches per epoch."""
        return self.n_prompts // self.prompts_per_generation

    def order(self, epoch: int) -> list[int]:
        """All prompt indices of ``epoch`` in the order they are drawn."""
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed)
                for _ in range(epoch):  # the earlier epochs' permutations come from the same generator
                    torch.randperm(self.n_prompts, generator=generator)
                order = torch.randperm(self.n_prompts, generator=generator).tolist()
            else:
                order = list(range(self.n_prompts))
            self._cached = (epoch, order)
        return self._cached[1]

    def global_batch(self, epoch: int, position: int) -> list[int]:
        """The distinct prompts of batch ``position`` of ``epoch`` (all ranks)."""
        start = position * self.prompts_per_generation
        return self.order(epoch)[start:start + self.prompts_per_generation]

    def next_batch(self) -> list[int]:
        """This rank's prompt indices for the next generation round, each ``num_generations`` times."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        prompts = self.global_batch(self.epoch, self.position)
        self.position += 1
        per_rank = len(prompts) // self.world_size
        mine = prompts[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [i for i in mine for _ in range(self.num_generations)]

    def state_dict(self) -> dict:
        return {"kind": type(self).__name__, "epoch": self.epoch, "position": self.position,
                **{key: getattr(self, key) for key in SAMPLER_SETTINGS}}

    def load_state_dict(self, state: dict) -> None:
        for key in SAMPLER_SETTINGS:
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise InputError(f"prompt sampler state has {key}={state.get(key)!r} but this run has "
                                 f"{getattr(self, key)!r}: resume with the same prompts and generation "
                                 f"settings")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
