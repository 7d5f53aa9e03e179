"""peft's LoRA and minift's on the same model, adapter, batch and optimizer.

Each case (CASES) starts both sides from the same adapter: the base checkpoint's values, with
every lora_A drawn U(-1/sqrt(in), 1/sqrt(in)) and every lora_B N(0, 0.05^2) from one seeded
generator, in the sorted order of peft's checkpoint keys (B non-zero, so A gets a gradient at
step 0 as well). Every dropout of the base model is 0; LoRA dropout, where a case has it, draws
from torch's global RNG seeded before each forward, on both sides in the same module order.
Then ``STEPS`` AdamW steps (lr 1e-2, weight decay 0.1 on all but biases and LayerNorm, as Trainer
splits it; no clipping) on one batch, float32 throughout. Adam's eps is 1e-6, not 1e-8: the key
part of ``c_attn``'s bias has a zero gradient in exact arithmetic (softmax ignores what a key bias
adds to every score of a query), and with eps 1e-8 Adam turns its float32 noise (1e-11) into
updates of random sign of up to lr, different on two correct implementations.

Recorded per case: the eval-mode logits before training (first ``LOGIT_COLUMNS`` columns and the
log-sum-exp over the whole vocabulary), the training loss of every step, the adapter's
gradients at step 0 and its weights after the last step, under peft's checkpoint keys.

``python3 tests/peft_lora.py`` (peft and transformers installed) writes
``tests/data/peft_lora_trace.safetensors`` from peft, so machines without peft still compare
minift with it (tests/test_lora.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "benchmarks"))  # conftest imports the harness

from conftest import FIXTURES  # noqa: E402

TRACE = HERE / "data" / "peft_lora_trace.safetensors"
STEPS = 3
LR, WEIGHT_DECAY, EPS = 1e-2, 0.1, 1e-6
LOGIT_COLUMNS = 16
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
# minift's LoraSettings fields; peft's LoraConfig gets the same values under its names
CASES = {
    # GPT-2's Conv1D layout; "c_proj" matches attn.c_proj and mlp.c_proj; LoRA dropout
    "gpt2": {"fixture": "tiny-gpt2", "lora": {"r": 4, "alpha": 8, "dropout": 0.1,
                                               "target_modules": ["c_attn", "c_proj", "c_fc"],
                                               "bias": "lora_only", "modules_to_save": ["ln_f"]}},
    # GPT-1, a dotted suffix, rsLoRA scaling, every bias trained
    "gpt1": {"fixture": "tiny-openai-gpt",
             "lora": {"r": 2, "alpha": 4, "use_rslora": True, "target_modules": ["c_attn", "mlp.c_proj"],
                      "bias": "all"}},
    # plain nn.Linear layers: a regex target, a Linear head as a trained copy
    "toy": {"fixture": None,
            "lora": {"r": 3, "alpha": 6, "dropout": 0.2, "target_modules": r".*\.(q_proj|up_proj)",
                     "bias": "lora_only", "modules_to_save": ["lm_head"]}},
    # a Llama-shaped transformers model (q/k/v/o, gate/up/down nn.Linear, untied head) under minift's
    # adapter: "all-linear" leaves the head out; not in the stored trace (it needs transformers)
    "llama-hf": {"fixture": None,
                 "lora": {"r": 4, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear",
                          "modules_to_save": ["model.norm"]}},
}
TRACED = ("gpt2", "gpt1", "toy")


class ToyBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.up_proj = nn.Linear(width, 2 * width)
        self.down_proj = nn.Linear(2 * width, width)

    def forward(self, h):
        x = self.norm(h)
        gated = self.v_proj(x) * torch.sigmoid(self.q_proj(x))
        return h + gated + self.down_proj(nn.functional.gelu(self.up_proj(x)))


class ToyLM(nn.Module):
    """A small model made only of nn.Linear projections (the layout of Llama-style models)."""

    def __init__(self, vocab: int = 48, width: int = 16, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(ToyBlock(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)
        return self.lm_head(self.norm(h))


def llama_model():
    """A tiny random transformers LlamaForCausalLM (grouped-query attention, untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def toy_model() -> ToyLM:
    torch.manual_seed(0)
    model = ToyLM()
    with torch.no_grad():  # biases and norms away from 0 / 1, so a dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(case: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(input_ids, attention_mask, labels): the fixture's reference batch (pads labelled -100),
    or seeded ids for the toy."""
    fixture = CASES[case]["fixture"]
    if fixture is None:  # toy, llama-hf: vocabulary 48
        ids = torch.randint(0, 48, (3, 9), generator=torch.Generator().manual_seed(1))
        return ids, None, ids
    ref = np.load(FIXTURES / fixture / "reference_logits.npz")
    ids, mask = torch.from_numpy(ref["input_ids"]), torch.from_numpy(ref["attention_mask"])
    return ids, mask, ids.masked_fill(mask == 0, -100)


def toy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                       labels[:, 1:].reshape(-1))


def plain_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the toy or of a transformers model called with ids alone."""
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def initial_adapter(base_values: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The starting adapter under peft's checkpoint keys (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(base_values):
        value = base_values[key].detach().clone()
        if key.endswith("lora_A.weight"):
            bound = value.shape[1] ** -0.5
            value = (torch.rand(value.shape, generator=generator) * 2 - 1) * bound
        elif key.endswith("lora_B.weight"):
            value = torch.randn(value.shape, generator=generator) * 0.05
        out[key] = value
    return out


def record_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"logits_head": logits[..., :LOGIT_COLUMNS].detach().clone(),
            "logits_lse": torch.logsumexp(logits.detach().double(), dim=-1).float()}


# -- minift ----------------------------------------------------------------------------------------------
def minift_model(case: str):
    """The model minift adapts: its own GPT-1/GPT-2, or the toy (llama-hf: ``llama_model()``, which
    needs transformers)."""
    import minift

    if CASES[case]["fixture"] is None:
        return toy_model()
    return minift.from_pretrained(FIXTURES / CASES[case]["fixture"], **NO_DROPOUT)


def run_minift(case: str, model: nn.Module | None = None) -> dict[str, object]:
    """minift's side, on ``model`` (default: ``minift_model(case)``), from ``initial_adapter`` of
    minift's own adapter: the same tensors peft's side starts from when the key names agree."""
    from minift.lora import (
        LoraSettings,
        apply_lora,
        load_peft_state_dict,
        peft_state_dict,
        trainable_parameters,
    )
    from minift.lora.peft_format import PEFT_PREFIX, peft_key
    from minift.optim import make_adamw

    model = minift_model(case) if model is None else model
    apply_lora(model, LoraSettings(**CASES[case]["lora"]))
    load_peft_state_dict(model, initial_adapter(peft_state_dict(model)))
    ids, mask, labels = batch(case)
    out: dict[str, object] = {}
    model.eval()
    with torch.no_grad():
        logits = plain_logits(model, ids) if mask is None else model(ids, attention_mask=mask)
        out.update(record_logits(logits))
    model.train()
    optimizer = make_adamw(model, lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)
    losses = []
    for step in range(STEPS):
        torch.manual_seed(100 + step)
        if mask is None:
            loss = toy_loss(plain_logits(model, ids), labels)
        else:
            result = model(ids, attention_mask=mask, labels=labels)
            loss = result.loss_sum / result.n_loss_targets
        loss.backward()
        if step == 0:
            out["grads"] = {PEFT_PREFIX + peft_key(n): p.grad.clone()
                            for n, p in trainable_parameters(model).items()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    out["losses"] = torch.tensor(losses)
    out["final"] = peft_state_dict(model)
    return out


# -- peft ------------------------------------------------------------------------------------------------
def peft_config(case: str):
    from peft import LoraConfig

    lora = CASES[case]["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0),
                      target_modules=lora["target_modules"], bias=lora.get("bias", "none"),
                      use_rslora=lora.get("use_rslora", False), modules_to_save=lora.get("modules_to_save"))


def peft_checkpoint_key(name: str) -> str:
    """peft's parameter name -> its checkpoint key (the adapter name and the trained copy's
    ``modules_to_save`` level dropped, as get_peft_model_state_dict does)."""
    return name.replace(".default.", ".").replace(".modules_to_save.", ".")


def run_peft(case: str) -> dict[str, object]:
    """peft's side: get_peft_model on the transformers model (or the toy), Trainer's weight-decay
    split (transformers' get_parameter_names), torch's AdamW."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM
    from transformers.trainer_pt_utils import get_parameter_names

    fixture = CASES[case]["fixture"]
    if case == "llama-hf":
        base = llama_model()
    elif fixture is None:
        base = toy_model()
    else:
        base = AutoModelForCausalLM.from_pretrained(FIXTURES / fixture, attn_implementation="eager",
                                                    dtype=torch.float32, **NO_DROPOUT)
    model = get_peft_model(base, peft_config(case))
    initial = initial_adapter(get_peft_model_state_dict(model))
    result = set_peft_model_state_dict(model, initial)
    assert not result.unexpected_keys, result.unexpected_keys
    ids, mask, labels = batch(case)
    out: dict[str, object] = {}
    model.eval()
    with torch.no_grad():
        if mask is None:
            logits = plain_logits(model, ids)
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
        out.update(record_logits(logits))
    model.train()
    # Trainer.get_decay_parameter_names
    no_decay = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [nn.LayerNorm], no_decay))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if n in decay], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, eps=EPS, fused=True)
    losses = []
    for step in range(STEPS):
        torch.manual_seed(100 + step)
        if mask is None:
            loss = toy_loss(plain_logits(model, ids), labels)
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if step == 0:
            out["grads"] = {"base_model.model." + peft_checkpoint_key(n.removeprefix("base_model.model.")):
                            p.grad.clone() for n, p in params}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    out["losses"] = torch.tensor(losses)
    out["final"] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    out["initial"] = initial
    return out


# -- the stored trace ---------------------------------------------------------------------------------------
def flatten(case: str, run: dict[str, object]) -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in run.items():
        if isinstance(value, dict):
            flat.update({f"{case}/{key}/{name}": t.contiguous() for name, t in value.items()})
        else:
            flat[f"{case}/{key}"] = value.contiguous()
    return flat


def read_trace(case: str) -> dict[str, object]:
    from safetensors.torch import load_file

    run: dict[str, object] = {}
    for key, tensor in load_file(str(TRACE)).items():
        name, _, rest = key.partition("/")
        if name != case:
            continue
        part, _, inner = rest.partition("/")
        if inner:
            run.setdefault(part, {})[inner] = tensor
        else:
            run[part] = tensor
    return run


def main() -> None:
    import peft
    from safetensors.torch import save_file

    flat = {}
    for case in TRACED:
        run = run_peft(case)
        run.pop("initial")  # both sides make it from the seed
        flat.update(flatten(case, run))
    TRACE.parent.mkdir(exist_ok=True)
    save_file(flat, str(TRACE), metadata={"peft_version": peft.__version__, "steps": str(STEPS)})
    print(f"wrote {TRACE} ({TRACE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
