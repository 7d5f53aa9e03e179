"""The Llama-shaped decoder (``llama``, ``qwen2``, ``qwen3``, ``mistral``) exactly as transformers'
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` / ``MistralForCausalLM`` compute it.

h = embed_tokens[ids]; each layer is pre-RMSNorm:
    h = h + o_proj(attention(rope(q), rope(k), v));   q, k, v = q/k/v_proj(input_layernorm(h))
    h = h + down_proj(act(gate_proj(n)) * up_proj(n));  n = post_attention_layernorm(h)
then h = norm(h); logits = h @ lm_head^T (or embed_tokens^T when tied).

Grouped-query attention: ``num_key_value_heads`` k/v heads, each shared by
``num_attention_heads / num_key_value_heads`` query heads (SDPA's ``enable_gqa``; the KV cache
keeps the unshared heads). Rotary positions rotate each head's two halves by position x
``inv_freq`` (``rotate_half``, transformers' layout); Llama 3's ``rope_scaling`` stretches the
low frequencies. Qwen3 RMS-normalizes each head of q and k before the rotation. A sliding window
(Mistral; Qwen with ``use_sliding_window``) lets a query see only the last ``window`` positions,
counted in the row as transformers counts them (``kv_idx > q_idx - window``). Parameter names
match transformers, so the state dict maps onto ``model.safetensors`` key for key.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import CausalLM
from .decoder_config import DecoderConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from .layers import LayerKV, RMSNorm, activation_fn, causal_bias, causal_visible, eager_attention, run_block

SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def rope_inv_freq(config: DecoderConfig) -> torch.Tensor:
    """The rotary frequencies [head_dim / 2], float32, on the CPU (even when the model is being
    built on the meta device): theta^(-2i/d), with Llama 3's scaling when ``rope_scaling`` says so
    (wavelengths beyond ``original_max_position_embeddings / low_freq_factor`` divided by
    ``factor``, those below ``.../ high_freq_factor`` kept, a smooth blend between)."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", "default") != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < old_context / high) * ~(wavelength > old_context / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos and sin [B or 1, T, head_dim] of each position, computed in float32 like transformers.
    The frequencies follow the model's device but never its dtype: a bf16 model keeps float32
    frequencies (bf16 ones would smear the angles of later positions)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):
        device = fn(torch.empty(0, device=self.inv_freq.device)).device
        self.inv_freq = self.inv_freq.to(device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, heads, T, head_dim] by the positions' angles (cos/sin [B or 1, T, head_dim])."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class DecoderAttention(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.scale = self.head_dim ** -0.5
        self.dropout_p = config.attention_dropout
        self.impl = "sdpa"  # or "eager": see CausalLM.set_hot_path
        d, q_out, kv_out = config.hidden_size, self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(d, q_out, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, kv_out, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, kv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_out, d, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_bias: torch.Tensor | None,
                layer_cache: LayerKV | None = None) -> torch.Tensor:
        """``attn_bias``: None = plain causal attention; else an additive [B or 1, 1, T, keys] bias
        holding the causal part (and padding, documents, the sliding window)."""
        batch, time, _ = x.shape
        q = self.q_proj(x).view(batch, time, self.n_head, self.head_dim)
        k = self.k_proj(x).view(batch, time, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(batch, time, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin)
        if layer_cache is not None:
            k, v = layer_cache.append(k, v)
        if attn_bias is None and k.shape[-2] != time:  # new tokens after cached ones: causal, offset
            attn_bias = causal_bias(time, k.shape[-2], q.device)
        dropout_p = self.dropout_p if self.training else 0.0
        y = self.attend(q, k, v, attn_bias, dropout_p)
        return self.o_proj(y.transpose(1, 2).reshape(batch, time, self.n_head * self.head_dim))

    def attend(self, q, k, v, attn_bias, dropout_p):
        groups = self.n_head // self.n_kv_head
        if self.impl == "eager" or (groups > 1 and not SDPA_HAS_GQA):
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
            if self.impl == "eager":
                return eager_attention(q, k, v, attn_bias, self.scale, dropout_p)
            groups = 1
        gqa = {"enable_gqa": True} if groups > 1 else {}
        if attn_bias is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                                  scale=self.scale, **gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), dropout_p=dropout_p,
                                              scale=self.scale, **gqa)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv_heads, T, D] -> [B, kv_heads * groups, T, D], each k/v head repeated for its query heads."""
    if groups == 1:
        return x
    batch, heads, time, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, time, dim).reshape(batch, heads * groups, time, dim)


class SwiGLU(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        d, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_proj_bias
        self.gate_proj = nn.Linear(d, inner, bias=bias)
        self.up_proj = nn.Linear(d, inner, bias=bias)
        self.down_proj = nn.Linear(inner, d, bias=bias)
        self.act = activation_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, window: int | None):
        super().__init__()
        self.window = window
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, h, cos, sin, attn_bias, layer_cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn_bias, layer_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """transformers' ``LlamaModel`` (``model.*`` in the checkpoint): embedding, layers, final norm."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, window) for window in config.layer_windows())
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.activation_checkpointing = False  # see CausalLM.set_activation_checkpointing

    def forward(self, input_ids, position_ids, attn_bias, kv_cache=None):
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, h.dtype)
        keys = input_ids.shape[1] + (len(kv_cache[0]) if kv_cache else 0)
        biases = {None: attn_bias}  # one bias per distinct window, built once per forward
        queries = input_ids.shape[1]
        for i, layer in enumerate(self.layers):
            if layer.window not in biases:
                biases[layer.window] = windowed_bias(attn_bias, layer.window, queries, keys, h.device)
            layer_cache = None if kv_cache is None else kv_cache[i]
            h = run_block(layer, h, cos, sin, biases[layer.window], layer_cache=layer_cache,
                          checkpointed=self.activation_checkpointing)
        return self.norm(h)


def windowed_bias(attn_bias: torch.Tensor | None, window: int, queries: int, keys: int,
                  device: torch.device) -> torch.Tensor | None:
    """``attn_bias`` (None = causal) with keys more than ``window - 1`` positions before the query
    hidden as well; unchanged when no key is that far back. The queries are the last ``queries`` of
    ``keys`` positions (generation after a cache)."""
    if keys <= window:
        return attn_bias
    query_pos = torch.arange(keys - queries, keys, device=device)[:, None]
    in_window = torch.arange(keys, device=device)[None, :] > query_pos - window
    min_value = torch.finfo(torch.float32).min
    if attn_bias is None:
        visible = causal_visible(queries, keys, device) & in_window
        return torch.zeros(queries, keys, device=device).masked_fill_(~visible, min_value)
    return attn_bias.masked_fill(~in_window, min_value)


class DecoderLM(CausalLM):
    """The Llama-shaped causal LM; ``config.model_type`` picks the family's switches."""

    config_class = DecoderConfig
    base_model_prefix = "model"
    token_embedding_name = "embed_tokens"

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.model = DecoderModel(config)
        self.init_weights()


class LlamaForCausalLM(DecoderLM):
    config_class = LlamaConfig


class Qwen2ForCausalLM(DecoderLM):
    config_class = Qwen2Config


class Qwen3ForCausalLM(DecoderLM):
    config_class = Qwen3Config


class MistralForCausalLM(DecoderLM):
    config_class = MistralConfig


DECODER_CLASSES: dict[str, type[DecoderLM]] = {
    cls.config_class.model_type: cls for cls in (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
                                                 MistralForCausalLM)}
