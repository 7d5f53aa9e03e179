"""Collation: examples -> padded tensors plus the counts the training loop needs.

Right padding to the longest sequence of the batch (optionally to a multiple of N), or to a
fixed ``max_length`` (only to reproduce the classic Trainer recipe). Labels are the input
ids with -100 on pads (and, under the ``completion`` objective, on the prompt; under
``assistant``, on every token outside the example's ``assistant_mask``: TRL's assistant-only
loss on chat data); the model shifts them. ``PackingCollator`` concatenates examples into rows
with per-example positions and attention confined to each example; with ``rows_per_batch``
every batch has the same shape [rows_per_batch, row_length] (the static path: one compiled
graph, CUDA-graph-able). Every batch says ``right_padded`` (a Python bool), so the model never
reads its mask back from the device to decide it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import InputError
from .models.layers import IGNORE_INDEX

OBJECTIVES = ("all", "completion", "assistant")  # every real token / after the prompt / assistant turns
PADDINGS = ("longest", "max_length")  # dynamic / the classic recipe's fixed length


@dataclass
class Collator:
    pad_id: int
    objective: str = "all"  # "all": every real token; "completion": after the prompt; "assistant": the mask
    pad_to_multiple_of: int | None = None
    padding: str = "longest"  # or "max_length" (the classic recipe)
    max_length: int | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.padding not in PADDINGS:
            raise InputError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.padding == "max_length" and not self.max_length:
            raise InputError("padding='max_length' needs max_length")
        if self.pad_id is None:
            raise InputError("the tokenizer has no pad token: add one (tokenizer.add_pad_token()) or use EOS")

    def padded_tokens(self, lengths: Sequence[int]) -> int:
        """Tokens (real + pad) of the batch holding examples of these lengths."""
        return len(lengths) * self.padded_length(max(lengths))

    def padded_length(self, longest: int) -> int:
        length = self.max_length if self.padding == "max_length" else longest
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def example_labels(self, example: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
        """One example's labels under the objective (-100 where it takes no loss)."""
        if self.objective == "assistant":
            if "assistant_mask" not in example:
                raise InputError("objective \"assistant\" needs chat examples (data.format = \"chat\"): this "
                                 "example has no assistant_mask")
            keep = torch.as_tensor(example["assistant_mask"], dtype=torch.bool)
            return ids.masked_fill(~keep, IGNORE_INDEX)
        first_label = example.get("prompt_length", 0) if self.objective == "completion" else 0
        return torch.cat([ids.new_full((min(first_label, len(ids)),), IGNORE_INDEX), ids[first_label:]])

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(e["input_ids"]) for e in examples]
        time = self.padded_length(max(lengths))
        input_ids = torch.full((len(examples), time), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), time), dtype=torch.long)
        labels = torch.full((len(examples), time), IGNORE_INDEX, dtype=torch.long)
        for row, (example, length) in enumerate(zip(examples, lengths)):
            ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
            input_ids[row, :length] = ids
            attention_mask[row, :length] = 1
            labels[row, :length] = self.example_labels(example, ids)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "right_padded": True, **batch_counts(input_ids, labels, n_real_tokens=sum(lengths))}


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Indices into ``lengths`` per row, first fit in the given order: each example goes into
    the first row with room, else opens a row; an example never splits across rows. The packed
    sampler (sampling.PackedSampler) cuts batches with this same rule."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        if n > row_length:
            raise InputError(f"example of {n} tokens does not fit a packed row of {row_length} "
                             f"(raise data.max_length or truncate the examples)")
        row = next((r for r, u in enumerate(used) if u + n <= row_length), len(used))
        if row == len(used):
            rows.append([])
            used.append(0)
        rows[row].append(i)
        used[row] += n
    return rows


@dataclass
class PackingCollator(Collator):
    """Packs the batch's examples (``pack_rows``) into rows of at most ``row_length`` tokens.
    Each example keeps positions 0..n-1, sees only itself (``document_ids``; -1 on padding),
    and its first token is never a target, so no attention and no loss crosses an example
    boundary. ``rows_per_batch``: every batch is exactly [rows_per_batch, row_length] (empty
    rows are all padding); None: as many rows as the examples need, as long as the longest."""

    row_length: int = 128
    rows_per_batch: int | None = None

    def padded_tokens(self, lengths: Sequence[int]) -> int:
        rows = pack_rows(lengths, self.row_length)
        if self.rows_per_batch:
            return self.rows_per_batch * self.row_length
        return len(rows) * self.padded_length(max(sum(lengths[i] for i in row) for row in rows))

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = pack_rows([len(e["input_ids"]) for e in examples], self.row_length)
        if self.rows_per_batch:
            if len(rows) > self.rows_per_batch:
                raise InputError(f"{len(examples)} examples need {len(rows)} packed rows of "
                                 f"{self.row_length} tokens; the batch has {self.rows_per_batch} "
                                 f"(use sampling.PackedSampler)")
            shape = (self.rows_per_batch, self.row_length)
        else:
            shape = (len(rows), self.padded_length(max(sum(len(examples[i]["input_ids"]) for i in row)
                                                       for row in rows)))
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        document_ids = torch.full(shape, -1, dtype=torch.long)  # -1: padding
        attention_mask = torch.zeros(shape, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for doc, i in enumerate(row):
                ids = torch.as_tensor(examples[i]["input_ids"], dtype=torch.long)
                end = start + len(ids)
                input_ids[r, start:end] = ids
                position_ids[r, start:end] = torch.arange(len(ids))
                document_ids[r, start:end] = doc
                attention_mask[r, start:end] = 1
                labels[r, start:end] = self.example_labels(examples[i], ids)
                labels[r, start] = IGNORE_INDEX  # predicted by nothing of its own document: never a target
                start = end
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "position_ids": position_ids, "document_ids": document_ids, "right_padded": True,
                **batch_counts(input_ids, labels, n_real_tokens=int(attention_mask.sum()))}


def batch_counts(input_ids: torch.Tensor, labels: torch.Tensor, n_real_tokens: int) -> dict[str, int]:
    """The counts the loop reads from every batch, as Python ints (no device sync in the loop)."""
    return {
        "n_real_tokens": n_real_tokens,
        "n_padded_tokens": input_ids.numel(),
        # a label at position t is predicted from t-1: the first position is never a target
        "n_loss_targets": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        # Trainer's count for GPT-1/GPT-2 (unshifted labels, first tokens included); see docs
        "n_label_tokens": int((labels != IGNORE_INDEX).sum()),
    }


def count_loss_targets(batch: dict[str, Any], count_key: str = "n_loss_targets") -> int:
    """``count_key`` of a batch that did not come from a minift collator (it has ``labels``)."""
    if "labels" not in batch:
        raise KeyError(f"the batch has neither {count_key!r} nor 'labels' (keys: {sorted(batch)}): give the "
                       f"model labels (input_ids with -100 where no loss is wanted), or use minift.Collator")
    labels = batch["labels"]
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else labels.numel()
    return batch_counts(batch["input_ids"], labels, real)[count_key]


MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids", "document_ids")
MODEL_HINTS = ("right_padded",)  # Python values the collator decided on the CPU


def model_inputs(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The tensors of a batch that the model takes, moved to ``device``, and the collator's hints."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
    return {**inputs, **{k: batch[k] for k in MODEL_HINTS if k in batch}}


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]], collator: Collator) -> float:
    """Real tokens / padded tokens over ``batches`` (index lists), computed from lengths alone."""
    real = padded = 0
    for batch in batches:
        batch_lengths = [lengths[i] for i in batch]
        real += sum(batch_lengths)
        padded += collator.padded_tokens(batch_lengths)
    return real / padded
