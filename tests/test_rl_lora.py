"""The RL stage with [lora]: the reference is the policy with its adapter off (no second model in
memory), which computes what a frozen copy of the initial policy computes; a whole run equals the
run whose reference is that copy, and model/ holds the adapter in peft's layout."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from fitting_helpers import base_folder, synthetic_material
from torch import nn

import minift
from minift.lora import LoraSettings, apply_lora
from minift.rl import recipe
from minift.rl.objective import AdapterOffLogProbs, CompletionLogProbs

from conftest import REPO


def test_adapter_off_log_probs_are_the_base_models():
    """After the adapter has moved away from zero, the adapter-off scorer gives the log-probs and
    entropies of the untouched base, bit for bit, and leaves the policy's mode as it was."""
    torch.manual_seed(0)
    lm = minift.build_model(minift.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                              resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
    base = copy.deepcopy(lm).eval()
    apply_lora(lm, LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["c_attn", "c_fc"]),
               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    positions = torch.arange(12).expand(3, 12)
    lm.train()
    with torch.no_grad():
        off = AdapterOffLogProbs(lm, temperature=0.7)(ids, mask, positions, 5)
        plain = CompletionLogProbs(base, temperature=0.7)(ids, mask, positions, 5)
        lm.eval()
        on = CompletionLogProbs(lm, temperature=0.7)(ids, mask, positions, 5)
    assert lm.training is False  # set just above; the scorer restored train mode before
    for a, b in zip(off, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(on[0], off[0])  # the adapter does change the policy


def rl_config(out, base, *overrides):
    data = synthetic_material(base.parent)[0]
    return recipe.load_rl_config(REPO / "configs" / "grpo-tiny.toml", [
        f'model.name="{base}"', 'model.tokenizer=""', "model.config={}", f'data.source="{data}"',
        f'train.output_dir="{out}"', "train.max_steps=3", "train.device=\"cpu\"", "eval.max_examples=8",
        "eval.before_training=false", "rl.beta=0.1", "rl.log_completions=false",
        'rl.reward_funcs=["rl_rewards:vowels"]', "lora.r=4", "lora.alpha=8",
        'lora.target_modules=["c_attn", "c_proj"]', "train.lr=5e-2", *overrides])


def step_records(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step_time" in r]


def test_grpo_with_lora_equals_the_run_with_a_frozen_copy(tmp_path, monkeypatch):
    base = base_folder(None, "gpt2")
    lines = []
    made = []
    real_deepcopy = copy.deepcopy

    def recording_deepcopy(value, *args, **kwargs):
        made.append(isinstance(value, nn.Module))
        return real_deepcopy(value, *args, **kwargs)

    monkeypatch.setattr(recipe.copy, "deepcopy", recording_deepcopy)
    recipe.run_rl(rl_config(tmp_path / "off", base), log=lines.append)
    assert "rl: the reference is the policy with its LoRA adapter off (no second model)" in lines
    assert not any(made), "a second model was made"
    monkeypatch.setattr(recipe, "holds_adapter", lambda model: False)  # the reference: a frozen copy
    recipe.run_rl(rl_config(tmp_path / "copy", base), log=lambda *_: None)
    assert any(made)

    off, frozen = step_records(tmp_path / "off"), step_records(tmp_path / "copy")
    assert len(off) == len(frozen) == 3
    for a, b in zip(off, frozen):
        for key in ("loss", "kl", "reward", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    assert max(r["kl"] for r in off) > 0  # the policy moved away from the reference
    folder = tmp_path / "off" / "model"
    assert (folder / "adapter_config.json").exists() and not (folder / "model.safetensors").exists()
    from safetensors.torch import load_file

    a = load_file(folder / "adapter_model.safetensors")
    b = load_file(tmp_path / "copy" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
