"""The RL stage's step source: generation rounds -> the windows of micro-batches ``loop.train`` runs.

One round (``RoundMaker.make``), when its first micro-step comes:

    the prompt sampler's next batch (this rank's prompts, each ``num_generations`` times)
    -> completions: sampled from the current policy (eval mode, no gradients, the stage's own
       ``torch.Generator``), or read from a completions file (replay)
    -> rewards of this rank's completions (``RewardSet``), with the prompts' other columns
    -> the round's training order: one ``randperm`` drawn from the same generator after the sampling
       draws (TRL draws it from its one global stream after sampling), or the file's ``position``s
    -> every rank gathers the whole round -> ``round.prepare_round``: old / reference log-probs,
       advantages, this rank's micro-batches, the round's metrics

The order (``RoundSource``), TRL's ``_prepare_inputs``: micro-step s trains on micro-batch
``s % steps_per_generation`` of the current round, a round serves ``steps_per_generation x
num_iterations`` micro-steps, optimizer step k runs micro-steps k*grad_accum .. (k+1)*grad_accum - 1.
The loop must not prefetch (``prefetch = False``): the next window is built only when the loop asks
for it, after the previous step's update, so a round is sampled and scored with the weights of its
moment. ``step_done`` returns the metrics of the rounds the step built (averaged), logged with it.

Resume. The source is what the checkpoint saves of the data position (``Stage.sampler``): the prompt
sampler's position, the generator's state and the micro-steps done, and, when a checkpoint falls
inside a round (``num_iterations`` or ``steps_per_generation`` above ``grad_accum``), that round's
micro-batches themselves (ids, masks, advantages, old and reference log-probs: kilobytes). Sampling
the round again would need the weights that sampled it, which the updates since have changed; so a
resumed run continues the very round, and a SIGKILLed run resumed is bit-identical on CPU (TRL
instead samples a new round after a resume: its buffer is not saved).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..distributed import SINGLE_PROCESS, Distributed
from ..errors import InputError
from ..runtime import to_device
from .advantages import weighted_rewards
from .generation import SamplingSettings, decode_completions, generate_completions
from .prompts import PromptSampler, PromptSet
from .replay import ReplayError, ReplayRound
from .rewards import RewardSet
from .round import RoundSettings, prepare_round

COMPLETIONS_FILE = "completions.jsonl"


@dataclass
class Round:
    """One round's micro-batches (this rank's, in training order) and what is logged about it."""

    micro_batches: list[dict]
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)  # the whole round, for completions.jsonl (rank 0)


class RoundMaker:
    """Samples (or replays), scores and lays out one generation round. ``lm`` samples (the unwrapped
    ``CausalLM``), ``scorer`` / ``reference`` give old and reference log-probs (``CompletionLogProbs``)."""

    def __init__(self, lm, scorer, reference, settings: RoundSettings, sampling: SamplingSettings,
                 prompts: PromptSet, sampler: PromptSampler, rewards: RewardSet, tokenizer,
                 eos_ids: list[int], generator: torch.Generator, replay: list[ReplayRound] | None = None,
                 replay_path: str = "", generation_rows: int = 0, dist: Distributed = SINGLE_PROCESS,
                 device: torch.device | None = None, autocast=None):
        self.lm, self.scorer, self.reference = lm, scorer, reference
        self.settings, self.sampling = settings, sampling
        self.prompts, self.sampler, self.rewards, self.tokenizer = prompts, sampler, rewards, tokenizer
        self.eos_ids, self.pad_id = list(eos_ids), tokenizer.pad_id
        self.stop_ids = set(self.eos_ids) | {self.pad_id}
        self.generator, self.replay, self.replay_path = generator, replay, replay_path
        self.generation_rows, self.dist, self.autocast = generation_rows, dist, autocast
        self.device = device or torch.device("cpu")

    def make(self, index: int, step: int) -> Round:
        """Round ``index`` (0-based), sampled at optimizer step ``step`` (the steps done)."""
        clock = time.perf_counter
        start = clock()
        rows = self.prompts.select(self.sampler.next_batch())
        if self.replay is not None:
            completion_ids = self.replayed(index, rows)
        else:
            completion_ids = generate_completions(self.lm, rows.prompt_ids, self.sampling, self.eos_ids,
                                                  self.pad_id, self.generator,
                                                  self.generation_rows or None).completion_ids
        generated = clock()
        texts = decode_completions(self.tokenizer, completion_ids)
        scores = self.rewards.score(rows.prompts, texts, completion_ids, rows.columns, step=step)
        scored = clock()
        n_round = len(completion_ids) * self.dist.world_size
        permutation = self.permutation(index, n_round)
        parts = self.dist.gather((rows.prompt_ids, completion_ids, scores.per_function, rows.prompts, texts,
                                  permutation))
        prompt_ids, completion_ids, per_function, prompts, texts = (
            [x for part in parts for x in part[i]] for i in range(5))
        per_function = torch.stack(per_function)
        prepared = prepare_round(self.settings, self.scorer, self.reference, prompt_ids, completion_ids,
                                 per_function, scores.weights, scores.names, self.pad_id, self.stop_ids,
                                 parts[0][5], self.device, self.dist.rank, self.dist.world_size,
                                 self.autocast)
        metrics = {**prepared.metrics, "generate_time": generated - start, "reward_time": scored - generated,
                   "reference_time": clock() - scored}
        metrics.update({name: statistics.fmean(values) for name, values in scores.extra_metrics.items()})
        samples = []
        if self.dist.is_main:
            weighted = weighted_rewards(per_function, scores.weights)  # NaN: no reward applied
            for i, (prompt, text) in enumerate(zip(prompts, texts)):
                samples.append({"prompt": prompt, "completion": text,
                                **{name: _number(per_function[i, j]) for j, name in enumerate(scores.names)},
                                "reward": _number(weighted[i]), "advantage": _number(prepared.advantages[i])})
        return Round(prepared.micro_batches, metrics, samples)

    def permutation(self, index: int, n: int) -> list[int]:
        """The round's training order: the completions file's, or one ``randperm`` of the generator."""
        if self.replay is not None and self.replay[index].permutation is not None:
            return list(self.replay[index].permutation)
        return torch.randperm(n, generator=self.generator, device=self.generator.device).tolist()

    def replayed(self, index: int, rows: PromptSet) -> list[list[int]]:
        """This rank's completions of round ``index`` of the completions file, checked against the prompts
        the sampler drew (the same prompts, seed and generation batch as the recorded run)."""
        where = f"{self.replay_path} round {index + 1}"
        if index >= len(self.replay):
            raise ReplayError(f"{where}: the file has {len(self.replay)} rounds; the run needs more — "
                              f"record more rounds or lower train.max_steps")
        recorded = self.replay[index]
        n_round = len(rows) * self.dist.world_size
        if len(recorded) != n_round:
            raise ReplayError(f"{where}: {len(recorded)} completions, but a round of this run has {n_round} "
                              f"(rl.generation_batch_size): replay with the settings it was recorded with")
        mine = slice(self.dist.rank * len(rows), (self.dist.rank + 1) * len(rows))
        for i, (text, drawn, ids) in enumerate(zip(recorded.prompts[mine], rows.prompts,
                                                  recorded.completion_ids[mine]), start=mine.start):
            if text != drawn:
                raise ReplayError(f"{where}, completion {i + 1}: prompt {text[:60]!r} is not the prompt this "
                                  f"run drew ({drawn[:60]!r}) — replay with the prompts, train.seed, "
                                  f"rl.shuffle_dataset and generation batch the completions were recorded "
                                  f"with")
            if len(ids) > self.sampling.max_completion_length:
                raise ReplayError(f"{where}, completion {i + 1}: {len(ids)} tokens, more than "
                                  f"rl.max_completion_length = {self.sampling.max_completion_length}")
            if max(ids) >= self.lm.config.vocab_size:
                raise ReplayError(f"{where}, completion {i + 1}: token id {max(ids)} is outside the model's "
                                  f"{self.lm.config.vocab_size} ids")
        if recorded.prompt_ids is not None and recorded.prompt_ids[mine] != rows.prompt_ids:
            raise ReplayError(f"{where}: its prompt_ids are not this tokenizer's ids of its prompts — "
                              f"replay with the tokenizer the completions were recorded with")
        return [list(ids) for ids in recorded.completion_ids[mine]]

    def state_dict(self) -> dict[str, Any]:
        return {"prompt_sampler": self.sampler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["prompt_sampler"])
        self.generator.set_state(state["generator"])


def _number(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if value != value else value  # NaN (a reward that did not apply) -> null


class CompletionsLog:
    """``completions.jsonl`` (rank 0): the latest round's prompts, completions, rewards and advantages,
    one JSON line each with the optimizer step, every ``log_every`` steps (TRL's ``log_completions``).
    The first write of a process drops lines past the step it started at (a resumed run redoes them)."""

    def __init__(self, path: Path, log_every: int, enabled: bool):
        self.path, self.log_every, self.enabled = path, log_every, enabled
        self.kept_up_to: int | None = None

    def start(self, step: int) -> None:
        if self.kept_up_to is None:
            self.kept_up_to = step

    def write(self, step: int, samples: list[dict]) -> None:
        if not (self.enabled and samples and step % self.log_every == 0):
            return
        if self.kept_up_to is not None:
            kept = [line for line in self._lines() if json.loads(line).get("step", 0) <= self.kept_up_to]
            self.path.write_text("".join(kept), encoding="utf-8")
            self.kept_up_to = None
        with self.path.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in samples)

    def _lines(self) -> list[str]:
        if not self.path.exists():
            return []
        lines = []
        for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed mid-write
                continue
            lines.append(line if line.endswith("\n") else line + "\n")
        return lines


class RoundSource:
    """``loop.train``'s step source for the RL stage (``loop.LoaderSteps``' two methods) and what the
    checkpoint saves of its position (``state_dict`` / ``load_state_dict``, ``epoch``, ``consumed``)."""

    prefetch = False  # loop.train: build a window only when its step comes (see the module docstring)

    def __init__(self, maker: RoundMaker, steps_per_generation: int, num_iterations: int, grad_accum: int,
                 device: torch.device, log: CompletionsLog | None = None):
        self.maker, self.spg, self.mu = maker, steps_per_generation, num_iterations
        self.grad_accum = grad_accum
        self.device, self.log = device, log
        self.micro_step = 0  # micro-steps trained, in finished optimizer steps
        self.rounds_made = 0
        self.round_start = 0  # the micro-step the current round began at
        self.micro_batches: list[dict] | None = None  # the current round's (this rank's)
        self.pending: list[Round] = []  # rounds made for the window being trained

    @property
    def epoch(self) -> int:
        return self.maker.sampler.epoch

    @property
    def consumed(self) -> int:
        return self.micro_step

    def _layout(self) -> list[int]:
        return [self.spg, self.mu, self.grad_accum]

    def __iter__(self) -> Iterator[list[dict]]:
        if self.log is not None:
            self.log.start(self.micro_step // self.grad_accum)
        while True:
            window = []
            for s in range(self.micro_step, self.micro_step + self.grad_accum):
                if self.micro_batches is None or s >= self.round_start + self.spg * self.mu:
                    made = self.maker.make(self.rounds_made, step=self.micro_step // self.grad_accum)
                    self.micro_batches, self.round_start = made.micro_batches, s
                    self.rounds_made += 1
                    self.pending.append(made)
                window.append(self.micro_batches[(s - self.round_start) % self.spg])
            yield to_device(window, self.device)

    def step_done(self, window: list[dict]) -> dict[str, Any]:
        """The window was trained: move the position; the metrics of the rounds it made (their mean)."""
        self.micro_step += len(window)
        made, self.pending = self.pending, []
        sampler = self.maker.sampler
        out: dict[str, Any] = {"epoch": sampler.epoch + sampler.position / max(1, len(sampler))}
        for key in dict.fromkeys(k for r in made for k in r.metrics):
            values = [r.metrics[key] for r in made if key in r.metrics and r.metrics[key] == r.metrics[key]]
            out[key] = statistics.fmean(values) if values else None  # TRL's mean, NaNs left out
        if made and self.log is not None:
            self.log.write(self.micro_step // self.grad_accum, made[-1].samples)
        return out

    def state_dict(self) -> dict[str, Any]:
        mid_round = self.micro_batches is not None and self.micro_step < self.round_start + self.spg * self.mu
        return {"kind": type(self).__name__, "micro_step": self.micro_step, "rounds_made": self.rounds_made,
                "round_start": self.round_start, "layout": self._layout(),
                "micro_batches": self.micro_batches if mid_round else None, "maker": self.maker.state_dict()}

    def load_state_dict(self, state: dict[str, Any], allow_changes: bool = False) -> None:
        if state.get("kind") != type(self).__name__:
            raise InputError(f"the checkpoint's data position is a {state.get('kind', 'batch sampler')}, not "
                             f"an RL stage's: resume it with the command that wrote it")
        self.maker.load_state_dict(state["maker"])
        self.micro_step, self.rounds_made = int(state["micro_step"]), int(state["rounds_made"])
        self.round_start, self.micro_batches = int(state["round_start"]), state["micro_batches"]
        if self.micro_batches is not None and list(state["layout"]) != self._layout():
            if not allow_changes:
                raise InputError(f"the checkpoint is inside a round laid out as [steps_per_generation, "
                                 f"num_iterations, grad_accum] = {state['layout']}, this run has "
                                 f"{self._layout()}: resume with those settings")
            self.micro_batches = None  # the rest of that round is dropped: a new round starts
