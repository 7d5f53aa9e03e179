"""Layers shared by the architectures: Conv1D-layout projections, SDPA attention, the MLP and the
attention-mask builder of GPT-1 and GPT-2, the RMSNorm of the Llama-shaped decoders, and the
(optionally checkpointed) block call (the loss is in ``lm_loss``).

Parameter names match transformers (``c_attn``, ``c_proj``, ``c_fc``) so a state dict
maps onto the checkpoint key for key.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .lm_loss import IGNORE_INDEX, LossOutput  # noqa: F401  (re-exported: collators import them here)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``gelu_new``: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# Names used by openai-gpt's ``afn`` and gpt2's ``activation_function``, as transformers maps them.
ACTIVATIONS = {
    "gelu": F.gelu,  # GPT-2's "gelu" is the exact erf GELU; GPT-1 remaps "gelu" below
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation_fn(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class Conv1D(nn.Module):
    """transformers' Conv1D: ``y = x @ W + b`` with W stored [in_features, out_features]."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(out_shape)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, attn_pdrop: float, resid_pdrop: float,
                 scale: float | None = None):
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.attn_pdrop = attn_pdrop
        self.impl = "sdpa"  # or "eager": see CausalLM.set_hot_path
        self.c_attn = Conv1D(n_embd, 3 * n_embd)
        self.c_proj = Conv1D(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(resid_pdrop)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None, layer_cache: "LayerKV | None" = None
                ) -> torch.Tensor:
        """``attn_bias`` None means plain causal attention; otherwise an additive
        [B, 1, T, T] bias that already contains the causal part (see ``attention_bias``).
        ``layer_cache``: keys and values of earlier tokens (generation); the new ones are appended."""
        batch, time, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if layer_cache is not None:
            k, v = layer_cache.append(k, v)
        dropout_p = self.attn_pdrop if self.training else 0.0
        if attn_bias is None and k.shape[-2] != time:  # new tokens after cached ones: causal, offset
            attn_bias = causal_bias(time, k.shape[-2], q.device)
        if self.impl == "eager":
            y = eager_attention(q, k, v, attn_bias, self.scale, dropout_p)
        elif attn_bias is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype),
                                               dropout_p=dropout_p, scale=self.scale)
        y = y.transpose(1, 2).reshape(batch, time, channels)
        return self.resid_dropout(self.c_proj(y))


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor | None,
                    scale: float, dropout_p: float) -> torch.Tensor:
    """Textbook attention, the way transformers' openai-gpt computes it: scores, causal (and
    padding) bias, softmax, dropout, weighted sum. The plain path SDPA is benchmarked against."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if attn_bias is None:
        attn_bias = causal_bias(q.shape[-2], k.shape[-2], q.device)
    scores = scores + attn_bias.to(scores.dtype)
    weights = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p)
    return weights @ v


class MLP(nn.Module):
    def __init__(self, n_embd: int, n_inner: int, activation: str, resid_pdrop: float):
        super().__init__()
        self.c_fc = Conv1D(n_embd, n_inner)
        self.c_proj = Conv1D(n_inner, n_embd)
        self.act = activation_fn(activation)
        self.dropout = nn.Dropout(resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) computed in float32, cast back, then scaled (transformers' order)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def run_block(block: nn.Module, *inputs, layer_cache: LayerKV | None = None, checkpointed: bool = False
              ) -> torch.Tensor:
    """One transformer block, ``block(*inputs, layer_cache)``. ``checkpointed`` (activation
    checkpointing; applied only when a gradient is being recorded and no KV cache is in use): the
    block's inner activations are not kept for backward but recomputed from its inputs there,
    ``torch.utils.checkpoint`` with ``use_reentrant=False``; the RNG state is restored for the
    recomputation, so dropout draws the same masks and the gradients equal those of the plain call."""
    if checkpointed and layer_cache is None and torch.is_grad_enabled():
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs, layer_cache)


class LayerKV:
    """One layer's keys and values [B, heads, T_seen, head_dim] of the tokens seen so far."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' keys/values; return all of them."""
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2)
        self.keys, self.values = keys, values
        return keys, values

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]


def causal_visible(queries: int, keys: int, device) -> torch.Tensor:
    """[queries, keys] bool: query i (the last ``queries`` of ``keys`` positions) sees key j <= its own."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)


def causal_bias(queries: int, keys: int, device) -> torch.Tensor:
    """The additive form of ``causal_visible``: 0 where visible, float32 min elsewhere."""
    bias = torch.zeros(queries, keys, dtype=torch.float32, device=device)
    return bias.masked_fill_(~causal_visible(queries, keys, device), torch.finfo(torch.float32).min)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] that skip padding: each real token's count of real tokens before it (pads get
    0), as transformers' ``generate`` derives them, so left padding leaves a row's positions unchanged."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 0)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones followed by zeros: real tokens never see a pad."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def cached_attention_bias(attention_mask: torch.Tensor, queries: int, device: torch.device) -> torch.Tensor:
    """Additive bias [B, 1, queries, keys] for ``queries`` new tokens after ``keys - queries`` cached
    ones (generation with a KV cache), ``attention_mask`` [B, keys] covering all of them (1 = real).

    Key j is visible to query i iff j is not after i and ``attention_mask[j] == 1``; each query also
    sees its own key, so the row of a left-padding query is never empty: its output is ignored, but
    stays finite (an all-masked row would be NaN in half precision and poison the sums over values,
    where a NaN times a zero weight is still NaN). Real queries never see a pad either way."""
    keys = attention_mask.shape[1]
    visible = causal_visible(queries, keys, device)[None, None] & attention_mask.bool()[:, None, None, :]
    own = torch.zeros(queries, keys, dtype=torch.bool, device=device)
    own[:, keys - queries:] = torch.eye(queries, dtype=torch.bool, device=device)
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=device)
    return bias.masked_fill_(~(visible | own), torch.finfo(torch.float32).min)


def attention_bias(attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None,
                   time: int, device: torch.device) -> torch.Tensor | None:
    """Additive attention bias [B, 1, T, T]: 0 where query i may see key j, float32 min elsewhere.

    Key j is visible to query i iff j <= i, ``attention_mask[j] == 1`` and (when packing)
    ``document_ids[i] == document_ids[j]``. Returns None when only the causal part remains,
    so SDPA can take its fast ``is_causal`` path.
    """
    if attention_mask is None and document_ids is None:
        return None
    visible = causal_visible(time, time, device)[None, None]
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, None, None, :]
    if document_ids is not None:
        visible = visible & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=device)
    return bias.masked_fill_(~visible, torch.finfo(torch.float32).min)
