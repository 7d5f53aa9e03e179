"""The fine-tuning recipe: build every component from a ``RunConfig``, then call the loop.

    tokenizer + model -> data (load, clean, tokenize) -> sampler + DataLoader
    -> AdamW + schedule -> [resume] -> eval before -> loop.train -> checkpoint, eval after, export

``run`` reads top to bottom; each component comes from one small ``build_*`` function here,
each backed by its own module, so a researcher can copy this file and swap any piece. The
benchmarks build their minift rows with these same functions.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from . import synthetic
from .collate import Collator, PackingCollator, padding_efficiency
from .config import RunConfig, RunConfigError
from .chat_data import chat_tokenizer
from .data import DataError, SplitReport, TokenizedExamples, example_preparer, load_splits
from .distributed import SINGLE_PROCESS, Distributed
from .evaluate import EvalData, EvalResult, eval_data_from_examples, evaluate
from .hub import from_pretrained
from .loop import Hooks, NextTokenLoss, TrainState, fail_if_mostly_skipped, skip_nonfinite, stop_on_nonfinite, train
from .metrics import MetricsLogger, eval_line, plot_curves, run_summary, summary_text, trim_metrics
from .models import CONFIG_CLASSES, build_model as build_random_model
from .optim import make_adamw, make_scheduler, warmup_steps_for
from .precision import Precision, dtype_of
from .run_dir import claim_output_dir
from .runtime import StopRequest, peak_memory_bytes, pick_device, setup_process
from .sampling import BatchSampler, make_sampler, trainer_eval_batches
from .tokenizer import check_vocab_matches, ensure_pad_token, load_tokenizer

SYNTHETIC = "synthetic"  # data.source / model.tokenizer: the offline default's own material


# -- components, one function each ----------------------------------------------------------------
def build_tokenizer(cfg: RunConfig):
    name = cfg.model.tokenizer or cfg.model.name
    if name == SYNTHETIC:
        name = synthetic.prepare(Path(cfg.train.output_dir) / SYNTHETIC, seed=cfg.train.seed)[1]
    if name == "random":
        raise DataError("model.name = \"random\" needs model.tokenizer")
    return ensure_pad_token(chat_tokenizer(load_tokenizer(name), cfg.data), cfg.model.pad_token)


def build_model(cfg: RunConfig, tokenizer, device: torch.device):
    """The pretrained checkpoint (or a random init), its vocabulary grown to the tokenizer's."""
    if cfg.model.name == "random":
        config_cls = CONFIG_CLASSES[cfg.model.model_type]
        model = build_random_model(config_cls.from_dict({"vocab_size": tokenizer.vocab_size, **cfg.model.config},
                                                        source="[model] config", strict=True))
    else:
        dtype = dtype_of(cfg.model.dtype, "model.dtype")  # converted once as read: no float32 copy of bf16
        model = from_pretrained(cfg.model.name, dtype=dtype, **cfg.model.config)
    if tokenizer.vocab_size > model.config.vocab_size:
        model.resize_token_embeddings(tokenizer.vocab_size)  # e.g. the added [PAD]: mean-initialized row
    check_vocab_matches(model, tokenizer)
    if cfg.data.max_length > model.config.n_positions:
        raise DataError(f"data.max_length ({cfg.data.max_length}) exceeds the model's n_positions "
                        f"({model.config.n_positions})")
    model.pad_vocab(cfg.model.pad_vocab_to).set_hot_path(**cfg.model.hot_path(device.type))
    return model.to(device=device, dtype=dtype_of(cfg.model.dtype, "model.dtype"))


@dataclass
class Datasets:
    """The tokenized training examples, the evaluation data (and the examples it was made from), and
    what cleaning did to each split."""

    train: TokenizedExamples
    eval: EvalData
    eval_examples: TokenizedExamples
    reports: list[SplitReport]


def load_dataset_splits(cfg: RunConfig):
    """The raw splits of ``data.source`` (the synthetic set is written first when asked for)."""
    d = cfg.data
    source = d.source
    if source == SYNTHETIC:
        source = str(synthetic.prepare(Path(cfg.train.output_dir) / SYNTHETIC, seed=cfg.train.seed)[0])
    return load_splits(source, validation_fraction=d.validation_fraction, seed=cfg.train.seed)


def build_datasets(cfg: RunConfig, tokenizer, with_train: bool = True) -> Datasets:
    d = cfg.data
    splits = load_dataset_splits(cfg)
    prepare, label_ids = example_preparer(d, splits, tokenizer)  # data.format: template strings or chats
    eval_examples, eval_report = prepare("validation" if d.validation_fraction else d.eval_split)
    n_eval = min(cfg.eval.max_examples or len(eval_examples), len(eval_examples))
    eval_batches = None  # in dataset order; train.compat = "trainer": the batches Trainer's eval loader makes
    if cfg.train.compat == "trainer":
        eval_batches = trainer_eval_batches(eval_examples.lengths[:n_eval], cfg.eval.batch_size, cfg.train.seed,
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


def build_sampler(cfg: RunConfig, examples: TokenizedExamples, dist: Distributed = SINGLE_PROCESS) -> BatchSampler:
    """minift's samplers; under ``train.compat = "trainer"`` Trainer's (its seeded order, its
    group_by_length megabatches of batch x accumulation), in one process only."""
    t = cfg.train
    if t.compat == "trainer" and dist.enabled:
        raise DataError("train.compat = \"trainer\" reproduces one-process Trainer runs; run it without torchrun")
    return make_sampler(cfg.data.sampler, examples.lengths, t.batch_size, t.seed, rank=dist.rank,
                        world_size=dist.world_size, order="trainer" if t.compat == "trainer" else "minift",
                        grad_accum=t.grad_accum, row_length=cfg.data.max_length)


def build_loader(cfg: RunConfig, examples: TokenizedExamples, sampler: BatchSampler, collator: Collator,
                 device: torch.device) -> DataLoader:
    """Batches in the sampler's order. Its own generator keeps worker seeding off the global RNG
    (exact resume); pinned memory on CUDA only."""
    return DataLoader(examples, batch_sampler=sampler, collate_fn=collator, num_workers=cfg.data.num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator(), persistent_workers=False)


def count_steps(cfg: RunConfig, sampler: BatchSampler) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``epochs`` x steps per epoch (the last
    step of an epoch may have fewer micro-batches)."""
    return cfg.train.max_steps or math.ceil(cfg.train.epochs * math.ceil(len(sampler) / cfg.train.grad_accum))


def build_optimizer(cfg: RunConfig, model) -> torch.optim.AdamW:
    t = cfg.train
    return make_adamw(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, t.fused_adamw)


def build_scheduler(cfg: RunConfig, optimizer, total_steps: int):
    t = cfg.train
    return make_scheduler(optimizer, t.schedule, total_steps, warmup_steps_for(total_steps, t.warmup_steps,
                                                                              t.warmup_ratio))


def build_loss(cfg: RunConfig) -> NextTokenLoss:
    return NextTokenLoss("n_label_tokens" if cfg.train.loss_denominator == "trainer" else "n_loss_targets")


def wrap_for_training(cfg: RunConfig, model, dist: Distributed):
    """DDP under torchrun, then ``torch.compile`` when asked (``model.compile_mode``: "reduce-overhead"
    replays CUDA graphs, which needs the static path); the unwrapped model is what is saved."""
    model = dist.wrap(model)
    return torch.compile(model, mode=cfg.model.compile_mode) if cfg.model.compile else model


def eval_loss_formula(cfg: RunConfig) -> str:
    """minift's token-weighted eval loss, or Trainer's per-batch mean under ``train.compat``."""
    return "trainer" if cfg.train.compat == "trainer" else "tokens"


# -- hooks: what happens between steps ---------------------------------------------------------------
def build_hooks(cfg: RunConfig, log: Callable[[dict], None], evaluate_at: Callable[[int], Any],
                save: Callable[[TrainState], Any], stop: Callable[[], bool]) -> Hooks:
    """What the loop calls between steps, with ``[train]``'s cadences and its non-finite policy."""
    t = cfg.train
    return Hooks(log=log, evaluate=lambda s: evaluate_at(s.step), eval_every=t.eval_every, checkpoint=save,
                 checkpoint_every=t.checkpoint_every, should_stop=stop, log_every=t.log_every,
                 on_nonfinite=skip_nonfinite if t.on_nonfinite == "skip" else stop_on_nonfinite)


def evaluate_and_log(step: int, model, data: EvalData, precision: Precision, dist: Distributed, cfg: RunConfig,
                     metrics: MetricsLogger, say: Callable[[str], None]) -> EvalResult:
    result = evaluate(model, data, precision, dist, accuracy=cfg.eval.accuracy, loss_formula=eval_loss_formula(cfg))
    metrics.write({"step": step, "eval": result.as_dict()})
    say(eval_line(step, result))
    return result


def export_model(out_dir: Path, model, tokenizer, cfg: RunConfig, summary: dict[str, Any]) -> Path:
    """``<output_dir>/model``: weights + tokenizer + the run config, for predict/generate; ``summary.json``."""
    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save(directory)
        (directory / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    ckpt.write_dir_atomically(out_dir / "model", write)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir / "model"


# -- the run ------------------------------------------------------------------------------------------
def run(cfg: RunConfig, resume: str | bool | None = None, log: Callable[[str], None] = print,
        overwrite: bool = False, resume_with_changes: bool = False) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says. ``resume``: True = newest intact checkpoint in output_dir,
    a path = that checkpoint; ``resume_with_changes``: resume although settings that change the
    maths differ (they are used and recorded). ``overwrite``: a fresh run into a folder holding
    another run moves that run aside. Returns the summary (also written to ``summary.json``)."""
    dist = Distributed.from_env()
    with claim_output_dir(cfg.train.output_dir, resume=bool(resume), overwrite=overwrite, enabled=dist.is_main,
                          log=log):
        return _run_in_claimed_dir(cfg, dist, resume, resume_with_changes, log)


def _run_in_claimed_dir(cfg: RunConfig, dist: Distributed, resume: str | bool | None, resume_with_changes: bool,
                        log: Callable[[str], None]) -> dict[str, Any]:
    t, out_dir = cfg.train, Path(cfg.train.output_dir)
    say = log if dist.is_main else (lambda *_: None)
    device = dist.device if dist.enabled else pick_device(t.device)
    setup_process(t.seed, device, t.threads, t.keep_large_allocations)
    precision = Precision(t.precision, device)
    precision.warn_if_slow()

    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, device)
    say(f"model: {cfg.model.name} ({type(model).__name__}, {model.num_parameters() / 1e6:.2f} M parameters), "
        f"tokenizer: {tokenizer.source} ({tokenizer.vocab_size} ids, pad {tokenizer.pad_token!r} = {tokenizer.pad_id})")
    data = build_datasets(cfg, tokenizer)
    for report in data.reports:
        say("data: " + report.line())
    collator = build_collator(cfg, tokenizer.pad_id)
    sampler = build_sampler(cfg, data.train, dist)
    loader = build_loader(cfg, data.train, sampler, collator, device)
    total_steps = count_steps(cfg, sampler)
    say(f"steps: {total_steps} optimizer steps, {t.batch_size} x {t.grad_accum} x {dist.world_size} sequences "
        f"each, {len(data.train)} examples; padding efficiency "
        f"{padding_efficiency(data.train.lengths, sampler.batches(0), collator):.3f}"
        + (f"; {sampler.dropped_examples(0)} examples per epoch left out to give every rank equal batches"
           if sampler.dropped_examples(0) else ""))

    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    parts = ckpt.TrainingParts(model, optimizer, scheduler, precision, sampler, tokenizer)
    state, fingerprints = TrainState(), ckpt.fingerprints(tokenizer, data.train)
    if resume:  # metrics.jsonl cut back to the resumed step (all of it when starting from scratch)
        resumed = ckpt.resume_training(resume, out_dir, state, parts, dist, cfg.to_dict(), fingerprints,
                                       allow_changes=resume_with_changes, log=say)
        trim_metrics(out_dir, state.step if resumed else -1, keep_evals_at_step=state.step < total_steps)

    metrics = MetricsLogger(out_dir, total_steps, initial_step=state.step, enabled=dist.is_main,
                            progress=t.progress, log_every=t.log_every, echo=say, report_to=t.report_to,
                            window_mean=t.compat == "trainer")
    say = metrics.say  # from here on, lines go around the progress bar instead of onto it
    evaluate_at = partial(evaluate_and_log, model=model, data=data.eval, precision=precision, dist=dist, cfg=cfg,
                          metrics=metrics, say=say)
    save = partial(ckpt.save_training_state, out_dir, parts=parts, dist=dist, run_config=cfg.to_dict(),
                   total_steps=total_steps, keep=t.keep_checkpoints, fingerprints=fingerprints, log=say)
    try:
        with StopRequest() as stop:
            before = evaluate_at(state.step) if cfg.eval.before_training and state.step == 0 else None
            state = train(wrap_for_training(cfg, model, dist), optimizer, scheduler, loader, total_steps=total_steps,
                          grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm, precision=precision,
                          loss=build_loss(cfg), dist=dist, state=state,
                          hooks=build_hooks(cfg, metrics, evaluate_at, save, stop))
        checkpoint = save(state)
        if stop():
            say(f"stopped by {stop.signal_name} at step {state.step}; checkpoint {checkpoint}; resume with --resume")
            return {"stopped_by": stop.signal_name, "step": state.step, "checkpoint": str(checkpoint)}
        after = evaluate_at(state.step)
        summary = run_summary(metrics.records, state, total_steps, before, after, peak_memory_bytes(device),
                              data.reports[0])
        if dist.is_main:
            metrics.write({"summary": summary})
            say(summary_text(summary))
            say(f"checkpoint: {checkpoint}; model for predict/generate: {export_model(out_dir, model, tokenizer, cfg, summary)}")
            if t.plot:
                say(plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png"))
        fail_if_mostly_skipped(state)
        return summary
    finally:
        metrics.close()
        dist.shutdown()


def evaluate_only(cfg: RunConfig, model_name: str | None = None) -> EvalResult:
    """``minift eval``: the eval split's loss, perplexity and label accuracy for one model."""
    if model_name:
        cfg.model.name = model_name
    if cfg.model.name == "random":
        raise RunConfigError("minift eval: the config's model is \"random\", so there is no trained model to score "
                                  "(each call would score a fresh random init) — pass --model <output_dir>/model or a hub name")
    device = pick_device(cfg.train.device)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, device)
    data = build_datasets(cfg, tokenizer, with_train=False)
    print("data: " + data.reports[0].line())
    return evaluate(model, data.eval, Precision(cfg.train.precision, device), accuracy=cfg.eval.accuracy,
                    loss_formula=eval_loss_formula(cfg))
