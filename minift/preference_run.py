"""The preference recipes, ``minift dpo`` and ``minift reward``: the fine-tuning recipe's pieces
with pairs instead of sequences and a ``compute_loss`` instead of the LM forward.

    config ([model] [data] [train] [eval] as ``minift train``, plus [pairs] and [dpo] / [reward])
    -> tokenizer + policy (dropout off, as TRL) -> pairs (tweets or a TRL-format source), tokenized
    -> sampler + PairCollator + DataLoader -> DPO: reference (frozen copy or precomputed log-probs)
       / RM: backbone + score head -> AdamW + schedule + GradScaler -> [resume]
    -> held-out pairs before -> loop.train(compute_loss=..., count_key="n_pairs") -> checkpoint,
       held-out pairs after, model + tokenizer + summary

The loop is the SFT loop: accumulation (K micro-batches = one batch of K*b pairs), AMP,
clipping, checkpoints, bit-exact resume and DDP come with it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import RunConfig, RunConfigError, _check_value, apply_overrides, from_dict, read_toml
from .data import DataError
from .dpo import LOSS_TYPES, REFERENCES, DPOObjective, SequenceLogProbs, evaluate_pairs, precompute_reference_logps
from .finetune import (StopRequest, _truncate_metrics, build_model_for, build_tokenizer, load_data,
                       pick_device, seed_everything)
from .hub import load_weights
from .loop import TrainState, autocast_for, train
from .metrics import MetricsLogger, environment_line, peak_memory_bytes, summarize_steps
from .optim import make_adamw, make_scheduler, warmup_steps_for
from .preference import (REJECTED_CHOICES, PairCollator, TokenizedPairs, load_pairs, pair_batches, tokenize_pairs,
                         tweet_pairs)
from .reward import RewardModel, load_reward_weights, pairwise_accuracy, reward_loss

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
        splits = load_data(cfg)
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
            log: Callable[[str], None] = print) -> dict[str, Any]:
    return _run(cfg, pref, "dpo", resume, log)


def run_reward(cfg: RunConfig, pref: PreferenceConfig, resume: str | bool | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    return _run(cfg, pref, "reward", resume, log)


def _run(cfg: RunConfig, pref: PreferenceConfig, stage: str, resume, log) -> dict[str, Any]:
    t = cfg.train
    disable_dropout = pref.dpo.disable_dropout if stage == "dpo" else pref.reward.disable_dropout
    if disable_dropout:
        cfg = without_dropout(cfg)
    dist = dist_utils.init_from_env()
    say = log if dist.is_main else (lambda *_: None)
    out_dir = Path(t.output_dir)
    seed_everything(t.seed)
    device = dist.device if dist.enabled else pick_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    autocast = autocast_for(device, t.precision)

    # 1. tokenizer, policy / reward model, pairs
    tokenizer = build_tokenizer(cfg)
    lm = build_model_for(cfg, tokenizer, device)
    train_pairs, eval_pairs = build_pairs(cfg, pref, tokenizer, say)
    collator = PairCollator(tokenizer.pad_id, cfg.data.pad_to_multiple_of or None)
    eval_batches = pair_batches(eval_pairs, collator, cfg.eval.batch_size)

    # 2. what trains, what is saved, the loss and the held-out evaluation
    if stage == "dpo":
        module, saved_model = SequenceLogProbs(lm), lm
        objective, eval_objective = _dpo_objectives(pref, lm, module, train_pairs, eval_batches, collator,
                                                    cfg.eval.batch_size, device, autocast, say)
        compute_loss = objective

        def held_out() -> dict[str, float]:
            return evaluate_pairs(eval_objective, module, eval_batches, device, autocast)
    else:
        module = saved_model = RewardModel(lm, tokenizer.pad_id)
        compute_loss = reward_loss

        def held_out() -> dict[str, float]:
            with autocast:
                return pairwise_accuracy(module, eval_batches, device)
    say(f"{stage}: {cfg.model.name} ({module.__class__.__name__}), {len(train_pairs)} train pairs, "
        f"{len(eval_pairs)} held-out pairs")

    # 3. sampler, loader, optimizer, schedule, scaler
    sampler = dist_utils.make_rank_sampler(cfg.data.sampler, train_pairs.lengths, t.batch_size, t.seed, dist)
    loader_generator = torch.Generator()

    def make_loader(batch_sampler):
        return DataLoader(train_pairs, batch_sampler=batch_sampler, collate_fn=collator,
                          num_workers=cfg.data.num_workers, generator=loader_generator)

    total_steps = t.max_steps or math.ceil(t.epochs * math.ceil(len(sampler) / t.grad_accum))
    optimizer = make_adamw(module, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, t.fused_adamw)
    scheduler = make_scheduler(optimizer, t.schedule, total_steps,
                               warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    state = TrainState()

    # 4. resume: weights, optimizer, scheduler, scaler, sampler, RNG (and precomputed reference log-probs)
    if resume:
        path = ckpt.find_resumable(out_dir, log=say) if resume is True else Path(resume)
        if path is not None:
            saved = ckpt.load_training_state(path)
            dist_utils.check_world_size(saved, dist)
            (load_weights if stage == "dpo" else load_reward_weights)(saved_model, path)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            scaler.load_state_dict(saved["scaler"])
            sampler.load_state_dict(saved["sampler"][dist.rank])
            state.load_state_dict(saved["train_state"])
            ckpt.set_rng_state(saved["rng"][dist.rank])
            if "reference_logps" in saved:
                compute_loss.reference_logps = saved["reference_logps"]
            say(f"resume: {path} (step {state.step})")

    train_module = dist_utils.wrap_model(module, dist)
    metrics = MetricsLogger(out_dir, total_steps, initial_step=state.step, enabled=dist.is_main,
                            progress=t.progress, log_every=t.log_every)
    if state.step:
        _truncate_metrics(out_dir / "metrics.jsonl", state.step)

    def save(state_now: TrainState) -> Path | None:
        rng = dist_utils.gather_objects(ckpt.rng_state(), dist)
        samplers = dist_utils.gather_objects(sampler.state_dict(), dist)
        if not dist.is_main:
            return None
        training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "rng": rng, "sampler": samplers,
                          "train_state": state_now.state_dict(), "total_steps": total_steps,
                          "world_size": dist.world_size}
        if stage == "dpo" and compute_loss.reference_logps is not None:
            training_state["reference_logps"] = compute_loss.reference_logps
        return ckpt.save_checkpoint(out_dir, state_now.step, saved_model, training_state,
                                    {**cfg.to_dict(), **dataclasses.asdict(pref)}, keep=t.keep_checkpoints)

    def evaluate_held_out(step: int) -> dict[str, float]:
        result = held_out()
        metrics.write({"step": step, "eval": result})
        say(f"held-out pairs @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    before = evaluate_held_out(state.step) if cfg.eval.before_training and state.step == 0 else None
    with StopRequest() as stop:
        state = train(train_module, optimizer, scheduler, sampler, make_loader, total_steps=total_steps,
                      grad_accum=t.grad_accum, device=device, precision=t.precision, max_grad_norm=t.max_grad_norm,
                      scaler=scaler, state=state, count_key="n_pairs", all_reduce_sum=dist_utils.sum_reducer(dist),
                      world_size=dist.world_size, on_nonfinite=t.on_nonfinite, log=metrics,
                      evaluate=lambda s: evaluate_held_out(s.step), eval_every=t.eval_every, checkpoint=save,
                      checkpoint_every=t.checkpoint_every, should_stop=stop, sync=dist_utils.device_sync(device),
                      compute_loss=compute_loss)
    final = save(state)
    if stop():
        metrics.close()
        say(f"stopped by {stop.signal_name} at step {state.step}; checkpoint {final}; resume with --resume")
        dist_utils.shutdown(dist)
        return {"stopped_by": stop.signal_name, "step": state.step, "checkpoint": str(final)}
    after = evaluate_held_out(state.step)
    losses = [r["loss"] for r in metrics.records if "step_time" in r]
    summary = {"stage": stage, "steps": state.step, "total_steps": total_steps, **summarize_steps(metrics.records),
               "peak_memory_mb": peak_memory_bytes(device) / 2**20, "held_out_before": before,
               "held_out_after": after, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "environment": environment_line()}
    if dist.is_main:
        saved_model.save_pretrained(out_dir / "model")
        tokenizer.save(out_dir / "model")
        (out_dir / "model" / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        metrics.write({"summary": summary})
        say(f"done: {state.step} steps, loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; "
            f"checkpoint {final}; model {out_dir / 'model'}")
    metrics.close()
    dist_utils.shutdown(dist)
    return summary


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
