"""One generation round -> the micro-batches the loop trains on, and the round's logged numbers, as TRL 1.16.

    sampled completions + their rewards per reward function       (generation and rewards: elsewhere)
    -> laid out (batching.round_batch), old log-probs if an update can come between
       (batching.needs_old_logps), reference log-probs if beta > 0, all under the weights of this moment
    -> advantages: GRPO's group baseline, or RLOO's leave-one-out on the reward minus beta x its KL
    -> the round's training order (``permutation``) cut into ``steps_per_generation`` micro-batches,
       this rank's slice of each
    -> metrics under TRL's names (reward, reward_std, frac_reward_zero_std, rewards/<name>/*, completions/*,
       and RLOO's kl), logged in the optimizer step whose micro-step sampled the round

Every rank holds the whole round (all ranks' completions and rewards, in generation order) so that
advantages, the "dapo" token count and the padding are the round's. The round's training order (one
permutation, the same on every rank) is cut into ``steps_per_generation`` micro-batches, and under N ranks
each micro-batch into N equal slices, rank r training on slice r (``rank_rows``): N ranks then train on
exactly the micro-batches one process would, whatever the permutation. Only RLOO with beta > 0 scores
every row on every rank (its reward needs every completion's KL); otherwise a rank scores the rows it
trains on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import advantages as adv
from .batching import needs_old_logps, round_batch, shuffled_split, tokens_per_micro_batch
from .objective import CompletionLogProbs, completion_logps

ALGORITHMS = ("grpo", "rloo")


@dataclass
class RoundSettings:
    """TRL's names; ``rows_per_forward`` is TRL's per-device batch (old and reference log-probs are computed
    that many rows at a time)."""

    algorithm: str = "grpo"
    num_generations: int = 8
    scale_rewards: str = "group"  # GRPO
    normalize_advantages: bool = False  # RLOO
    reward_clip_range: tuple[float, float] | None = None  # RLOO
    beta: float = 0.0
    mask_truncated_completions: bool = False
    positions: str = "padded"
    steps_per_generation: int = 1
    grad_accum: int = 1
    num_iterations: int = 1
    rows_per_forward: int = 8

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")


class PreparedRound(NamedTuple):
    micro_batches: list[dict]  # this rank's, in training order
    metrics: dict[str, float]  # the round's, under TRL's names
    advantages: torch.Tensor  # [N] the round's, in generation order (what completions.jsonl shows)


def rank_rows(permutation, n_micro_batches: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The round rows ``rank`` trains on, in its training order. ``permutation`` is the round's training
    order (training row k = round row permutation[k], TRL's shuffle), cut into ``n_micro_batches`` equal
    micro-batches; under ``world_size`` ranks micro-batch k is cut into equal slices, rank r taking
    slice r."""
    permutation = torch.as_tensor(permutation, dtype=torch.long)
    n = len(permutation)
    if n % (n_micro_batches * world_size):
        raise ValueError(f"{n} completions do not split into {n_micro_batches} micro-batches x {world_size} "
                         f"ranks")
    size, share = n // n_micro_batches, n // (n_micro_batches * world_size)
    return torch.cat([permutation[k * size + rank * share:k * size + (rank + 1) * share]
                      for k in range(n_micro_batches)])


def prepare_round(settings: RoundSettings, policy: CompletionLogProbs, reference: CompletionLogProbs | None,
                  prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  rewards_per_func: torch.Tensor,
                  reward_weights: torch.Tensor, reward_names: list[str], pad_id: int, stop_ids: set[int],
                  permutation, device: torch.device, rank: int = 0, world_size: int = 1, autocast=None
                  ) -> PreparedRound:
    """This rank's micro-batches, the round's metrics and advantages. ``rewards_per_func`` [N, F] float32
    (NaN = None), rows in generation order; ``permutation``: the round's training order (training row k =
    round row permutation[k]; TRL's shuffle), the same on every rank; rank r trains on slice r of each
    micro-batch (``rank_rows``). ``autocast``: the training forward's autocast context (bf16 / fp16
    runs), so that on-policy ratios are exactly 1."""
    n = len(completion_ids)
    if n % settings.num_generations or len(permutation) != n:
        raise ValueError(f"a round of {n} completions with a permutation of {len(permutation)} rows does not "
                         f"split into groups of {settings.num_generations}")
    rows = rank_rows(permutation, settings.steps_per_generation, rank, world_size)
    batch = round_batch(prompt_ids, completion_ids, pad_id, stop_ids, settings.mask_truncated_completions,
                        settings.positions)
    mask = batch["completion_mask"]
    score_all = settings.algorithm == "rloo" and settings.beta != 0.0
    scored = batch if score_all else {k: v[rows] for k, v in batch.items()}

    old = ref = None  # [rows scored, C], computed now: under the weights that sampled the round
    if settings.algorithm == "rloo" or needs_old_logps(settings.grad_accum, settings.steps_per_generation,
                                                       settings.num_iterations):
        old = completion_logps(policy, scored, settings.rows_per_forward, device, autocast).cpu()
    if settings.beta != 0.0:
        ref = completion_logps(reference, scored, settings.rows_per_forward, device, autocast).cpu()

    rewards = adv.weighted_rewards(rewards_per_func, reward_weights)
    metrics: dict[str, float] = {}
    if settings.algorithm == "grpo":
        advantages, std = adv.grpo_advantages(rewards, settings.num_generations, settings.scale_rewards)
    else:
        if settings.reward_clip_range:
            rewards = rewards.clamp(*settings.reward_clip_range)
        if ref is not None:  # every row was scored
            rewards = rewards - settings.beta * adv.sequence_kl(old, ref, mask)
            metrics["kl"] = (((old - ref) * mask).sum() / mask.sum().clamp(min=1)).item()
        advantages, std = adv.rloo_advantages(rewards, settings.num_generations,
                                              settings.normalize_advantages)
    metrics.update(adv.reward_metrics(rewards_per_func, reward_weights, reward_names, std))
    metrics.update(adv.completion_metrics(completion_ids, stop_ids))

    mine = {k: v[rows] for k, v in batch.items()}
    mine["advantages"] = advantages[rows]
    mine["tokens_per_micro_batch"] = tokens_per_micro_batch(int(mask.sum()), world_size,
                                                            settings.steps_per_generation)
    for key, values in (("old_logps", old), ("ref_logps", ref)):
        if values is not None:
            mine[key] = values[rows] if score_all else values
    micro_batches = shuffled_split(mine, torch.arange(len(rows)), settings.steps_per_generation)
    return PreparedRound(micro_batches, metrics, advantages)
