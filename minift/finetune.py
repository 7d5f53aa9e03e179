"""The fine-tuning recipe: build every component from a ``RunConfig``, then call the loop.

    tokenizer + model  -> data (load, clean, tokenize) -> sampler + collator + DataLoader
    -> AdamW + schedule + GradScaler -> [resume] -> eval before -> loop.train -> final
    checkpoint, eval after, summary

Each component comes from its own module; this file only wires them, so a researcher can
copy it and swap any piece.
"""
from __future__ import annotations

import json
import math
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import synthetic
from .collate import Collator, PackingCollator, padding_efficiency
from .config import RunConfig
from .data import DataError, label_token_ids, load_splits, prepare_split
from .evaluate import EvalResult, evaluate
from .hub import from_pretrained, load_weights
from .loop import TrainState, autocast_for, train
from .metrics import MetricsLogger, environment_line, peak_memory_bytes, plot_curves, summarize_steps
from .models import CONFIG_CLASSES, build_model
from .runtime import keep_large_allocations
from .sampling import make_sampler, trainer_eval_batches
from .optim import make_adamw, make_scheduler, warmup_steps_for, warn_slow_bf16
from .tokenizer import check_vocab_matches, ensure_pad_token, load_tokenizer

SYNTHETIC = "synthetic"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synthetic_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / "synthetic"


# -- components ---------------------------------------------------------------------------------
def build_tokenizer(cfg: RunConfig):
    name = cfg.model.tokenizer or cfg.model.name
    if name == SYNTHETIC:
        name = synthetic.prepare(synthetic_dir(cfg), seed=cfg.train.seed)[1]
    if name == "random":
        raise DataError("model.name = \"random\" needs model.tokenizer")
    tokenizer = ensure_pad_token(load_tokenizer(name), cfg.model.pad_token)
    return tokenizer


def build_model_for(cfg: RunConfig, tokenizer, device: torch.device):
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.name == "random":
        config_cls = CONFIG_CLASSES[cfg.model.model_type]
        fields = {"vocab_size": tokenizer.vocab_size, **cfg.model.config}
        model = build_model(config_cls.from_dict(fields, source="[model] config"))
    else:
        model = from_pretrained(cfg.model.name, **cfg.model.config)
    if tokenizer.vocab_size > model.config.vocab_size:
        model.resize_token_embeddings(tokenizer.vocab_size)  # e.g. the added [PAD]: mean-initialized row
    check_vocab_matches(model, tokenizer)
    if cfg.data.max_length > model.config.n_positions:
        raise DataError(f"data.max_length ({cfg.data.max_length}) exceeds the model's n_positions "
                        f"({model.config.n_positions})")
    return model.to(device=device, dtype=dtype)


def load_data(cfg: RunConfig):
    """The dataset's splits (the synthetic one is written first when asked for)."""
    d = cfg.data
    source = str(synthetic.prepare(synthetic_dir(cfg), seed=cfg.train.seed)[0]) if d.source == SYNTHETIC else d.source
    return load_splits(source, validation_fraction=d.validation_fraction, seed=cfg.train.seed)


def eval_split_name(cfg: RunConfig) -> str:
    return "validation" if cfg.data.validation_fraction else cfg.data.eval_split


def prepare(cfg: RunConfig, splits, split: str, tokenizer):
    """Clean, format and tokenize one split as the config says."""
    d = cfg.data
    examples, _, report = prepare_split(splits, split, tokenizer, template=d.template, labels=tuple(d.labels),
                                        max_length=d.max_length, text_column=d.text_column,
                                        label_column=d.label_column,
                                        append_eos={"auto": None, "yes": True, "no": False}[d.append_eos])
    return examples, report


def build_collator(cfg: RunConfig, pad_id: int) -> Collator:
    d = cfg.data
    kwargs = dict(pad_id=pad_id, objective=d.objective, pad_to_multiple_of=d.pad_to_multiple_of or None,
                  padding=d.padding, max_length=d.max_length)
    if d.packing:
        return PackingCollator(**kwargs, row_length=d.max_length)
    return Collator(**kwargs)


@dataclass
class EvalData:
    """What evaluation needs: padded batches for the loss, prompts and gold labels for accuracy."""

    batches: list[dict]
    prompts: list[list[int]]
    gold: list[int]
    label_ids: list[list[int]]


def build_eval_data(cfg: RunConfig, examples, tokenizer, collator: Collator) -> EvalData:
    n = len(examples) if not cfg.eval.max_examples else min(cfg.eval.max_examples, len(examples))
    plain = Collator(pad_id=collator.pad_id, objective=collator.objective)  # eval never packs or pads to max
    size = cfg.eval.batch_size
    index_batches = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    if cfg.train.compat == "trainer":  # train.compat: Trainer's eval batches
        index_batches = trainer_eval_batches(examples.lengths[:n], size, cfg.train.seed,
                                             group_by_length=cfg.data.sampler == "length_grouped")
    batches = [plain([examples[i] for i in b]) for b in index_batches]
    prompts = [examples.input_ids[i][:examples.prompt_length[i]] for i in range(n)]
    labels = tuple(cfg.data.labels)
    return EvalData(batches, prompts, examples.label_index[:n], label_token_ids(tokenizer, cfg.data.template, labels))


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __call__(self) -> bool:
        return self.signal_name is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- the run ------------------------------------------------------------------------------------------
def run(cfg: RunConfig, resume: str | bool | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says. ``resume``: True = newest intact checkpoint in output_dir,
    a path = that checkpoint. Returns the summary (also written to ``summary.json``)."""
    t, d = cfg.train, cfg.data
    dist = dist_utils.init_from_env()
    say = log if dist.is_main else (lambda *_: None)
    out_dir = Path(t.output_dir)
    seed_everything(t.seed)
    device = dist.device if dist.enabled else pick_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.keep_large_allocations and device.type == "cpu":
        keep_large_allocations()
    if t.precision == "bf16":
        warn_slow_bf16(device)

    # 1. tokenizer, model
    tokenizer = build_tokenizer(cfg)
    model = build_model_for(cfg, tokenizer, device)
    say(f"model: {cfg.model.name} ({type(model).__name__}, {model.num_parameters() / 1e6:.2f} M parameters), "
        f"tokenizer: {tokenizer.source} ({tokenizer.vocab_size} ids, pad {tokenizer.pad_token!r} = {tokenizer.pad_id})")

    # 2. data
    splits = load_data(cfg)
    train_examples, train_report = prepare(cfg, splits, d.train_split, tokenizer)
    eval_examples, eval_report = prepare(cfg, splits, eval_split_name(cfg), tokenizer)
    say("data: " + train_report.line())
    say("data: " + eval_report.line())
    if d.max_train_examples and d.max_train_examples < len(train_examples):
        train_examples.truncate(d.max_train_examples)
        say(f"data: training on the first {d.max_train_examples} kept examples (data.max_train_examples)")
    collator = build_collator(cfg, tokenizer.pad_id)
    sampler = dist_utils.make_rank_sampler(d.sampler, train_examples.lengths, t.batch_size, t.seed, dist)
    # -- train.compat = "trainer": Trainer's sampler order, one process (minift/sampling.py) --
    if t.compat == "trainer":
        if dist.enabled:
            raise DataError("train.compat = \"trainer\" reproduces one-process Trainer runs; run it without torchrun")
        sampler = make_sampler(d.sampler, train_examples.lengths, t.batch_size, t.seed, order="trainer",
                               grad_accum=t.grad_accum)
    # -- end train.compat --
    loader_generator = torch.Generator()  # keeps DataLoader seeding off the global RNG (exact resume)

    def make_loader(batch_sampler):
        return DataLoader(train_examples, batch_sampler=batch_sampler, collate_fn=collator,
                          num_workers=d.num_workers, pin_memory=device.type == "cuda",
                          generator=loader_generator, persistent_workers=False)

    if dist.enabled and sampler.dropped_examples(0):
        say(f"data: {sampler.dropped_examples(0)} examples per epoch (the last global batches, too few for "
            f"every one of {dist.world_size} ranks) are left out; each epoch's shuffle leaves out others")
    steps_per_epoch = math.ceil(len(sampler) / t.grad_accum)
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    say(f"steps: {total_steps} optimizer steps ({steps_per_epoch} per epoch), "
        f"{t.batch_size} x {t.grad_accum} x {dist.world_size} sequences each; "
        f"padding efficiency this epoch {padding_efficiency(train_examples.lengths, sampler.batches(0), collator):.3f}")

    # 3. optimizer, schedule, scaler
    optimizer = make_adamw(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, t.fused_adamw)
    scheduler = make_scheduler(optimizer, t.schedule, total_steps, warmup_steps_for(total_steps, t.warmup_steps,
                                                                                     t.warmup_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    state = TrainState()

    # 4. resume: weights, optimizer, scheduler, scaler, sampler position, RNG
    if resume:
        path = ckpt.find_resumable(out_dir, log=say) if resume is True else Path(resume)
        if path is None:
            say(f"resume: no complete checkpoint in {out_dir}; starting from scratch")
        else:
            if resume is not True:
                ckpt.verify_checkpoint(path)
            saved = ckpt.load_training_state(path)
            dist_utils.check_world_size(saved, dist)
            load_weights(model, path)
            model.to(device)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            scaler.load_state_dict(saved["scaler"])
            sampler.load_state_dict(saved["sampler"][dist.rank])
            state.load_state_dict(saved["train_state"])
            ckpt.set_rng_state(saved["rng"][dist.rank])
            say(f"resume: {path} (step {state.step}, epoch {sampler.epoch}, batch {sampler.consumed})")

    train_model = dist_utils.wrap_model(model, dist)
    if cfg.model.compile:
        train_model = torch.compile(train_model)
    metrics = MetricsLogger(out_dir, total_steps, initial_step=state.step, enabled=dist.is_main,
                            progress=t.progress, log_every=t.log_every, window_mean=t.compat == "trainer")
    if state.step:
        metrics_path = out_dir / "metrics.jsonl"
        _truncate_metrics(metrics_path, state.step)
    eval_data = build_eval_data(cfg, eval_examples, tokenizer, collator)
    eval_shard = dist_utils.shard_eval(eval_data, dist)

    def run_eval(step: int) -> EvalResult:
        result = evaluate(model, eval_shard.batches, eval_shard.prompts, eval_shard.gold, eval_shard.label_ids,
                          tokenizer.pad_id, device, cfg.eval.batch_size, autocast_for(device, t.precision),
                          accuracy=cfg.eval.accuracy, loss_formula="trainer" if t.compat == "trainer" else "tokens")
        result = dist_utils.reduce_eval(result, dist, len(eval_data.label_ids))
        metrics.write({"step": step, "eval": result.as_dict()})
        say(f"eval @ step {step}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f}"
            + (f", accuracy {result.accuracy:.4f}, macro-F1 {result.macro_f1:.4f} ({result.n_scored} examples)"
               if result.accuracy is not None else ""))
        return result

    def save(state_now: TrainState) -> Path | None:
        rng = dist_utils.gather_objects(ckpt.rng_state(), dist)
        samplers = dist_utils.gather_objects(sampler.state_dict(), dist)
        if not dist.is_main:
            return None
        training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "rng": rng, "sampler": samplers,
                          "train_state": state_now.state_dict(), "total_steps": total_steps,
                          "world_size": dist.world_size}
        path = ckpt.save_checkpoint(out_dir, state_now.step, model, training_state, cfg.to_dict(),
                                    keep=t.keep_checkpoints)
        return path

    before = run_eval(state.step) if cfg.eval.before_training and state.step == 0 else None
    count_key = "n_label_tokens" if t.loss_denominator == "trainer" else "n_loss_targets"
    with StopRequest() as stop:
        state = train(train_model, optimizer, scheduler, sampler, make_loader, total_steps=total_steps,
                      grad_accum=t.grad_accum, device=device, precision=t.precision,
                      max_grad_norm=t.max_grad_norm, scaler=scaler, state=state, count_key=count_key,
                      all_reduce_sum=dist_utils.sum_reducer(dist), world_size=dist.world_size,
                      on_nonfinite=t.on_nonfinite,
                      log=metrics, evaluate=lambda s: run_eval(s.step), eval_every=t.eval_every,
                      checkpoint=save, checkpoint_every=t.checkpoint_every, should_stop=stop,
                      sync=dist_utils.device_sync(device))
    if stop():
        path = save(state)
        metrics.close()
        say(f"stopped by {stop.signal_name} at step {state.step}; checkpoint {path}; resume with --resume")
        dist_utils.shutdown(dist)
        return {"stopped_by": stop.signal_name, "step": state.step, "checkpoint": str(path)}

    final = save(state)
    after = run_eval(state.step)
    summary = _summary(metrics, state, before, after, device, train_report, total_steps)
    if dist.is_main:
        model.save_pretrained(out_dir / "model")
        tokenizer.save(out_dir / "model")
        (out_dir / "model" / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        metrics.write({"summary": summary})
        say(_summary_text(summary))
        say(f"checkpoint: {final}; model for predict/generate: {out_dir / 'model'}")
        if t.plot:
            say(plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png"))
    metrics.close()
    dist_utils.shutdown(dist)
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records of steps after the checkpoint we resume from (they are redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step and "summary" not in json.loads(line)]
    path.write_text("".join(line + "\n" for line in kept))


def _summary(metrics, state: TrainState, before, after, device, train_report, total_steps) -> dict[str, Any]:
    summary: dict[str, Any] = {"steps": state.step, "total_steps": total_steps, **summarize_steps(metrics.records),
                               "peak_memory_mb": peak_memory_bytes(device) / 2**20,
                               "skipped_nonfinite": state.skipped_nonfinite,
                               "skipped_overflow": state.skipped_overflow,
                               "train_rows_skipped_empty": len(train_report.skipped_empty),
                               "train_rows_truncated": train_report.truncated, "environment": environment_line()}
    if before is not None:
        summary["eval_before"] = before.as_dict()
    summary["eval_after"] = after.as_dict()
    losses = [r["loss"] for r in metrics.records if "step_time" in r]
    if losses:
        summary["first_loss"], summary["last_loss"] = losses[0], losses[-1]
    return summary


def _summary_text(s: dict[str, Any]) -> str:
    lines = [f"done: {s['steps']} steps"]
    if "real_tokens_per_s" in s:
        lines.append(f"  throughput: {s['real_tokens_per_s']:.1f} real tokens/s, {s['sequences_per_s']:.2f} "
                     f"sequences/s, padding efficiency {s['padding_efficiency']:.3f}, median step {s['median_step_s']:.3f} s")
    lines.append(f"  peak memory: {s['peak_memory_mb']:.0f} MiB")
    if "first_loss" in s:
        lines.append(f"  train loss: {s['first_loss']:.4f} -> {s['last_loss']:.4f}")
    for key in ("eval_before", "eval_after"):
        if key in s and "accuracy" in s[key]:
            lines.append(f"  {key}: loss {s[key]['loss']:.4f}, accuracy {s[key]['accuracy']:.4f}, "
                         f"macro-F1 {s[key]['macro_f1']:.4f}")
    return "\n".join(lines)


def evaluate_only(cfg: RunConfig, model_name: str | None = None) -> EvalResult:
    """``minift eval``: the eval split's loss, perplexity and label accuracy for one model."""
    if model_name:
        cfg.model.name = model_name
    device = pick_device(cfg.train.device)
    tokenizer = build_tokenizer(cfg)
    model = build_model_for(cfg, tokenizer, device)
    examples, report = prepare(cfg, load_data(cfg), eval_split_name(cfg), tokenizer)
    print("data: " + report.line())
    data = build_eval_data(cfg, examples, tokenizer, build_collator(cfg, tokenizer.pad_id))
    return evaluate(model, data.batches, data.prompts, data.gold, data.label_ids, tokenizer.pad_id, device,
                    cfg.eval.batch_size, autocast_for(device, cfg.train.precision), accuracy=cfg.eval.accuracy,
                    loss_formula="trainer" if cfg.train.compat == "trainer" else "tokens")
