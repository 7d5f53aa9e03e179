"""The fine-tuning stage (``minift train``): sequences from ``[data]``, the next-token loss.

    tokenizer + model -> data (load, clean, tokenize) -> collator -> sampler + DataLoader
    -> the loss object (next-token cross-entropy) and the held-out evaluation (loss, label accuracy)
    -> orchestration.run_stage: AdamW + schedule, resume, loop.train, checkpoints, export, summary

``build_stage`` reads top to bottom; each component comes from one small ``build_*`` function (the
shared ones in ``components.py``, this stage's own here), so a researcher can swap any piece: write a
function with the same signature and pass a ``build_stage`` of your own to ``run_stage`` (README:
"Change one piece"), or copy this file (its imports are absolute, so a copy runs anywhere).
The benchmarks build their minift rows with these same functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from minift import checkpoint as ckpt
from minift.collate import Collator, PackingCollator, padding_efficiency
from minift.components import (
    SYNTHETIC,
    build_loader,
    build_model,
    build_sampler,
    build_tokenizer,
    count_steps,
    data_seed,
    load_dataset_splits,
)
from minift.config import RunConfig, RunConfigError
from minift.data import SplitReport, TokenizedExamples, example_preparer
from minift.evaluate import EvalData, EvalResult, eval_data_from_examples, evaluate
from minift.label_smoothing import LabelSmoothedLoss
from minift.loop import NextTokenLoss
from minift.orchestration import RunContext, Stage, run_stage
from minift.precision import Precision
from minift.runtime import pick_device
from minift.sampling import trainer_eval_batches

__all__ = ["SYNTHETIC", "build_tokenizer", "build_model", "build_datasets", "build_collator", "build_sampler",
           "build_loader", "count_steps", "build_loss", "build_stage", "run", "evaluate_only"]


# -- this stage's components, one function each -------------------------------------------------------
@dataclass
class Datasets:
    """The tokenized training examples, the evaluation data (and the examples it was made from), and
    what cleaning did to each split."""

    train: TokenizedExamples
    eval: EvalData
    eval_examples: TokenizedExamples
    reports: list[SplitReport]


def build_datasets(cfg: RunConfig, tokenizer, with_train: bool = True) -> Datasets:
    d = cfg.data
    splits = load_dataset_splits(cfg)
    prepare, label_ids = example_preparer(d, splits, tokenizer)  # data.format: template strings or chats
    eval_examples, eval_report = prepare("validation" if d.validation_fraction else d.eval_split)
    n_eval = min(cfg.eval.max_examples or len(eval_examples), len(eval_examples))
    eval_batches = None  # in dataset order; train.compat = "trainer": the batches Trainer's eval loader makes
    if cfg.train.compat == "trainer":
        eval_batches = trainer_eval_batches(eval_examples.lengths[:n_eval], cfg.eval.batch_size,
                                            data_seed(cfg),
                                            group_by_length=d.sampler == "length_grouped")
    eval_data = eval_data_from_examples(eval_examples, label_ids, tokenizer.pad_id, d.objective,
                                        cfg.eval.batch_size, n_eval, eval_batches)
    if not with_train:
        return Datasets(None, eval_data, eval_examples, [eval_report])
    train_examples, train_report = prepare(d.train_split)
    if d.max_train_examples and d.max_train_examples < len(train_examples):
        train_examples.truncate(d.max_train_examples)
    return Datasets(train_examples, eval_data, eval_examples, [train_report, eval_report])


def build_collator(cfg: RunConfig, pad_id: int) -> Collator:
    d = cfg.data
    kwargs = dict(pad_id=pad_id, objective=d.objective, pad_to_multiple_of=d.pad_to_multiple_of or None,
                  padding=d.padding, max_length=d.max_length)
    if d.sampler == "packed":  # static shapes: every batch [batch_size rows, max_length]
        return PackingCollator(**kwargs, row_length=d.max_length, rows_per_batch=cfg.train.batch_size)
    return PackingCollator(**kwargs, row_length=d.max_length) if d.packing else Collator(**kwargs)


def build_loss(cfg: RunConfig) -> NextTokenLoss:
    """Next-token cross-entropy, label-smoothed when ``train.label_smoothing`` > 0
    (``label_smoothing.py``)."""
    count_key = "n_label_tokens" if cfg.train.loss_denominator == "trainer" else "n_loss_targets"
    if cfg.train.label_smoothing:
        return LabelSmoothedLoss(count_key, epsilon=cfg.train.label_smoothing)
    return NextTokenLoss(count_key)


def eval_loss_formula(cfg: RunConfig) -> str:
    """minift's token-weighted eval loss, or Trainer's per-batch mean under ``train.compat``."""
    return "trainer" if cfg.train.compat == "trainer" else "tokens"


def evaluate_held_out(model, data: EvalData, precision: Precision, dist, cfg: RunConfig) -> dict[str, Any]:
    """Eval loss, perplexity and (``eval.accuracy``) label accuracy and macro-F1 on the eval split
    (under ``compat = "trainer"`` the loss is Trainer's eval_loss, label-smoothed as its training loss)."""
    return evaluate(model, data, precision, dist, accuracy=cfg.eval.accuracy,
                    loss_formula=eval_loss_formula(cfg), label_smoothing=cfg.train.label_smoothing).as_dict()


def eval_line(step: int, result: dict[str, Any]) -> str:
    line = f"eval @ step {step}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}"
    if "accuracy" in result:
        line += (f", accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} "
                 f"({result['n_scored']} examples)")
    return line


# -- the stage ----------------------------------------------------------------------------------------------
def build_stage(ctx: RunContext) -> Stage:
    """Every part of a fine-tuning run, for ``run_stage``."""
    cfg, say = ctx.cfg, ctx.say
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, ctx.device)
    say(f"model: {cfg.model.name} ({type(model).__name__}, {model.num_parameters() / 1e6:.2f} M parameters), "
        f"tokenizer: {tokenizer.source} ({tokenizer.vocab_size} ids, "
        f"pad {tokenizer.pad_token!r} = {tokenizer.pad_id})")
    data = build_datasets(cfg, tokenizer)
    for report in data.reports:
        say("data: " + report.line())
    collator = build_collator(cfg, tokenizer.pad_id)
    sampler = build_sampler(cfg, data.train, ctx.dist)
    loader = build_loader(cfg, data.train, sampler, collator, ctx.device)
    total_steps = count_steps(cfg, sampler)
    t = cfg.train
    say(f"steps: {total_steps} optimizer steps, {t.batch_size} x {t.grad_accum} x {ctx.dist.world_size} "
        f"sequences each, {len(data.train)} examples; padding efficiency "
        f"{padding_efficiency(data.train.lengths, sampler.batches(0), collator):.3f}"
        + (f"; {sampler.dropped_examples(0)} examples per epoch left out to give every rank equal batches"
           if sampler.dropped_examples(0) else ""))
    return Stage("train", model=model, saved_model=model, loss=build_loss(cfg), batches=loader,
                 sampler=sampler, total_steps=total_steps, tokenizer=tokenizer,
                 evaluate=partial(evaluate_held_out, model, data.eval, ctx.precision, ctx.dist, cfg),
                 eval_line=eval_line,
                 fingerprints=ckpt.fingerprints(tokenizer,
                                                zip(data.train.input_ids, data.train.prompt_length)),
                 summary={"train_rows_skipped_empty": len(data.reports[0].skipped_empty),
                          "train_rows_truncated": data.reports[0].truncated})


def run(cfg: RunConfig, resume: str | bool | None = None, log: Callable[[str], None] = print,
        overwrite: bool = False, resume_with_changes: bool = False) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says (``run_stage`` explains ``resume``, ``overwrite`` and
    ``resume_with_changes``). Returns the summary of the whole run (also in ``summary.json``)."""
    return run_stage(cfg, build_stage, resume=resume, log=log, overwrite=overwrite,
                     resume_with_changes=resume_with_changes)


def evaluate_only(cfg: RunConfig, model_name: str | None = None) -> EvalResult:
    """``minift eval``: the eval split's loss, perplexity and label accuracy for one model."""
    if model_name:
        cfg.model.name = model_name
    if cfg.model.name == "random":
        raise RunConfigError("minift eval: the config's model is \"random\", so there is no trained model to "
                             "score (each call would score a fresh random init) — pass --model "
                             "<output_dir>/model or a hub name")
    device = pick_device(cfg.train.device)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, device, training=False)
    data = build_datasets(cfg, tokenizer, with_train=False)
    print("data: " + data.reports[0].line())
    return evaluate(model, data.eval, Precision(cfg.train.precision, device), accuracy=cfg.eval.accuracy,
                    loss_formula=eval_loss_formula(cfg))


if __name__ == "__main__":  # a copy of this file runs: python3 my_recipe.py CONFIG [--set ...] [--resume]
    import sys

    from minift.cli import run_script

    sys.exit(run_script(build_stage))
