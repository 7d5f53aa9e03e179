"""GPT-2 exactly as transformers' ``GPT2LMHeadModel`` computes it.

h = wte[ids] + wpe[positions]; each block is pre-LayerNorm:
    h = h + attn(ln_1(h));  h = h + mlp(ln_2(h))
then h = ln_f(h); logits = h @ wte^T (tied head).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import CausalLM
from .config import GPT2Config
from .layers import MLP, CausalSelfAttention, run_block


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        scale = 1.0 / math.sqrt(config.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.attn_pdrop, config.resid_pdrop,
                                        scale=scale)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config.n_embd, config.inner_dim, config.activation_function, config.resid_pdrop)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None, layer_cache=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_bias, layer_cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.activation_checkpointing = False  # see CausalLM.set_activation_checkpointing

    def forward(self, input_ids, position_ids, attn_bias, kv_cache=None):
        h = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for i, block in enumerate(self.h):
            layer_cache = None if kv_cache is None else kv_cache[i]
            h = run_block(block, h, attn_bias, layer_cache=layer_cache,
                          checkpointed=self.activation_checkpointing)
        return self.ln_f(h)


class GPT2LMHeadModel(CausalLM):
    config_class = GPT2Config
    token_embedding_name = "wte"
    scaled_init_suffixes = ("attn.c_proj", "mlp.c_proj")

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Transformer(config)
        self.init_weights()
