"""A generation round laid out as TRL 1.16 lays it out, and cut into the micro-batches the loop runs.

    prompts [N]      left-padded to the round's longest prompt (pad id, mask 0)
    completions [N]  right-padded to the round's longest completion; each ends at its first EOS
                     (kept) or at ``max_completion_length`` (a *truncated* completion)
    -> input_ids = prompt ‖ completion, attention_mask = prompt mask ‖ completion mask
    -> mask_truncated_completions: a truncated completion's mask is all 0 (no loss, no attention)
    -> rows shuffled (TRL: one ``torch.randperm`` of the round) and split into
       ``steps_per_generation`` equal micro-batches, reused ``num_iterations`` times

Positions. transformers' GPT forward numbers positions 0..T-1 across the padded row, so in TRL's
loss forward a left-padded prompt starts at position = its number of pad tokens (``generate``
instead counts from the first real token). ``positions="padded"`` reproduces TRL's log-probs;
``positions="real"`` starts every prompt at 0, so a token's probability never depends on how
much padding its round needed (what ``generate`` sampled from).

Which micro-batch runs when (TRL's ``_prepare_inputs``): micro-step s (0-based, over the run)
trains on micro-batch ``s % steps_per_generation`` of round ``s // (steps_per_generation *
num_iterations)``; optimizer step k runs micro-steps k*grad_accum .. (k+1)*grad_accum - 1. A
round is generated (and its old / reference log-probs computed) when its first micro-step comes,
with the weights of that moment. ``RoundLoader`` yields exactly that stream to ``loop.train``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

POSITIONS = ("padded", "real")


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, L], mask [N, L]): each row right-aligned, pads on the left (rows: lists or tensors)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, L], mask [N, L]): each row left-aligned, pads on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def truncated(completion_ids: Sequence[Sequence[int]], stop_ids: set[int]) -> torch.Tensor:
    """[N] bool: the completion's last token is no EOS (nor the pad id): it was cut at the length limit."""
    return torch.tensor([ids[-1] not in stop_ids for ids in completion_ids], dtype=torch.bool)


def position_ids(prompt_mask: torch.Tensor, total_width: int, positions: str) -> torch.Tensor:
    """[N, T] positions of prompt ‖ completion: "padded" counts from the row's first column (TRL),
    "real" from its first real token (pads before it get 0)."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    columns = torch.arange(total_width)[None, :].expand(prompt_mask.shape[0], -1)
    if positions == "padded":
        return columns
    n_pad = prompt_mask.shape[1] - prompt_mask.sum(1, keepdim=True)
    return (columns - n_pad).clamp(min=0)


def round_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int,
                stop_ids: set[int], mask_truncated: bool = False, positions: str = "padded") -> dict:
    """The round's tensors, rows in generation order: ``input_ids`` / ``attention_mask`` /
    ``position_ids`` [N, P + C] and ``completion_mask`` [N, C] (int; 1 = a completion token the loss
    sees). ``stop_ids``: the EOS ids and the pad id (a completion ending in one of them finished)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(completion_ids)} completions")
    if any(len(c) == 0 for c in completion_ids) or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt and every completion needs at least one token")
    prompts, prompt_mask = left_pad(prompt_ids, pad_id)
    completions, completion_mask = right_pad(completion_ids, pad_id)
    if mask_truncated:
        completion_mask = completion_mask * (~truncated(completion_ids, stop_ids))[:, None].long()
    input_ids = torch.cat([prompts, completions], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
            "position_ids": position_ids(prompt_mask, input_ids.shape[1], positions),
            "completion_mask": completion_mask}


def shuffled_split(batch: dict, permutation: Sequence[int] | torch.Tensor, n_micro_batches: int
                   ) -> list[dict]:
    """TRL's ``shuffle_sequence_dict`` then ``split_tensor_dict``: training row k is round row
    ``permutation[k]``; the rows are cut into ``n_micro_batches`` equal, consecutive parts. Tensors
    with one row per completion are permuted and cut; other values (Python numbers) are copied into
    every part. Each part gets the loop's counts (``n_real_tokens``, ``n_padded_tokens``)."""
    permutation = torch.as_tensor(permutation, dtype=torch.long)
    n_rows = len(permutation)
    if n_rows % n_micro_batches:
        raise ValueError(f"{n_rows} completions do not split into {n_micro_batches} equal micro-batches")
    if sorted(permutation.tolist()) != list(range(n_rows)):
        raise ValueError("permutation must hold each row index once")
    size = n_rows // n_micro_batches
    parts = []
    for i in range(n_micro_batches):
        rows = permutation[i * size:(i + 1) * size]
        part = {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
        part["n_real_tokens"] = int(part["attention_mask"].sum())
        part["n_padded_tokens"] = part["input_ids"].numel()
        parts.append(part)
    return parts


def needs_old_logps(grad_accum: int, steps_per_generation: int, num_iterations: int) -> bool:
    """Whether a micro-batch can run on weights other than the ones that sampled it (TRL computes
    the old per-token log-probs then, and otherwise uses the current ones, detached): some
    optimizer step falls between a round's generation and one of its micro-steps."""
    return grad_accum % (steps_per_generation * num_iterations) != 0


def tokens_per_micro_batch(round_loss_tokens: int, world_size: int, steps_per_generation: int) -> float:
    """The "dapo" denominator of one micro-batch: the round's loss tokens over all ranks (at least 1),
    shared evenly by its world_size × steps_per_generation micro-batches."""
    return max(round_loss_tokens, 1) / (world_size * steps_per_generation)


class RoundLoader:
    """The micro-batch stream ``loop.train`` runs for the RL stage: ``make_round(r)`` builds round r's
    micro-batches (its ``steps_per_generation`` parts) when its first micro-step comes, that is after
    the optimizer steps before it; each round is then yielded ``num_iterations`` times. Iterate once
    (a second pass would build the rounds again). ``loop.train`` may not prefetch: a round built one
    step early would be scored with the weights before that step."""

    batch_sampler = None  # loop.train reads it; this stream has no sampler position

    def __init__(self, make_round: Callable[[int], list[dict]], n_rounds: int, num_iterations: int = 1):
        self.make_round, self.n_rounds, self.num_iterations = make_round, n_rounds, num_iterations

    def __iter__(self) -> Iterator[dict]:
        for r in range(self.n_rounds):
            micro_batches = self.make_round(r)
            for _ in range(self.num_iterations):
                yield from micro_batches
