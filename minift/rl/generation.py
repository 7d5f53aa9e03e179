"""Generation inside the RL step: completions sampled from the current policy, many prompts at once,
with the KV cache.

    prompts (token ids) -> chunks of ``batch_size`` rows -> each chunk left-padded, one forward over the
    prompts (prefill), then one token per row per step through the cache -> completions up to and
    including the first EOS, their mask, whether they were cut at ``max_completion_length``

Padding never changes a probability: the prompts are padded on the LEFT, pads are hidden from every
real token (``CausalLM.hidden_states`` with a cache and an attention mask), and positions count only
real tokens (``positions_from_mask``), so a prompt continues exactly as it would alone (tested
against the same prompt generated alone, and against transformers' ``generate`` on left-padded
batches).

One step of sampling, in transformers' order (``GenerationMixin._get_logits_processor``, which
TRL's ``GRPOTrainer`` uses when it generates without vLLM):

    logits (float32) -> repetition penalty -> / temperature -> top_k -> top_p -> min_p
    -> softmax -> torch.multinomial(probs, 1, generator)

Each filter is written here and checked against transformers' ``RepetitionPenaltyLogitsProcessor``,
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` and ``MinPLogitsWarper`` on
random logits (tests/test_rl_generation.py). Rows that reached EOS keep being sampled until every
row has finished (their tokens are replaced by the pad id), as transformers does: a row's draws then
do not depend on when other rows finish, and on CPU a generator seeded like transformers' global RNG
draws the very tokens ``generate(do_sample=True)`` draws.

The random numbers come from one ``torch.Generator`` (on the model's device) that the caller owns:
saving ``generator.get_state()`` with a checkpoint and restoring it makes a resumed run draw the
same completions. The draws depend on the chunking: keep ``batch_size`` when resuming.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from .batching import left_pad


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn; TRL's ``GRPOConfig`` names and defaults (``do_sample=False``: greedy)."""

    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off (TRL's None)
    repetition_penalty: float = 1.0  # 1: off
    do_sample: bool = True

    def check(self) -> SamplingSettings:
        """One line per bad setting (InputError), named as in the config."""
        problems = []
        if self.max_completion_length < 1:
            problems.append(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            problems.append(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            problems.append(f"repetition_penalty must be a finite number > 0 (1 = off), "
                            f"got {self.repetition_penalty}")
        if problems:
            raise InputError("generation: " + "; ".join(problems))
        return self


@dataclass
class Completions:
    """What one generation round produced, row for row with the prompts it was given (CPU tensors).

    ``ids`` [N, L]: the sampled tokens, right-padded with the pad id after each row's first EOS;
    ``mask`` [N, L]: 1 up to and including the first EOS (TRL's ``completion_mask``);
    ``logprobs`` [N, L]: log-probability of each sampled token under softmax(logits / temperature),
    before the top-k/top-p/min-p filters and the repetition penalty (what the policy's own forward
    gives, TRL's ``per_token_logps``), 0 where ``mask`` is 0; ``is_truncated`` [N]: the completion
    does not end with an EOS or the pad id (TRL's rule; it filled ``max_completion_length``)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # each up to and including its first EOS: TRL's completion_ids
    ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    is_truncated: torch.Tensor

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


# -- the filters of one sampling step ------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token already in the row (``seen`` [B, V] bool): a positive logit is
    divided by ``penalty``, a negative one multiplied by it."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (ties with the k-th kept too), -inf elsewhere."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (the
    most likely token always). From the least likely up, a token goes while the probability of it and
    everything below it stays <= 1 - top_p."""
    if top_p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)
    below_and_self = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = below_and_self <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the most likely one (which always stays)."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    top = probs.max(dim=-1, keepdim=True)
    drop = probs < min_p * top.values
    drop.scatter_(-1, top.indices, False)
    return logits.masked_fill(drop, float("-inf"))


def next_token_scores(logits: torch.Tensor, settings: SamplingSettings, seen: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Raw float32 logits [B, V] -> the scores the next token is drawn from (softmax of them), in
    transformers' order: repetition penalty, temperature, top_k, top_p, min_p."""
    if seen is not None and settings.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if not settings.do_sample:
        return logits
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    logits = filter_top_k(logits, settings.top_k)
    logits = filter_top_p(logits, settings.top_p)
    return filter_min_p(logits, settings.min_p)


def choose_tokens(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: a draw from softmax(scores), or the argmax when not sampling."""
    if not do_sample:
        return scores.argmax(dim=-1)
    return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)


# -- the generation loop ---------------------------------------------------------------------------------
def new_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The sampling generator (on the device the policy runs on); save ``get_state()`` to resume."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def check_prompts(prompt_ids: Sequence[Sequence[int]], n_positions: int, max_completion_length: int) -> None:
    """Every prompt has a token, and room for ``max_completion_length`` more within the model's positions."""
    if not prompt_ids:
        raise InputError("generation: no prompts")
    for row, prompt in enumerate(prompt_ids):
        if not len(prompt):
            raise InputError(f"generation: prompt {row} has no tokens")
        if len(prompt) + max_completion_length > n_positions:
            raise InputError(f"generation: prompt {row} has {len(prompt)} tokens; with max_completion_length "
                             f"{max_completion_length} that passes the model's {n_positions} positions")


@torch.no_grad()
def generate_completions(model, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings,
                         eos_ids: Sequence[int], pad_id: int, generator: torch.Generator | None = None,
                         batch_size: int | None = None) -> Completions:
    """Sample one completion per prompt (repeat a prompt to get several) from ``model`` (a ``CausalLM``,
    not a DDP wrapper), ``batch_size`` rows per forward (None: all at once), in eval mode (dropout off;
    the mode is restored after). A row stops after its first token in ``eos_ids``; every row stops
    after ``max_completion_length`` tokens."""
    settings.check()
    check_prompts(prompt_ids, model.config.n_positions, settings.max_completion_length)
    device = model.lm_head_weight.device
    if settings.do_sample and generator is not None and generator.device.type != device.type:
        raise InputError(f"generation: the sampling generator is on {generator.device}, "
                         f"the model on {device}")
    was_training = model.training
    model.eval()
    try:
        step = batch_size or len(prompt_ids)
        chunks = [_generate_chunk(model, prompt_ids[i:i + step], settings, eos_ids, pad_id, generator, device)
                  for i in range(0, len(prompt_ids), step)]
    finally:
        model.train(was_training)
    return _assemble(prompt_ids, chunks, eos_ids, pad_id)


def _generate_chunk(model, prompt_ids, settings: SamplingSettings, eos_ids, pad_id: int,
                    generator: torch.Generator | None, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: prefill the left-padded prompts, then a token per row per step. Returns the tokens
    [B, steps] (pad after a row's EOS) and their log-probs [B, steps]."""
    ids, mask = (t.to(device) for t in left_pad(prompt_ids, pad_id))
    padded = not bool(mask.all())  # read once: appended tokens are real, so this never changes
    eos = torch.as_tensor(list(eos_ids), dtype=torch.long, device=device)
    seen = None
    if settings.repetition_penalty != 1.0:  # real tokens of each row so far (pads left out)
        vocab = model.config.vocab_size  # pads are written to an extra column, then dropped
        seen = torch.zeros(len(prompt_ids), vocab + 1, dtype=torch.bool, device=device)
        seen = seen.scatter_(1, ids.masked_fill(mask == 0, vocab), True)[:, :vocab]
    cache = model.new_kv_cache()
    hidden = model.hidden_states(ids, mask if padded else None, kv_cache=cache)[:, -1]
    unfinished = torch.ones(len(prompt_ids), dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for _ in range(settings.max_completion_length):
        logits = F.linear(hidden, model.lm_head_weight).float()
        scores = next_token_scores(logits, settings, seen)
        token = choose_tokens(scores, settings.do_sample, generator)
        logprobs.append(token_logprobs(logits, token, settings.temperature if settings.do_sample else 1.0))
        token = torch.where(unfinished, token, torch.full_like(token, pad_id))
        tokens.append(token)
        unfinished &= ~torch.isin(token, eos)
        if not bool(unfinished.any()):
            break
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if padded:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        hidden = model.hidden_states(token[:, None], mask if padded else None, kv_cache=cache)[:, -1]
    return torch.stack(tokens, dim=1).cpu(), torch.stack(logprobs, dim=1).float().cpu()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) at ``tokens`` [B], without writing the [B, V] log-softmax."""
    scaled = logits / temperature if temperature != 1.0 else logits
    return scaled.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)


def decode_completions(tokenizer, completion_ids: Sequence[Sequence[int]]) -> list[str]:
    """The completions' text as the rewards see it: special tokens (EOS, pad) left out, as TRL decodes
    them (``batch_decode(completion_ids, skip_special_tokens=True)``)."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]


def completion_mask(tokens: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """1 up to and including each row's first EOS (every position when there is none), 0 after."""
    is_eos = torch.isin(tokens, torch.as_tensor(list(eos_ids), dtype=torch.long))
    none = torch.full_like(tokens[:, 0], tokens.shape[1])
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), none)
    return (torch.arange(tokens.shape[1])[None, :] <= first[:, None]).long()


def _assemble(prompt_ids, chunks, eos_ids, pad_id: int) -> Completions:
    width = max(tokens.shape[1] for tokens, _ in chunks)
    ids = torch.cat([F.pad(tokens, (0, width - tokens.shape[1]), value=pad_id) for tokens, _ in chunks])
    logprobs = torch.cat([F.pad(lp, (0, width - lp.shape[1])) for _, lp in chunks])
    mask = completion_mask(ids, eos_ids)
    ids = ids.masked_fill(mask == 0, pad_id)
    logprobs = logprobs.masked_fill(mask == 0, 0.0)
    completion_ids = [row[:n].tolist() for row, n in zip(ids, mask.sum(dim=1).tolist())]
    ends = set(eos_ids) | {pad_id}
    is_truncated = torch.tensor([c[-1] not in ends for c in completion_ids], dtype=torch.bool)
    return Completions([list(p) for p in prompt_ids], completion_ids, ids, mask, logprobs, is_truncated)
