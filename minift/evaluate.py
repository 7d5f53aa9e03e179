"""Evaluation: token-weighted loss and perplexity, and sentiment accuracy by label scoring.

Two eval-loss formulas: minift's (``finish_eval``), the whole set's summed cross-entropy over
its next-token targets, and Trainer's (``trainer_eval_loss``, for ``train.compat = "trainer"``),
each batch divided by its own count and the batches averaged weighted by their sequences.

Label scoring: for each example, the log-probability of each label's tokens after the
prompt; the prediction is the label with the highest one. One batched forward per batch of
prompts when every label is a single token; otherwise one sequence per (example, label).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .collate import model_inputs


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    n_loss_targets: int
    accuracy: float | None = None
    macro_f1: float | None = None
    n_scored: int = 0
    loss_sum: float = 0.0
    predicted: list[int] | None = None
    gold: list[int] | None = None

    def as_dict(self) -> dict:
        hidden = ("predicted", "gold", "loss_sum")
        return {k: v for k, v in self.__dict__.items() if v is not None and k not in hidden}


def finish_eval(loss_sum: float, n_targets: int, predicted: Sequence[int] | None, gold: Sequence[int] | None,
                n_classes: int) -> EvalResult:
    """Token-weighted loss and perplexity; accuracy and macro-F1 when predictions are given."""
    loss = loss_sum / max(1, n_targets)
    result = EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), n_loss_targets=n_targets,
                        loss_sum=loss_sum)
    if predicted is not None:
        result.accuracy, result.macro_f1 = accuracy_and_macro_f1(predicted, gold, n_classes)
        result.n_scored = len(predicted)
        result.predicted, result.gold = list(predicted), list(gold)
    return result


def trainer_eval_loss(per_batch: Sequence[tuple[float, int, int]]) -> float:
    """Trainer's ``eval_loss`` from ``(summed CE, counted labels, sequences)`` per batch.

    transformers 5.24: ``prediction_step`` divides each batch's summed CE by that batch's own
    ``num_items_in_batch`` (trainer.py:3270-3277; for GPT-1/GPT-2 the unshifted label count,
    their ``loss_type`` being None), ``evaluation_loop`` repeats it once per sequence
    (trainer.py:3007, the last batch cut to its real size by accelerate's ``gather_for_metrics``)
    and takes the mean (trainer.py:3102). A batch of short tweets weighs as much per sequence
    as a batch of long ones, so this differs from the token-weighted mean."""
    sequences = sum(n for _, _, n in per_batch)
    return sum(total / max(1, count) * n for total, count, n in per_batch) / max(1, sequences)


def per_batch_loss_sums(model, batches: Iterable[dict], device, autocast=None, count_key: str = "n_label_tokens"
                        ) -> list[tuple[float, int, int, int]]:
    """``(summed CE, batch[count_key], sequences, next-token targets)`` for every batch."""
    out = []
    with torch.no_grad():
        for batch in batches:
            with autocast if autocast is not None else contextlib.nullcontext():
                result = model(**model_inputs(batch, device))
            out.append((float(result.loss_sum), batch[count_key], batch["input_ids"].shape[0], result.n_loss_targets))
    return out


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, lengths


def label_log_probs(model, prompts: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]], pad_id: int,
                    device, batch_size: int = 32) -> torch.Tensor:
    """[n_prompts, n_labels]: log p(label tokens | prompt) under ``model`` (eval mode)."""
    head = model.lm_head_weight
    out = []
    single_token = all(len(ids) == 1 for ids in label_ids)
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            if single_token:
                ids, lengths = _right_pad(chunk, pad_id)
                hidden = model.hidden_states(ids.to(device))
                last = hidden[torch.arange(len(chunk)), (lengths - 1).to(device)]
                logp = F.log_softmax(F.linear(last, head).float(), dim=-1)
                out.append(logp[:, [ids_[0] for ids_ in label_ids]].cpu())
                continue
            seqs = [list(p) + list(lab) for p in chunk for lab in label_ids]
            ids, _ = _right_pad(seqs, pad_id)
            hidden = model.hidden_states(ids.to(device))
            scores = torch.zeros(len(seqs))
            for s, (p, lab) in enumerate((p, lab) for p in chunk for lab in label_ids):
                positions = torch.arange(len(p) - 1, len(p) + len(lab) - 1, device=hidden.device)
                logp = F.log_softmax(F.linear(hidden[s, positions], head).float(), dim=-1)
                scores[s] = logp[torch.arange(len(lab)), torch.as_tensor(lab, device=hidden.device)].sum().cpu()
            out.append(scores.view(len(chunk), len(label_ids)))
    return torch.cat(out) if out else torch.zeros(0, len(label_ids))


def accuracy_and_macro_f1(predicted: Sequence[int], gold: Sequence[int], n_classes: int) -> tuple[float, float]:
    predicted, gold = list(predicted), list(gold)
    correct = sum(p == g for p, g in zip(predicted, gold))
    f1s = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return correct / max(1, len(gold)), sum(f1s) / n_classes


def evaluate(model, loss_batches: Iterable[dict], prompts: Sequence[Sequence[int]], gold: Sequence[int],
             label_ids: Sequence[Sequence[int]], pad_id: int, device, batch_size: int = 32,
             autocast=None, accuracy: bool = True, loss_formula: str = "tokens") -> EvalResult:
    """``loss_formula``: "tokens" (minift's token-weighted loss) or "trainer" (``trainer_eval_loss``;
    ``perplexity`` stays exp of the mean CE per next-token target)."""
    was_training = model.training
    model.eval()
    per_batch = per_batch_loss_sums(model, loss_batches, device, autocast)
    predicted = None
    if accuracy:
        predicted = label_log_probs(model, prompts, label_ids, pad_id, device, batch_size).argmax(dim=1).tolist()
    model.train(was_training)
    result = finish_eval(sum(p[0] for p in per_batch), sum(p[3] for p in per_batch), predicted,
                         gold if accuracy else None, len(label_ids))
    if loss_formula == "trainer":
        result.loss = trainer_eval_loss([p[:3] for p in per_batch])
    return result
