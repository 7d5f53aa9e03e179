"""What a run reports: one JSON line per optimizer step and per evaluation (``metrics.jsonl``),
a tqdm bar on a terminal (plain lines otherwise), optional TensorBoard scalars (``report_to``),
the throughput of the logged steps, the end-of-run summary, a plot.

The throughput summary (``throughput``) is the one formula for tokens/s and sequences/s: the
run's summary and the benchmarks both use it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .config import REPORTERS, RunConfigError

METRICS_FILE = "metrics.jsonl"


class TensorBoardReporter:
    """The numbers of each ``metrics.jsonl`` record as TensorBoard scalars: ``train/<key>`` for a
    step, ``eval/<key>`` for an evaluation, at the record's optimizer step."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError('train.report_to = ["tensorboard"] needs the tensorboard package: '
                              'pip install "minift[tensorboard]"') from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        prefix, values = ("eval", record["eval"]) if "eval" in record else ("train", record)
        for key, value in values.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def close(self) -> None:
        self.writer.close()


def make_reporters(names: list[str], output_dir: Path) -> list:
    """The trackers ``train.report_to`` names; TensorBoard writes under ``<output_dir>/tensorboard``."""
    unknown = [name for name in names if name not in REPORTERS]
    if unknown:
        raise RunConfigError(f"train.report_to: unknown {unknown}; known: {list(REPORTERS)}")
    return [TensorBoardReporter(output_dir / "tensorboard") for name in names if name == "tensorboard"]


class MetricsLogger:
    """Writes ``metrics.jsonl`` (appending on resume), the same records to each ``report_to``
    tracker, and shows progress: a tqdm bar when stderr is a terminal, else a plain line through
    ``echo`` about every tenth of the run, so piped output (CI, ``| tee``) never holds bar frames.
    ``say`` writes a line around the bar instead of gluing it onto the bar's line.

    Every ``log_every``-th step record is written. ``window_mean`` (``train.compat = "trainer"``):
    its ``loss`` is the mean of the steps since the last written record, as Trainer logs
    ``logging_steps`` (trainer.py:2257-2263), and the step's own loss goes to ``step_loss``;
    lr and grad-norm stay the step's own, as in Trainer. Steps after the last full window
    are not written (Trainer leaves them out of ``log_history`` too). ``first_step``: step 1 is
    written too (Trainer's ``logging_first_step``), its window that one step."""

    def __init__(self, output_dir: str | Path, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 progress: bool = True, log_every: int = 1, echo: Callable[[str], None] = print,
                 report_to: list[str] = (), on_terminal: bool | None = None, window_mean: bool = False,
                 first_step: bool = False):
        self.enabled = enabled
        self.first_step = first_step
        self.log_every = log_every
        self.window_mean = window_mean
        self.window_losses: list[float] = []  # losses of the steps since the last written record
        self.echo = echo
        self.total_steps = total_steps
        self.records: list[dict[str, Any]] = []
        self.path = Path(output_dir) / METRICS_FILE
        self.file = None
        self.bar = None
        self.plain_every = 0  # steps between plain progress lines; 0 = none
        self.reporters = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.reporters = make_reporters(list(report_to), Path(output_dir))
            self.file = open(self.path, "a", encoding="utf-8")
            on_terminal = sys.stderr.isatty() if on_terminal is None else on_terminal
            if progress and on_terminal:
                self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
            elif progress:
                self.plain_every = max(log_every, math.ceil(total_steps / 10))

    def say(self, line: str) -> None:
        """A log line; with a bar showing, the bar is cleared first and redrawn after."""
        if self.bar is None:
            self.echo(line)
        else:
            with self.bar.external_write_mode():
                self.echo(line)

    def __call__(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        if "loss" in record:
            self.window_losses.append(record["loss"])
        first = self.first_step and record.get("step") == 1
        if record.get("step", 0) % self.log_every == 0 or "eval" in record or first:
            self._write(self._windowed(record))
        if "loss" not in record:
            return
        throughput = record.get("real_tokens", 0) / max(record.get("step_time", 0.0), 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{throughput:.0f}")
            if self.bar.n >= self.total_steps:  # closed now, so no stale bar follows the summary
                self.bar.close()
                self.bar = None
        elif self.plain_every and (record["step"] % self.plain_every == 0
                                   or record["step"] == self.total_steps):
            self.echo(f"step {record['step']}/{self.total_steps}: loss {record['loss']:.4f}, "
                      f"lr {record['lr']:.2e}, {throughput:.0f} tokens/s")

    def _windowed(self, record: dict[str, Any]) -> dict[str, Any]:
        losses, self.window_losses = self.window_losses, []
        if not self.window_mean or "loss" not in record:
            return record
        return {**record, "loss": sum(losses) / len(losses), "step_loss": record["loss"]}

    def write(self, record: dict[str, Any]) -> None:
        """A non-step record (evaluation, summary)."""
        self.records.append(record)
        if self.enabled:
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if "summary" not in record:  # the summary repeats the run's numbers; trackers get them per step
            for reporter in self.reporters:
                reporter(record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
        for reporter in self.reporters:
            reporter.close()


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

class StepRecords:
    """Steps run but not yet read back from the device. The loop adds each step's device values
    (its loss and metric sums, its gradient norm and, under DDP, its token counts summed over
    ranks) with its host values; ``flush`` reads every pending step in one device -> host transfer,
    reports a NaN/inf loss to ``on_nonfinite`` (which may raise), adds the step to the run's
    counters (``TrainState``: tokens, first/last loss, timed totals — this process's first step is
    warm-up and left out of those) and hands one record per step to ``log``. Loss and metrics are
    per counted unit (divided by the step's count: targets, pairs, completion tokens)."""

    def __init__(self, log: Callable[[dict], None], on_nonfinite: Callable[[Any, float], None]):
        self.log, self.on_nonfinite = log, on_nonfinite
        self.pending: list[dict[str, Any]] = []
        self.warmed_up = False

    def add(self, step: int, device_values: torch.Tensor, metric_names: list[str], counts: list[int] | None,
            host: dict[str, Any], timing) -> None:
        """``device_values``: [loss sum, metric sums..., (real, padded, counted: under DDP), grad norm];
        ``counts``: [real, padded, counted] when known on the host (one process)."""
        self.pending.append({"step": step, "device": device_values, "metric_names": metric_names,
                             "counts": counts, "host": host, "timing": timing})

    def flush(self, state) -> None:
        if not self.pending:
            return
        rows = torch.stack([p["device"] for p in self.pending]).tolist()  # the one device -> host transfer
        for entry, row in zip(self.pending, rows):
            names = entry["metric_names"]
            loss_sum, metric_values, grad_norm = row[0], row[1:1 + len(names)], row[-1]
            real, padded, n_counted = entry["counts"] or row[1 + len(names):-1]
            loss_value = loss_sum / max(n_counted, 1)  # mean loss per counted unit, all ranks
            if not math.isfinite(loss_value):
                self.on_nonfinite(dataclasses.replace(state, step=entry["step"] - 1), loss_value)
                state.skipped_nonfinite += 1
            host = dict(entry["host"])
            record = {"step": entry["step"], "epoch": host.pop("epoch", None), "loss": loss_value,
                      "lr": host.pop("lr"), "grad_norm": grad_norm,
                      **{name: value / max(n_counted, 1) for name, value in zip(names, metric_values)},
                      "real_tokens": int(real), "padded_tokens": int(padded), "loss_tokens": int(n_counted)}
            overflow = host.pop("overflow")
            record = {**record, **host, **StepTimer.seconds(entry["timing"]), "overflow": overflow}
            state.real_tokens += int(real)
            state.padded_tokens += int(padded)
            state.first_loss = loss_value if state.first_loss is None else state.first_loss
            state.last_loss = loss_value
            if self.warmed_up:
                add_timed(state.timed, record)
            self.warmed_up = True
            self.log(record)
        self.pending.clear()


# -- throughput: the one formula, for a run's summary and for the benchmarks ------------------------
COUNTED = ("real_tokens", "padded_tokens", "loss_tokens", "sequences")


def add_timed(totals: dict[str, float], record: dict[str, Any]) -> dict[str, float]:
    """Add one step record to running sums of its seconds and counts."""
    totals["steps"] = totals.get("steps", 0) + 1
    totals["seconds"] = totals.get("seconds", 0.0) + record["step_time"]
    for key in COUNTED:
        totals[key] = totals.get(key, 0) + record[key]
    return totals


def rates(totals: dict[str, float]) -> dict[str, Any]:
    """Tokens and sequences per second from the sums of ``add_timed``."""
    seconds = max(totals["seconds"], 1e-12)
    return {"timed_steps": totals["steps"], "real_tokens_per_s": totals["real_tokens"] / seconds,
            "padded_tokens_per_s": totals["padded_tokens"] / seconds,
            "loss_tokens_per_s": totals["loss_tokens"] / seconds,
            "sequences_per_s": totals["sequences"] / seconds,
            "padding_efficiency": totals["real_tokens"] / max(1, totals["padded_tokens"])}


def step_time_medians(step_records: list[dict[str, Any]]) -> dict[str, Any]:
    """The median step and its spread, and the median of each phase
    (data / forward / backward / optimizer)."""
    step_times = [r["step_time"] for r in step_records]
    out = {"median_step_s": statistics.median(step_times),
           "spread_step_s": [min(step_times), max(step_times)]}
    for phase in ("data", "forward", "backward", "optimizer"):
        if all(f"{phase}_time" in r for r in step_records):
            out[f"{phase}_s"] = statistics.median(r[f"{phase}_time"] for r in step_records)
    return out


def throughput(step_records: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens and sequences per second over ``step_records`` (the loop's per-step records), the
    median step and its spread, and the median of each phase."""
    totals: dict[str, float] = {}
    for record in step_records:
        add_timed(totals, record)
    return {**rates(totals), **step_time_medians(step_records)}


def trim_metrics(output_dir: str | Path, step: int, keep_evals_at_step: bool = True) -> None:
    """On resume from ``step``: drop the records of later steps (they are redone) and any summary,
    replacing the file atomically so a crash here loses nothing. ``step = -1`` empties it (a
    restart from scratch). ``keep_evals_at_step=False``: an evaluation at ``step`` is redone too
    (the final one, when a finished run is resumed)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            continue
        at = record.get("step", 0)
        redone = at == step and ("resume" in record or ("eval" in record and not keep_evals_at_step))
        if "summary" in record or at > step or redone:  # an earlier resume from the same step: its marker too
            continue
        kept.append(line + "\n")
    tmp = path.with_name(f".{METRICS_FILE}.{os.getpid()}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def read_records(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` (the whole run, across resumes); a torn last line is skipped."""
    path = Path(output_dir) / METRICS_FILE
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def eval_at(records: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    """The last evaluation recorded at ``step``, or None."""
    found = [r["eval"] for r in records if "eval" in r and r.get("step") == step]
    return found[-1] if found else None


def run_summary(stage: str, records: list[dict[str, Any]], state, total_steps: int, peak_memory: int,
                extra: dict[str, Any]) -> dict[str, Any]:
    """The end-of-run summary (``summary.json`` and the last line of ``metrics.jsonl``) of the whole
    run, resumed parts included: counts, losses and throughput from the loop's counters (saved in
    every checkpoint), step-time medians over the logged steps (the first step and the first after
    each resume are warm-up), evaluations from ``records`` (the whole ``metrics.jsonl``)."""
    resumed_at = [r["step"] for r in records if "resume" in r]
    warm_up = {1, *(step + 1 for step in resumed_at)}
    logged = [r for r in records if "step_time" in r]
    timed = [r for r in logged if r["step"] not in warm_up] or logged
    summary: dict[str, Any] = {"stage": stage, "steps": state.step, "total_steps": total_steps,
                               "resumed_at": resumed_at, "logged_steps": len(logged)}
    if state.timed.get("steps"):
        summary.update(rates(state.timed))
    if timed:
        summary.update(step_time_medians(timed))
    summary.update({"peak_memory_mb": peak_memory / 2**20, "skipped_nonfinite": state.skipped_nonfinite,
                    "skipped_overflow": state.skipped_overflow, "first_loss": state.first_loss,
                    "last_loss": state.last_loss, **extra})
    before, after = eval_at(records, 0), eval_at(records, state.step)
    if before is not None:
        summary["eval_before"] = before
    if after is not None:
        summary["eval_after"] = after
    summary["environment"] = environment_line()
    return summary


def summary_text(s: dict[str, Any]) -> str:
    resumed = f" (resumed at step {', '.join(map(str, s['resumed_at']))})" if s.get("resumed_at") else ""
    lines = [f"done: {s['steps']} steps{resumed}"]
    if "real_tokens_per_s" in s:
        lines.append(f"  throughput: {s['real_tokens_per_s']:.1f} real tokens/s, {s['sequences_per_s']:.2f} "
                     f"sequences/s, padding efficiency {s['padding_efficiency']:.3f}, median step "
                     f"{s['median_step_s']:.3f} s ({s['timed_steps']} timed steps)")
    lines.append(f"  peak memory: {s['peak_memory_mb']:.0f} MiB")
    if s.get("skipped_nonfinite"):
        lines.append(f"  skipped: {s['skipped_nonfinite']} of {s['steps']} steps had a NaN/inf loss "
                     f"(their gradients were dropped)")
    if s.get("first_loss") is not None:
        mean = s.get("train_loss")
        since = s["resumed_at"][-1] + 1 if s.get("resumed_at") else 1  # the mean covers this process's steps
        lines.append(f"  train loss: step 1 {s['first_loss']:.4f} -> step {s['steps']} {s['last_loss']:.4f}"
                     + (f", mean {mean:.4f}" if mean is not None else "")
                     + (f" (steps {since}-{s['steps']})" if mean is not None and since > 1 else ""))
    if "best_model" in s:
        best = s["best_model"]
        lines.append(f"  best model: {best['metric']} {best['value']:.4f} at step {best['step']}"
                     + (", stopped early" if s.get("early_stopped") else ""))
    for key in ("eval_before", "eval_after"):
        if key in s:
            lines.append(f"  {key}: " + ", ".join(f"{name} {value:.4f}" for name, value in s[key].items()
                                                 if isinstance(value, float)))
    return "\n".join(lines)


def eval_line(step: int, result: dict[str, Any]) -> str:
    """One line for an evaluation's numbers (a stage's held-out metrics)."""
    shown = ", ".join(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                      for name, value in result.items())
    return f"eval @ step {step}: {shown}"


def plot_curves(metrics_path: Path, out_path: Path) -> str:
    """Loss (and eval accuracy) against step as a PNG when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'minift[plot]')"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [(r["step"], r["loss"]) for r in records if "loss" in r and "step_time" in r]
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r and "loss" in r["eval"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot(*zip(*steps), label="train loss (mean CE per target)", lw=1)
    if evals:
        ax.plot([s for s, _ in evals], [e["loss"] for _, e in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    acc = [(s, e["accuracy"]) for s, e in evals if "accuracy" in e]
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), "s--", color="tab:green", label="eval accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return f"plot written to {out_path}"


def environment_line() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus"
