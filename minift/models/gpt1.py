"""GPT-1 (openai-gpt) exactly as transformers' ``OpenAIGPTLMHeadModel`` computes it.

h = E[ids] + P[positions]; each block is post-LayerNorm:
    n = ln_1(h + attn(h));  h = ln_2(n + mlp(n))
no final LayerNorm; logits = h @ E^T (tied head).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import CausalLM
from .config import GPTConfig
from .layers import MLP, CausalSelfAttention, run_block

# openai-gpt's ``afn`` names; its "gelu" is the tanh approximation (transformers' gelu_new).
GPT1_ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}


class GPT1Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.afn not in GPT1_ACTIVATIONS:
            raise ValueError(f"openai-gpt afn {config.afn!r} unknown; known: {sorted(GPT1_ACTIVATIONS)}")
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.attn_pdrop, config.resid_pdrop)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config.n_embd, 4 * config.n_embd, GPT1_ACTIVATIONS[config.afn], config.resid_pdrop)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None, layer_cache=None) -> torch.Tensor:
        n = self.ln_1(x + self.attn(x, attn_bias, layer_cache))
        return self.ln_2(n + self.mlp(n))


class GPT1Transformer(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.tokens_embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.positions_embed = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT1Block(config) for _ in range(config.n_layer))
        self.activation_checkpointing = False  # see CausalLM.set_activation_checkpointing

    def forward(self, input_ids, position_ids, attn_bias, kv_cache=None):
        h = self.drop(self.tokens_embed(input_ids) + self.positions_embed(position_ids))
        for i, block in enumerate(self.h):
            layer_cache = None if kv_cache is None else kv_cache[i]
            h = run_block(block, h, attn_bias, layer_cache=layer_cache,
                          checkpointed=self.activation_checkpointing)
        return h


class GPT1LMHeadModel(CausalLM):
    config_class = GPTConfig
    token_embedding_name = "tokens_embed"

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.transformer = GPT1Transformer(config)
        self.init_weights()
