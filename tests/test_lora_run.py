"""LoRA through the stages ([lora] in the run config): checkpoints that hold the adapter and its
optimizer state only and resume bit for bit, model/ in peft's layout that peft, transformers (merged)
and every minift command load, DPO's reference as the adapter-off policy, the reward model."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from fitting_helpers import base_folder, run_config
from helpers import run_until_crash
from safetensors.torch import load_file
from torch import nn

import minift
from minift import checkpoint as ckpt
from minift.cli import main
from minift.finetune import run
from minift.lora import LoraSettings, adapters_disabled, apply_lora, trainable_parameters
from minift.optim import make_adamw

from conftest import REPO

LORA = ("lora.r=4", "lora.alpha=8", "lora.dropout=0.1")
TARGETS = ('lora.target_modules=["c_attn", "c_proj"]', "train.checkpoint_every=3")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Eight LoRA steps on a GPT-2-shaped base whose vocabulary the run grows by [PAD]."""
    root = tmp_path_factory.mktemp("lora")
    base = base_folder(None, "gpt2", with_pad=False)
    config = run_config(root / "run", base, *LORA, *TARGETS)
    run(config, log=lambda *_: None)
    return root / "run", base


def test_checkpoints_hold_the_adapter_and_resume_bit_identically(lora_run, tmp_path, monkeypatch):
    out, base = lora_run
    final = out / "checkpoint-8"
    assert not (final / "model.safetensors").exists()
    adapter = load_file(str(final / ckpt.ADAPTER_STATE))
    assert sorted(adapter) == sorted(f"transformer.h.{i}.{m}.lora_{ab}.weight" for i in (0, 1)
                                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj") for ab in "AB")
    state = ckpt.load_training_state(final)
    assert len(state["optimizer"]["state"]) == len(adapter)  # AdamW's moments of the adapter only
    # crash at step 5 (the newest checkpoint is step 3: dropout's RNG and the data position are replayed)
    config = run_config(tmp_path, base, *LORA, *TARGETS)
    run_until_crash(config, 5, monkeypatch)
    run(config, resume=True, log=lambda *_: None)
    resumed = load_file(str(tmp_path / "checkpoint-8" / ckpt.ADAPTER_STATE))
    assert all(torch.equal(resumed[k], adapter[k]) for k in adapter)
    again = ckpt.load_training_state(tmp_path / "checkpoint-8")["optimizer"]["state"]
    for a, b in zip(state["optimizer"]["state"].values(), again.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.requires("peft", "transformers")
def test_model_folder_loads_in_peft_and_merges_for_transformers(lora_run, tmp_path):
    """model/ is peft's layout: PeftModel.from_pretrained on the (grown) base gives the logits of
    minift's base + adapter; ``minift merge`` writes weights transformers loads to the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, base = lora_run
    model_dir = out / "model"
    config = json.loads((model_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["fan_in_fan_out"]
    ids = torch.randint(0, 287, (2, 12), generator=torch.Generator().manual_seed(3))
    mine = _logits(minift.from_pretrained(model_dir), ids)
    theirs_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs_base.resize_token_embeddings(287, mean_resizing=False)
    with torch.no_grad():  # the row minift added for [PAD]: the mean of the others
        embedding = theirs_base.get_input_embeddings().weight
        embedding[286] = embedding[:286].mean(0)
    peft_model = PeftModel.from_pretrained(theirs_base, model_dir).eval()
    torch.testing.assert_close(_logits(peft_model, ids), mine, rtol=0, atol=1e-5)
    assert main(["merge", str(model_dir), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, ids), mine, rtol=0, atol=1e-5)


def test_inference_commands_read_an_adapter_folder(lora_run, tmp_path, capsys):
    """predict, generate and eval --model take model/ (base + adapter) as they take merged weights."""
    out, _ = lora_run
    assert main(["merge", str(out / "model"), str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    results = {}
    for name, folder in (("adapter", out / "model"), ("merged", tmp_path / "merged")):
        assert main(["predict", "i love the new phone", "--model", str(folder)]) == 0
        assert main(["generate", "the concert", "--model", str(folder), "--temperature", "0"]) == 0
        assert main(["eval", str(REPO / "configs" / "offline-default.toml"), "--model", str(folder), "--set",
                     f'train.output_dir="{out}"', "--set", "eval.max_examples=24"]) == 0
        results[name] = capsys.readouterr().out.replace(str(folder), "MODEL")
    assert results["adapter"] == results["merged"]


def test_a_merge_of_full_weights_is_refused(lora_run, capsys):
    out, base = lora_run
    assert main(["merge", str(base), str(out / "nowhere")]) == 2
    assert f"minift merge: {base} holds full weights already" in capsys.readouterr().err


# -- DPO: the reference is the base, the adapter off ---------------------------------------------------
def test_adapter_off_reference_gives_the_frozen_copy_losses():
    """Three DPO steps with the adapter-off policy as reference equal three with a frozen copy of
    the initial policy (what reference = "frozen" holds without LoRA)."""
    from minift.preference.dpo import DPOObjective, SequenceLogProbs

    torch.manual_seed(0)
    lm = minift.build_model(minift.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    apply_lora(lm, LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["c_attn"]),
               generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pair_index": torch.arange(2)}

    def losses(objective, policy):
        scorer = SequenceLogProbs(policy).train()
        optimizer = make_adamw(scorer, lr=1e-2)
        out = []
        for step in range(3):
            torch.manual_seed(step)  # LoRA dropout
            loss = objective(scorer, batch, torch.device("cpu")).loss_sum
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out.append(loss.item())
        return out

    frozen = SequenceLogProbs(copy.deepcopy(lm)).eval().requires_grad_(False)
    with_copy = losses(DPOObjective(reference=frozen), copy.deepcopy(lm))
    adapter_off = losses(DPOObjective(adapter_off_reference=True), lm)
    assert adapter_off == pytest.approx(with_copy, abs=1e-7) and with_copy[0] != with_copy[2]
    with adapters_disabled(lm), torch.no_grad():  # the adapter trained; the base did not
        torch.testing.assert_close(SequenceLogProbs(lm).eval()(ids, torch.ones_like(ids), labels),
                                   frozen(ids, torch.ones_like(ids), labels), rtol=0, atol=0)


def test_dpo_with_lora_makes_no_second_model(tmp_path, monkeypatch):
    from minift.preference import recipe

    base = base_folder(None, "openai-gpt")
    cfg = run_config(tmp_path / "dpo", base, "lora.r=4", "train.max_steps=2", "pairs.max_train_pairs=32",
                     "pairs.max_eval_pairs=8", path=REPO / "configs" / "dpo-tiny.toml")
    copied = []
    real_deepcopy = copy.deepcopy

    def recording_deepcopy(value, *args, **kwargs):
        copied.append(type(value).__name__)
        assert not isinstance(value, nn.Module), "a second model was made"
        return real_deepcopy(value, *args, **kwargs)

    monkeypatch.setattr(recipe.copy, "deepcopy", recording_deepcopy)
    lines = []
    summary = recipe.run_dpo(cfg, log=lines.append)
    assert summary["steps"] == 2 and "RunConfig" in copied  # without_dropout copies the config only
    assert "dpo: the reference is the policy with its LoRA adapter off (no second model)" in lines
    assert (tmp_path / "dpo" / "model" / "adapter_config.json").exists()


def test_a_reward_model_with_lora_exports_merged_weights(tmp_path):
    """The reward model trains its adapter and score head; model/ holds the merged weights that
    ``minift score`` loads, scoring as the adapted model in the checkpoint does."""
    from minift.components import build_model, build_tokenizer
    from minift.preference.recipe import run_reward
    from minift.preference.reward import RewardModel, load_reward_model

    base = base_folder(None, "openai-gpt")
    cfg = run_config(tmp_path / "reward", base, "lora.r=4", "train.max_steps=3", "pairs.max_train_pairs=32",
                     "pairs.max_eval_pairs=8", "train.checkpoint_every=3",
                     path=REPO / "configs" / "reward-tiny.toml")
    run_reward(cfg, log=lambda *_: None)
    adapter = load_file(str(tmp_path / "reward" / "checkpoint-3" / ckpt.ADAPTER_STATE))
    assert "score.weight" in adapter and any("lora_A" in k for k in adapter)
    tokenizer = build_tokenizer(cfg)
    lm = build_model(cfg, tokenizer, torch.device("cpu"), say=lambda *_: None)
    adapted = RewardModel(lm, tokenizer.pad_id)
    ckpt.load_model_state(adapted, tmp_path / "reward" / "checkpoint-3")
    assert trainable_parameters(adapted).keys() == adapter.keys()
    ids = torch.randint(0, 286, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = adapted.eval()(ids, mask)
        exported = load_reward_model(tmp_path / "reward" / "model")(ids, mask)
    torch.testing.assert_close(exported, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.requires("peft", "transformers")
@pytest.mark.parametrize("family", ["openai-gpt", "llama"])
def test_every_family_trains_an_adapter_peft_loads(family, tmp_path):
    """GPT-1 (nn.Linear-free Conv1D layout) and the Llama decoder (nn.Linear, peft's default targets
    q_proj and v_proj) as GPT-2 above: model/ loads in peft and merges for transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = base_folder(None, family)
    run(run_config(tmp_path / "run", base, "lora.r=4", "train.max_steps=3"), log=lambda *_: None)
    ids = torch.randint(0, 287, (2, 12), generator=torch.Generator().manual_seed(3))
    mine = _logits(minift.from_pretrained(tmp_path / "run" / "model"), ids)
    assert (mine - _logits(minift.from_pretrained(base), ids)).abs().max() > 1e-4  # the adapter trained
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                       tmp_path / "run" / "model").eval()
    torch.testing.assert_close(_logits(theirs, ids), mine, rtol=0, atol=1e-5)
    assert main(["merge", str(tmp_path / "run" / "model"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, ids), mine, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_lora_with_compile_and_checkpointing_equals_the_plain_run(tmp_path):
    """model.compile and model.activation_checkpointing beside [lora] in a run: the adapter and the
    losses of the plain run, within float error."""
    base = base_folder(None, "gpt2")
    plain = run_config(tmp_path / "plain", base, "lora.r=4", "train.max_steps=4", 'data.sampler="packed"')
    fitted = run_config(tmp_path / "fitted", base, "lora.r=4", "train.max_steps=4", 'data.sampler="packed"',
                        "model.compile=true", "model.activation_checkpointing=true")
    for config in (plain, fitted):
        run(config, log=lambda *_: None)
    a = load_file(str(tmp_path / "plain" / "model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fitted" / "model" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    losses = {}
    for name in ("plain", "fitted"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(x)["loss"] for x in lines if '"step_time"' in x]
    assert losses["fitted"] == pytest.approx(losses["plain"], abs=1e-5)
