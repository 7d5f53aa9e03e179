"""One generation round -> the micro-batches the loop trains on, and the round's logged numbers, as TRL 1.16.

    sampled completions + their rewards per reward function       (generation and rewards: elsewhere)
    -> laid out (batching.round_batch), old log-probs if an update can come between
       (batching.needs_old_logps), reference log-probs if beta > 0, all under the weights of this moment
    -> advantages: GRPO's group baseline, or RLOO's leave-one-out on the reward minus beta x its KL
    -> this rank's rows, shuffled by ``permutation`` and cut into ``steps_per_generation`` micro-batches
    -> metrics under TRL's names (reward, reward_std, frac_reward_zero_std, rewards/<name>/*, completions/*,
       and RLOO's kl), logged in the optimizer step whose micro-step sampled the round

Every rank holds the whole round (all ranks' completions and rewards, in generation order) so that
advantages, the "dapo" token count and the padding are the round's: N ranks then train exactly as one
process. Only RLOO with beta > 0 scores every row on every rank (its reward needs every completion's KL);
otherwise a rank scores its own rows.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def prepare_round(settings: RoundSettings, policy: CompletionLogProbs, reference: CompletionLogProbs | None,
                  prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  rewards_per_func: torch.Tensor,
                  reward_weights: torch.Tensor, reward_names: list[str], pad_id: int, stop_ids: set[int],
                  permutation, device: torch.device, rank: int = 0, world_size: int = 1, autocast=None
                  ) -> tuple[list[dict], dict[str, float]]:
    """(this rank's micro-batches, the round's metrics). ``rewards_per_func`` [N, F] float32 (NaN = None),
    rows in generation order; ``permutation``: TRL's shuffle of this rank's rows (training row k = local row
    permutation[k]); rank r trains on the round's rows [r·N/world_size, (r+1)·N/world_size). ``autocast``:
    the training forward's autocast context (bf16 / fp16 runs), so that on-policy ratios are exactly 1."""
    n = len(completion_ids)
    if n % world_size or n % settings.num_generations:
        raise ValueError(f"a round of {n} completions does not split into {world_size} ranks and groups of "
                         f"{settings.num_generations}")
    local = slice(rank * n // world_size, (rank + 1) * n // world_size)
    batch = round_batch(prompt_ids, completion_ids, pad_id, stop_ids, settings.mask_truncated_completions,
                        settings.positions)
    mask = batch["completion_mask"]
    score_all = settings.algorithm == "rloo" and settings.beta != 0.0
    scored = batch if score_all else {k: v[local] for k, v in batch.items()}

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

    mine = {k: v[local] for k, v in batch.items()}
    mine["advantages"] = advantages[local]
    mine["tokens_per_micro_batch"] = tokens_per_micro_batch(int(mask.sum()), world_size,
                                                            settings.steps_per_generation)
    for key, values in (("old_logps", old), ("ref_logps", ref)):
        if values is not None:
            mine[key] = values[local] if score_all else values
    return shuffled_split(mine, permutation, settings.steps_per_generation), metrics
