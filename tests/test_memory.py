"""The start-up memory estimate (minift/memory.py): exact parameter, gradient and AdamW bytes, an
activation estimate checked against the tensors a training step really holds, FSDP's per-rank share,
and the one-line refusal of a setup that cannot fit."""
from __future__ import annotations

import pytest
import torch
from fitting_helpers import base_folder, run_config
from memory import LiveTensorBytes  # benchmarks/memory.py: follows every tensor torch allocates

from minift import memory
from minift.cli import main
from minift.components import build_model, build_tokenizer, model_config_of
from minift.config import RunConfigError, load_config
from minift.lora import apply_lora
from minift.models import GPT2Config, GPTConfig, LlamaConfig
from minift.models import build_model as random_model
from minift.optim import make_adamw

from conftest import REPO

SHAPES = {
    "gpt2": GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=1000, n_positions=128, resid_pdrop=0.1,
                       embd_pdrop=0.1, attn_pdrop=0.1),
    "openai-gpt": GPTConfig(n_layer=3, n_embd=64, n_head=4, vocab_size=1000, n_positions=128, attn_pdrop=0.0),
    "llama": LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
}
LORA = ("lora.r=8", 'lora.target_modules="all-linear"')


def _config(*overrides):
    return load_config(None, ['model.name="a-base"', "train.batch_size=4", "data.max_length=128", *overrides])


def _trained_model(cfg, shape):
    torch.manual_seed(0)
    model = random_model(shape).pad_vocab(cfg.model.pad_vocab_to)
    model.set_hot_path(loss_rows="labelled", fused_head=cfg.model.fused_lm_head)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora.settings(), generator=torch.Generator().manual_seed(0))
    return model.set_activation_checkpointing(cfg.model.activation_checkpointing).train()


@pytest.mark.parametrize("overrides", [(), LORA])
def test_weights_gradients_and_adamw_are_counted_exactly(overrides):
    cfg, shape = _config(*overrides), SHAPES["gpt2"]
    found = memory.estimate(cfg, shape)
    model = _trained_model(cfg, shape)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw(model, lr=1e-3)
    for p in trained:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moments = [t for state in optimizer.state.values() for name, t in state.items() if name != "step"]
    assert found.n_parameters == sum(p.numel() for p in model.parameters())
    assert found.n_trained == sum(p.numel() for p in trained) < (found.n_parameters if overrides else 10 ** 9)
    assert found.parameters == sum(p.numel() * p.element_size() for p in model.parameters())
    assert found.gradients == sum(p.numel() * p.element_size() for p in trained)
    assert found.optimizer == sum(t.numel() * t.element_size() for t in moments)


@pytest.mark.parametrize("family,overrides,rows,length", [
    ("gpt2", (), 4, 64), ("gpt2", (), 8, 128), ("gpt2", ("model.activation_checkpointing=true",), 8, 128),
    ("openai-gpt", LORA, 8, 128), ("llama", (), 8, 128),
    ("llama", (*LORA, "model.activation_checkpointing=true"), 8, 128),
    ("llama", ("model.fused_lm_head=false",), 4, 64),
])
def test_the_estimate_is_near_what_a_training_step_holds(family, overrides, rows, length):
    """Every tensor alive during a training step after the first (AdamW's state allocated), counted
    as torch allocates it: the estimate is within 30 % of its peak."""
    cfg = _config(f"train.batch_size={rows}", f"data.max_length={length}", *overrides)
    shape = SHAPES[family]
    model = _trained_model(cfg, shape)
    ids = torch.randint(0, shape.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))
    optimizer = make_adamw(model, lr=1e-3, fused="no")

    def step():
        out = model(ids, labels=ids)
        (out.loss_sum / out.n_loss_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    live = LiveTensorBytes()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    for tensor in [*model.parameters(), ids, *state]:
        live.track(tensor)
    with live:
        step()
    assert 0.7 < memory.estimate(cfg, shape).total / live.peak < 1.3


def test_fsdp_checkpointing_and_lora_each_lower_what_a_rank_needs():
    shape = SHAPES["llama"]
    full = memory.estimate(_config(), shape)
    fsdp = memory.estimate(_config('train.distributed="fsdp"'), shape, world_size=4)
    model = _trained_model(_config(), shape)
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    root = full.parameters - 3 * block
    assert fsdp.parameters == full.parameters // 4 + block + root and fsdp.optimizer == full.optimizer // 4
    assert fsdp.gradients == full.gradients // 4 + block and fsdp.whole_parameters == full.parameters
    assert "FSDP over 4 ranks" in fsdp.setup
    unsharded = memory.estimate(_config('train.distributed="fsdp"', 'train.fsdp_accumulation="unsharded"',
                                        "train.grad_accum=4"), shape, world_size=4)
    assert (unsharded.parameters, unsharded.gradients) == (full.parameters, full.gradients)
    checkpointed = memory.estimate(_config("model.activation_checkpointing=true"), shape)
    assert checkpointed.activations < full.activations / 2 and checkpointed.parameters == full.parameters
    lora = memory.estimate(_config(*LORA), shape)
    assert lora.gradients < full.gradients / 5 and lora.optimizer < full.optimizer / 5


def test_a_setup_that_cannot_fit_is_refused_with_the_numbers(monkeypatch, capsys):
    base = base_folder(None, "gpt2")
    cfg = run_config(base.parent / "never-written", base)
    tokenizer = build_tokenizer(cfg)
    needed = memory.estimate(cfg, model_config_of(cfg, tokenizer)).total
    monkeypatch.setattr(memory, "available_bytes", lambda device: needed - 1)
    refusal = r"this setup needs about \d+\.\d MiB per rank \(parameters"
    with pytest.raises(RunConfigError, match=refusal) as err:
        build_model(cfg, tokenizer, torch.device("cpu"), say=lambda *_: None)
    assert f"and this machine has {memory.size(needed - 1)} —" in str(err.value)
    assert "train.check_memory = false skips this check" in str(err.value)
    cfg.train.check_memory = False
    lines = []
    build_model(cfg, tokenizer, torch.device("cpu"), say=lines.append)  # said, not refused
    assert lines[0].startswith("memory estimate per rank: parameters ")
    code = main(["train", str(REPO / "configs" / "offline-default.toml"), "--set", f'model.name="{base}"',
                 "--set", 'model.tokenizer=""', "--set", "model.config={}", "--set",
                 f'train.output_dir="{base.parent / "refused"}"'])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("minift: error: this setup needs about") and err.count("\n") == 1
