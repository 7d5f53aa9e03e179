"""The preference recipes, ``minift dpo`` and ``minift reward``: the fine-tuning recipe's pieces
with pairs instead of sequences and a pair objective instead of the LM loss.

    config ([model] [data] [train] [eval] as ``minift train``, plus [pairs] and [dpo] / [reward])
    -> tokenizer + policy (dropout off, as TRL) -> pairs (tweets or a TRL-format source), tokenized
    -> sampler + PairCollator + DataLoader -> DPO: reference (frozen copy or precomputed log-probs)
       / RM: backbone + score head -> AdamW + schedule + GradScaler -> [resume]
    -> held-out pairs before -> loop.train(loss=PairObjective(...)) (counts n_pairs) -> checkpoint,
       held-out pairs after, model + tokenizer + summary

The loop is the SFT loop: accumulation (K micro-batches = one batch of K*b pairs), AMP,
clipping, checkpoints, bit-exact resume and DDP come with it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from .config import RunConfig, RunConfigError, _check_value, apply_overrides, from_dict, read_toml
from .data import DataError
from .distributed import Distributed
from .dpo import LOSS_TYPES, REFERENCES, DPOObjective, SequenceLogProbs, evaluate_pairs, precompute_reference_logps
from .finetune import (build_hooks, build_loader, build_model, build_optimizer, build_sampler, build_scheduler,
                       build_tokenizer, count_steps, load_dataset_splits)
from .hub import load_weights
from .loop import TrainState, train
from .metrics import MetricsLogger, environment_line, summarize_steps, trim_metrics
from .precision import Precision
from .preference import (REJECTED_CHOICES, PairCollator, TokenizedPairs, load_pairs, pair_batches, tokenize_pairs,
                         tweet_pairs)
from .reward import RewardModel, load_reward_weights, pairwise_accuracy, reward_loss
from .run_dir import claim_output_dir
from .runtime import StopRequest, peak_memory_bytes, pick_device, setup_process

TWEETS = "tweets"
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


# -- config -------------------------------------------------------------------------------------------
@dataclass
class PairsSection:
    source: str = TWEETS  # "tweets": pairs built from [data] (template, labels); else a TRL-format source
    rejected: str = "one"  # tweets: one seeded wrong label per tweet, or "both"
    max_length: int = 0  # prompt + completion; 0 = data.max_length
    append_eos: bool = False  # add EOS to both completions (TRL always does)
    max_train_pairs: int = 0  # 0 = all
    max_eval_pairs: int = 0


@dataclass
class DPOSection:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # "sigmoid" (DPO), "ipo", "hinge"
    label_smoothing: float = 0.0  # cDPO, sigmoid only
    reference: str = "frozen"  # "frozen" copy of the initial policy or "precomputed" log-probs
    disable_dropout: bool = True


@dataclass
class RewardSection:
    disable_dropout: bool = True


@dataclass
class PreferenceConfig:
    pairs: PairsSection = dataclasses.field(default_factory=PairsSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)

    def validate(self) -> "PreferenceConfig":
        p, d = self.pairs, self.dpo
        checks = [(p.rejected in REJECTED_CHOICES, f"pairs.rejected must be one of {REJECTED_CHOICES}"),
                  (p.max_length >= 0 and p.max_train_pairs >= 0 and p.max_eval_pairs >= 0,
                   "pairs.max_length, max_train_pairs, max_eval_pairs must be >= 0"),
                  (d.beta > 0, "dpo.beta must be > 0"),
                  (d.loss_type in LOSS_TYPES, f"dpo.loss_type {d.loss_type!r}: one of {LOSS_TYPES}"),
                  (0 <= d.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)"),
                  (d.label_smoothing == 0 or d.loss_type == "sigmoid", "dpo.label_smoothing applies to sigmoid only"),
                  (d.reference in REFERENCES, f"dpo.reference {d.reference!r}: one of {REFERENCES}")]
        for ok, message in checks:
            if not ok:
                raise RunConfigError(message)
        return self


PREFERENCE_SECTIONS = {f.name for f in dataclasses.fields(PreferenceConfig)}


def load_preference_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[RunConfig, PreferenceConfig]:
    """A ``minift train`` config plus [pairs], [dpo], [reward]; ``--set`` works for all sections."""
    raw = apply_overrides(read_toml(path) if path is not None else {}, overrides)
    source = str(path) if path is not None else "defaults"
    pref = PreferenceConfig()
    for section in PREFERENCE_SECTIONS & raw.keys():
        target = getattr(pref, section)
        names = {f.name for f in dataclasses.fields(target)}
        for key, value in raw.pop(section).items():
            if key not in names:
                raise RunConfigError(f"{source}: unknown key [{section}] {key}; known keys: {sorted(names)}")
            setattr(target, key, _check_value(section, key, value, getattr(target, key), source))
    return from_dict(raw, source=source), pref.validate()


# -- data -----------------------------------------------------------------------------------------------
def build_pairs(cfg: RunConfig, pref: PreferenceConfig, tokenizer, say: Callable[[str], None]
                ) -> tuple[TokenizedPairs, TokenizedPairs]:
    """Train and held-out pairs, tokenized and counted."""
    d, p = cfg.data, pref.pairs
    max_length = p.max_length or d.max_length
    if p.source == TWEETS:
        splits = load_dataset_splits(cfg)
        eval_split = "validation" if d.validation_fraction else d.eval_split

        def pairs_of(split):
            return tweet_pairs(splits[split], split, d.template, d.labels, p.rejected, cfg.train.seed,
                               d.text_column, d.label_column)
        raw = {"train": pairs_of(d.train_split), "eval": pairs_of(eval_split)}
    else:
        splits = load_pairs(p.source, cfg.train.seed)
        if d.eval_split not in splits:
            raise DataError(f"{p.source}: no {d.eval_split!r} split for held-out pairs (found {sorted(splits)})")
        raw = {"train": splits[d.train_split], "eval": splits[d.eval_split]}
    out = []
    for name, limit in (("train", p.max_train_pairs), ("eval", p.max_eval_pairs)):
        pairs, report = tokenize_pairs(raw[name], tokenizer, max_length, p.append_eos, name)
        say("pairs: " + report.line())
        if limit and limit < len(pairs):
            pairs.truncate(limit)
            say(f"pairs: using the first {limit} {name} pairs")
        out.append(pairs)
    return out[0], out[1]


def without_dropout(cfg: RunConfig) -> RunConfig:
    """TRL's ``disable_dropout=True``: the log-ratios of policy and reference are then comparable."""
    cfg = copy.deepcopy(cfg)
    cfg.model.config.update({name: 0.0 for name in DROPOUT_FIELDS})
    return cfg


# -- the runs -------------------------------------------------------------------------------------------
def run_dpo(cfg: RunConfig, pref: PreferenceConfig, resume: str | bool | None = None,
            log: Callable[[str], None] = print, overwrite: bool = False,
            resume_with_changes: bool = False) -> dict[str, Any]:
    with claim_output_dir(cfg.train.output_dir, resume=bool(resume), overwrite=overwrite, log=log,
                          enabled=Distributed.from_env().is_main):
        return _run(cfg, pref, "dpo", resume, log, resume_with_changes)


def run_reward(cfg: RunConfig, pref: PreferenceConfig, resume: str | bool | None = None,
               log: Callable[[str], None] = print, overwrite: bool = False,
               resume_with_changes: bool = False) -> dict[str, Any]:
    with claim_output_dir(cfg.train.output_dir, resume=bool(resume), overwrite=overwrite, log=log,
                          enabled=Distributed.from_env().is_main):
        return _run(cfg, pref, "reward", resume, log, resume_with_changes)


@dataclass
class PairObjective:
    """The loop's loss object for pairs: the objective's summed loss of a micro-batch, divided over
    the step's pairs (``n_pairs``), so K micro-batches equal one batch of K*b pairs."""

    objective: Callable
    count_key: str = "n_pairs"

    def count(self, batch: dict) -> int:
        return batch[self.count_key]

    def __call__(self, model, batch: dict, device: torch.device):
        return self.objective(model, batch, device)


def _run(cfg: RunConfig, pref: PreferenceConfig, stage: str, resume, log, resume_with_changes: bool = False
         ) -> dict[str, Any]:
    t = cfg.train
    if (pref.dpo.disable_dropout if stage == "dpo" else pref.reward.disable_dropout):
        cfg = without_dropout(cfg)
    dist = Distributed.from_env()
    say = log if dist.is_main else (lambda *_: None)
    out_dir = Path(t.output_dir)
    device = dist.device if dist.enabled else pick_device(t.device)
    setup_process(t.seed, device, t.threads, t.keep_large_allocations)
    precision = Precision(t.precision, device)

    # 1. tokenizer, policy / reward model, pairs
    tokenizer = build_tokenizer(cfg)
    lm = build_model(cfg, tokenizer, device)
    train_pairs, eval_pairs = build_pairs(cfg, pref, tokenizer, say)
    collator = PairCollator(tokenizer.pad_id, cfg.data.pad_to_multiple_of or None)
    eval_batches = pair_batches(eval_pairs, collator, cfg.eval.batch_size)

    # 2. what trains, what is saved, the loss and the held-out evaluation
    if stage == "dpo":
        module, saved_model = SequenceLogProbs(lm), lm
        objective, eval_objective = _dpo_objectives(pref, lm, module, train_pairs, eval_batches, collator,
                                                    cfg.eval.batch_size, device, precision.autocast(), say)
        held_out = partial(evaluate_pairs, eval_objective, module, eval_batches, device, precision.autocast())
    else:
        module = saved_model = RewardModel(lm, tokenizer.pad_id)
        objective = reward_loss

        def held_out() -> dict[str, float]:
            with precision.autocast():
                return pairwise_accuracy(module, eval_batches, device)
    say(f"{stage}: {cfg.model.name} ({module.__class__.__name__}), {len(train_pairs)} train pairs, "
        f"{len(eval_pairs)} held-out pairs")

    # 3. sampler, loader, optimizer, schedule (the fine-tuning recipe's builders)
    sampler = build_sampler(cfg, train_pairs, dist)
    loader = build_loader(cfg, train_pairs, sampler, collator, device)
    total_steps = count_steps(cfg, sampler)
    optimizer = build_optimizer(cfg, module)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    reference_logps = getattr(objective, "reference_logps", None)
    parts = ckpt.TrainingParts(saved_model, optimizer, scheduler, precision, sampler,
                               extra_state={"reference_logps": reference_logps} if reference_logps is not None else None,
                               load_model_weights=load_weights if stage == "dpo" else load_reward_weights)
    state = TrainState()
    run_config = {**cfg.to_dict(), **dataclasses.asdict(pref)}

    # 4. resume: weights, optimizer, scheduler, scaler, sampler, RNG (and precomputed reference log-probs),
    #    refusing a checkpoint written with other settings unless resume_with_changes (as minift train)
    if resume:
        resumed = ckpt.resume_training(resume, out_dir, state, parts, dist, run_config, {},
                                       allow_changes=resume_with_changes, log=say)
        if resumed and parts.extra_state:
            objective.reference_logps = parts.extra_state["reference_logps"]
        trim_metrics(out_dir, state.step if resumed else -1, keep_evals_at_step=state.step < total_steps)

    metrics = MetricsLogger(out_dir, total_steps, initial_step=state.step, enabled=dist.is_main,
                            progress=t.progress, log_every=t.log_every, echo=say, report_to=t.report_to)
    say = metrics.say
    save = partial(ckpt.save_training_state, out_dir, parts=parts, dist=dist,
                   run_config=run_config, total_steps=total_steps,
                   keep=t.keep_checkpoints)

    def evaluate_held_out(step: int) -> dict[str, float]:
        result = held_out()
        metrics.write({"step": step, "eval": result})
        say(f"held-out pairs @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    try:
        with StopRequest() as stop:
            before = evaluate_held_out(state.step) if cfg.eval.before_training and state.step == 0 else None
            state = train(dist.wrap(module), optimizer, scheduler, loader, total_steps=total_steps,
                          grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm, precision=precision,
                          loss=PairObjective(objective), dist=dist, state=state,
                          hooks=build_hooks(cfg, metrics, evaluate_held_out, save, stop))
        final = save(state)
        if stop():
            say(f"stopped by {stop.signal_name} at step {state.step}; checkpoint {final}; resume with --resume")
            return {"stopped_by": stop.signal_name, "step": state.step, "checkpoint": str(final)}
        after = evaluate_held_out(state.step)
        losses = [r["loss"] for r in metrics.records if "step_time" in r]
        summary = {"stage": stage, "steps": state.step, "total_steps": total_steps,
                   **summarize_steps(metrics.records), "peak_memory_mb": peak_memory_bytes(device) / 2**20,
                   "held_out_before": before, "held_out_after": after, "first_loss": losses[0] if losses else None,
                   "last_loss": losses[-1] if losses else None, "environment": environment_line()}
        if dist.is_main:
            saved_model.save_pretrained(out_dir / "model")
            tokenizer.save(out_dir / "model")
            (out_dir / "model" / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            metrics.write({"summary": summary})
            say(f"done: {state.step} steps, loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; "
                f"checkpoint {final}; model {out_dir / 'model'}")
        return summary
    finally:
        metrics.close()
        dist.shutdown()


def _dpo_objectives(pref: PreferenceConfig, lm, scorer: SequenceLogProbs, train_pairs: TokenizedPairs,
                    eval_batches: list[dict], collator: PairCollator, batch_size: int, device, autocast, say):
    """The training objective and the held-out one. ``frozen``: a deep copy of the initial policy,
    eval mode, no gradients (a second model in memory, a second forward per step). ``precomputed``:
    the initial policy's log-probs of every pair, computed once now (2 floats per pair)."""
    d = pref.dpo
    kwargs = dict(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing)
    if d.reference == "frozen":
        reference = SequenceLogProbs(copy.deepcopy(lm)).eval().requires_grad_(False)
        objective = DPOObjective(**kwargs, reference=reference)
        return objective, objective
    train_batches = pair_batches(train_pairs, collator, batch_size)
    train_ref = precompute_reference_logps(scorer, train_batches, len(train_pairs), device, autocast)
    eval_ref = precompute_reference_logps(scorer, eval_batches, sum(b["n_pairs"] for b in eval_batches),
                                          device, autocast)
    say(f"dpo: reference log-probs precomputed for {len(train_pairs)} train and {len(eval_ref)} held-out pairs")
    return DPOObjective(**kwargs, reference_logps=train_ref), DPOObjective(**kwargs, reference_logps=eval_ref)
