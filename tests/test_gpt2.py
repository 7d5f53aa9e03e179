"""GPT-2 beside GPT-1: legacy checkpoint keys, EOS handling, a short real run."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minift
from minift.config import load_config
from minift.finetune import build_tokenizer, run

from conftest import REPO, SHARED, shared_path


@pytest.mark.shared
def test_legacy_gpt2_buffers_are_ignored_not_confused_with_c_attn_bias(tmp_path):
    src = shared_path("fixtures", "tiny-gpt2-base")
    d = tmp_path / "legacy"
    shutil.copytree(src, d)
    tensors = load_file(str(d / "model.safetensors"))
    for i in range(2):  # what the hub gpt2 file and older state dicts carry
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(d / "model.safetensors"))
    model = minift.from_pretrained(d)
    reference = minift.from_pretrained(shared_path("fixtures", "tiny-gpt2"))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # but a missing c_attn bias is still an error
    del tensors["h.0.attn.c_attn.bias"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(minift.CheckpointError, match="missing key transformer.h.0.attn.c_attn.bias"):
        minift.from_pretrained(d)


@pytest.mark.shared
def test_gpt2_pads_with_eos_and_keeps_appended_eos_as_a_target():
    cfg = load_config(REPO / "configs" / "gpt2-tweets.toml",
                      [f'model.name="{shared_path("fixtures", "tiny-gpt2")}"'])
    tok = build_tokenizer(cfg)
    assert tok.pad_id == tok.eos_id == 50256 and tok.vocab_size == 50257  # no [PAD] added, no resize
    from minift.collate import Collator

    batch = Collator(pad_id=tok.pad_id)([{"input_ids": [10, 11, 50256]}, {"input_ids": [12, 50256]}])
    assert batch["input_ids"].tolist() == [[10, 11, 50256], [12, 50256, 50256]]
    assert batch["labels"].tolist() == [[10, 11, 50256], [12, 50256, -100]]  # the real EOS is trained on


@pytest.mark.slow
@pytest.mark.shared
def test_short_real_run_tiny_gpt2(tmp_path):
    cfg = load_config(REPO / "configs" / "gpt2-tweets.toml", [
        f'model.name="{shared_path("fixtures", "tiny-gpt2")}"', "data.max_length=64",
        f'data.source="{SHARED / "data" / "tweet_sentiment_extraction"}"', f'train.output_dir="{tmp_path}"',
        "train.max_steps=30", "train.lr=3e-3", "train.batch_size=16", "train.grad_accum=2",
        "train.progress=false", "train.plot=false", "train.checkpoint_every=0", "train.eval_every=0",
        "eval.max_examples=300", "eval.batch_size=100"])
    summary = run(cfg, log=print)
    assert summary["steps"] == 30 and summary["last_loss"] < summary["first_loss"]
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert summary["eval_after"]["n_scored"] == 300 and 0 <= summary["eval_after"]["accuracy"] <= 1
    saved = minift.from_pretrained(tmp_path / "model")
    assert type(saved).__name__ == "GPT2LMHeadModel"
