"""What every architecture shares as a causal language model: the forward contract
(logits, or summed loss + target count), the tied head, init, resize and save.

The token embedding (= the tied head) may hold more rows than the vocabulary (``pad_vocab``):
the head's GEMM then has a width the GPU's kernels like (40,478 -> 40,512). The extra rows
are zero, never looked up, masked to -inf before every softmax of the loss, and left out of
the logits returned to users and of ``save_pretrained``.

Each architecture subclasses ``CausalLM`` and supplies its base model under the attribute
``base_model_prefix`` names (``transformer`` for GPT-1/GPT-2, ``model`` for the Llama-shaped
decoders: the checkpoint's key prefix), a module whose ``forward(input_ids, position_ids,
attn_bias, kv_cache)`` returns hidden states, and the name of its token embedding.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .config import ModelConfig
from .layers import (
    Conv1D,
    LayerKV,
    RMSNorm,
    attention_bias,
    cached_attention_bias,
    is_right_padded,
    positions_from_mask,
)
from .lm_loss import LOSS_ROWS, LossOutput, fused_lm_loss_sum, lm_loss_sum, lm_loss_sum_all_positions

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CausalLM(nn.Module):
    config_class: type[ModelConfig]
    base_model_prefix: str = "transformer"  # attribute (and checkpoint key prefix) of the base model
    token_embedding_name: str  # attribute of the base model holding the token embedding
    scaled_init_suffixes: tuple[str, ...] = ()  # weights GPT-2 inits with std / sqrt(2 n_layer)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.lm_head: nn.Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.loss_rows = "labelled"  # see set_hot_path
        self.attention = "sdpa"
        self.fused_head = False
        self.vocab_multiple = 1  # see pad_vocab

    # -- the hot path's levers, each one switchable to measure what it buys ---------------------
    def set_hot_path(self, loss_rows: str | None = None, attention: str | None = None,
                     fused_head: bool | None = None) -> "CausalLM":
        """Set the levers given (None keeps the current setting).

        ``loss_rows="labelled"``: the LM head runs only on rows that have a label (their number
        is read from the device: a host sync and a new shape per batch); ``"all"``: every
        position, ignored targets masked (fixed shapes, no sync: the torch.compile path).
        ``fused_head``: ``LinearCrossEntropy`` (chunked head + CE with its own backward, no
        [rows x vocab] logits kept); off: plain chunks (``"labelled"``) or whole logits (``"all"``,
        transformers' way). ``attention="sdpa"``: ``scaled_dot_product_attention`` with
        ``is_causal`` and no mask when right padding makes one unnecessary; ``"eager"``: matmul,
        mask, softmax, matmul, with the padding mask always applied (transformers' openai-gpt way).
        Every setting gives the same loss within float error (tests/test_models.py,
        tests/test_lm_loss.py); only the speed differs (benchmarks/RESULTS.md)."""
        if loss_rows not in (None, *LOSS_ROWS) or attention not in (None, "sdpa", "eager"):
            rows = " or ".join(map(repr, LOSS_ROWS))
            raise ValueError(f"set_hot_path: loss_rows must be {rows} (got {loss_rows!r}), "
                             f"attention 'sdpa' or 'eager' (got {attention!r})")
        self.loss_rows = loss_rows or self.loss_rows
        self.attention = attention or self.attention
        self.fused_head = self.fused_head if fused_head is None else bool(fused_head)
        for module in self.modules():
            if hasattr(module, "impl"):  # every architecture's attention layer
                module.impl = self.attention
        return self

    # -- memory ---------------------------------------------------------------------------------
    def set_activation_checkpointing(self, enabled: bool = True) -> CausalLM:
        """Per-block activation checkpointing (``layers.run_block``): in training each block keeps
        only its input for backward and recomputes the rest there, about one more forward of
        the blocks per step for activation memory that no longer grows with the block's inner
        tensors (attention, the 4x-wide MLP). Same loss and gradients
        (tests/test_activation_checkpointing.py).
        Generation and no-grad evaluation are unaffected."""
        if not hasattr(self.base_model, "activation_checkpointing"):
            raise NotImplementedError(f"{type(self.base_model).__name__} does not run its blocks through "
                                      f"layers.run_block: activation checkpointing is not available")
        self.base_model.activation_checkpointing = bool(enabled)
        return self

    @property
    def activation_checkpointing(self) -> bool:
        return bool(getattr(self.base_model, "activation_checkpointing", False))

    # -- the forward contract ---------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The model without its LM head (transformers' ``base_model``)."""
        return getattr(self, self.base_model_prefix)

    @property
    def token_embedding(self) -> nn.Embedding:
        return getattr(self.base_model, self.token_embedding_name)

    @property
    def padded_head_weight(self) -> torch.Tensor:
        """The head [vocab rounded up by ``pad_vocab``, C]: what the training loss multiplies by."""
        return self.token_embedding.weight if self.lm_head is None else self.lm_head.weight

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The head's rows of real tokens [vocab_size, C] (a view): logits for users."""
        return self.padded_head_weight[:self.config.vocab_size]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, right_padded: bool | None = None
                ) -> torch.Tensor | LossOutput:
        """Without ``labels``: logits [B, T, vocab] at every position.

        With ``labels`` (aligned with ``input_ids``, -100 = ignore; the shift happens here):
        ``LossOutput(loss_sum, n_loss_targets)``, the summed next-token cross-entropy.

        ``position_ids`` default to 0..T-1 (padding is on the right). ``document_ids`` [B, T]
        confine attention to tokens of the same packed example. ``right_padded``: the
        collator's word (a Python bool) that every mask row is ones then zeros, so the mask is
        dropped without reading it from the device; None: look at the mask.
        """
        # A key-padding mask only changes what we return when a real token could see a pad
        # (left padding) or when logits at pad positions are returned.
        if attention_mask is not None and self.attention == "sdpa":
            if labels is None:
                needs_mask = not bool(attention_mask.all())
            else:
                needs_mask = not (is_right_padded(attention_mask) if right_padded is None else right_padded)
            if not needs_mask:
                attention_mask = None
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, document_ids)
        if labels is None:
            return F.linear(hidden, self.lm_head_weight)
        head, vocab_size = self.padded_head_weight, self.config.vocab_size
        if self.fused_head:
            return fused_lm_loss_sum(hidden, head, labels, rows=self.loss_rows, vocab_size=vocab_size)
        if self.loss_rows == "all":
            return lm_loss_sum_all_positions(hidden, head, labels, vocab_size)
        return lm_loss_sum(hidden, head, labels, vocab_size=vocab_size)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                      kv_cache: list[LayerKV] | None = None) -> torch.Tensor:
        """The last hidden states [B, T, C] (before the LM head). ``attention_mask`` is
        applied as given (pass None when right padding makes it unnecessary). With ``kv_cache``
        (one ``LayerKV`` per layer, see ``new_kv_cache``) the tokens continue the cached ones:
        their positions start after them, and their keys/values are added to the cache.

        Batched generation with left padding: give the cache an ``attention_mask`` [B, cached + T]
        over all tokens so far (0 = pad). Pads are then hidden from every real token, and the
        positions default to the count of real tokens before each one (``positions_from_mask``),
        so a padded prompt gets the positions (and the probabilities) it has alone."""
        seen = len(kv_cache[0]) if kv_cache else 0
        time = input_ids.shape[1]
        if seen + time > self.config.n_positions:
            raise ValueError(f"sequence length {seen + time} exceeds n_positions={self.config.n_positions}")
        if kv_cache is not None and document_ids is not None:
            raise ValueError("a KV cache takes no document_ids (packed rows)")
        if kv_cache is not None and attention_mask is not None:
            if attention_mask.shape != (input_ids.shape[0], seen + time):
                raise ValueError(f"with a KV cache the attention_mask covers cached and new tokens: expected "
                                 f"{(input_ids.shape[0], seen + time)}, got {tuple(attention_mask.shape)}")
            bias = cached_attention_bias(attention_mask, time, input_ids.device)
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)[:, seen:]
        else:
            bias = attention_bias(attention_mask, document_ids, time, input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(seen, seen + time, device=input_ids.device)[None, :]
        return self.base_model(input_ids, position_ids, bias, kv_cache)

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
        self._check_generation(ids, max_new_tokens, temperature, top_k)
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

    @torch.no_grad()
    def generate_many(self, prompt_ids: Sequence[int], n: int, max_new_tokens: int = 20,
                      temperature: float = 1.0, top_k: int = 0, eos_id: int | None = None,
                      generator: torch.Generator | None = None) -> list[list[int]]:
        """``n`` continuations of one prompt, sampled as one batch: the prompt runs once into a KV cache
        every row shares, then each step is one forward of ``n`` tokens and one draw of ``n`` next tokens.
        Each row is the prompt's ids followed by its new ones, cut after its ``eos_id``; the sampling
        rules are ``generate``'s (temperature 0: every row is the greedy continuation)."""
        ids = list(prompt_ids)
        self._check_generation(ids, max_new_tokens, temperature, top_k)
        if n < 1:
            raise InputError(f"generate_many: n must be >= 1, got {n}")
        was_training = self.training
        self.eval()
        device = self.lm_head_weight.device
        cache = self.new_kv_cache()
        last = self.hidden_states(torch.tensor([ids], device=device), kv_cache=cache)[:, -1]
        for layer in cache:  # the one prompt under every row
            layer.keys, layer.values = layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1)
        logits = F.linear(last, self.lm_head_weight).float().expand(n, -1)
        rows: list[list[int]] = [list(ids) for _ in range(n)]
        open_rows = torch.ones(n, dtype=torch.bool)
        steps = min(max_new_tokens, self.config.n_positions - len(ids))
        for step in range(steps):
            next_ids = sample_tokens(logits, temperature, top_k, generator)
            for row, token in zip(torch.nonzero(open_rows).flatten().tolist(), next_ids[open_rows].tolist()):
                rows[row].append(token)
            if eos_id is not None:
                open_rows &= next_ids != eos_id
            if step == steps - 1 or not open_rows.any():
                break
            hidden = self.hidden_states(next_ids[:, None].to(device), kv_cache=cache)
            logits = F.linear(hidden[:, -1], self.lm_head_weight).float()
        self.train(was_training)
        return rows

    def _check_generation(self, ids: list[int], max_new_tokens: int, temperature: float, top_k: int) -> None:
        if not ids:
            raise InputError("generate: the prompt has no tokens")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InputError(f"generate: temperature must be a finite number >= 0, got {temperature}")
        if top_k < 0 or max_new_tokens < 0:
            raise InputError(f"generate: top_k and max_new_tokens must be >= 0, got {top_k} and "
                             f"{max_new_tokens}")
        if len(ids) >= self.config.n_positions:
            raise InputError(f"generate: the prompt has {len(ids)} tokens; the model holds "
                             f"{self.config.n_positions}")

    # -- parameters -------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Distinct parameters (the tied head counted once, padding rows of the vocabulary not counted)."""
        padding = sum(self.padded_head_weight.shape[0] - self.config.vocab_size
                      for _ in self.vocab_weight_keys())
        return sum(p.numel() for p in self.parameters()) - padding * self.config.n_embd

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """transformers' random init: N(0, initializer_range) for embeddings and projections,
        zero biases, LayerNorm 1/0, RMSNorm 1; GPT-2 scales its residual projections by 1/sqrt(2 n_layer)."""
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
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    @torch.no_grad()
    def resize_token_embeddings(self, new_vocab_size: int) -> None:
        """Grow (or shrink) the token embedding; new rows start at the mean of the old rows.
        The head stays tied (it reads the embedding's weight); ``pad_vocab``'s multiple is kept."""
        if new_vocab_size <= 0:
            raise ValueError(f"new vocabulary size must be positive, got {new_vocab_size}")
        if new_vocab_size != self.config.vocab_size:
            self._rebuild_vocab_rows(new_vocab_size, self.vocab_multiple)

    @torch.no_grad()
    def pad_vocab(self, multiple: int) -> "CausalLM":
        """Round the embedding's (and an untied head's) rows up to a multiple of ``multiple``
        (0 or 1: no padding). ``config.vocab_size``, the logits users get and the saved weights
        keep the real vocabulary; the padding rows are zero and take no probability mass."""
        self._rebuild_vocab_rows(self.config.vocab_size, max(1, multiple))
        return self

    def _rebuild_vocab_rows(self, vocab_size: int, multiple: int) -> None:
        """New embedding (and untied head): the first min(old, new) real rows kept, rows added to the
        vocabulary at the mean of the old real rows, padding rows up to ``multiple`` zero."""
        old_size, keep = self.config.vocab_size, min(self.config.vocab_size, vocab_size)
        n_rows = -(-vocab_size // multiple) * multiple

        def rebuilt(old_weight: torch.Tensor) -> torch.Tensor:
            new = old_weight.new_zeros(n_rows, old_weight.shape[1])
            new[:keep] = old_weight[:keep]
            if vocab_size > old_size:
                new[old_size:vocab_size] = old_weight[:old_size].float().mean(dim=0).to(old_weight.dtype)
            return new

        if n_rows == self.padded_head_weight.shape[0] and vocab_size == old_size:
            self.vocab_multiple = multiple
            return
        # built from their weights: no random init, so the global RNG (dropout) stream is untouched
        embedding = nn.Embedding(n_rows, self.config.n_embd, _weight=rebuilt(self.token_embedding.weight))
        setattr(self.base_model, self.token_embedding_name, embedding)
        if self.lm_head is not None:
            head = nn.utils.skip_init(nn.Linear, self.config.n_embd, n_rows, bias=False,
                                      device=embedding.weight.device, dtype=embedding.weight.dtype)
            head.weight.copy_(rebuilt(self.lm_head.weight))
            self.lm_head = head
        self.config.vocab_size, self.vocab_multiple = vocab_size, multiple

    # -- saving ---------------------------------------------------------------------------------
    def vocab_weight_keys(self) -> tuple[str, ...]:
        """State-dict keys with one row per vocabulary entry (padded by ``pad_vocab``)."""
        keys = (f"{self.base_model_prefix}.{self.token_embedding_name}.weight",)
        return keys + (("lm_head.weight",) if self.lm_head is not None else ())

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under transformers' key names (``transformer.`` or ``model.`` prefix, no
        tied head), vocabulary rows only (no padding)."""
        vocab_keys, vocab_size = self.vocab_weight_keys(), self.config.vocab_size
        return {k: (v[:vocab_size] if k in vocab_keys else v).detach().contiguous()
                for k, v in self.state_dict().items()}

    def load_checkpoint_state_dict(self, tensors: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load tensors shaped as ``checkpoint_state_dict`` gives them (strict): vocabulary rows
        get this model's zero padding rows back."""
        padded_rows = self.padded_head_weight.shape[0]
        tensors = {k: torch.cat([v, v.new_zeros(padded_rows - v.shape[0], *v.shape[1:])])
                   if k in self.vocab_weight_keys() and v.shape[0] < padded_rows else v
                   for k, v in tensors.items()}
        self.load_state_dict(tensors, strict=True, assign=assign)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` in the transformers layout."""
        from safetensors.torch import save_file

        if getattr(self, "lora_settings", None) is not None:  # set by minift.lora.apply_lora
            raise InputError("save_pretrained: the model holds a LoRA adapter, whose wrapped layers "
                             "transformers cannot read; save the adapter (minift.lora.save_adapter) or merge "
                             "it first (minift.lora.merge_adapters)")

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights_dtype = str(self.padded_head_weight.dtype).removeprefix("torch.")
        self.config.save_json(directory / CONFIG_NAME, weights_dtype)
        save_file(self.checkpoint_state_dict(), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory


def sample_token(logits: torch.Tensor, temperature: float, top_k: int = 0,
                 generator: torch.Generator | None = None) -> int:
    """The next token from one position's logits: argmax at temperature 0, else a sample."""
    return int(sample_tokens(logits[None], temperature, top_k, generator)[0])


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int = 0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One next token per row of ``logits`` [rows, vocab] (on the CPU): argmax at temperature 0,
    else a sample from softmax(logits / temperature), from the ``top_k`` likeliest when > 0."""
    if temperature == 0:
        return logits.argmax(dim=-1).cpu()
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
