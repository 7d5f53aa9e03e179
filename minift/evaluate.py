"""Evaluation: token-weighted loss and perplexity, and sentiment accuracy by label scoring.

Two eval-loss formulas: minift's (``finish_eval``), the whole set's summed cross-entropy over
its next-token targets, and Trainer's (``trainer_eval_loss``, for ``train.compat = "trainer"``),
each batch divided by its own count and the batches averaged weighted by their sequences.

Label scoring: for each example, the log-probability of each label's tokens after the
prompt; the prediction is the label with the highest one. One batched forward per batch of
prompts when every label is a single token; otherwise one sequence per (example, label).

``EvalData`` is what evaluation needs (padded loss batches, prompts, gold labels), built once
per run; ``evaluate`` hands back an ``EvalResult``, reduced over ranks under torchrun.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .collate import Collator, model_inputs
from .distributed import SINGLE_PROCESS, Distributed
from .models.lm_loss import label_smoothed_sums


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


@dataclass
class EvalData:
    """What evaluation needs: padded batches for the loss, prompts and gold labels for accuracy."""

    batches: list[dict]
    prompts: list[list[int]]
    gold: list[int]
    label_ids: list[list[int]]  # the tokens each label adds after the prompt
    pad_id: int
    batch_size: int = 32

    def shard(self, dist: Distributed) -> "EvalData":
        """This rank's share (batches and prompts dealt round robin); the whole set in one process."""
        if not dist.enabled:
            return self
        return replace(self, batches=dist.shard(self.batches), prompts=dist.shard(self.prompts),
                       gold=dist.shard(self.gold))


def eval_data_from_examples(examples, label_ids: list[list[int]], pad_id: int, objective: str = "all",
                            batch_size: int = 32, max_examples: int = 0,
                            index_batches: list[list[int]] | None = None) -> EvalData:
    """Batches of ``batch_size`` in dataset order (or the given ``index_batches``), padded to their
    longest (evaluation never packs or pads to a fixed length), and each example's prompt (its
    tokens before the label)."""
    n = min(max_examples, len(examples)) if max_examples else len(examples)
    collate = Collator(pad_id=pad_id, objective=objective)
    if index_batches is None:
        index_batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    batches = [collate([examples[i] for i in batch]) for batch in index_batches]
    prompts = [examples.input_ids[i][:examples.prompt_length[i]] for i in range(n)]
    return EvalData(batches, prompts, examples.label_index[:n], label_ids, pad_id, batch_size)


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


def per_batch_loss_sums(model, batches: Iterable[dict], device, autocast=None,
                        count_key: str = "n_label_tokens", label_smoothing: float = 0.0
                        ) -> list[tuple[float, int, int, int, float]]:
    """``(summed loss, batch[count_key], sequences, next-token targets, summed CE)`` for every batch;
    the summed loss is the CE, or with ``label_smoothing`` > 0 the smoothed loss (logits, then
    ``models.lm_loss.label_smoothed_sums``)."""
    out = []
    with torch.no_grad():
        for batch in batches:
            inputs = model_inputs(batch, device)
            with autocast if autocast is not None else contextlib.nullcontext():
                if label_smoothing:
                    labels = inputs.pop("labels")
                    logits = model(**inputs)
                    loss_sum, ce_sum, n_targets = label_smoothed_sums(logits, labels, label_smoothing)
                else:
                    result = model(**inputs)
                    loss_sum = ce_sum = result.loss_sum
                    n_targets = result.n_loss_targets  # 0-d on the sync-free paths
            out.append((float(loss_sum), batch[count_key], batch["input_ids"].shape[0], int(n_targets),
                        float(ce_sum)))
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
            out.append(torch.stack([_label_scores_after(model, p, label_ids, pad_id, device) for p in chunk]))
    return torch.cat(out) if out else torch.zeros(0, len(label_ids))


def _label_scores_after(model, prompt: Sequence[int], label_ids: Sequence[Sequence[int]], pad_id: int,
                        device) -> torch.Tensor:
    """[n_labels]: log p(label | prompt) for multi-token labels. The prompt runs once into a KV
    cache; every label then continues from it in one batch (right-padded: a pad after a label's
    last token cannot change that label's scores, attention being causal)."""
    head = model.lm_head_weight
    cache = model.new_kv_cache()
    last = model.hidden_states(torch.tensor([list(prompt)], device=device), kv_cache=cache)[0, -1]
    n = len(label_ids)
    for layer in cache:  # the same prompt under every label
        layer.keys, layer.values = layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1)
    ids, _ = _right_pad(label_ids, pad_id)
    hidden = model.hidden_states(ids.to(device), kv_cache=cache)
    # label token j is predicted from the prompt's last position (j = 0) or the label's token j - 1
    predictors = torch.cat([last.expand(n, 1, -1), hidden[:, :-1]], dim=1)
    logp = F.log_softmax(F.linear(predictors, head).float(), dim=-1)
    return torch.stack([logp[i, torch.arange(len(lab)), torch.as_tensor(lab, device=logp.device)].sum()
                        for i, lab in enumerate(label_ids)]).cpu()


def accuracy_and_macro_f1(predicted: Sequence[int], gold: Sequence[int],
                          n_classes: int) -> tuple[float, float]:
    predicted, gold = list(predicted), list(gold)
    correct = sum(p == g for p, g in zip(predicted, gold))
    f1s = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return correct / max(1, len(gold)), sum(f1s) / n_classes


def evaluate(model, data: EvalData, precision=None, dist: Distributed = SINGLE_PROCESS,
             accuracy: bool = True, loss_formula: str = "tokens", label_smoothing: float = 0.0) -> EvalResult:
    """The loss over ``data.batches`` and, with ``accuracy``, label-scoring accuracy and macro-F1.
    ``loss_formula``: "tokens" (minift's token-weighted loss) or "trainer" (``trainer_eval_loss``,
    of the smoothed loss when ``label_smoothing`` > 0, as Trainer's eval_loss; ``perplexity`` stays
    exp of the mean CE per next-token target). Under torchrun each rank scores its shard and the
    sums are gathered: equal to one process."""
    device = next(model.parameters()).device
    shard = data.shard(dist)
    was_training = model.training
    model.eval()
    per_batch = per_batch_loss_sums(model, shard.batches, device, precision.autocast() if precision else None,
                                    label_smoothing=label_smoothing if loss_formula == "trainer" else 0.0)
    accuracy = accuracy and bool(data.label_ids)  # rows without labels (chat conversations): loss only
    predicted = None
    if accuracy:
        scores = label_log_probs(model, shard.prompts, data.label_ids, data.pad_id, device, data.batch_size)
        predicted = scores.argmax(dim=1).tolist()
    model.train(was_training)
    gold = shard.gold
    if dist.enabled:  # every rank's batches and predictions, in rank order
        parts = dist.gather((per_batch, predicted, shard.gold))
        per_batch = [b for p in parts for b in p[0]]
        predicted = [x for p in parts for x in p[1]] if accuracy else None
        gold = [x for p in parts for x in p[2]]
    result = finish_eval(sum(p[4] for p in per_batch), sum(p[3] for p in per_batch), predicted,
                         gold if accuracy else None, len(data.label_ids))
    if loss_formula == "trainer":
        result.loss = trainer_eval_loss([p[:3] for p in per_batch])
    return result
