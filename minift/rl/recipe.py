"""The RL stage, ``minift grpo`` and ``minift rloo``: the policy samples completions of prompts, rewards
score them, and a clipped policy-gradient update moves it, run by the same orchestration as ``minift
train``, ``dpo`` and ``reward``.

    config ([model] [data] [train] [eval] as ``minift train``, plus [rl])
    -> tokenizer + policy (dropout off) -> prompts (the tweets of [data], or a TRL prompt dataset),
       tokenized; too long for the model's positions: dropped and counted
    -> rewards (the label rule, reward model folders, ``module:function`` callables)
    -> reference (a frozen copy of the initial policy; with [lora] the policy with its adapter off;
       none when beta = 0)
    -> the step source (``source.RoundSource``): each round sampled (or replayed), scored and laid out
       when its first micro-step comes; the loss object (``GRPOObjective`` / ``RLOOObjective``)
    -> orchestration.run_stage: AdamW + schedule, resume, held-out rewards before and after, loop.train,
       checkpoints (with the round in flight), model/ (the policy), summary

``loop.train`` trains ``CompletionLogProbs`` (the policy's log-probs of completion tokens): accumulation,
AMP, clipping, checkpoints, bit-exact resume and DDP come with it. TRL's per-device batch is
``train.batch_size``; docs/grpo.md maps every TRL behaviour to its line here and lists the defaults
that differ.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from .. import checkpoint as ckpt
from ..components import build_model, build_tokenizer, load_dataset_splits
from ..config import RunConfig, RunConfigError, load_config
from ..data import DataError, load_splits
from ..distributed import Distributed
from ..evaluate import accuracy_and_macro_f1
from ..lora import holds_adapter
from ..orchestration import RunContext, Stage, run_stage
from ..preference.recipe import without_dropout
from .advantages import weighted_rewards
from .config import STAGE_CONFIGS, TWEETS, RLSection
from .generation import SamplingSettings, decode_completions, generate_completions, new_generator
from .objective import (
    AdapterOffLogProbs,
    CompletionLogProbs,
    GRPOObjective,
    RLOOObjective,
    finish_step_metrics,
)
from .prompts import (
    LABEL_COLUMN,
    PromptSampler,
    PromptSet,
    checked_prompt_split,
    max_prompt_tokens,
    prompts_per_generation,
    tokenize_prompts,
    tweet_prompts,
)
from .replay import read_replay
from .rewards import RewardSet, first_word
from .round import RoundSettings
from .source import COMPLETIONS_FILE, CompletionsLog, RoundMaker, RoundSource


def load_rl_config(path: str | Path | None, overrides: list[str] = (), algorithm: str = "grpo") -> RunConfig:
    """A ``minift train`` config plus [rl] as ``minift grpo`` / ``minift rloo`` read it (``cfg.stage.rl``)."""
    return load_config(path, overrides, stage=STAGE_CONFIGS[algorithm])


# -- the round's layout --------------------------------------------------------------------------------------
@dataclass
class Layout:
    """How many completions a round holds and how it is cut (TRL's generation batch)."""

    generation_batch_size: int  # completions per round, all ranks
    steps_per_generation: int  # micro-batches per round
    prompts_per_generation: int  # distinct prompts per round, all ranks


def round_layout(r: RLSection, batch_size: int, grad_accum: int, world_size: int) -> Layout:
    """TRL's ``GRPOConfig.__post_init__``: the generation batch from ``steps_per_generation`` (default
    ``grad_accum``) or ``generation_batch_size``; whole groups, whole micro-batches on every rank."""
    rows = batch_size * world_size
    if r.generation_batch_size:
        if r.generation_batch_size % rows:
            raise RunConfigError(f"rl.generation_batch_size {r.generation_batch_size} is not a multiple of "
                                 f"train.batch_size x ranks = {batch_size} x {world_size}: a round is cut "
                                 f"into whole micro-batches")
        spg = r.generation_batch_size // rows
    else:
        spg = r.steps_per_generation or grad_accum
    total = rows * spg
    if total % r.num_generations:
        raise RunConfigError(f"a round of {total} completions (train.batch_size {batch_size} x {world_size} "
                             f"ranks x steps_per_generation {spg}) is not a multiple of rl.num_generations "
                             f"{r.num_generations}: a round holds whole groups")
    return Layout(total, spg, prompts_per_generation(total, r.num_generations))


# -- prompts -------------------------------------------------------------------------------------------
def build_prompt_splits(cfg: RunConfig):
    """The raw train and held-out prompt datasets (held out: None when the source has no such split)."""
    d, r = cfg.data, cfg.stage.rl
    eval_split = "validation" if d.validation_fraction else d.eval_split
    if r.prompts == TWEETS:
        splits = load_dataset_splits(cfg)

        def prompts_of(split):
            return tweet_prompts(splits[split], split, d.template, d.labels, d.text_column, d.label_column)
    else:
        splits = load_splits(r.prompts, validation_fraction=d.validation_fraction, seed=cfg.train.seed)

        def prompts_of(split):
            return checked_prompt_split(splits[split], r.prompts, split)
    source = d.source if r.prompts == TWEETS else r.prompts
    if d.train_split not in splits:
        raise DataError(f"{source}: no {d.train_split!r} split of prompts (found {sorted(splits)})")
    train = prompts_of(d.train_split)
    if d.max_train_examples:
        train = train.select(range(min(d.max_train_examples, len(train))))
    held_out = prompts_of(eval_split) if eval_split in splits else None
    if held_out is not None and cfg.eval.max_examples:
        held_out = held_out.select(range(min(cfg.eval.max_examples, len(held_out))))
    return train, held_out


def build_prompts(cfg: RunConfig, tokenizer, n_positions: int, say: Callable[[str], None]
                  ) -> tuple[PromptSet, PromptSet | None, dict[str, int]]:
    """Tokenized train and held-out prompts; those with no room for ``max_completion_length`` new tokens
    within the model's positions are dropped and counted."""
    max_tokens = max_prompt_tokens(n_positions, cfg.stage.rl.max_completion_length)
    train_raw, eval_raw = build_prompt_splits(cfg)
    train, report = tokenize_prompts(train_raw, tokenizer, max_tokens, "train")
    say("prompts: " + report.line())
    counts = {"prompts": len(train), "prompts_dropped": len(report.dropped_rows)}
    held_out = None
    if eval_raw is not None and len(eval_raw):
        held_out, eval_report = tokenize_prompts(eval_raw, tokenizer, max_tokens, "held-out")
        say("prompts: " + eval_report.line())
        counts["eval_prompts_dropped"] = len(eval_report.dropped_rows)
    else:
        say("prompts: no held-out split (data.eval_split, or data.validation_fraction): no evaluation")
    return train, held_out, counts


def prompt_fingerprints(tokenizer, prompts: PromptSet, replay_path: str) -> dict[str, str]:
    """sha256 of the tokenizer, the prompts (ids and the columns the rewards read) and a replayed file."""
    columns = list(prompts.columns.values())
    rows = ([ids, *(repr(c[i]) for c in columns)] for i, ids in enumerate(prompts.prompt_ids))
    out = ckpt.fingerprints(tokenizer, rows)
    if replay_path:
        out["completions"] = hashlib.sha256(Path(replay_path).read_bytes()).hexdigest()
    return out


# -- the parts -----------------------------------------------------------------------------------------
def stop_token_ids(r: RLSection, tokenizer, vocab_size: int) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and ``rl.eos_token_ids``."""
    ids = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + list(r.eos_token_ids)
    if any(i >= vocab_size for i in ids):
        raise RunConfigError(f"rl.eos_token_ids {r.eos_token_ids}: the model has {vocab_size} ids")
    if r.mask_truncated_completions and not ids:
        raise RunConfigError("rl.mask_truncated_completions = true, but the tokenizer has no EOS and "
                             "rl.eos_token_ids is empty: every completion runs to max_completion_length and "
                             "would be masked — name the ids that end a completion, or set it to false")
    return list(dict.fromkeys(ids))


def build_objective(r: RLSection, dist: Distributed):
    """The loss object ``loop.train`` calls (TRL's loss of one micro-batch, ``count`` 1)."""
    epsilon_high = r.epsilon_high or None
    if r.ALGORITHM == "rloo":
        return RLOOObjective(epsilon_low=r.epsilon, epsilon_high=epsilon_high, dist=dist)
    return GRPOObjective(loss_type=r.loss_type, epsilon_low=r.epsilon, epsilon_high=epsilon_high,
                         importance_sampling_level=r.importance_sampling_level, beta=r.beta,
                         use_bias_correction_kl=r.use_bias_correction_kl,
                         max_completion_length=r.max_completion_length, dist=dist)


def round_settings(r: RLSection, layout: Layout, cfg: RunConfig) -> RoundSettings:
    clip = tuple(getattr(r, "reward_clip_range", ())) or None
    return RoundSettings(algorithm=r.ALGORITHM, num_generations=r.num_generations,
                         scale_rewards=getattr(r, "scale_rewards", "group"),
                         normalize_advantages=getattr(r, "normalize_advantages", False),
                         reward_clip_range=clip,
                         beta=r.beta, mask_truncated_completions=r.mask_truncated_completions,
                         positions=r.positions, steps_per_generation=layout.steps_per_generation,
                         grad_accum=cfg.train.grad_accum, num_iterations=r.num_iterations,
                         rows_per_forward=cfg.train.batch_size)


def count_rl_steps(cfg: RunConfig, rounds_per_epoch: int, layout: Layout) -> int:
    """``train.max_steps``, else ``train.epochs`` passes over the prompts: rounds x micro-batches per round x
    ``num_iterations`` / ``grad_accum``."""
    rl = cfg.stage.rl
    micro_steps = cfg.train.epochs * rounds_per_epoch * layout.steps_per_generation * rl.num_iterations
    return cfg.train.max_steps or max(1, math.ceil(micro_steps / cfg.train.grad_accum))


@torch.no_grad()
def evaluate_rewards(lm, prompts: PromptSet, rewards: RewardSet, tokenizer, sampling: SamplingSettings,
                     eos_ids: list[int], labels: list[str] | None, dist: Distributed, seed: int,
                     rows_per_forward: int) -> dict[str, Any]:
    """One completion per held-out prompt (greedy, or sampled with a generator seeded ``seed``: the same
    draws at every evaluation), scored by the rewards: the mean weighted ``reward``, each reward's mean,
    the mean completion length; for prompts with a gold ``label`` (the tweets), the ``accuracy`` and
    ``macro_f1`` of the completion's first word as the predicted label. Ranks share the prompts."""
    rows = prompts.select(dist.shard(list(range(len(prompts)))))
    per_function, lengths, predicted, gold = torch.zeros(0, len(rewards.names)), [], [], []
    if len(rows):
        generator = new_generator(seed, lm.lm_head_weight.device) if sampling.do_sample else None
        completions = generate_completions(lm, rows.prompt_ids, sampling, eos_ids, tokenizer.pad_id,
                                           generator, rows_per_forward)
        texts = decode_completions(tokenizer, completions.completion_ids)
        scores = rewards.score(rows.prompts, texts, completions.completion_ids, rows.columns)
        per_function = scores.per_function
        lengths = completions.lengths.tolist()
        if labels is not None and LABEL_COLUMN in rows.columns:
            index = {label: i for i, label in enumerate(labels)}
            predicted = [index.get(first_word(t), len(labels)) for t in texts]  # not a label: wrong for all
            gold = [index.get(str(g).strip().lower(), len(labels)) for g in rows.columns[LABEL_COLUMN]]
    parts = dist.gather((per_function, lengths, predicted, gold))
    per_function = torch.cat([p[0] for p in parts])
    weighted = weighted_rewards(per_function, rewards.weights)
    out = {"reward": torch.nanmean(weighted).item()}
    out.update({f"rewards/{name}/mean": torch.nanmean(per_function[:, i]).item()
                for i, name in enumerate(rewards.names)})
    out["completions/mean_length"] = sum(sum(p[1]) for p in parts) / max(1, sum(len(p[1]) for p in parts))
    predicted, gold = [x for p in parts for x in p[2]], [x for p in parts for x in p[3]]
    if gold:
        out["accuracy"], out["macro_f1"] = accuracy_and_macro_f1(predicted, gold, len(labels))
    out["n_prompts"] = len(per_function)
    return out


# -- the stage -----------------------------------------------------------------------------------------
def build_grpo_stage(ctx: RunContext) -> Stage:
    """Every part of a GRPO or RLOO run (``cfg.stage.rl`` says which), for ``run_stage``."""
    cfg, say, dist, device = ctx.cfg, ctx.say, ctx.dist, ctx.device
    r, t = cfg.stage.rl, cfg.train
    layout = round_layout(r, t.batch_size, t.grad_accum, dist.world_size)
    sampling = r.sampling_settings()
    policy_cfg = without_dropout(cfg) if r.disable_dropout else copy.deepcopy(cfg)
    policy_cfg.data.max_length, policy_cfg.data.pad_to_multiple_of = 1, 0  # fine-tuning's lengths: unused
    tokenizer = build_tokenizer(policy_cfg)
    lm = build_model(policy_cfg, tokenizer, device)
    say(f"policy: {cfg.model.name} ({type(lm).__name__}, {lm.num_parameters() / 1e6:.2f} M parameters), "
        f"tokenizer: {tokenizer.source} ({tokenizer.vocab_size} ids, pad {tokenizer.pad_token!r} = "
        f"{tokenizer.pad_id})")
    eos_ids = stop_token_ids(r, tokenizer, lm.config.vocab_size)
    prompts, held_out, counts = build_prompts(cfg, tokenizer, lm.config.n_positions, say)
    sampler = PromptSampler(len(prompts), r.num_generations, layout.prompts_per_generation, seed=t.seed,
                            shuffle=r.shuffle_dataset, rank=dist.rank, world_size=dist.world_size)
    total_steps = count_rl_steps(cfg, len(sampler), layout)
    rounds_needed = math.ceil(total_steps * t.grad_accum / (layout.steps_per_generation * r.num_iterations))
    replay = None
    if r.completions:
        replay = read_replay(r.completions, num_generations=r.num_generations)
        if len(replay) < rounds_needed:
            raise DataError(f"rl.completions = {r.completions}: {len(replay)} rounds, but {total_steps} "
                            f"steps need {rounds_needed} — record more rounds or lower train.max_steps")
    rewards = RewardSet.from_specs(r.reward_funcs, r.reward_weights or None, device=device,
                                   batch_size=r.reward_batch_size)
    say(f"rewards: {', '.join(f'{w:g} x {n}' for n, w in zip(rewards.names, rewards.weights.tolist()))}")
    scorer = CompletionLogProbs(lm, r.temperature)
    reference = None
    if r.beta > 0 and holds_adapter(lm):  # LoRA: the policy with its adapter off, no second model
        say("rl: the reference is the policy with its LoRA adapter off (no second model)")
        reference = AdapterOffLogProbs(lm, r.temperature)
    elif r.beta > 0:  # the initial policy, frozen (copied before any resume loads later weights)
        reference = CompletionLogProbs(copy.deepcopy(lm), r.temperature).eval().requires_grad_(False)
    maker = RoundMaker(lm, scorer, reference, round_settings(r, layout, cfg), sampling, prompts, sampler,
                       rewards, tokenizer, eos_ids, new_generator(t.seed + dist.rank, device), replay,
                       r.completions, r.generation_rows, dist, device, ctx.precision.autocast())
    log = CompletionsLog(ctx.out_dir / COMPLETIONS_FILE, t.log_every, r.log_completions and dist.is_main)
    source = RoundSource(maker, layout.steps_per_generation, r.num_iterations, t.grad_accum, device, log)
    say(f"steps: {total_steps} optimizer steps of {t.grad_accum} micro-batches of {t.batch_size} completions "
        f"x {dist.world_size} ranks; rounds of {layout.generation_batch_size} completions "
        f"({layout.prompts_per_generation} prompts x {r.num_generations}), {rounds_needed} rounds"
        + (f", replayed from {r.completions}" if replay else ""))
    evaluate = None
    if held_out is not None:
        eval_sampling = dataclasses.replace(sampling, do_sample=r.eval_sampling == "sample")
        evaluate = partial(evaluate_rewards, lm, held_out, rewards, tokenizer, eval_sampling, eos_ids,
                           list(cfg.data.labels) if r.prompts == TWEETS else None, dist, t.seed,
                           cfg.eval.batch_size)
    return Stage(r.ALGORITHM, model=scorer, saved_model=lm, loss=build_objective(r, dist), batches=source,
                 sampler=source, total_steps=total_steps, tokenizer=tokenizer, evaluate=evaluate,
                 fingerprints=prompt_fingerprints(tokenizer, prompts, r.completions), summary=counts,
                 finish_record=finish_step_metrics)


build_rloo_stage = build_grpo_stage  # one recipe: the algorithm is cfg.stage.rl's


def run_rl(cfg: RunConfig, resume: str | bool | None = None, log: Callable[[str], None] = print,
           overwrite: bool = False, resume_with_changes: bool = False) -> dict[str, Any]:
    """``minift grpo`` / ``minift rloo``: ``run_stage`` of ``build_grpo_stage`` (``cfg`` loaded with
    ``load_rl_config``)."""
    if cfg.stage is None or not hasattr(cfg.stage, "rl"):
        raise RunConfigError("the RL stage needs its [rl] section: load the config with load_rl_config")
    return run_stage(cfg, build_grpo_stage, resume=resume, log=log, overwrite=overwrite,
                     resume_with_changes=resume_with_changes)
