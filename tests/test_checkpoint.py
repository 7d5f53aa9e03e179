"""Checkpoints: atomic writes, exact resume (bit for bit on CPU), corrupt ones skipped."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from helpers import cli_command, run_until_crash, subprocess_env, tiny_config
from safetensors.torch import load_file

from minift import checkpoint as ckpt
from minift.finetune import run


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(tiny_config(out, "train.checkpoint_every=3"), log=lambda *_: None)
    return out


def test_resume_after_a_crash_mid_epoch_is_bit_identical(tmp_path, uninterrupted, monkeypatch):
    """Crash at step 11 (13 steps per epoch; the last checkpoint is step 9, mid-epoch), resume."""
    run_until_crash(tiny_config(tmp_path, "train.checkpoint_every=3"), 11, monkeypatch)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-6"]
    state = ckpt.load_training_state(tmp_path / "checkpoint-9")
    assert state["sampler"][0]["consumed"] == 18 and state["sampler"][0]["epoch"] == 0
    summary = run(tiny_config(tmp_path, "train.checkpoint_every=3"), resume=True, log=lambda *_: None)
    assert summary["steps"] == 20
    _assert_bitwise_equal(_weights(tmp_path / "checkpoint-20"), _weights(uninterrupted / "checkpoint-20"))
    full = ckpt.load_training_state(uninterrupted / "checkpoint-20")
    resumed = ckpt.load_training_state(tmp_path / "checkpoint-20")
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl holds each step once: the steps redone after the crash replaced the lost ones
    steps = [json.loads(line).get("step") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "step_time" in line]
    assert steps == list(range(1, 21))


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, uninterrupted):
    config = tiny_config(tmp_path, "train.checkpoint_every=3")
    env = subprocess_env()
    proc = subprocess.Popen(cli_command(config), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"step_time"') >= 8:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.find_resumable(tmp_path, log=lambda *_: None) is not None
    result = subprocess.run(cli_command(config, "--resume"), env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_bitwise_equal(_weights(tmp_path / "checkpoint-20"), _weights(uninterrupted / "checkpoint-20"))


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_half_written_and_corrupt_checkpoints_are_skipped(tmp_path, uninterrupted):
    out = _copy_run(uninterrupted, tmp_path / "run")
    newest, older = ckpt.list_checkpoints(out)
    # a write that died before its manifest, at a higher step: never taken
    partial = out / "checkpoint-30"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    messages = []
    assert ckpt.find_resumable(out, log=messages.append) == newest
    assert "checkpoint-30: no manifest.json (the write did not finish)" in messages[0]
    # a truncated weights file in the newest complete checkpoint: fall back to the older one
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[:-10])
    messages.clear()
    assert ckpt.find_resumable(out, log=messages.append) == older
    assert "model.safetensors" in messages[1] and "truncated" in messages[1]
    # a flipped byte (same size): the checksum catches it
    (newest / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ckpt.CheckpointCorrupt, match="sha256 does not match"):
        ckpt.verify_checkpoint(newest)
    # a missing optimizer/training-state file
    (older / ckpt.STATE_FILE).unlink()
    with pytest.raises(ckpt.CheckpointCorrupt, match="training_state.pt: missing"):
        ckpt.verify_checkpoint(older)
    assert ckpt.find_resumable(out, log=lambda *_: None) is None


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, uninterrupted, monkeypatch):
    out = _copy_run(uninterrupted, tmp_path / "run")
    before = ckpt.list_checkpoints(out)

    class Model(torch.nn.Module):  # a model whose save fails as a full disk makes it fail
        def save_pretrained(self, path):
            path.mkdir()
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(out, 99, Model(), {}, {}, keep=1)
    assert ckpt.list_checkpoints(out) == before
    assert not list(out.glob(".tmp-checkpoint-*"))
    ckpt.verify_checkpoint(before[0])


def test_keep_last_k(tmp_path, uninterrupted):
    assert [p.name for p in ckpt.list_checkpoints(uninterrupted)] == ["checkpoint-20", "checkpoint-18"]


def test_the_packed_static_path_resumes_bit_identically(tmp_path, monkeypatch):
    """data.sampler = "packed" (fixed-shape batches): crash at step 7, resume from step 6, same weights
    at 8."""
    overrides = ("data.sampler=packed", "train.batch_size=2", "train.checkpoint_every=3", "train.max_steps=8")
    run(tiny_config(tmp_path / "full", *overrides), log=lambda *_: None)
    run_until_crash(tiny_config(tmp_path / "resumed", *overrides), 7, monkeypatch)
    assert ckpt.list_checkpoints(tmp_path / "resumed")[0].name == "checkpoint-6"
    run(tiny_config(tmp_path / "resumed", *overrides), resume=True, log=lambda *_: None)
    _assert_bitwise_equal(_weights(tmp_path / "resumed" / "checkpoint-8"),
                          _weights(tmp_path / "full" / "checkpoint-8"))
