"""The settings that fit bigger models ([lora], model.activation_checkpointing, train.distributed) as
the shared builders apply them for every stage, and what minift refuses in one line."""
from __future__ import annotations

import json

import pytest
import torch
from fitting_helpers import base_folder, run_config

import minift
from minift import checkpoint as ckpt
from minift.cli import main
from minift.components import build_model, build_optimizer, build_tokenizer
from minift.config import RunConfigError, describe, load_config
from minift.lora import LoraLinear, lora_settings, merged_state_dict, trainable_parameters
from minift.models import LlamaConfig

from conftest import REPO


def test_the_lora_section_takes_pefts_fields(tmp_path):
    cfg = load_config(None, ["lora.r=8", "lora.alpha=16", "lora.dropout=0.05",
                             'lora.target_modules="all-linear"',
                             "lora.use_rslora=true", 'lora.bias="lora_only"', 'lora.modules_to_save=["ln_f"]',
                             'lora.init="gaussian"', f'model.name="{tmp_path}"'])
    settings = cfg.lora.settings()
    assert (settings.r, settings.alpha, settings.dropout) == (8, 16.0, 0.05)
    assert settings.target_modules == "all-linear"
    assert settings.use_rslora and settings.bias == "lora_only" and settings.modules_to_save == ("ln_f",)
    assert settings.scaling == 16 / 8 ** 0.5 and settings.init == "gaussian"
    listed = load_config(None, ["lora.r=4", 'lora.target_modules=["c_proj", "c_attn"]',
                                f'model.name="{tmp_path}"'])
    assert listed.lora.settings().target_modules == ("c_attn", "c_proj")
    assert load_config(None, []).lora.settings() is None  # r = 0: no LoRA
    assert "lora.target_modules" in describe() and "train.distributed" in describe()


@pytest.mark.parametrize("overrides,message", [
    (["lora.r=8", "model.name=random"], 'model.name = "random" is none that the saved adapter could name'),
    (["lora.r=-1"], r"\[lora\] r must be >= 0"),
    (["lora.r=8", 'lora.bias="some"', 'model.name="gpt2"'], r"\[lora\]: bias must be one of"),
    (["lora.r=8", "lora.dropout=1.0", 'model.name="gpt2"'], r"\[lora\]: dropout must be in \[0, 1\)"),
    (['train.distributed="zero"'], r"train.distributed 'zero': one of \['ddp', 'fsdp'\]"),
    (['train.distributed="fsdp"', 'train.compat="trainer"'], 'Trainer\'s numbers are those of one process'),
    (['train.distributed="fsdp"', 'train.precision="fp16"'], 'use "bf16" \\(no scaler\\) or "fp32"'),
    (['train.distributed="fsdp"', "model.compile=true"], "model.compile = true is not supported"),
    (['train.distributed="fsdp"', 'train.fsdp_accumulation="lazy"'], "train.fsdp_accumulation 'lazy'"),
    (['train.distributed="fsdp"', "train.load_best_model_at_end=true", "train.eval_every=2",
      "train.checkpoint_every=2"], "load_best_model_at_end = true is not supported"),
])
def test_combinations_minift_cannot_honour_are_refused_in_one_line(overrides, message):
    with pytest.raises(RunConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_build_model_adds_the_adapter_and_checkpointing_for_every_stage(tmp_path):
    """build_model (shared by train, dpo, reward and the RL stage): the adapter on the model with the
    grown vocabulary, only the adapter in the optimizer; activation checkpointing on."""
    base = base_folder(None, "gpt2", with_pad=False)
    cfg = run_config(tmp_path / "run", base, "lora.r=4", 'lora.target_modules=["c_attn"]',
                     "model.activation_checkpointing=true")
    tokenizer = build_tokenizer(cfg)
    lines = []
    model = build_model(cfg, tokenizer, torch.device("cpu"), say=lines.append)
    assert model.config.vocab_size == tokenizer.vocab_size == 287  # the [PAD] row added before the adapter
    assert lora_settings(model).target_modules == ("c_attn",) and model.activation_checkpointing
    trained = trainable_parameters(model)
    assert sorted(trained) == [f"transformer.h.{i}.attn.c_attn.lora_{m}.weight" for i in (0, 1) for m in "AB"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(trained)
    optimizer = build_optimizer(cfg, model)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in trained.values()}
    assert lines[0].startswith("memory estimate per rank: ")
    assert "LoRA r = 4, activation checkpointing" in lines[0]
    # the adapter starts from a generator seeded train.seed: two builds, one adapter
    again = build_model(cfg, tokenizer, torch.device("cpu"), say=lines.append)
    assert all(torch.equal(p, trainable_parameters(again)[n]) for n, p in trained.items())


def test_llama_blocks_checkpoint_with_the_same_gradients():
    torch.manual_seed(0)
    model = minift.build_model(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=32)).double().train()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss_sum.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    checkpointed = grads() if model.set_activation_checkpointing(True).activation_checkpointing else None
    assert model.model.activation_checkpointing
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-12, msg=name)


def test_merged_state_dict_is_what_merging_leaves(tmp_path):
    """The export of a reward model with an adapter: the merged state dict, computed without
    touching the model, equals merge_adapters' (a trained copy under its original's keys)."""
    from minift.lora import LoraSettings, apply_lora, merge_adapters

    torch.manual_seed(0)
    config = minift.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    model = minift.build_model(config)
    apply_lora(model, LoraSettings(r=4, target_modules=["c_attn", "c_fc"], modules_to_save=["ln_f"],
                                   bias="lora_only"), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_B.weight.normal_()
        model.transformer.ln_f.modules_to_save.weight.add_(1.0)
    merged = merged_state_dict(model)
    assert any(isinstance(m, LoraLinear) for m in model.modules())  # untouched
    expected = merge_adapters(model).state_dict()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)


def test_a_checkpoint_older_than_a_setting_resumes_when_the_setting_is_at_its_default(tmp_path):
    cfg = load_config(REPO / "configs" / "offline-default.toml", [])
    saved = cfg.to_dict()
    del saved["lora"], saved["train"]["distributed"], saved["model"]["activation_checkpointing"]
    (tmp_path / ckpt.RUN_CONFIG).write_text(json.dumps(saved))
    (tmp_path / ckpt.MANIFEST).write_text(json.dumps({"files": {}}))
    assert ckpt.resume_differences(tmp_path, cfg.to_dict(), {}) == []
    changed = load_config(REPO / "configs" / "offline-default.toml", ['train.distributed="fsdp"'])
    assert ckpt.resume_differences(tmp_path, changed.to_dict(), {}) == [("train.distributed", None, "fsdp")]


def test_a_target_that_matches_nothing_is_refused_before_training(tmp_path, capsys):
    base = base_folder(None, "openai-gpt")
    cfg = run_config(tmp_path / "run", base)
    code = main(["train", str(REPO / "configs" / "offline-default.toml"), "--set", f'model.name="{base}"',
                 "--set", 'model.tokenizer=""', "--set", "model.config={}", "--set",
                 f'train.output_dir="{cfg.train.output_dir}"', "--set", "lora.r=4", "--set",
                 'lora.target_modules=["q_proj"]'])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert ("'q_proj' matches no module of GPT1LMHeadModel; its linear layers are named c_attn, c_fc, "
            "c_proj") in err


def test_fsdp_is_refused_for_a_stage_that_generates_and_a_checkpoint_of_the_other_kind():
    from types import SimpleNamespace

    from minift.distributed import Distributed
    from minift.errors import ResumeRefused
    from minift.orchestration import check_sharding

    cfg = load_config(None, ['train.distributed="fsdp"'])
    lines = []
    check_sharding(cfg, SimpleNamespace(name="grpo"), Distributed(), lines.append)  # said, not refused
    assert lines == ['train.distributed = "fsdp": one process, nothing to shard (start with torchrun '
                     '--nproc-per-node N)']
    for name in ("train", "dpo", "reward"):
        check_sharding(cfg, SimpleNamespace(name=name), Distributed(world_size=2), lines.append)
    with pytest.raises(RunConfigError, match='not supported by the grpo stage .it generates with the model'):
        check_sharding(cfg, SimpleNamespace(name="grpo"), Distributed(world_size=2), lines.append)
    with pytest.raises(ResumeRefused, match='holds the model sharded by FSDP; resume it with '
                                            'train.distributed = "fsdp" under torchrun'):
        ckpt._check_sharding("checkpoint-4", saved_sharded=True, sharded=False)
    with pytest.raises(ResumeRefused, match=r"holds the model whole \(one process or DDP\)"):
        ckpt._check_sharding("checkpoint-4", saved_sharded=False, sharded=True)
