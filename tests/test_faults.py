"""Faults a long run must survive: signals, SIGKILL at random moments. The run always ends with
the weights of an uninterrupted run, bit for bit (CPU)."""
from __future__ import annotations

import random
import signal
import subprocess
import time

import pytest
import torch
from helpers import cli_command, subprocess_env, tiny_config
from safetensors.torch import load_file

from minift import checkpoint as ckpt
from minift.finetune import run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run(tiny_config(out, "train.checkpoint_every=3"), log=lambda *_: None)
    return load_file(str(out / "checkpoint-20" / "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _wait_for_steps(path, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().count('"step_time"') >= n:
            return
        time.sleep(0.01)
    raise TimeoutError(f"{path} never reached {n} steps")


# SIGINT takes the same path as SIGTERM (StopRequest handles both): the default suite runs one
@pytest.mark.slow  # the default suite keeps one kill + resume: test_checkpoint.py's SIGKILL
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_next_step_boundary_and_exits_cleanly(tmp_path, reference, sig):
    config = tiny_config(tmp_path, "train.checkpoint_every=3")
    proc = subprocess.Popen(cli_command(config), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_steps(tmp_path / "metrics.jsonl", 5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert f"stopped by {sig.name} at step" in stdout
    stopped_at = int(stdout.split(f"stopped by {sig.name} at step ")[1].split(";")[0])
    assert 5 <= stopped_at < 20
    newest = ckpt.find_resumable(tmp_path, log=lambda *_: None)
    assert newest.name == f"checkpoint-{stopped_at}"
    result = subprocess.run(cli_command(config, "--resume"), env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _same(load_file(str(tmp_path / "checkpoint-20" / "model.safetensors")), reference)


def _kill_loop(tmp_path, reference, n_kills, seed):
    """SIGKILL the run at ``n_kills`` random moments, resuming each time, then let it finish.
    Each kill waits for a random step to be logged (or, for step 0, a random moment of
    start-up), then a random few milliseconds: it lands inside a step, an evaluation
    (every 7 steps) or a checkpoint write (every 3)."""
    config = tiny_config(tmp_path, "train.checkpoint_every=3", "train.eval_every=7")
    rng = random.Random(seed)
    targets = sorted(rng.randint(0, 19) for _ in range(n_kills))
    killed_mid_run = 0
    for i, target in enumerate(targets):
        proc = subprocess.Popen(cli_command(config, *(["--resume"] if i else [])), env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if target == 0:
            time.sleep(rng.uniform(0.2, 2.0))
        else:
            _wait_for_steps(tmp_path / "metrics.jsonl", target)
            time.sleep(rng.uniform(0.0, 0.06))
        killed_mid_run += proc.poll() is None
        proc.kill()
        proc.wait()
        newest = ckpt.find_resumable(tmp_path, log=lambda *_: None)
        if newest is not None:  # whatever the kill left, what resume would take is complete
            ckpt.verify_checkpoint(newest)
    assert killed_mid_run == n_kills
    result = subprocess.run(cli_command(config, "--resume"), env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # eval_every changes nothing in training: the reference (no periodic eval) must still match
    assert _same(load_file(str(tmp_path / "checkpoint-20" / "model.safetensors")), reference)


@pytest.mark.slow  # the default suite has one SIGKILL + resume (test_checkpoint.py)
def test_sigkill_at_random_moments(tmp_path, reference):
    _kill_loop(tmp_path, reference, n_kills=3, seed=0)


@pytest.mark.slow
def test_sigkill_soak_ten_moments(tmp_path, reference):
    _kill_loop(tmp_path, reference, n_kills=10, seed=1)
