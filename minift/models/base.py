"""What GPT-1 and GPT-2 share as causal language models: the forward contract
(logits, or summed loss + target count), the tied head, init, resize and save.

Each architecture subclasses ``CausalLM`` and supplies ``self.transformer`` (a module
whose ``forward(input_ids, position_ids, attn_bias)`` returns hidden states) and the name
of its token embedding.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from ..errors import InputError
from .layers import (CausalSelfAttention, Conv1D, LayerKV, LossOutput, attention_bias, is_right_padded, lm_loss_sum,
                     lm_loss_sum_all_positions)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CausalLM(nn.Module):
    config_class: type[ModelConfig]
    token_embedding_name: str  # attribute of self.transformer holding the token embedding
    scaled_init_suffixes: tuple[str, ...] = ()  # weights GPT-2 inits with std / sqrt(2 n_layer)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.lm_head: nn.Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.loss_rows = "labelled"  # see set_hot_path
        self.attention = "sdpa"

    # -- the hot path's levers, each one switchable to measure what it buys ---------------------
    def set_hot_path(self, loss_rows: str = "labelled", attention: str = "sdpa") -> "CausalLM":
        """``loss_rows="labelled"``: the LM head runs only on rows that have a label, chunked
        (``lm_loss_sum``); ``"all"``: logits at every position, then cross-entropy with
        ignore_index (``lm_loss_sum_all_positions``, transformers' way).
        ``attention="sdpa"``: ``scaled_dot_product_attention`` with ``is_causal`` and no mask
        when right padding makes one unnecessary; ``"eager"``: matmul, mask, softmax, matmul,
        with the padding mask always applied (transformers' openai-gpt way).
        Every setting gives the same loss within float error (tests/test_models.py); only the
        speed differs (benchmarks/RESULTS.md)."""
        if loss_rows not in ("labelled", "all") or attention not in ("sdpa", "eager"):
            raise ValueError(f"set_hot_path: loss_rows must be 'labelled' or 'all' (got {loss_rows!r}), "
                             f"attention 'sdpa' or 'eager' (got {attention!r})")
        self.loss_rows, self.attention = loss_rows, attention
        for module in self.modules():
            if isinstance(module, CausalSelfAttention):
                module.impl = attention
        return self

    # -- the forward contract ---------------------------------------------------------------
    @property
    def token_embedding(self) -> nn.Embedding:
        return getattr(self.transformer, self.token_embedding_name)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.token_embedding.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor | LossOutput:
        """Without ``labels``: logits [B, T, vocab] at every position.

        With ``labels`` (aligned with ``input_ids``, -100 = ignore; the shift happens here):
        ``LossOutput(loss_sum, n_loss_targets)``, the summed next-token cross-entropy.

        ``position_ids`` default to 0..T-1 (padding is on the right). ``document_ids`` [B, T]
        confine attention to tokens of the same packed example.
        """
        # A key-padding mask only changes what we return when a real token could see a pad
        # (left padding) or when logits at pad positions are returned.
        if attention_mask is not None and self.attention == "sdpa":
            if labels is None:
                needs_mask = not bool(attention_mask.all())
            else:
                needs_mask = not is_right_padded(attention_mask)
            if not needs_mask:
                attention_mask = None
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, document_ids)
        if labels is None:
            return F.linear(hidden, self.lm_head_weight)
        if self.loss_rows == "all":
            return lm_loss_sum_all_positions(hidden, self.lm_head_weight, labels)
        return lm_loss_sum(hidden, self.lm_head_weight, labels)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                      kv_cache: list[LayerKV] | None = None) -> torch.Tensor:
        """The last hidden states [B, T, C] (before the LM head). ``attention_mask`` is
        applied as given (pass None when right padding makes it unnecessary). With ``kv_cache``
        (one ``LayerKV`` per layer, see ``new_kv_cache``) the tokens continue the cached ones:
        their positions start after them, and their keys/values are added to the cache."""
        seen = len(kv_cache[0]) if kv_cache else 0
        time = input_ids.shape[1]
        if seen + time > self.config.n_positions:
            raise ValueError(f"sequence length {seen + time} exceeds n_positions={self.config.n_positions}")
        if kv_cache and (attention_mask is not None or document_ids is not None):
            raise ValueError("a KV cache takes unpadded sequences: no attention_mask or document_ids")
        bias = attention_bias(attention_mask, document_ids, time, input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(seen, seen + time, device=input_ids.device)[None, :]
        return self.transformer(input_ids, position_ids, bias, kv_cache)

    def new_kv_cache(self) -> list[LayerKV]:
        """An empty key/value cache, one entry per layer, for ``hidden_states(..., kv_cache=)``."""
        return [LayerKV() for _ in range(self.config.n_layer)]

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 20, temperature: float = 1.0,
                 top_k: int = 0, eos_id: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> list[int]:
        """Continue one prompt token by token; returns the prompt's ids followed by the new ones.

        ``temperature`` 0 is greedy; otherwise sample from softmax(logits / temperature), from the
        ``top_k`` most likely tokens when ``top_k`` > 0. Stops after ``eos_id``, after
        ``max_new_tokens``, or when the sequence fills the model's ``n_positions``.
        With ``use_cache`` the keys and values of earlier tokens are kept (one token's forward per
        step); without, the whole sequence is recomputed each step — the same tokens (tested)."""
        ids = list(prompt_ids)
        if not ids:
            raise InputError("generate: the prompt has no tokens")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InputError(f"generate: temperature must be a finite number >= 0, got {temperature}")
        if top_k < 0 or max_new_tokens < 0:
            raise InputError(f"generate: top_k and max_new_tokens must be >= 0, got {top_k} and {max_new_tokens}")
        if len(ids) >= self.config.n_positions:
            raise InputError(f"generate: the prompt has {len(ids)} tokens; the model holds {self.config.n_positions}")
        was_training = self.training
        self.eval()
        device = self.lm_head_weight.device
        cache = self.new_kv_cache() if use_cache else None
        new_ids = ids
        for _ in range(min(max_new_tokens, self.config.n_positions - len(ids))):
            context = new_ids if use_cache else ids  # with a cache only the tokens it has not seen
            hidden = self.hidden_states(torch.tensor([context], device=device), kv_cache=cache)
            logits = F.linear(hidden[0, -1], self.lm_head_weight).float()
            next_id = sample_token(logits, temperature, top_k, generator)
            ids.append(next_id)
            new_ids = [next_id]
            if next_id == eos_id:
                break
        self.train(was_training)
        return ids

    # -- parameters -------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Distinct parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """transformers' random init: N(0, initializer_range) for embeddings and projections,
        zero biases, LayerNorm 1/0; GPT-2 scales its residual projections by 1/sqrt(2 n_layer)."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, (Conv1D, nn.Linear)):
                scale = std
                if name.endswith(self.scaled_init_suffixes):
                    scale = std / (2 * self.config.n_layer) ** 0.5
                module.weight.normal_(0.0, scale, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    @torch.no_grad()
    def resize_token_embeddings(self, new_vocab_size: int) -> None:
        """Grow (or shrink) the token embedding; new rows start at the mean of the old rows.
        The head stays tied (it reads the embedding's weight)."""
        old = self.token_embedding
        old_size, width = old.weight.shape
        if new_vocab_size == old_size:
            return
        if new_vocab_size <= 0:
            raise ValueError(f"new vocabulary size must be positive, got {new_vocab_size}")
        new = nn.Embedding(new_vocab_size, width, device=old.weight.device, dtype=old.weight.dtype)
        keep = min(old_size, new_vocab_size)
        new.weight[:keep] = old.weight[:keep]
        if new_vocab_size > old_size:
            new.weight[old_size:] = old.weight.float().mean(dim=0).to(old.weight.dtype)
        setattr(self.transformer, self.token_embedding_name, new)
        if self.lm_head is not None:
            head = nn.Linear(width, new_vocab_size, bias=False, device=new.weight.device, dtype=new.weight.dtype)
            head.weight[:keep] = self.lm_head.weight[:keep]
            if new_vocab_size > old_size:
                head.weight[old_size:] = self.lm_head.weight.float().mean(dim=0).to(head.weight.dtype)
            self.lm_head = head
        self.config.vocab_size = new_vocab_size

    # -- saving ---------------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under transformers' key names (``transformer.`` prefix, no tied head)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` in the transformers layout."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_json(directory / CONFIG_NAME)
        save_file(self.checkpoint_state_dict(), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory


def sample_token(logits: torch.Tensor, temperature: float, top_k: int = 0,
                 generator: torch.Generator | None = None) -> int:
    """The next token from one position's logits: argmax at temperature 0, else a sample."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
