"""The training loop. One function, read top to bottom:

    for each optimizer step:
        take up to K micro-batches of the current epoch
        count the loss targets of all K            (before any backward; summed over ranks)
        for each micro-batch: autocast forward -> summed CE -> backward of (sum / total targets)
        unscale (fp16) -> clip -> optimizer step -> scheduler step -> zero grads
        log; maybe evaluate; maybe checkpoint

Dividing every micro-batch's summed loss by the window's total target count makes K
micro-batches of b sequences give the gradient of one batch of K*b, whatever the lengths.
No callbacks: evaluation, checkpointing and logging are plain function arguments.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from .collate import model_inputs


class NonFiniteLoss(RuntimeError):
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


def autocast_for(device: torch.device, precision: str):
    """``torch.autocast`` for bf16/fp16, a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def micro_batch_windows(sampler, make_loader: Callable, grad_accum: int) -> Iterator[list[dict]]:
    """Windows of up to ``grad_accum`` micro-batches; a window never spans two epochs (the
    last step of an epoch may have fewer micro-batches, as in Trainer). The loader starts
    at ``sampler.consumed``, so a resumed run continues on the next unseen batch."""
    while True:
        window: list[dict] = []
        for batch in make_loader(sampler):
            window.append(batch)
            if len(window) == grad_accum:
                yield window
                window = []
        if window:
            yield window
        sampler.set_epoch(sampler.epoch + 1)


def train(model, optimizer, scheduler, sampler, make_loader: Callable, *, total_steps: int, grad_accum: int,
          device: torch.device, precision: str = "fp32", max_grad_norm: float = 1.0,
          scaler: torch.amp.GradScaler | None = None, state: TrainState | None = None,
          count_key: str = "n_loss_targets", all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
          world_size: int = 1,
          on_nonfinite: str = "stop", log: Callable[[dict], None] = lambda record: None,
          evaluate: Callable[[TrainState], None] | None = None, eval_every: int = 0,
          checkpoint: Callable[[TrainState], None] | None = None, checkpoint_every: int = 0,
          should_stop: Callable[[], bool] = lambda: False, sync: Callable[[], None] = lambda: None,
          compute_loss: Callable[[Any, dict, torch.device], Any] | None = None
          ) -> TrainState:
    """Run optimizer steps until ``state.step == total_steps`` (or ``should_stop()``).

    ``model`` may be wrapped in DDP (``no_sync`` is used on all but the last micro-batch).
    ``count_key`` selects the loss denominator from the collator's counts: ``n_loss_targets``
    (next-token targets) or ``n_label_tokens`` (Trainer's GPT-1 count, see docs).
    ``all_reduce_sum`` sums a tensor over ranks (identity in one process); DDP averages
    gradients over ``world_size`` ranks, so each rank's share is scaled back up by it.
    ``sync`` waits for the device (for honest timings on CUDA).
    ``compute_loss(model, batch, device)`` replaces the LM forward (DPO, reward model): it returns
    an object with ``loss_sum`` (summed over the micro-batch's ``count_key`` units) and optionally
    ``metric_sums`` (name -> summed tensor), logged as sum over the window and ranks / count.
    """
    state = state or TrainState()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    params = [p for p in model.parameters() if p.requires_grad]
    windows = micro_batch_windows(sampler, make_loader, grad_accum)
    model.train()
    while state.step < total_steps and not should_stop():
        t_start = time.perf_counter()
        window = next(windows)
        t_data = time.perf_counter()

        # 1. the denominator: every loss target of the whole window, on every rank
        n_targets = int(all_reduce_sum(torch.tensor(sum(batch[count_key] for batch in window), device=device)))
        denominator = max(n_targets, 1) / world_size  # DDP divides the summed gradients by world_size

        # 2. K micro-batches: forward, summed CE, backward of its share of the mean
        loss_sum = torch.zeros((), device=device)
        metric_sums: dict[str, torch.Tensor] = {}  # compute_loss's extra sums (e.g. DPO's rewards/*)
        t_forward = t_backward = 0.0
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            no_sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
            with no_sync:
                t0 = time.perf_counter()
                with autocast_for(device, precision):
                    out = (compute_loss(model, batch, device) if compute_loss is not None
                           else model(**model_inputs(batch, device)))
                loss = out.loss_sum / denominator
                sync()
                t1 = time.perf_counter()
                scaler.scale(loss).backward()
                sync()
                t_forward += t1 - t0
                t_backward += time.perf_counter() - t1
            loss_sum += out.loss_sum.detach()
            for name, value in (getattr(out, "metric_sums", None) or {}).items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value.detach().double()

        # 3. non-finite loss: stop (default) or drop this step's gradients and go on
        t_opt = time.perf_counter()
        real = sum(b["n_real_tokens"] for b in window)
        padded = sum(b["n_padded_tokens"] for b in window)
        totals = all_reduce_sum(torch.stack([loss_sum.double(), torch.tensor(real, dtype=torch.float64, device=device),
                                             torch.tensor(padded, dtype=torch.float64, device=device)]))
        loss_value = float(totals[0]) / max(n_targets, 1)  # mean CE per counted target, all ranks
        real, padded = int(totals[1]), int(totals[2])
        if metric_sums:  # one all-reduce for all of them; every rank has the same names in the same order
            summed = all_reduce_sum(torch.stack(list(metric_sums.values())))
            metric_sums = {name: float(v) / max(n_targets, 1) for name, v in zip(metric_sums, summed)}
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            if on_nonfinite == "stop":
                raise NonFiniteLoss(f"loss is {loss_value} at optimizer step {state.step + 1}; stopping "
                                    f"(set train.on_nonfinite = \"skip\" to drop such steps)")
            state.skipped_nonfinite += 1

        # 4. unscale (fp16) -> clip -> step -> schedule -> zero grads
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
        lr = optimizer.param_groups[0]["lr"]
        scale_before = scaler.get_scale()
        if math.isfinite(loss_value):
            scaler.step(optimizer)
        scaler.update()
        overflow = scaler.is_enabled() and scaler.get_scale() < scale_before
        if overflow:
            state.skipped_overflow += 1
        else:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t_end = time.perf_counter()

        # 5. bookkeeping: the sampler position moves only once the step is complete
        sampler.consumed += len(window)
        state.step += 1
        state.real_tokens += real
        state.padded_tokens += padded
        log({"step": state.step, "epoch": sampler.epoch + sampler.consumed / max(1, len(sampler)),
             "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
             "real_tokens": real, "padded_tokens": padded, "loss_tokens": n_targets,
             "sequences": sum(b["input_ids"].shape[0] for b in window), "micro_batches": len(window),
             "step_time": t_end - t_start, "data_time": t_data - t_start, "forward_time": t_forward,
             "backward_time": t_backward, "optimizer_time": t_end - t_opt, "overflow": overflow, **metric_sums})
        if evaluate is not None and eval_every and state.step % eval_every == 0 and state.step < total_steps:
            evaluate(state)
        if checkpoint is not None and checkpoint_every and state.step % checkpoint_every == 0:
            checkpoint(state)
    return state
