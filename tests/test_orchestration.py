"""One orchestration for every stage: what ``run_stage`` does around the loop holds for ``dpo`` and
``reward`` exactly as for ``train`` — compile, failure on a mostly-NaN run, atomic export, resume
refusing changed data, the slow-precision warning, a summary of the whole run."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from minift.config import load_config
from minift.errors import ResumeRefused
from minift.loop import NonFiniteLoss
from minift.preference.config import PreferenceConfig
from minift.preference.recipe import run_dpo, run_reward

from conftest import REPO

QUIET = dict(log=lambda *_: None)
SMALL = ["pairs.max_train_pairs=16", "pairs.max_eval_pairs=8", "train.batch_size=4", "train.grad_accum=1",
         "train.max_steps=2", "eval.batch_size=8"]


def _config(stage: str, out, *overrides):
    return load_config(REPO / "configs" / f"{stage}-tiny.toml",
                       [f'train.output_dir="{out}"', *SMALL, *overrides], stage=PreferenceConfig)


def _run(stage: str, cfg, **kwargs):
    return (run_dpo if stage == "dpo" else run_reward)(cfg, **QUIET, **kwargs)


def test_dpo_honours_model_compile(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile",
                        lambda model, mode=None: compiled.append(type(model).__name__) or model)
    _run("dpo", _config("dpo", tmp_path, "model.compile=true"))
    assert compiled == ["SequenceLogProbs"]  # the module the loop trains, compiled once


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_a_mostly_nan_run_fails_and_keeps_its_outputs(tmp_path, stage):
    cfg = _config(stage, tmp_path, "train.lr=1e30", 'train.on_nonfinite="skip"', "train.max_steps=4")
    with pytest.raises(NonFiniteLoss, match="of 4 optimizer steps were skipped"):
        _run(stage, cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_nonfinite"] >= 3 and (tmp_path / "model" / "model.safetensors").exists()


KILL_DURING_EXPORT = """
import os, signal, sys
from minift.config import load_config
from minift.preference.config import PreferenceConfig
from minift.preference import recipe
from minift.orchestration import Stage

def half_write_then_die(self, directory):
    (directory.mkdir(parents=True, exist_ok=True), (directory / "config.json").write_text("{"))
    os.kill(os.getpid(), signal.SIGKILL)

stage, out = sys.argv[1], sys.argv[2]
cfg = load_config(f"configs/{stage}-tiny.toml", [f'train.output_dir="{out}"', *sys.argv[3:]],
                  stage=PreferenceConfig)
build = recipe.build_dpo_stage if stage == "dpo" else recipe.build_reward_stage
def build_and_break(ctx):
    parts = build(ctx)
    type(parts.saved_model).save_pretrained = half_write_then_die
    return parts
recipe.run_stage(cfg, build_and_break, resume=True, log=lambda *_: None)
"""


@pytest.mark.parametrize("stage", ["dpo", pytest.param("reward", marks=pytest.mark.slow)])
def test_a_kill_during_export_leaves_the_previous_model_intact(tmp_path, stage):
    _run(stage, _config(stage, tmp_path))
    weights = tmp_path / "model" / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_EXPORT, stage, str(tmp_path), *SMALL],
                            cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr  # it did reach the export
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before
    assert json.loads((tmp_path / "model" / "config.json").read_text())  # still the complete folder


def test_resume_refuses_a_changed_pairs_file(tmp_path):
    data = tmp_path / "pairs"
    data.mkdir()
    rows = [{"prompt": f"tweet {i} sentiment:", "chosen": " positive", "rejected": " negative"}
            for i in range(24)]

    def write(rows):
        for split in ("train", "test"):
            (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(rows)
    out = tmp_path / "run"
    overrides = [f'pairs.source="{data}"', "train.checkpoint_every=1"]
    _run("dpo", _config("dpo", out, *overrides, "train.max_steps=1"))
    rows[3]["chosen"] = " neutral"
    write(rows)
    with pytest.raises(ResumeRefused, match="train_data sha256"):
        _run("dpo", _config("dpo", out, *overrides), resume=True)


def test_dpo_warns_that_bf16_is_slow_on_a_cpu_without_it(tmp_path, monkeypatch):
    from minift import precision

    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16 on this CPU has no native support"):
        _run("dpo", _config("dpo", tmp_path, 'train.precision="bf16"', "train.max_steps=1"))


def test_a_resumed_run_summarises_the_whole_run(tmp_path):
    """The summary after a resume has the first step's loss, the evaluation before training and
    every step's tokens, as the uninterrupted run's does."""
    straight = _run("dpo", _config("dpo", tmp_path / "straight", "train.max_steps=4",
                                   "eval.before_training=true"))
    _run("dpo", _config("dpo", tmp_path / "resumed", "train.max_steps=4", "eval.before_training=true",
                        "train.checkpoint_every=2"))
    (tmp_path / "resumed" / "summary.json").unlink()
    resumed = _run("dpo", _config("dpo", tmp_path / "resumed", "train.max_steps=4",
                                  "eval.before_training=true", "train.checkpoint_every=2"),
                   resume=str(tmp_path / "resumed" / "checkpoint-2"))
    for key in ("first_loss", "last_loss", "eval_before", "eval_after", "steps", "skipped_nonfinite"):
        assert resumed[key] == straight[key], key
    assert resumed["resumed_at"] == [2] and straight["resumed_at"] == []
    again = _run("dpo", _config("dpo", tmp_path / "resumed", "train.max_steps=4", "eval.before_training=true",
                                "train.checkpoint_every=2"), resume=True)  # a finished run, resumed: the same
    assert again["first_loss"] == straight["first_loss"] and again["eval_before"] == straight["eval_before"]
