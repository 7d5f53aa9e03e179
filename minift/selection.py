"""Keeping the best model and stopping early, as Trainer does (``metric_for_best_model``,
``greater_is_better``, ``load_best_model_at_end``, ``EarlyStoppingCallback``).

After each evaluation during training (``after_evaluation``), in Trainer's order:

    1. early stopping: the evaluation is "no improvement" unless it beats the best metric so far
       strictly and by more than ``early_stopping_threshold``; ``early_stopping_patience`` of them
       in a row stop the run (the counter restarts at every improvement)
    2. best model: a strictly better value becomes the best metric, its step the best step

At each checkpoint (``before_checkpoint``), a checkpoint written at the best step becomes the best
checkpoint: pruning keeps it (``checkpoint.prune_checkpoints``' ``protect``) and
``load_best_model_at_end`` loads its weights after the last step (``orchestration``).

The counters live in ``TrainState`` (saved in every checkpoint), so a resumed run continues with
the same best metric and the same count of evaluations without improvement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import RunConfig, RunConfigError


@dataclass(frozen=True)
class ModelSelection:
    metric: str = ""  # the eval metric compared ("" = no best model is tracked)
    greater_is_better: bool = False
    patience: int = 0  # evaluations without improvement that stop the run (0 = never)
    threshold: float = 0.0

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "ModelSelection":
        """``metric_for_best_model``, or "loss" when the best model is loaded or early stopping is on
        (Trainer's default, training_args.py:1590); ``greater_is_better = "auto"``: not for a
        metric whose name ends in "loss" (training_args.py:1592)."""
        t = cfg.train
        wanted = t.load_best_model_at_end or t.early_stopping_patience
        metric = t.metric_for_best_model or ("loss" if wanted else "")
        greater = {"yes": True, "no": False, "auto": not metric.endswith("loss")}[t.greater_is_better]
        return cls(metric, greater, t.early_stopping_patience, t.early_stopping_threshold)

    def value(self, result: dict[str, Any]) -> float:
        """The compared metric of an evaluation's numbers (``eval_loss`` and ``loss`` name the same)."""
        name = self.metric[len("eval_"):] if self.metric.startswith("eval_") else self.metric
        if name not in result:
            numbers = sorted(k for k, v in result.items() if isinstance(v, (int, float)))
            raise RunConfigError(f"train.metric_for_best_model {self.metric!r}: the evaluation gives "
                                 f"{numbers}")
        return float(result[name])

    def improves(self, value: float, best: float) -> bool:
        return value > best if self.greater_is_better else value < best

    def after_evaluation(self, state, result: dict[str, Any] | None) -> None:
        """Update the early-stopping counter, then the best metric and step, from an evaluation at
        ``state.step`` (``EarlyStoppingCallback.on_evaluate``, then ``Trainer._determine_best_metric``)."""
        if not self.metric or result is None:
            return
        value = self.value(result)
        best = state.best_metric
        if best is None or (self.improves(value, best) and abs(value - best) > self.threshold):
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        if best is None:
            best = -math.inf if self.greater_is_better else math.inf
        if self.improves(value, best):
            state.best_metric, state.best_step = value, state.step

    def before_checkpoint(self, state) -> None:
        """A checkpoint at the best step is the best checkpoint (Trainer's ``best_model_checkpoint``)."""
        if self.metric and state.best_step == state.step:
            state.best_checkpoint = state.step

    def should_stop(self, state) -> bool:
        return self.patience > 0 and state.evals_without_improvement >= self.patience

    def summary(self, state) -> dict[str, Any]:
        if not self.metric or state.best_step is None:
            return {}
        return {"best_model": {"metric": self.metric, "value": state.best_metric, "step": state.best_step,
                               "checkpoint_step": state.best_checkpoint},
                **({"early_stopped": True} if self.should_stop(state) else {})}
