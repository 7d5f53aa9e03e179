"""A tiny, fast run config on the project's own synthetic data (no shared material)."""
from __future__ import annotations

import pytest

from minift import metrics
from minift.config import load_config
from minift.finetune import run

from conftest import REPO


def tiny_config(output_dir, *overrides):
    return load_config(REPO / "configs" / "offline-default.toml", [
        f'train.output_dir="{output_dir}"', "train.progress=false", "train.plot=false",
        "model.config.resid_pdrop=0.1", "model.config.embd_pdrop=0.1", "model.config.attn_pdrop=0.1",
        "data.max_train_examples=200", "data.sampler=random", "train.batch_size=8", "train.grad_accum=2",
        "train.max_steps=20", "train.eval_every=0", "eval.max_examples=40", "eval.before_training=false",
        *overrides])


def cli_command(config, *extra):
    """``python -m minift train`` with every value of ``config`` passed by --set."""
    import json
    import sys

    sets = []
    for section in ("model", "data", "train", "eval"):
        for key, value in getattr(config, section).__dict__.items():
            if key != "config":
                sets += ["--set", f"{section}.{key}={json.dumps(value)}"]
    for key, value in config.model.config.items():
        sets += ["--set", f"model.config.{key}={json.dumps(value)}"]
    return [sys.executable, "-m", "minift", "train", str(REPO / "configs" / "offline-default.toml"), *sets,
            *extra]


def subprocess_env():
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}


class Crash(Exception):
    pass


def run_until_crash(config, step: int, monkeypatch) -> None:
    """Run ``config`` (``minift train``) and crash (an exception) when the loop logs optimizer step
    ``step``."""
    original_call = metrics.MetricsLogger.__call__

    def crash_at(self, record):
        if record.get("step") == step:
            raise Crash()
        original_call(self, record)

    monkeypatch.setattr(metrics.MetricsLogger, "__call__", crash_at)
    with pytest.raises(Crash):
        run(config, log=lambda *_: None)
    monkeypatch.setattr(metrics.MetricsLogger, "__call__", original_call)
