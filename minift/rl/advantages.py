"""Rewards -> advantages, and the numbers logged about them, as TRL 1.16 computes them.

Every function takes the whole generation round (all ranks' completions, in generation order:
``num_generations`` consecutive completions share a prompt, a *group*) and keeps the dtype it is
given: float32 reproduces TRL, float64 checks the formulas.

    rewards_per_func [N, F]  one column per reward function; NaN where a function returned None
    -> weighted sum          NaN-aware: a None counts as 0 unless every function returned None
                             (an *unscorable* completion: NaN, left out of every baseline)
    -> GRPO: (r - group mean) / (std + 1e-4)    std of the group, of the round, or none
       RLOO: r - mean of the other completions of the group (leave-one-out baseline)
    -> NaN advantages (unscorable completions, groups of one scorable completion) become 0

Standard deviations are NaN-aware with Bessel's correction (TRL's ``nanstd``).
"""
from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")
STD_EPSILON = 1e-4  # added to the std before dividing (TRL's constant)


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction; NaN where fewer than two values."""
    keep = dim if dim is not None else tuple(range(values.dim()))
    mean = torch.nanmean(values, dim=keep, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=keep, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=keep, keepdim=True).to(variance.dtype)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N] the weighted sum over reward functions; a None (NaN) counts as 0, except that a
    completion every function returned None for stays NaN (unscorable)."""
    rewards = (rewards_per_func * weights.to(rewards_per_func)[None]).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's group-relative advantages of a round's ``rewards`` [N] (weighted, NaN = unscorable).

    The baseline is the group's mean reward. ``scale_rewards``: "group" divides by the group's
    std (+1e-4), "batch" by the std of the whole round (+1e-4), "none" does not divide (Dr. GRPO).
    Returns (advantages [N], the std each row was compared with [N]: its group's, or the round's
    for "batch" — what ``frac_reward_zero_std`` reads, also under "none")."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = rewards.view(-1, num_generations)
    baseline = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - baseline
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPSILON)
    return torch.nan_to_num(advantages, nan=0.0), std


def sequence_kl(old_logps: torch.Tensor, ref_logps: torch.Tensor, completion_mask: torch.Tensor
                ) -> torch.Tensor:
    """[N] RLOO's KL estimate of each completion: the summed first-order log-ratio log π_old - log π_ref
    over its completion tokens (can be negative; RLOO subtracts beta times it from the reward)."""
    return ((old_logps - ref_logps) * completion_mask).sum(-1)


def rloo_advantages(rewards: torch.Tensor, num_generations: int, normalize: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO's leave-one-out advantages of a round's ``rewards`` [N] (already clipped and KL-penalised
    when those are on; NaN = unscorable).

    Each completion's baseline is the mean reward of the *other* scorable completions of its group.
    ``normalize``: then (a - mean) / (std + 1e-4) over the round's scorable completions.
    Returns (advantages [N], each group's reward std [N / num_generations], for ``frac_reward_zero_std``)."""
    grouped = rewards.view(-1, num_generations)
    std = nanstd(grouped, dim=1)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    others = torch.nansum(grouped, dim=1, keepdim=True) - grouped
    advantages = rewards - (others / (scorable - 1)).view(-1)  # 0/0 = NaN: a group's only scorable completion
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + STD_EPSILON)
    return torch.nan_to_num(advantages, nan=0.0), std


def reward_metrics(rewards_per_func: torch.Tensor, weights: torch.Tensor, names: list[str],
                   compared_std: torch.Tensor) -> dict[str, float]:
    """The round's reward numbers under TRL's names: ``rewards/<name>/mean|std`` per function (over
    the completions it scored), ``reward`` / ``reward_std`` of the weighted sum (unscorable ones left
    out, no KL penalty), ``frac_reward_zero_std``: the share of ``compared_std`` close to 0."""
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, i]).item()
        out[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, i]).item()
    rewards = weighted_rewards(rewards_per_func, weights)
    out["reward"] = torch.nanmean(rewards).item()
    out["reward_std"] = nanstd(rewards).item()
    zero_std = torch.isclose(compared_std, torch.zeros_like(compared_std))
    out["frac_reward_zero_std"] = zero_std.float().mean().item()
    return out


def completion_metrics(completion_ids: list[list[int]], stop_ids: set[int]) -> dict[str, float]:
    """Lengths of the round's completions under TRL's names. ``stop_ids``: the EOS ids and the pad
    id; a completion whose last token is none of them hit ``max_completion_length`` (clipped)."""
    lengths = torch.tensor([len(ids) for ids in completion_ids], dtype=torch.float32)
    clipped = torch.tensor([ids[-1] not in stop_ids for ids in completion_ids])
    terminated = lengths[~clipped] if (~clipped).any() else torch.zeros(1)
    return {"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": clipped.float().mean().item(),
            "completions/mean_terminated_length": terminated.mean().item(),
            "completions/min_terminated_length": terminated.min().item(),
            "completions/max_terminated_length": terminated.max().item()}
