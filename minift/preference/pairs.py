"""Preference pairs: from rows to one padded batch of chosen and rejected sequences.

The stages, each a function:

    load_pairs        hub id or local JSONL/Parquet in TRL's standard format (prompt, chosen, rejected)
    tweet_pairs       the built-in pairs: prompt "{text} sentiment:", chosen the gold label, rejected a
                      wrong one (seeded; one wrong label per tweet, or both)
    tokenize_pairs    prompt / chosen / rejected ids as TRL splits them, truncated as TRL does, counted
    PairCollator      chosen rows then rejected rows, right-padded once, completion-only labels

Truncation follows TRL's DPO default (``truncation_mode="keep_start"``): each prompt+completion is
cut at ``max_length`` from the END, so the completion loses its tail first; a pair whose prompt alone
fills ``max_length`` keeps no completion token and is dropped. Pairs that cannot teach anything are
dropped too: an empty chosen or rejected completion, and chosen = rejected (the loss is then log 2
with zero gradient, and held-out accuracy would count float noise). All are counted in the report.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import datasets
import torch

from ..data import ROW, DataError, clean_split, format_prompt, load_splits, split_template
from ..models.layers import IGNORE_INDEX
from .config import REJECTED_CHOICES

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class PairReport:
    """What loading and tokenization did to one split of pairs (printed at the start of a run)."""

    split: str
    rows_read: int = 0
    pairs: int = 0
    truncated: int = 0  # pairs where chosen or rejected lost tokens at the end
    dropped_long_prompt: int = 0  # pairs whose prompt alone reaches max_length
    dropped_rows: list[int] = field(default_factory=list)  # rows dropped for any reason
    dropped_empty: list[int] = field(default_factory=list)  # rows with an empty chosen or rejected completion
    dropped_identical: list[int] = field(default_factory=list)  # rows whose chosen and rejected are equal

    def line(self) -> str:
        line = (f"{self.split}: {self.rows_read} rows read, {self.pairs} pairs, {self.truncated} truncated "
                f"(end cut, as TRL's keep_start), {self.dropped_long_prompt} dropped (prompt fills "
                "max_length)")
        for rows, why in ((self.dropped_empty, "empty chosen or rejected"),
                          (self.dropped_identical, "chosen = rejected")):
            if rows:
                shown = ", ".join(map(str, sorted(rows)[:5])) + ("..." if len(rows) > 5 else "")
                line += f", {len(rows)} dropped ({why}; rows {shown})"
        return line


# -- sources ----------------------------------------------------------------------------------------
def load_pairs(source: str, seed: int = 0, validation_fraction: float = 0.0) -> datasets.DatasetDict:
    """Preference splits from a hub id, local directory (train.jsonl / test.parquet ...) or file, in
    TRL's standard format: string columns ``prompt``, ``chosen``, ``rejected``. With
    ``validation_fraction`` > 0 a seeded ``validation`` split is held out of train (as ``minift train``)."""
    splits = load_splits(source, seed=seed, validation_fraction=validation_fraction,
                         text_columns=PAIR_COLUMNS)
    for name, split in splits.items():
        missing = [c for c in PAIR_COLUMNS if c not in split.column_names]
        if missing:
            raise DataError(f"{source}: split {name!r} lacks column(s) {missing} of TRL's preference format "
                            f"(prompt, chosen, rejected); columns are {split.column_names}")
        for row, values in enumerate(zip(*(split[c] for c in PAIR_COLUMNS))):
            for column, value in zip(PAIR_COLUMNS, values):
                if value is None and column == "prompt":
                    raise DataError(f"{source}: split {name!r} row {row}: 'prompt' is null — give the prompt "
                                    f"(\"\" for none), or remove the row")
                if value is not None and not isinstance(value, str):  # a null completion: dropped as empty
                    raise DataError(f"{source}: split {name!r} row {row}: {column!r} must be plain text, "
                                    f"got {type(value).__name__} (conversational pairs are not supported)")
    return splits


def tweet_pairs(split: datasets.Dataset, name: str, template: str, labels: Sequence[str],
                rejected: str = "one", seed: int = 0, text_column: str = "text",
                label_column: str = "label_text") -> datasets.Dataset:
    """Pairs from labelled texts: prompt ``"{text} sentiment:"``, chosen ``" {gold}"``, rejected
    ``" {wrong}"``. ``rejected="one"``: one wrong label per row, drawn with ``seed``; ``"both"``:
    a pair for every wrong label. Empty texts are skipped as ``minift train`` skips them."""
    if rejected not in REJECTED_CHOICES:
        raise DataError(f"rejected must be one of {REJECTED_CHOICES}, got {rejected!r}")
    cleaned, _ = clean_split(split, name, text_column, label_column, tuple(labels))
    completion = split_template(template)[1]
    rng = random.Random(seed)
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], ROW: []}
    columns = cleaned.select_columns([text_column, label_column, ROW]).to_dict()
    for text, gold, row in zip(columns[text_column], columns[label_column], columns[ROW]):
        wrong = [label for label in labels if label != gold]
        for bad in (wrong if rejected == "both" else [rng.choice(wrong)]):
            out["prompt"].append(format_prompt(text, template))
            out["chosen"].append(completion.format(label=gold))
            out["rejected"].append(completion.format(label=bad))
            out[ROW].append(row)
    return datasets.Dataset.from_dict(out)


# -- tokenization -------------------------------------------------------------------------------------
def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TokenizedPairs:
    """Map-style dataset of tokenized pairs (python lists): what the sampler and collator read."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]  # completion tokens only, after truncation
    rejected_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def lengths(self) -> list[int]:
        """The longer sequence of each pair (what the batch pads to)."""
        return [len(p) + max(len(c), len(r))
                for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)]

    def truncate(self, n: int) -> None:
        self.prompt_ids, self.chosen_ids, self.rejected_ids = (
            self.prompt_ids[:n], self.chosen_ids[:n], self.rejected_ids[:n])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"prompt_ids": self.prompt_ids[i], "chosen_ids": self.chosen_ids[i],
                "rejected_ids": self.rejected_ids[i], "index": i}


def append_eos_for(setting: str | bool, tokenizer, stage: str) -> bool:
    """``pairs.append_eos`` resolved for a tokenizer: "yes"/"no" (or a saved true/false), or "auto" =
    what TRL computes. TRL appends EOS to every completion when the tokenizer has one. Its reward
    model (transformers' sequence classifier) reads the reward at the last token that is not the pad
    token, so where EOS is the pad token (GPT-2) it reads the token before EOS: the reward stage then
    leaves EOS off, and minift's reward, read at the last real token, is that same token's."""
    if isinstance(setting, bool) or setting in ("yes", "no"):
        return setting in (True, "yes")
    if tokenizer.eos_id is None:
        return False
    return not (stage == "reward" and tokenizer.pad_id == tokenizer.eos_id)


def tokenize_pairs(pairs: datasets.Dataset, tokenizer, max_length: int, append_eos: bool = False,
                   name: str = "train") -> tuple[TokenizedPairs, PairReport]:
    """Tokenize as TRL's DPOTrainer does: encode prompt, prompt+chosen and prompt+rejected; the
    completion starts where the three stop sharing a prefix. ``append_eos`` adds the tokenizer's
    EOS to both completions (``append_eos_for`` says when). Then keep_start truncation to
    ``max_length`` per sequence. Pairs that cannot teach are dropped and counted (module docstring)."""
    report = PairReport(name, rows_read=len(pairs))
    eos = [tokenizer.eos_id] if append_eos and tokenizer.eos_id is not None else []
    if append_eos and not eos:
        raise DataError(f"append_eos asked for, but tokenizer {tokenizer.source} has no EOS token")
    columns = {c: [value or "" for value in values]  # a null completion counts as empty (dropped)
               for c, values in pairs.select_columns(list(PAIR_COLUMNS)).to_dict().items()}
    numbers = list(pairs[ROW]) if ROW in pairs.column_names else range(len(pairs))  # rows of the source
    prompts = tokenizer.encode_batch(columns["prompt"])
    with_chosen = tokenizer.encode_batch([p + c for p, c in zip(columns["prompt"], columns["chosen"])])
    with_rejected = tokenizer.encode_batch([p + r for p, r in zip(columns["prompt"], columns["rejected"])])
    out = TokenizedPairs([], [], [])
    for row, p_ids, c_full, r_full in zip(numbers, prompts, with_chosen, with_rejected):
        start = min(common_prefix_length(p_ids, c_full), common_prefix_length(p_ids, r_full))
        if start >= max_length:
            report.dropped_long_prompt += 1
            report.dropped_rows.append(row)
            continue
        if not c_full[start:] or not r_full[start:]:
            report.dropped_empty.append(row)
            report.dropped_rows.append(row)
            continue
        chosen, rejected = c_full[start:] + eos, r_full[start:] + eos
        room = max_length - start
        if chosen[:room] == rejected[:room]:
            report.dropped_identical.append(row)
            report.dropped_rows.append(row)
            continue
        if len(chosen) > room or len(rejected) > room:
            report.truncated += 1
        out.prompt_ids.append(c_full[:start])
        out.chosen_ids.append(chosen[:room])
        out.rejected_ids.append(rejected[:room])
    report.pairs = len(out)
    if not len(out):
        raise DataError(f"split {name!r}: no pair left ({report.line()})")
    return out, report


# -- collation ---------------------------------------------------------------------------------------
@dataclass
class PairCollator:
    """B pairs -> one batch of 2B rows: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected,
    right-padded to the longest row. ``labels`` carry the completion tokens only (-100 on prompt
    and pads), so summed log-probs cover exactly the completion. ``n_pairs`` is the loop's count."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = ([(e["prompt_ids"], e["chosen_ids"]) for e in examples]
                + [(e["prompt_ids"], e["rejected_ids"]) for e in examples])
        time = max(len(p) + len(c) for p, c in rows)
        if self.pad_to_multiple_of:
            time = -(-time // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), time), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), time), dtype=torch.long)
        labels = torch.full((len(rows), time), IGNORE_INDEX, dtype=torch.long)
        for r, (prompt, completion) in enumerate(rows):
            ids = torch.as_tensor(list(prompt) + list(completion), dtype=torch.long)
            input_ids[r, :len(ids)] = ids
            attention_mask[r, :len(ids)] = 1
            labels[r, len(prompt):len(ids)] = ids[len(prompt):]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pair_index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
                "n_pairs": len(examples), "n_real_tokens": int(attention_mask.sum()),
                "n_padded_tokens": input_ids.numel()}


def pair_batches(pairs: TokenizedPairs, collator: PairCollator, batch_size: int,
                 limit: int = 0) -> list[dict]:
    """Sequential batches over the first ``limit`` pairs (all when 0): for evaluation and precompute."""
    n = len(pairs) if not limit else min(limit, len(pairs))
    return [collator([pairs[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size)]


# -- the loss object and the held-out evaluation, for every pair objective ------------------------------
class PairLoss(NamedTuple):
    """What the objective hands the loop: the loss summed over the micro-batch's pairs and metric
    sums (the loop logs each divided by the window's pair count)."""

    loss_sum: torch.Tensor
    metric_sums: dict[str, torch.Tensor]


@dataclass
class PairObjective:
    """The loop's loss object for pairs: the objective's summed loss of a micro-batch, divided over
    the step's pairs (``n_pairs``), so K micro-batches equal one batch of K*b pairs."""

    objective: Callable[[Any, dict, torch.device], PairLoss]
    count_key: str = "n_pairs"

    def count(self, batch: dict) -> int:
        return batch[self.count_key]

    def __call__(self, model, batch: dict, device: torch.device) -> PairLoss:
        return self.objective(model, batch, device)


@torch.no_grad()
def evaluate_pairs(objective: Callable[[Any, dict, torch.device], PairLoss], model, batches: list[dict],
                   device: torch.device, autocast) -> dict[str, float]:
    """Held-out pairs, in eval mode: the objective's mean loss and each of its metrics per pair
    (DPO: rewards/*, logps/*; the reward model: accuracy, margin, rewards/*). With precomputed DPO
    reference log-probs the objective must hold the held-out pairs' values."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    n = 0
    for batch in batches:
        with autocast:
            out = objective(model, batch, device)
        for name, value in {"loss": out.loss_sum, **out.metric_sums}.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        n += batch["n_pairs"]
    model.train(was_training)
    return {name: value / max(n, 1) for name, value in totals.items()}
