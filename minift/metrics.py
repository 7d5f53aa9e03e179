"""Logging: one JSON line per optimizer step, a tqdm bar, an end-of-run summary, a plot."""
from __future__ import annotations

import json
import os
import resource
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


def peak_memory_bytes(device: torch.device) -> int:
    """Peak RSS of this process on CPU; peak allocated tensor memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsLogger:
    """Writes ``metrics.jsonl`` (appending on resume) and drives the progress bar.

    Every ``log_every``-th step record is written. ``window_mean`` (``train.compat = "trainer"``):
    its ``loss`` is the mean of the steps since the last written record, as Trainer logs
    ``logging_steps`` (trainer.py:2257-2263), and the step's own loss goes to ``step_loss``;
    lr and grad-norm stay the step's own, as in Trainer. Steps after the last full window
    are not written (Trainer leaves them out of ``log_history`` too)."""

    def __init__(self, output_dir: str | Path, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 progress: bool = True, log_every: int = 1, window_mean: bool = False):
        self.enabled = enabled
        self.log_every = log_every
        self.window_mean = window_mean
        self.window_losses: list[float] = []  # losses of the steps since the last written record
        self.records: list[dict[str, Any]] = []
        self.path = Path(output_dir) / "metrics.jsonl"
        self.file = None
        self.bar = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
            if progress:
                self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def __call__(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        if "loss" in record:
            self.window_losses.append(record["loss"])
        if record.get("step", 0) % self.log_every == 0 or "eval" in record:
            self.file.write(json.dumps(self._windowed(record)) + "\n")
            self.file.flush()
        if self.bar is not None and "loss" in record:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['real_tokens'] / max(record['step_time'], 1e-9):.0f}")

    def _windowed(self, record: dict[str, Any]) -> dict[str, Any]:
        losses, self.window_losses = self.window_losses, []
        if not self.window_mean or "loss" not in record:
            return record
        return {**record, "loss": sum(losses) / len(losses), "step_loss": record["loss"]}

    def write(self, record: dict[str, Any]) -> None:
        """A non-step record (evaluation, summary)."""
        self.records.append(record)
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def summarize_steps(records: list[dict[str, Any]], skip_first: int = 1) -> dict[str, float]:
    """Throughput over the logged steps of this process (the first ``skip_first`` excluded as warm-up)."""
    steps = [r for r in records if "step_time" in r]
    timed = steps[skip_first:] if len(steps) > skip_first else steps
    if not timed:
        return {}
    seconds = sum(r["step_time"] for r in timed)
    real = sum(r["real_tokens"] for r in timed)
    padded = sum(r["padded_tokens"] for r in timed)
    return {
        "logged_steps": len(steps),
        "real_tokens_per_s": real / seconds,
        "padded_tokens_per_s": padded / seconds,
        "loss_tokens_per_s": sum(r["loss_tokens"] for r in timed) / seconds,
        "sequences_per_s": sum(r["sequences"] for r in timed) / seconds,
        "padding_efficiency": real / max(1, padded),
        "median_step_s": statistics.median(r["step_time"] for r in timed),
    }


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
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
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
