"""torchrun with 2 CPU processes (gloo) equals one process with the doubled batch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SHARED, shared_path

# slow: each run starts two gloo processes (~30 s together); CI runs them in its second step
pytestmark = [pytest.mark.shared, pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(),
                                                     reason="torch.distributed is not available")]


def _config(path, output_dir, batch_size):
    model = shared_path("fixtures", "tiny-openai-gpt")
    path.write_text(f"""
[model]
name = "{model}"
config = {{ resid_pdrop = 0.0, embd_pdrop = 0.0, attn_pdrop = 0.0 }}
[data]
source = "{SHARED / 'data' / 'tweet_sentiment_extraction'}"
max_train_examples = 64
sampler = "random"
max_length = 64
[train]
output_dir = "{output_dir}"
max_steps = 6
batch_size = {batch_size}
grad_accum = 2
lr = 1e-3
weight_decay = 0.01
warmup_steps = 1
checkpoint_every = 2
keep_checkpoints = 10
progress = false
plot = false
[eval]
max_examples = 40
batch_size = 8
""")
    return path


def _run(args, nproc=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               "29533", "-m", "minift", *args]
    else:
        cmd = [sys.executable, "-m", "minift", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    single = _run(["train", str(_config(root / "single.toml", root / "single", batch_size=8))])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _run(["train", str(_config(root / "ddp.toml", root / "ddp", batch_size=4))], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return root


def test_two_ranks_equal_one_process_with_the_doubled_batch(runs):
    for step in (2, 4, 6):
        one = load_file(str(runs / "single" / f"checkpoint-{step}" / "model.safetensors"))
        two = load_file(str(runs / "ddp" / f"checkpoint-{step}" / "model.safetensors"))
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=f"step {step} {key}")
    logs = {}
    for name in ("single", "ddp"):
        records = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
        logs[name] = [r for r in records if "step_time" in r]
    assert [r["loss_tokens"] for r in logs["ddp"]] == [r["loss_tokens"] for r in logs["single"]]
    assert [r["loss"] for r in logs["ddp"]] == pytest.approx([r["loss"] for r in logs["single"]], abs=1e-5)


def test_eval_is_reduced_over_ranks(runs):
    one = json.loads((runs / "single" / "summary.json").read_text())
    two = json.loads((runs / "ddp" / "summary.json").read_text())
    for key in ("eval_before", "eval_after"):
        assert two[key]["loss"] == pytest.approx(one[key]["loss"], rel=1e-6)
        assert two[key]["n_loss_targets"] == one[key]["n_loss_targets"]
        assert two[key]["accuracy"] == one[key]["accuracy"] and two[key]["n_scored"] == 40


def test_ddp_resume_is_exact_and_another_world_size_is_refused(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs / "ddp", resumed)
    for step in (4, 6):
        shutil.rmtree(resumed / f"checkpoint-{step}")
    config = _config(tmp_path / "resume.toml", resumed, batch_size=4)
    refused = _run(["train", str(config), "--resume"])
    assert refused.returncode != 0
    assert "checkpoint was written with world size 2, this run has 1" in refused.stderr
    result = _run(["train", str(config), "--resume"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_file(str(runs / "ddp" / "checkpoint-6" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint-6" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_on_two_ranks_equals_one_process_with_the_doubled_batch(tmp_path):
    """The preference stage runs the same loop: DPO (frozen reference) on 2 gloo ranks x 4 pairs equals one
    process with 8 pairs per micro-batch — weights, logged loss and rewards/* per step."""
    shared_path("data", "tweet_sentiment_extraction")
    common = [str(REPO / "configs" / "dpo-tiny.toml"),
              "--set", f'model.tokenizer="{SHARED / "tokenizers" / "openai-gpt"}"',
              "--set", f'data.source="{SHARED / "data" / "tweet_sentiment_extraction"}"',
              "--set", "train.max_steps=4", "--set", "pairs.max_train_pairs=64",
              "--set", "pairs.max_eval_pairs=16"]
    for name, batch, nproc in (("single", 8, None), ("ddp", 4, 2)):
        result = _run(["dpo", *common, "--set", f'train.output_dir="{tmp_path / name}"',
                       "--set", f"train.batch_size={batch}"], nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
    one = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
    logs = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                   if '"step_time"' in x] for name in ("single", "ddp")}
    assert len(logs["single"]) == len(logs["ddp"]) == 4
    for mine, theirs in zip(logs["ddp"], logs["single"]):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), key
