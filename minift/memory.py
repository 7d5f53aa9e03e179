"""What a training setup needs in memory, estimated at start-up before anything is allocated, and a
refusal (with the numbers) when the device cannot hold it.

Per rank, in bytes:

    parameters   every weight in its storage dtype (LoRA's adapter in float32 under a half-precision
                 base); FSDP: this rank's shard, plus one block gathered whole for its forward and
                 backward, plus the root's own parameters (embeddings, final norm, head), which stay
                 gathered from the forward to the backward
    gradients    one per trained parameter (LoRA: the adapter's only); FSDP: sharded, plus one
                 block's whole gradient before its reduce-scatter
    optimizer    AdamW's two moments per trained parameter (sharded under FSDP)
    activations  what the forward keeps for the backward over one micro-batch of
                 ``batch_size x max_length`` tokens (pairs: two rows per pair): per block and token
                 about 10 widths + 2 MLP widths (GPT) or 8 widths + 4 MLP widths (SwiGLU) in the
                 compute dtype, plus the attention probabilities (twice, and the mask) when attention
                 dropout keeps them; with activation checkpointing one width per block plus the larger
                 of one block's full set (recomputed in the backward) and the LM head's logits and
                 their gradient (a 1,024-row chunk with the fused head, every labelled row without it)

The parameter counts are exact (the model is built on the meta device, the adapter added there); the
activations are an estimate, within a factor of about 1.5 of what autograd keeps
(tests/test_memory.py measures it). Under FSDP evaluation and the final export gather the whole
parameters on every rank (``fsdp.py``): the peak is the larger of the step and that.

The memory available is the device's free memory (CUDA), or the RAM the OS can give (``MemAvailable``)
shared by the ranks torchrun starts on this machine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .config import RunConfig, RunConfigError
from .fsdp import transformer_blocks
from .lora import apply_lora, trainable_parameters
from .models import MODEL_CLASSES, available_memory_bytes
from .precision import dtype_of

GiB, MiB = 2 ** 30, 2 ** 20
FUSED_HEAD_ROWS = 1024  # lm_loss.fused_lm_loss_sum's chunk


@dataclass
class MemoryEstimate:
    """Bytes per rank of a training setup (the module docstring says what each holds)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    whole_parameters: int  # FSDP: evaluation and export gather every parameter on every rank
    n_parameters: int
    n_trained: int
    tokens: int  # per micro-batch
    setup: str  # "full fine-tuning", "LoRA r = 8", "+ activation checkpointing", "FSDP over 2 ranks"

    @property
    def step_peak(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> int:
        return max(self.step_peak, self.whole_parameters + self.optimizer)

    def line(self, available: int | None) -> str:
        """The start-up line."""
        room = f" of {size(available)} available" if available is not None else ""
        return (f"memory estimate per rank: parameters {size(self.parameters)}, gradients "
                f"{size(self.gradients)}, AdamW {size(self.optimizer)}, activations "
                f"{size(self.activations)} = {size(self.total)}{room} ({self.setup}; "
                f"{self.n_trained / 1e6:,.2f} M of {self.n_parameters / 1e6:,.2f} M parameters train; "
                f"{self.tokens} tokens per micro-batch)")


def size(n_bytes: int) -> str:
    return f"{n_bytes / GiB:,.2f} GiB" if n_bytes >= GiB / 10 else f"{n_bytes / MiB:,.1f} MiB"


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def meta_model(cfg: RunConfig, model_config):
    """The model ``components.build_model`` builds, with its adapter, on the meta device (no memory)."""
    with torch.device("meta"):
        model = MODEL_CLASSES[model_config.model_type](model_config)
        model.pad_vocab(cfg.model.pad_vocab_to)
        model.to(dtype=dtype_of(cfg.model.dtype, "model.dtype"))
        if cfg.lora.enabled:
            apply_lora(model, cfg.lora.settings())
    return model


def rows_and_length(cfg: RunConfig) -> tuple[int, int]:
    """Rows per micro-batch and their longest length: pairs are two rows of ``pairs.max_length``."""
    pairs = getattr(cfg.stage, "pairs", None)
    if pairs is not None:
        return 2 * cfg.train.batch_size, pairs.max_length or cfg.data.max_length
    return cfg.train.batch_size, cfg.data.max_length


def activation_bytes(cfg: RunConfig, model_config, rows: int, length: int) -> int:
    """What the forward keeps for the backward over one micro-batch (module docstring)."""
    c = model_config
    width, layers, heads = c.n_embd, c.n_layer, c.n_head
    if hasattr(c, "intermediate_size"):  # SwiGLU: gate, up, their product and the activation
        per_token = 8 * width + 4 * c.intermediate_size
        attention_dropout = getattr(c, "attention_dropout", 0.0)
    else:
        per_token = 10 * width + 2 * getattr(c, "inner_dim", 4 * width)
        attention_dropout = getattr(c, "attn_pdrop", 0.0)
    if attention_dropout > 0:  # the probabilities before and after dropout, and its mask, are kept
        per_token += 2.25 * heads * length
    element = 2 if cfg.train.precision in ("bf16", "fp16") else dtype_of(cfg.model.dtype).itemsize
    tokens = rows * length
    head_rows = min(tokens, FUSED_HEAD_ROWS) if cfg.model.fused_lm_head else tokens
    head = 2 * head_rows * c.vocab_size * 4  # fp32 logits and their gradient
    if cfg.model.activation_checkpointing:  # block inputs kept; one block recomputed at a time, or the head
        kept, transient = tokens * layers * width * element, max(head, tokens * per_token * element)
    else:
        kept, transient = tokens * layers * per_token * element, head
    return int(kept + transient + tokens * width * element)


def estimate(cfg: RunConfig, model_config, world_size: int = 1) -> MemoryEstimate:
    """The memory per rank of training ``model_config`` as ``cfg`` says, on ``world_size`` ranks."""
    model = meta_model(cfg, model_config)
    params = list(model.parameters())
    trained = list(trainable_parameters(model).values()) if cfg.lora.enabled else params
    n_params, n_trained = sum(p.numel() for p in params), sum(p.numel() for p in trained)
    param_bytes, grad_bytes = _bytes(params), _bytes(trained)
    optimizer = 2 * grad_bytes
    fsdp = cfg.train.distributed == "fsdp" and world_size > 1
    if fsdp:
        blocks = transformer_blocks(model)
        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        block_params = max(_bytes(b.parameters()) for b in blocks)
        block_grads = max(_bytes(p for p in b.parameters() if p.requires_grad) for b in blocks)
        root = _bytes(p for p in params if id(p) not in in_blocks)
        if cfg.train.fsdp_accumulation == "unsharded" and cfg.train.grad_accum > 1:
            parameters, gradients = param_bytes, grad_bytes
        else:
            parameters = param_bytes // world_size + block_params + root
            gradients = grad_bytes // world_size + block_grads
        optimizer //= world_size
        whole = param_bytes
    else:
        parameters, gradients, whole = param_bytes, grad_bytes, 0
    rows, length = rows_and_length(cfg)
    setup = [f"LoRA r = {cfg.lora.r}" if cfg.lora.enabled else "full fine-tuning"]
    if cfg.model.activation_checkpointing:
        setup.append("activation checkpointing")
    if fsdp:
        setup.append(f"FSDP over {world_size} ranks")
    return MemoryEstimate(parameters, gradients, optimizer,
                          activation_bytes(cfg, model_config, rows, length), whole, n_params,
                          n_trained, rows * length, ", ".join(setup))


def available_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device; elsewhere the RAM available to this machine's ranks, each's share."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = available_memory_bytes()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return None if available is None else available // max(1, local_ranks)


def check_memory(cfg: RunConfig, model_config, device: torch.device, say: Callable[[str], None]
                 ) -> MemoryEstimate:
    """Say the estimate; refuse (``train.check_memory``) a setup that needs more than is available."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    found = estimate(cfg, model_config, world_size)
    available = available_bytes(device)
    say(found.line(available))
    if cfg.train.check_memory and available is not None and found.total > available:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        where = f"{device} has" if device.type == "cuda" else \
            "this machine has" if local_ranks == 1 else f"each of this machine's {local_ranks} ranks has"
        raise RunConfigError(
            f"this setup needs about {size(found.total)} per rank (parameters {size(found.parameters)}, "
            f"gradients {size(found.gradients)}, AdamW {size(found.optimizer)}, activations "
            f"{size(found.activations)}: {found.setup}, {found.n_parameters / 1e6:,.1f} M parameters, "
            f"{found.tokens} tokens per micro-batch) and {where} {size(available)} — train a LoRA adapter "
            f"([lora] r = 8), set model.activation_checkpointing = true, shard with train.distributed = "
            f"\"fsdp\" under torchrun, or lower train.batch_size (train.check_memory = false skips this "
            f"check)")
    return found
