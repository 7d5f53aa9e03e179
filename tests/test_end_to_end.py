"""Whole runs: the offline default (the README's second command), a short real run on the
shared tweets, predict and generate."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minift.config import load_config
from minift.finetune import run

from conftest import REPO, SHARED, shared_path


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("offline")
    # stdout and stderr into one pipe, as `minift train ... 2>&1 | tee log` or CI would see them
    result = subprocess.run([sys.executable, "-m", "minift", "train", "configs/offline-default.toml",
                             "--set", f'train.output_dir="{out}"'],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    output = result.stdout.decode()  # bytes first: text mode would turn a bar's "\r" into "\n"
    assert result.returncode == 0, output[-3000:]
    return out, output


def test_offline_default_loss_falls_and_accuracy_rises(offline_run):
    out, stdout = offline_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"] - 2.0
    assert summary["eval_after"]["accuracy"] > summary["eval_before"]["accuracy"] + 0.3
    assert summary["eval_after"]["accuracy"] >= 0.9
    assert "eval_before" in stdout and "throughput" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "step_time" in r)
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "real_tokens", "padded_tokens", "loss_tokens",
                "step_time"):
        assert key in step


def test_piped_output_is_plain_lines(offline_run):
    _, output = offline_run
    lines = output.splitlines()
    assert "\r" not in output and "it/s]" not in output and "examples/s]" not in output  # no bar frames
    assert all(line.startswith("eval @ step") for line in lines if "eval @ step" in line)  # nothing glued
    total = next(int(line.split()[1]) for line in lines if line.startswith("steps: "))
    progress = [line for line in lines if line.startswith("step ")]
    assert 5 <= len(progress) <= 12 and progress[-1].startswith(f"step {total}/{total}: loss ")
    after_summary = lines[next(i for i, line in enumerate(lines) if line.startswith("done: ")) + 1:]
    assert all(line.startswith(("  ", "checkpoint: ", "plot written", "no plot")) for line in after_summary)


@pytest.mark.slow  # two fresh processes; the default suite runs both in-process (test_lora_run.py)
def test_predict_and_generate_on_the_trained_model(offline_run):
    out, _ = offline_run
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "minift", "predict", "--model", str(out / "model"),
                             "i love the concert so much", "i hate this weather, awful"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()
    assert first.startswith("positive") and second.startswith("negative")
    probs = [float(x.split()[-1]) for x in first.split("(")[1].split(")")[0].split(",")]
    assert sum(probs) == pytest.approx(1.0, abs=2e-3)
    result = subprocess.run([sys.executable, "-m", "minift", "generate", "--model", str(out / "model"),
                             "i love", "--max-new-tokens", "5", "--temperature", "0"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("i love")


def test_eval_command_scores_the_trained_model(offline_run):
    out, _ = offline_run
    summary = json.loads((out / "summary.json").read_text())
    result = subprocess.run([sys.executable, "-m", "minift", "eval", "configs/offline-default.toml",
                             "--model", str(out / "model"), "--set", f'train.output_dir="{out}"'],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{"):])
    # the same model on the same eval split as the run's final evaluation
    assert report["loss"] == pytest.approx(summary["eval_after"]["loss"], rel=1e-5)
    assert report["accuracy"] == summary["eval_after"]["accuracy"]


@pytest.mark.slow
@pytest.mark.shared
def test_short_real_run_tiny_checkpoint_real_tweets(tmp_path):
    cfg = load_config(REPO / "configs" / "openai-gpt-tweets.toml", [
        f'model.name="{shared_path("fixtures", "tiny-openai-gpt")}"',
        f'data.source="{SHARED / "data" / "tweet_sentiment_extraction"}"',
        f'train.output_dir="{tmp_path}"', "train.max_steps=40", "train.lr=3e-3", "train.batch_size=16",
        "train.grad_accum=2", "train.progress=false", "train.plot=false", "train.checkpoint_every=0",
        "train.eval_every=0", "eval.max_examples=600", "eval.batch_size=100"])
    summary = run(cfg, log=print)
    assert summary["steps"] == 40
    assert summary["last_loss"] < summary["first_loss"]
    assert 0.0 <= summary["eval_after"]["accuracy"] <= 1.0 and summary["eval_after"]["n_scored"] == 600
    assert summary["padding_efficiency"] > 0.9
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
