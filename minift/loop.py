"""The training loop. One function, read top to bottom:

    for each optimizer step:
        take up to K micro-batches of the current epoch
        count the loss targets of all K            (before any backward; summed over ranks)
        for each micro-batch: autocast forward -> summed loss -> backward of (sum / total count)
        unscale (fp16) -> clip -> optimizer step -> scheduler step -> zero grads   (optim.guarded_step)
        hooks: log; maybe evaluate; at an epoch's end, on_epoch_end; maybe checkpoint

Dividing every micro-batch's summed loss by the window's total count makes K micro-batches of
b sequences give the gradient of one batch of K*b, whatever their lengths. Under DDP the count is
summed over ranks and ``dist.no_sync`` skips the all-reduce of all but the last micro-batch; DDP's
averaging over ranks is undone by dividing by count / world size.

The step's maths lives here; what a stage does between steps (logging, evaluation, checkpoints,
stopping on a signal) comes in as ``Hooks``, plain functions called at fixed points. The loss is an
object (``NextTokenLoss`` by default) so another objective — DPO, a reward model, a policy-gradient
update — reuses this loop, and with it accumulation, AMP, clipping, resume and DDP.

No host sync in a step that neither logs, evaluates nor checkpoints: the step's loss, grad norm and
counts stay on the device (``metrics.StepRecords``) and are read every ``hooks.log_every`` steps in
one transfer. A NaN/inf loss skips its update on the device (fused AdamW's ``found_inf``); the step
is reported (``hooks.on_nonfinite``: raise to stop) when it is read, up to ``log_every - 1`` steps
later. Optimizers without ``found_inf`` support, and fp16's GradScaler, check every step instead.

Trainer's ``_inner_training_loop`` does the same; docs/trainer-map.md maps each line.
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from .collate import count_loss_targets, model_inputs
from .distributed import SINGLE_PROCESS, Distributed
from .errors import RunFailure
from .metrics import StepRecords, StepTimer
from .optim import guarded_step
from .precision import Precision
from .runtime import prefetched


class NonFiniteLoss(RunFailure):
    pass


@dataclass
class TrainState:
    """The loop's counters. Saved in every checkpoint, so a resumed run continues them and its
    summary describes the whole run, not only the part after the resume."""

    step: int = 0  # optimizer steps done
    skipped_nonfinite: int = 0  # steps dropped because the loss was NaN/inf (on_nonfinite="skip")
    skipped_overflow: int = 0  # fp16 steps the GradScaler skipped (inf/nan gradients)
    real_tokens: int = 0
    padded_tokens: int = 0
    first_loss: float | None = None  # the loss of the run's first step
    last_loss: float | None = None  # the loss of the latest step
    timed: dict[str, float] = field(default_factory=dict)  # sums over the timed steps (metrics.add_timed)
    # the best model and early stopping (selection.ModelSelection): the best eval metric, its step, the
    # checkpoint written at that step, and the evaluations since the last improvement
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: int | None = None
    evals_without_improvement: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class NextTokenLoss:
    """The fine-tuning objective: summed next-token cross-entropy of a micro-batch, and the
    count it is divided by over the whole step (``count_key`` of the collator's counts:
    ``n_loss_targets``, the next-token targets, or ``n_label_tokens``, Trainer's count for GPT-1
    and GPT-2)."""

    count_key: str = "n_loss_targets"

    def count(self, batch: dict) -> int:
        """This micro-batch's share of the step's denominator (a Python int: no device sync)."""
        if self.count_key in batch:
            return batch[self.count_key]
        return count_loss_targets(batch, self.count_key)  # a batch from another collator

    def __call__(self, model, batch: dict, device: torch.device):
        """``LossOutput(loss_sum, n_loss_targets)`` of one micro-batch (``metric_sums`` optional)."""
        return model(**model_inputs(batch, device))


def skip_nonfinite(state: TrainState, loss_value: float) -> None:
    """``Hooks.on_nonfinite`` that drops the step's gradients and goes on (train.on_nonfinite = "skip")."""


def stop_on_nonfinite(state: TrainState, loss_value: float) -> None:
    raise NonFiniteLoss(f"loss is {loss_value} at optimizer step {state.step + 1}; stopping "
                        f"(set train.on_nonfinite = \"skip\" to drop such steps)")


def fail_if_mostly_skipped(state: TrainState) -> None:
    """Called once the run's outputs are written: a run that dropped more than half of its steps
    for a NaN/inf loss did not train, so it fails (exit 1) instead of reporting success."""
    if state.skipped_nonfinite * 2 > state.step:
        raise NonFiniteLoss(f"{state.skipped_nonfinite} of {state.step} optimizer steps were skipped for a "
                            f"NaN/inf loss (train.on_nonfinite = \"skip\") — lower train.lr, "
                            f"use train.precision = \"fp32\", or check the data; "
                            f"the outputs are kept for inspection")


@dataclass
class Hooks:
    """What the recipe does at fixed points of the loop. Each is a plain function; none can
    change the step's maths. ``log`` gets one record per optimizer step; ``evaluate`` and
    ``checkpoint`` run every ``eval_every`` / ``checkpoint_every`` steps (0 = never here) and,
    with ``eval_per_epoch`` / ``checkpoint_per_epoch``, after each epoch's last step (``due``);
    ``on_epoch_end`` runs after an epoch's last step, between them; ``should_stop`` is asked before
    each step; ``on_nonfinite`` is called when a step's loss is NaN/inf: raise to stop, return
    to go on (the step's update was dropped). The loop reads its device values every
    ``log_every`` steps and before each evaluation and checkpoint."""

    log: Callable[[dict], None] = lambda record: None
    evaluate: Callable[[TrainState], Any] | None = None
    eval_every: int = 0
    checkpoint: Callable[[TrainState], Any] | None = None
    checkpoint_every: int = 0
    should_stop: Callable[[], bool] = lambda: False
    on_nonfinite: Callable[[TrainState, float], None] = stop_on_nonfinite
    log_every: int = 1  # steps between reads of the device (the steps between are logged then, all of them)
    eval_per_epoch: bool = False
    checkpoint_per_epoch: bool = False
    on_epoch_end: Callable[[TrainState], Any] | None = None

    def due(self, step: int, total_steps: int, epoch_end: bool) -> tuple[bool, bool]:
        """(evaluate, checkpoint) after optimizer step ``step``, as Trainer's DefaultFlowCallback:
        every ``eval_every`` / ``checkpoint_every`` steps or at an epoch's end; an evaluating run also
        evaluates after its last step (Trainer's "epoch" strategy reaches it as a partial epoch's end)."""
        evaluates = bool(self.eval_every or self.eval_per_epoch)
        evaluate = self.evaluate is not None and evaluates and (
            step == total_steps or (self.eval_every and step % self.eval_every == 0)
            or (self.eval_per_epoch and epoch_end))
        checkpoint = self.checkpoint is not None and (
            (self.checkpoint_every and step % self.checkpoint_every == 0)
            or (self.checkpoint_per_epoch and epoch_end))
        return bool(evaluate), bool(checkpoint)

    def after_step(self, state: TrainState, evaluate: bool, checkpoint: bool, epoch_end: bool) -> None:
        """Evaluate, ``on_epoch_end``, then checkpoint: a checkpoint holds what its step's evaluation
        and epoch end decided."""
        if evaluate:
            self.evaluate(state)
        if epoch_end and self.on_epoch_end is not None:
            self.on_epoch_end(state)
        if checkpoint:
            self.checkpoint(state)


class LoaderSteps:
    """What one optimizer step consumes, from a DataLoader: windows of up to ``grad_accum``
    micro-batches. A window never spans two epochs (the last step of an epoch may have fewer
    micro-batches, as in Trainer). minift's samplers start at their ``consumed`` position; each
    window remembers where it ends, and ``step_done`` moves the sampler there once its step is
    complete, so a resumed run continues on the next unseen batch (also when the next window was
    fetched ahead, into the next epoch). ``step_done`` says whether the step ended an epoch. Any
    other step source (the RL stage's generation phase) has the same two methods: iterate windows,
    and ``step_done(window)`` returning numbers to log with the step (and ``epoch_end``)."""

    def __init__(self, loader, grad_accum: int):
        self.loader, self.grad_accum = loader, grad_accum
        self.sampler = loader.batch_sampler
        self.ends: deque[tuple[int, int]] = deque()  # (epoch, batches consumed) after each window fetched

    def __iter__(self) -> Iterator[list[dict]]:
        epoch, position = getattr(self.sampler, "epoch", 0), getattr(self.sampler, "consumed", 0)
        while True:
            window: list[dict] = []
            for batch in self.loader:
                window.append(batch)
                if len(window) == self.grad_accum:
                    self.ends.append((epoch, position := position + len(window)))
                    yield window
                    window = []
            if window:
                self.ends.append((epoch, position := position + len(window)))
                yield window
            epoch, position = epoch + 1, 0
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)

    def step_done(self, window: list[dict]) -> dict[str, Any]:
        epoch, position = self.ends.popleft()
        if not hasattr(self.sampler, "consumed"):
            return {"epoch": None}
        self.sampler.epoch, self.sampler.consumed = epoch, position
        epoch_length = max(1, len(self.sampler))
        return {"epoch": self.sampler.epoch + self.sampler.consumed / epoch_length,
                "epoch_end": self.sampler.consumed >= epoch_length}


def train(model, optimizer, scheduler, loader, *, total_steps: int, grad_accum: int = 1,
          max_grad_norm: float = 1.0, precision: Precision | None = None, loss: NextTokenLoss | None = None,
          dist: Distributed = SINGLE_PROCESS, state: TrainState | None = None, hooks: Hooks | None = None
          ) -> TrainState:
    """Run optimizer steps until ``state.step == total_steps`` (or ``hooks.should_stop()``).

    ``loader``: a DataLoader over minift's batch sampler (or of any batches with ``input_ids``), or a
    step source like ``LoaderSteps``. ``model`` may be DDP-wrapped (``dist``); ``precision`` is fp32
    when None. The device is read every ``hooks.log_every`` steps (module docstring)."""
    precision = precision or Precision("fp32", next(model.parameters()).device)
    loss_fn, state, hooks, device = (loss or NextTokenLoss(), state or TrainState(), hooks or Hooks(),
                                     precision.device)
    steps = loader if hasattr(loader, "step_done") else LoaderSteps(loader, grad_accum)
    windows = prefetched(iter(steps), device) if getattr(steps, "prefetch", True) else iter(steps)  # RL: lazy
    params = [p for p in model.parameters() if p.requires_grad]
    records, timer = StepRecords(hooks.log, hooks.on_nonfinite), StepTimer(device)
    model.train()
    while state.step < total_steps and not hooks.should_stop():
        # 1. the step's micro-batches, and its denominator: their count over all ranks
        with timer("data"):
            window = next(windows)
            n_counted = dist.sum_count(sum(loss_fn.count(b) for b in window), device)  # Python ints
            denominator = n_counted.clamp(min=1) / dist.world_size if dist.enabled else max(n_counted, 1)

        # 2. each micro-batch: forward, summed loss, backward of its share of the step's mean
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(window):
            with dist.no_sync(model, last_micro_batch=i == len(window) - 1):
                with timer("forward"), precision.autocast():
                    out = loss_fn(model, batch, device)
                with timer("backward"):
                    precision.scaler.scale(out.loss_sum / denominator).backward()
            loss_sum += out.loss_sum.detach().double()
            for name, value in getattr(out, "metric_sums", {}).items():
                metric_sums[name] = metric_sums.get(name, 0) + value.detach().double()

        # 3. the update, skipped when the step's loss (summed over ranks) is not finite
        with timer("optimizer"):
            sums, counts = step_totals(loss_sum, metric_sums, window, n_counted, dist)
            grad_norm, lr, overflow = guarded_step(optimizer, scheduler, precision.scaler, params,
                                                   max_grad_norm, nonfinite=~torch.isfinite(sums[0]))
        state.step += 1
        state.skipped_overflow += overflow
        position = steps.step_done(window)  # the data position moves now
        epoch_end = position.pop("epoch_end", False)
        host = {"lr": lr, "overflow": overflow, **position,
                "sequences": sum(b["input_ids"].shape[0] for b in window), "micro_batches": len(window)}
        records.add(state.step, torch.cat([sums, grad_norm.double().reshape(1)]), list(metric_sums), counts,
                    host, timer.take())

        # 4. hooks: read the pending steps back (one transfer) and log; maybe evaluate, checkpoint; epoch end
        evaluate_now, checkpoint_now = hooks.due(state.step, total_steps, epoch_end)
        if state.step % hooks.log_every == 0 or evaluate_now or checkpoint_now or state.step == total_steps:
            records.flush(state)
        hooks.after_step(state, evaluate_now, checkpoint_now, epoch_end)
    records.flush(state)
    return state


def step_totals(loss_sum: torch.Tensor, metric_sums: dict[str, torch.Tensor], window: list[dict], n_counted,
                dist: Distributed) -> tuple[torch.Tensor, list[int] | None]:
    """The step's sums on the device, [loss, metrics...], and its token counts [real, padded, counted]:
    Python ints in one process; under DDP summed over ranks and appended to the device sums (the
    counts only leave the host here)."""
    counts = [sum(b.get("n_real_tokens", 0) for b in window),
              sum(b.get("n_padded_tokens", b["input_ids"].numel()) for b in window), n_counted]
    sums = torch.cat([loss_sum[None], *(v.reshape(1) for v in metric_sums.values())])
    if not dist.enabled:
        return sums, counts
    host_counts = torch.tensor(counts[:2], dtype=torch.float64, device=sums.device)
    return torch.cat([dist.reduce_sum(torch.cat([sums, host_counts])), n_counted.reshape(1)]), None
