"""The training loop. One function, read top to bottom:

    for each optimizer step:
        take up to K micro-batches of the current epoch
        count the loss targets of all K            (before any backward; summed over ranks)
        for each micro-batch: autocast forward -> summed loss -> backward of (sum / total count)
        unscale (fp16) -> clip -> optimizer step -> scheduler step -> zero grads
        hooks: log; maybe evaluate; maybe checkpoint

Dividing every micro-batch's summed loss by the window's total count makes K micro-batches of
b sequences give the gradient of one batch of K*b, whatever their lengths.

The step's maths lives here; what the recipe does between steps (logging, evaluation,
checkpoints, stopping on a signal) comes in as ``Hooks``, plain functions called at fixed
points. The loss is an object (``NextTokenLoss`` by default) so another objective — DPO, a
reward model — reuses this loop, and with it accumulation, AMP, clipping, resume and DDP.

Trainer's ``_inner_training_loop`` does the same; docs/trainer-map.md maps each line.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from .collate import count_loss_targets, model_inputs
from .distributed import SINGLE_PROCESS, Distributed
from .errors import RunFailure
from .precision import Precision
from .runtime import device_sync


class NonFiniteLoss(RunFailure):
    pass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    skipped_nonfinite: int = 0  # steps dropped because the loss was NaN/inf (on_nonfinite="skip")
    skipped_overflow: int = 0  # fp16 steps the GradScaler skipped (inf/nan gradients)
    real_tokens: int = 0
    padded_tokens: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class NextTokenLoss:
    """The fine-tuning objective: summed next-token cross-entropy of a micro-batch, and the
    count it is divided by over the whole step (``count_key`` of the collator's counts:
    ``n_loss_targets``, the next-token targets, or ``n_label_tokens``, Trainer's GPT-1 count)."""

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
        raise NonFiniteLoss(f"{state.skipped_nonfinite} of {state.step} optimizer steps were skipped for a NaN/inf "
                            f"loss (train.on_nonfinite = \"skip\") — lower train.lr, use train.precision = \"fp32\", "
                            f"or check the data; the outputs are kept for inspection")


@dataclass
class Hooks:
    """What the recipe does at fixed points of the loop. Each is a plain function; none can
    change the step's maths. ``log`` gets one record per optimizer step; ``evaluate`` and
    ``checkpoint`` run every ``eval_every`` / ``checkpoint_every`` steps (0 = never here);
    ``should_stop`` is asked before each step; ``on_nonfinite`` is called when a step's loss is
    NaN/inf: raise to stop, return to drop that step's gradients and go on."""

    log: Callable[[dict], None] = lambda record: None
    evaluate: Callable[[TrainState], Any] | None = None
    eval_every: int = 0
    checkpoint: Callable[[TrainState], Any] | None = None
    checkpoint_every: int = 0
    should_stop: Callable[[], bool] = lambda: False
    on_nonfinite: Callable[[TrainState, float], None] = stop_on_nonfinite


class StepTimer:
    """Wall-clock seconds per phase of a step. ``sync`` waits for the device at each phase
    boundary, so asynchronous CUDA kernels are charged to the phase that launched them."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[phase] += time.perf_counter() - start

    def record(self) -> dict[str, float]:
        out = {f"{phase}_time": s for phase, s in self.seconds.items()}
        out["step_time"] = sum(self.seconds.values())
        self.seconds.clear()
        return out


def micro_batch_windows(loader, grad_accum: int) -> Iterator[list[dict]]:
    """Windows of up to ``grad_accum`` micro-batches; a window never spans two epochs (the last
    step of an epoch may have fewer micro-batches, as in Trainer). minift's samplers start at
    their ``consumed`` position, so a resumed run continues on the next unseen batch."""
    sampler = loader.batch_sampler
    while True:
        window: list[dict] = []
        for batch in loader:
            window.append(batch)
            if len(window) == grad_accum:
                yield window
                window = []
        if window:
            yield window
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(sampler.epoch + 1)


def train(model, optimizer, scheduler, loader, *, total_steps: int, grad_accum: int = 1,
          max_grad_norm: float = 1.0, precision: Precision | None = None, loss: NextTokenLoss | None = None,
          dist: Distributed = SINGLE_PROCESS, state: TrainState | None = None, hooks: Hooks | None = None
          ) -> TrainState:
    """Run optimizer steps until ``state.step == total_steps`` (or ``hooks.should_stop()``).

    ``loader``: a DataLoader over minift's batch sampler (its ``consumed`` position moves once a
    step is complete; any DataLoader of batches with ``input_ids``/``labels`` works too).
    ``model`` may be DDP-wrapped: ``dist.no_sync`` skips the all-reduce of all but the last
    micro-batch, and DDP's averaging over ranks is undone by scaling the loss by the world size.
    ``precision``: fp32 when None; its scaler unscales before clipping and skips fp16 overflows.
    """
    precision = precision or Precision("fp32", next(model.parameters()).device)
    loss_fn = loss or NextTokenLoss()
    state = state or TrainState()
    hooks = hooks or Hooks()
    scaler = precision.scaler
    device = precision.device
    sampler = loader.batch_sampler
    params = [p for p in model.parameters() if p.requires_grad]
    windows = micro_batch_windows(loader, grad_accum)
    timer = StepTimer(device_sync(device))
    model.train()
    while state.step < total_steps and not hooks.should_stop():
        with timer("data"):
            window = next(windows)

        # 1. the denominator: the count of the whole window, on every rank
        n_counted = int(dist.reduce_sum(torch.tensor(sum(loss_fn.count(b) for b in window), device=device)))
        denominator = max(n_counted, 1) / dist.world_size  # DDP divides the summed gradients by world_size

        # 2. K micro-batches: forward, summed loss, backward of its share of the mean
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(window):
            with dist.no_sync(model, last_micro_batch=i == len(window) - 1):
                with timer("forward"), precision.autocast():
                    out = loss_fn(model, batch, device)
                with timer("backward"):
                    scaler.scale(out.loss_sum / denominator).backward()
            loss_sum += out.loss_sum.detach().double()
            for name, value in getattr(out, "metric_sums", {}).items():
                metric_sums[name] = metric_sums.get(name, 0) + value.detach().double()

        # 3. the step's mean loss over all ranks; non-finite: the hook stops or drops the step
        with timer("optimizer"):
            real = sum(b["n_real_tokens"] for b in window if "n_real_tokens" in b)
            padded = sum(b["n_padded_tokens"] if "n_padded_tokens" in b else b["input_ids"].numel() for b in window)
            sums = dist.reduce_sum(torch.stack([loss_sum, torch.tensor(float(real), dtype=torch.float64, device=device),
                                                torch.tensor(float(padded), dtype=torch.float64, device=device),
                                                *metric_sums.values()]))
            loss_value = float(sums[0]) / max(n_counted, 1)  # mean loss per counted unit, all ranks
            real, padded = int(sums[1]), int(sums[2])
            finite = math.isfinite(loss_value)
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                hooks.on_nonfinite(state, loss_value)
                state.skipped_nonfinite += 1

            # 4. unscale (fp16) -> clip -> step -> schedule -> zero grads
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
            lr = optimizer.param_groups[0]["lr"]
            scale_before = scaler.get_scale()
            if finite:
                scaler.step(optimizer)
            scaler.update()
            overflow = scaler.is_enabled() and scaler.get_scale() < scale_before
            if overflow:
                state.skipped_overflow += 1
            else:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        # 5. bookkeeping: the sampler position moves only once the step is complete
        if hasattr(sampler, "consumed"):
            sampler.consumed += len(window)
        state.step += 1
        state.real_tokens += real
        state.padded_tokens += padded
        epoch = sampler.epoch + sampler.consumed / max(1, len(sampler)) if hasattr(sampler, "consumed") else None
        metrics = {name: float(total) / max(n_counted, 1) for name, total in zip(metric_sums, sums[3:])}
        hooks.log({"step": state.step, "epoch": epoch, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                   **metrics, "real_tokens": real, "padded_tokens": padded, "loss_tokens": n_counted,
                   "sequences": sum(b["input_ids"].shape[0] for b in window), "micro_batches": len(window),
                   **timer.record(), "overflow": overflow})
        if hooks.evaluate is not None and hooks.eval_every and state.step % hooks.eval_every == 0 \
                and state.step < total_steps:
            hooks.evaluate(state)
        if hooks.checkpoint is not None and hooks.checkpoint_every and state.step % hooks.checkpoint_every == 0:
            hooks.checkpoint(state)
    return state
