"""The preference stages, ``minift dpo`` and ``minift reward``: pairs instead of sequences, a pair
objective instead of the next-token loss, run by the same orchestration as ``minift train``.

    config ([model] [data] [train] [eval] as ``minift train``, plus [pairs] and [dpo] / [reward])
    -> tokenizer + policy (dropout off, as TRL) -> pairs (tweets or a TRL-format source), tokenized
    -> sampler + PairCollator + DataLoader -> DPO: reference (frozen copy or precomputed log-probs)
       / RM: backbone + score head -> the loss object (PairObjective, counts n_pairs)
    -> orchestration.run_stage: AdamW + schedule, resume, held-out pairs before and after,
       loop.train, checkpoints, model/ (with the run config, [pairs] included), summary

The loop is the SFT loop: accumulation (K micro-batches = one batch of K*b pairs), AMP,
clipping, checkpoints, bit-exact resume and DDP come with it.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint as ckpt
from ..components import (
    build_loader,
    build_model,
    build_sampler,
    build_tokenizer,
    check_lengths,
    count_steps,
    load_dataset_splits,
)
from ..config import RunConfig, load_config
from ..data import DataError, label_token_ids
from ..hub import load_weights
from ..lora import holds_adapter
from ..orchestration import RunContext, Stage, run_stage
from .config import TWEETS, PreferenceConfig
from .dpo import DPOObjective, SequenceLogProbs, precompute_reference_logps
from .pairs import (
    PairCollator,
    PairObjective,
    TokenizedPairs,
    append_eos_for,
    evaluate_pairs,
    load_pairs,
    pair_batches,
    tokenize_pairs,
    tweet_pairs,
)
from .reward import RewardModel, load_reward_weights, reward_loss

DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


def load_preference_config(path: str | Path | None, overrides: list[str] = ()
                           ) -> tuple[RunConfig, PreferenceConfig]:
    """A ``minift train`` config plus [pairs], [dpo], [reward] (``--set`` works for all sections);
    the preference sections are also ``cfg.stage``."""
    cfg = load_config(path, overrides, stage=PreferenceConfig)
    return cfg, cfg.stage


# -- data -----------------------------------------------------------------------------------------------
def build_pairs(cfg: RunConfig, tokenizer, say: Callable[[str], None], stage: str
                ) -> tuple[TokenizedPairs, TokenizedPairs]:
    """Train and held-out pairs, tokenized and counted (held out: ``data.eval_split``, or the
    ``data.validation_fraction`` carved from train)."""
    d, p = cfg.data, cfg.stage.pairs
    max_length = p.max_length or d.max_length
    eval_split = "validation" if d.validation_fraction else d.eval_split
    if p.source == TWEETS:
        label_token_ids(tokenizer, d.template, tuple(d.labels))  # refuses labels the tokenizer confuses
        splits = load_dataset_splits(cfg)
    else:
        splits = load_pairs(p.source, cfg.train.seed, d.validation_fraction)
    for split in (d.train_split, eval_split):
        if split not in splits:
            held_out = split == eval_split
            hint = " — or set data.validation_fraction to hold pairs out of train" if held_out else ""
            source = d.source if p.source == TWEETS else p.source
            raise DataError(f"{source}: no {split!r} split (found {sorted(splits)}){hint}")
    if p.source == TWEETS:
        def pairs_of(split):
            return tweet_pairs(splits[split], split, d.template, d.labels, p.rejected, cfg.train.seed,
                               d.text_column, d.label_column)
        raw = {"train": pairs_of(d.train_split), "eval": pairs_of(eval_split)}
    else:
        raw = {"train": splits[d.train_split], "eval": splits[eval_split]}
    append_eos = append_eos_for(p.append_eos, tokenizer, stage)
    if append_eos and tokenizer.eos_id is None:
        raise DataError(f"pairs.append_eos = \"yes\", but tokenizer {tokenizer.source} has no EOS token — "
                        "set pairs.append_eos = \"auto\" or \"no\"")
    ending = f"end with {tokenizer.eos_token!r}" if append_eos else "have no EOS appended"
    say(f"pairs: completions {ending} (pairs.append_eos = {p.append_eos!r})")
    out = []
    for name, limit in (("train", p.max_train_pairs), ("eval", p.max_eval_pairs)):
        pairs, report = tokenize_pairs(raw[name], tokenizer, max_length, append_eos, name)
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


def pair_fingerprints(tokenizer, pairs: TokenizedPairs) -> dict[str, str]:
    return ckpt.fingerprints(tokenizer, zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids))


# -- the stages -------------------------------------------------------------------------------------------
@dataclass
class PairParts:
    """What both pair stages build the same way."""

    lm: Any
    tokenizer: Any
    train_pairs: TokenizedPairs
    eval_batches: list[dict]
    collator: PairCollator
    sampler: Any
    loader: Any
    total_steps: int


def build_pair_parts(ctx: RunContext, disable_dropout: bool, stage: str) -> PairParts:
    cfg = without_dropout(ctx.cfg) if disable_dropout else ctx.cfg
    tokenizer = build_tokenizer(cfg)
    lm = build_model(cfg, tokenizer, ctx.device)
    if cfg.stage.pairs.max_length:
        check_lengths(cfg.stage.pairs.max_length, cfg.data.pad_to_multiple_of, lm.config.n_positions,
                      "pairs.max_length")
    train_pairs, eval_pairs = build_pairs(cfg, tokenizer, ctx.say, stage)
    collator = PairCollator(tokenizer.pad_id, cfg.data.pad_to_multiple_of or None)
    sampler = build_sampler(cfg, train_pairs, ctx.dist)
    loader = build_loader(cfg, train_pairs, sampler, collator, ctx.device)
    ctx.say(f"pairs: {len(train_pairs)} train, {len(eval_pairs)} held out")
    return PairParts(lm, tokenizer, train_pairs, pair_batches(eval_pairs, collator, cfg.eval.batch_size),
                     collator, sampler, loader, count_steps(cfg, sampler))


def build_dpo_stage(ctx: RunContext) -> Stage:
    """The policy's log-probs (``SequenceLogProbs``) train; the language model is what is saved."""
    d = ctx.cfg.stage.dpo
    parts = build_pair_parts(ctx, d.disable_dropout, "dpo")
    scorer = SequenceLogProbs(parts.lm)
    objective, eval_objective = dpo_objectives(d, parts, scorer, ctx)
    reference_logps = getattr(objective, "reference_logps", None)
    return Stage("dpo", model=scorer, saved_model=parts.lm, loss=PairObjective(objective),
                 batches=parts.loader, sampler=parts.sampler, total_steps=parts.total_steps,
                 tokenizer=parts.tokenizer,
                 evaluate=partial(evaluate_pairs, eval_objective, scorer, parts.eval_batches, ctx.device,
                                  ctx.precision.autocast()),
                 fingerprints=pair_fingerprints(parts.tokenizer, parts.train_pairs),
                 extra_state={"reference_logps": reference_logps} if reference_logps is not None else None,
                 load_model_weights=load_weights)


def build_reward_stage(ctx: RunContext) -> Stage:
    """The backbone with a scalar head (``RewardModel``) trains and is saved."""
    parts = build_pair_parts(ctx, ctx.cfg.stage.reward.disable_dropout, "reward")
    model = RewardModel(parts.lm, parts.tokenizer.pad_id)
    return Stage("reward", model=model, saved_model=model, loss=PairObjective(reward_loss),
                 batches=parts.loader, sampler=parts.sampler, total_steps=parts.total_steps,
                 tokenizer=parts.tokenizer,
                 evaluate=partial(evaluate_pairs, reward_loss, model, parts.eval_batches, ctx.device,
                                  ctx.precision.autocast()),
                 fingerprints=pair_fingerprints(parts.tokenizer, parts.train_pairs),
                 load_model_weights=load_reward_weights)


def dpo_objectives(d, parts: PairParts, scorer: SequenceLogProbs, ctx: RunContext):
    """The training objective and the held-out one. ``frozen``: a deep copy of the initial policy,
    eval mode, no gradients (a second model in memory, a second forward per step); with LoRA the
    policy itself with its adapter off, which is the initial policy while ``lora.bias = "none"``.
    ``precomputed``: the initial policy's log-probs of every pair, computed once now (2 floats per pair)."""
    kwargs = dict(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing)
    if d.reference == "frozen" and holds_adapter(parts.lm):  # LoRA: the reference is the adapter-off policy
        ctx.say("dpo: the reference is the policy with its LoRA adapter off (no second model)")
        objective = DPOObjective(**kwargs, adapter_off_reference=True)
        return objective, objective
    if d.reference == "frozen":
        reference = SequenceLogProbs(copy.deepcopy(parts.lm)).eval().requires_grad_(False)
        objective = DPOObjective(**kwargs, reference=reference)
        return objective, objective
    autocast, batch_size = ctx.precision.autocast(), ctx.cfg.eval.batch_size
    train_batches = pair_batches(parts.train_pairs, parts.collator, batch_size)
    train_ref = precompute_reference_logps(scorer, train_batches,
                                           len(parts.train_pairs), ctx.device, autocast)
    eval_ref = precompute_reference_logps(scorer, parts.eval_batches,
                                          sum(b["n_pairs"] for b in parts.eval_batches), ctx.device, autocast)
    ctx.say(f"dpo: reference log-probs precomputed for {len(parts.train_pairs)} train and {len(eval_ref)} "
            f"held-out pairs")
    return DPOObjective(**kwargs, reference_logps=train_ref), DPOObjective(**kwargs, reference_logps=eval_ref)


def run_dpo(cfg: RunConfig, pref: PreferenceConfig | None = None, resume: str | bool | None = None,
            log: Callable[[str], None] = print, overwrite: bool = False,
            resume_with_changes: bool = False) -> dict[str, Any]:
    """``minift dpo``: ``run_stage`` of ``build_dpo_stage`` (``pref``: the preference sections, when
    ``cfg`` was loaded without them)."""
    return run_stage(with_stage(cfg, pref), build_dpo_stage, resume=resume, log=log, overwrite=overwrite,
                     resume_with_changes=resume_with_changes)


def run_reward(cfg: RunConfig, pref: PreferenceConfig | None = None, resume: str | bool | None = None,
               log: Callable[[str], None] = print, overwrite: bool = False,
               resume_with_changes: bool = False) -> dict[str, Any]:
    """``minift reward``: ``run_stage`` of ``build_reward_stage``."""
    return run_stage(with_stage(cfg, pref), build_reward_stage, resume=resume, log=log, overwrite=overwrite,
                     resume_with_changes=resume_with_changes)


def with_stage(cfg: RunConfig, pref: PreferenceConfig | None) -> RunConfig:
    if pref is None and cfg.stage is None:
        pref = PreferenceConfig()
    cfg = dataclasses.replace(cfg, stage=pref.validate()) if pref is not None else cfg
    cfg.stage.validate_with(cfg)
    return cfg
