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
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from .collate import count_loss_targets, model_inputs
from .distributed import SINGLE_PROCESS, Distributed
from .errors import RunFailure
from .precision import Precision


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
    ``n_loss_targets``, the next-token targets, or ``n_label_tokens``, Trainer's count for GPT-1 and GPT-2)."""

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
    NaN/inf: raise to stop, return to go on (the step's update was dropped). The loop reads its
    device values every ``log_every`` steps and before each evaluation and checkpoint."""

    log: Callable[[dict], None] = lambda record: None
    evaluate: Callable[[TrainState], Any] | None = None
    eval_every: int = 0
    checkpoint: Callable[[TrainState], Any] | None = None
    checkpoint_every: int = 0
    should_stop: Callable[[], bool] = lambda: False
    on_nonfinite: Callable[[TrainState, float], None] = stop_on_nonfinite
    log_every: int = 1  # steps between reads of the device (the steps between are logged then, all of them)


class StepTimer:
    """Seconds per phase of a step, read without a device sync: on CUDA each phase boundary is a
    CUDA event (the GPU's own clock, read when the step is flushed), elsewhere the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any, Any]] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def __call__(self, phase: str):
        start = self._now()
        yield
        self.marks.append((phase, start, self._now()))

    def take(self) -> list[tuple[str, Any, Any]]:
        """This step's marks, to be read by ``seconds`` once the device has caught up."""
        marks, self.marks = self.marks, []
        return marks

    @staticmethod
    def seconds(marks) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for phase, start, end in marks:
            if isinstance(start, float):
                out[f"{phase}_time"] += end - start
            else:
                end.synchronize()
                out[f"{phase}_time"] += start.elapsed_time(end) / 1000
        out["step_time"] = sum(out.values())
        return dict(out)


def to_device(window: list[dict], device: torch.device) -> list[dict]:
    """The window's tensors on ``device`` (non-blocking from pinned memory); counts stay Python ints."""
    if device.type == "cpu":
        return window
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()} for b in window]


def prefetched(windows: Iterator[list[dict]], device: torch.device) -> Iterator[list[dict]]:
    """Windows moved to the device one step ahead: while step k runs, step k+1's batches are
    collated and copied on a side stream (CUDA), so the input pipeline is off the critical path."""
    if device.type != "cuda":
        yield from windows
        return
    copy_stream = torch.cuda.Stream(device)
    ahead = None
    for window in windows:
        with torch.cuda.stream(copy_stream):
            moved = to_device(window, device)
        if ahead is not None:
            yield ahead
        torch.cuda.current_stream(device).wait_stream(copy_stream)
        for batch in moved:  # the tensors are used on the compute stream: keep their memory until then
            for value in batch.values():
                if torch.is_tensor(value):
                    value.record_stream(torch.cuda.current_stream(device))
        ahead = moved
    if ahead is not None:
        yield ahead


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

    No host sync in a step that neither logs, evaluates nor checkpoints: the step's loss, grad norm
    and counts stay on the device and are read every ``hooks.log_every`` steps in one transfer.
    A NaN/inf loss skips its update on the device (fused AdamW's ``found_inf``); the step is reported
    (``hooks.on_nonfinite``: raise to stop) when it is read, up to ``log_every - 1`` steps later.
    Optimizers without ``found_inf`` support, and fp16's GradScaler, check every step instead.
    """
    precision = precision or Precision("fp32", next(model.parameters()).device)
    loss_fn = loss or NextTokenLoss()
    state = state or TrainState()
    hooks = hooks or Hooks()
    scaler, device = precision.scaler, precision.device
    sampler = loader.batch_sampler
    params = [p for p in model.parameters() if p.requires_grad]
    skip_on_device = not scaler.is_enabled() and getattr(optimizer, "_step_supports_amp_scaling", False)
    windows = prefetched(micro_batch_windows(loader, grad_accum), device)
    timer = StepTimer(device)
    pending: list[dict] = []  # steps run but not yet read back from the device
    model.train()
    while state.step < total_steps and not hooks.should_stop():
        with timer("data"):
            window = next(windows)
            # 1. the denominator: the count of the whole window, summed over ranks
            n_counted = sum(loss_fn.count(b) for b in window)  # Python ints from the collator
            if dist.enabled:
                n_counted = dist.reduce_sum(torch.tensor(n_counted, device=device, dtype=torch.float64))
            denominator = (n_counted.clamp(min=1) if dist.enabled else max(n_counted, 1)) / dist.world_size

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

        with timer("optimizer"):
            # 3. the step's summed loss over all ranks; a non-finite one skips the update
            counts = [sum(b.get("n_real_tokens", 0) for b in window),
                      sum(b.get("n_padded_tokens", b["input_ids"].numel()) for b in window), n_counted]
            sums = torch.cat([loss_sum[None], *(v.reshape(1) for v in metric_sums.values())])
            if dist.enabled:  # every rank's sums and token counts (the counts only leave the host here)
                sums = torch.cat([dist.reduce_sum(torch.cat([sums, torch.tensor(counts[:2], dtype=torch.float64,
                                                                                device=device)])),
                                  n_counted.reshape(1)])  # already summed over ranks in step 1
            nonfinite = ~torch.isfinite(sums[0])
            if not skip_on_device and bool(nonfinite):  # this optimizer cannot skip on the device: check now
                optimizer.zero_grad(set_to_none=True)

            # 4. unscale (fp16) -> clip -> step (skipped when non-finite) -> schedule -> zero grads
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
            lr = optimizer.param_groups[0]["lr"]
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            if skip_on_device:
                optimizer.found_inf = nonfinite.float()
                optimizer.step()
                del optimizer.found_inf
            elif not nonfinite:
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
        epoch = sampler.epoch + sampler.consumed / max(1, len(sampler)) if hasattr(sampler, "consumed") else None
        pending.append({"step": state.step, "epoch": epoch, "lr": lr, "overflow": overflow,
                        "sequences": sum(b["input_ids"].shape[0] for b in window), "micro_batches": len(window),
                        "_device": torch.cat([sums, grad_norm.double().reshape(1)]),
                        "_counts": None if dist.enabled else counts, "_metrics": list(metric_sums),
                        "_timing": timer.take()})

        # 6. hooks: read the pending steps back (one transfer), log; maybe evaluate; maybe checkpoint
        evaluate_now = hooks.evaluate is not None and hooks.eval_every and state.step % hooks.eval_every == 0 \
            and state.step < total_steps
        checkpoint_now = hooks.checkpoint is not None and hooks.checkpoint_every \
            and state.step % hooks.checkpoint_every == 0
        if state.step % hooks.log_every == 0 or evaluate_now or checkpoint_now or state.step == total_steps:
            flush(pending, state, hooks)
        if evaluate_now:
            hooks.evaluate(state)
        if checkpoint_now:
            hooks.checkpoint(state)
    flush(pending, state, hooks)
    return state


def flush(pending: list[dict], state: TrainState, hooks: Hooks) -> None:
    """Read the pending steps' device values in one transfer, report non-finite steps
    (``hooks.on_nonfinite`` may raise), and hand one record per step to ``hooks.log``."""
    if not pending:
        return
    values = torch.stack([p["_device"] for p in pending]).tolist()  # the one device -> host transfer
    for record, row in zip(pending, values):
        n_metrics = len(record["_metrics"])
        # row: loss sum, the metric sums, [real, padded, counted under DDP: summed over ranks], grad norm
        loss_sum, metric_values, grad_norm = row[0], row[1:1 + n_metrics], row[-1]
        real, padded, n_counted = record["_counts"] or row[1 + n_metrics:-1]
        loss_value = loss_sum / max(n_counted, 1)  # mean loss per counted unit, all ranks
        if not math.isfinite(loss_value):
            hooks.on_nonfinite(TrainState(step=record["step"] - 1), loss_value)
            state.skipped_nonfinite += 1
        state.real_tokens += int(real)
        state.padded_tokens += int(padded)
        metrics = {name: value / max(n_counted, 1) for name, value in zip(record.pop("_metrics"), metric_values)}
        hooks.log({"step": record["step"], "epoch": record["epoch"], "loss": loss_value, "lr": record["lr"],
                   "grad_norm": grad_norm, **metrics, "real_tokens": int(real), "padded_tokens": int(padded),
                   "loss_tokens": int(n_counted), "sequences": record["sequences"],
                   "micro_batches": record["micro_batches"], **StepTimer.seconds(record.pop("_timing")),
                   "overflow": record["overflow"]})
    pending.clear()
