"""FSDP2 (train.distributed = "fsdp") under torchrun with 2 gloo ranks on the CPU: equal to one process
with the doubled batch (weights and losses, full fine-tuning and LoRA), bit-identical after SIGKILL and
resume, a model/ transformers loads, another world size refused."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from fitting_helpers import base_folder, cli_sets, run_config
from safetensors.torch import load_file

import minift

from conftest import REPO

# slow: every run starts two gloo processes (~10 s each on two busy cores)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(),
                                                   reason="torch.distributed is not available")]

COMMON = ("train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=10",
          "train.weight_decay=0.01", "train.warmup_steps=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(config, *extra, nproc=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(_free_port())] if nproc else [sys.executable]
    return [*launcher, "-m", "minift", "train", str(REPO / "configs" / "offline-default.toml"),
            *cli_sets(config), *extra], env


def _run(config, *extra, nproc=None):
    command, env = _command(config, *extra, nproc=nproc)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def _step_losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"step_time"' in x]


def _assert_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Full fine-tuning of a GPT-2-shaped base: one process with 16 rows per micro-batch, and FSDP
    on 2 ranks with 8 each; then LoRA (with activation checkpointing and unsharded accumulation)
    the same two ways."""
    root = tmp_path_factory.mktemp("fsdp")
    base = base_folder(None, "gpt2")
    configs = {
        "single": run_config(root / "single", base, *COMMON, "train.batch_size=16"),
        "fsdp": run_config(root / "fsdp", base, *COMMON, "train.batch_size=8", 'train.distributed="fsdp"'),
        "lora-single": run_config(root / "lora-single", base, *COMMON, "train.batch_size=16", "lora.r=4",
                                  'lora.target_modules="all-linear"'),
        "lora-fsdp": run_config(root / "lora-fsdp", base, *COMMON, "train.batch_size=8", "lora.r=4",
                                'lora.target_modules="all-linear"', 'train.distributed="fsdp"',
                                'train.fsdp_accumulation="unsharded"', "model.activation_checkpointing=true"),
    }
    for name, config in configs.items():
        result = _run(config, nproc=2 if "fsdp" in name else None)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    return root, configs


def test_two_sharded_ranks_equal_one_process(runs):
    root, _ = runs
    _assert_close(load_file(str(root / "fsdp" / "model" / "model.safetensors")),
                  load_file(str(root / "single" / "model" / "model.safetensors")))
    assert _step_losses(root / "fsdp") == pytest.approx(_step_losses(root / "single"), abs=1e-5)
    shards = json.loads((root / "fsdp" / "checkpoint-6" / "manifest.json").read_text())["files"]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "training_state.pt"} <= shards.keys()
    assert "model.safetensors" not in shards
    one = json.loads((root / "single" / "summary.json").read_text())["eval_after"]
    two = json.loads((root / "fsdp" / "summary.json").read_text())["eval_after"]
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5) and two["accuracy"] == one["accuracy"]


def test_lora_with_checkpointing_and_unsharded_accumulation_equals_one_process(runs):
    root, _ = runs
    adapter = "adapter_model.safetensors"
    _assert_close(load_file(str(root / "lora-fsdp" / "model" / adapter)),
                  load_file(str(root / "lora-single" / "model" / adapter)))
    assert _step_losses(root / "lora-fsdp") == pytest.approx(_step_losses(root / "lora-single"), abs=1e-5)
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(root / "lora-fsdp" / "checkpoint-6")).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert len(model_keys) == 16 and all(".lora_" in k for k in model_keys)  # the adapter, not the base


def test_sigkill_then_resume_is_bit_identical(runs, tmp_path):
    """SIGKILL to every process of the torchrun (mid-run, after step 3 was logged), then --resume on
    2 ranks: the same weights, bit for bit, as the uninterrupted run."""
    root, configs = runs
    config = run_config(tmp_path, base_folder(None, "gpt2"), *COMMON, "train.batch_size=8",
                        'train.distributed="fsdp"')
    command, env = _command(config, nproc=2)
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"step_time"') >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    assert not (tmp_path / "checkpoint-6").exists()
    result = _run(config, "--resume", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: " in result.stdout
    resumed = load_file(str(tmp_path / "model" / "model.safetensors"))
    uninterrupted = load_file(str(root / "fsdp" / "model" / "model.safetensors"))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert _step_losses(tmp_path) == _step_losses(root / "fsdp")


def test_another_world_size_is_refused(runs, tmp_path):
    import shutil

    root, configs = runs
    shutil.copytree(root / "fsdp", tmp_path / "run")
    config = run_config(tmp_path / "run", base_folder(None, "gpt2"), *COMMON, "train.batch_size=8",
                        'train.distributed="fsdp"')
    refused = _run(config, "--resume=" + str(tmp_path / "run" / "checkpoint-4"))
    assert refused.returncode == 2
    assert "checkpoint was written with world size 2, this run has 1" in refused.stderr


@pytest.mark.requires("transformers")
def test_the_gathered_model_loads_in_transformers(runs):
    from transformers import AutoModelForCausalLM

    root, _ = runs
    ids = torch.randint(0, 287, (2, 10), generator=torch.Generator().manual_seed(0))
    theirs = AutoModelForCausalLM.from_pretrained(root / "fsdp" / "model", dtype=torch.float32).eval()
    mine = minift.from_pretrained(root / "fsdp" / "model")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, mine(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_pair_stages_with_lora_on_two_sharded_ranks_equal_one_process(stage, tmp_path):
    """DPO (its reference the adapter-off policy, run through the sharded model) and the reward model
    (its score head sharded at the root) with LoRA: 2 FSDP ranks x 4 pairs equal one process x 8."""
    from minift.preference.config import PreferenceConfig

    base = base_folder(None, "openai-gpt")
    outputs = {}
    for name, batch, nproc in (("single", 8, None), ("fsdp", 4, 2)):
        config = run_config(tmp_path / name, base, "lora.r=4", "train.max_steps=3",
                            f"train.batch_size={batch}",
                            "pairs.max_train_pairs=48", "pairs.max_eval_pairs=8", 'train.distributed="fsdp"',
                            path=REPO / "configs" / f"{stage}-tiny.toml", stage=PreferenceConfig)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(_free_port())] if nproc else [sys.executable]
        command = [*launcher, "-m", "minift", stage, str(REPO / "configs" / f"{stage}-tiny.toml"),
                   *cli_sets(config), "--set", "pairs.max_train_pairs=48", "--set", "pairs.max_eval_pairs=8"]
        result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                                capture_output=True, text=True, timeout=600, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = tmp_path / name
    weights = "adapter_model.safetensors" if stage == "dpo" else "model.safetensors"
    _assert_close(load_file(str(outputs["fsdp"] / "model" / weights)),
                  load_file(str(outputs["single"] / "model" / weights)))
    assert _step_losses(outputs["fsdp"]) == pytest.approx(_step_losses(outputs["single"]), abs=1e-5)
