"""The RL stage's own config section, ``[rl]``, beside the ``[model] [data] [train] [eval]`` every stage has.

``minift grpo`` reads it as ``GRPOSection``, ``minift rloo`` as ``RLOOSection``: TRL's ``GRPOConfig`` and
``RLOOConfig`` names and defaults (GRPO: 8 generations, beta 0; RLOO: 2 generations, beta 0.05), each with
only its own algorithm's options (a GRPO option in an RLOO config is an unknown key). The per-device batch
is ``train.batch_size`` (completions per micro-batch and rank), the learning rate ``train.lr``. Every
default that differs from TRL's is a row of docs/grpo.md ("Defaults"). Light to import: ``minift --help``
lists these options.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import RunConfigError, option
from ..errors import InputError

TWEETS = "tweets"  # rl.prompts: the [data] rows as prompts "{text} sentiment:", the gold label kept
ALGORITHMS = ("grpo", "rloo")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")  # objective.LOSS_TYPES (not imported: torch-free here)
SCALE_REWARDS = ("group", "batch", "none")  # advantages.SCALE_REWARDS
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
POSITIONS = ("real", "padded")  # batching.POSITIONS
EVAL_SAMPLING = ("greedy", "sample")


@dataclass
class RLSection:
    """What GRPO and RLOO share."""

    algorithm: str = option("grpo", 'set by the command (minift grpo / minift rloo); a config may state it')
    num_generations: int = option(8, "completions sampled per prompt (a group); >= 2")
    max_completion_length: int = option(512, "new tokens per completion at most (a completion also ends at "
                                             "its first EOS)")
    generation_batch_size: int = option(0, "completions per generation round over all ranks; 0 = "
                                           "train.batch_size x ranks x steps_per_generation")
    steps_per_generation: int = option(0, "micro-batches one round is cut into; 0 = train.grad_accum "
                                          "(give this or generation_batch_size)")
    num_iterations: int = option(1, "updates on each round (mu); > 1 reuses it with the old log-probs")
    temperature: float = option(1.0, "sampling temperature (also divides the logits of the loss forward)")
    top_p: float = option(1.0, "nucleus sampling: keep the likeliest tokens up to this mass (1 = off)")
    top_k: int = option(0, "sample among the k likeliest tokens (0 = off)")
    min_p: float = option(0.0, "drop tokens below min_p x the likeliest one's probability (0 = off)")
    repetition_penalty: float = option(1.0, "CTRL's penalty on tokens already in the row (1 = off)")
    generation_rows: int = option(0, "rows per sampling forward; 0 = a rank's whole round at once (TRL); "
                                     "keep it when resuming (the draws depend on it)")
    eos_token_ids: list = option([], "more token ids that end a completion, beside the tokenizer's EOS "
                                     "(TRL: generation_config.eos_token_id)")
    beta: float = option(0.0, "weight of the KL to the frozen reference (0 = no reference in memory)")
    epsilon: float = option(0.2, "clip range of the ratio: [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float = option(0.0, "upper clip (DAPO's clip-higher); 0 = epsilon")
    mask_truncated_completions: bool = option(False, "no loss (and no attention) on completions cut at "
                                                     "max_completion_length")
    positions: str = option("real", '"real": positions count from each prompt\'s first token, padding '
                                    'changes nothing; "padded": TRL\'s loss forward (0..T-1 across the '
                                    'left-padded row)')
    reward_funcs: list = option(["label_match"], 'rewards: "label_match" (the tweets rule), a reward model '
                                                 'folder, or "package.module:function"')
    reward_weights: list = option([], "one weight per reward (empty = 1 each); the reward: their weighted "
                                      "sum")
    reward_batch_size: int = option(64, "rows per reward-model forward")
    prompts: str = option(TWEETS, '"tweets": prompts from [data] (template, labels); else a TRL prompt '
                                  'dataset (a "prompt" column; the others reach the rewards): hub id, '
                                  'JSONL/Parquet file or folder')
    shuffle_dataset: bool = option(True, "draw the prompts in a seeded order (train.seed), as TRL")
    completions: str = option("", "a completions file to replay instead of sampling (JSON lines: step, "
                                  "prompt, completion_ids)")
    log_completions: bool = option(False, "write the latest round's completions and rewards to "
                                          "completions.jsonl every train.log_every steps")
    disable_dropout: bool = option(True, "dropout off in policy and reference")
    eval_sampling: str = option("greedy", 'held-out completions: "greedy", or "sample" (a fixed seed)')

    ALGORITHM = "grpo"

    def checks(self) -> list[tuple[bool, str]]:
        s = self
        return [
            (s.algorithm == self.ALGORITHM,
             f"rl.algorithm = {s.algorithm!r}, but this is minift {self.ALGORITHM}: run minift {s.algorithm} "
             f"(the command sets the algorithm)" if s.algorithm in ALGORITHMS else
             f"rl.algorithm {s.algorithm!r}: one of {list(ALGORITHMS)}, set by the command"),
            (s.num_generations >= 2, f"rl.num_generations must be >= 2 (a group needs a baseline), got "
                                     f"{s.num_generations}"),
            (s.max_completion_length >= 1, "rl.max_completion_length must be >= 1"),
            (s.generation_batch_size >= 0 and s.steps_per_generation >= 0,
             "rl.generation_batch_size and steps_per_generation must be >= 0 (0 = derived)"),
            (not (s.generation_batch_size and s.steps_per_generation),
             "rl.generation_batch_size and rl.steps_per_generation both set: give one (the other follows "
             "from train.batch_size and the number of ranks)"),
            (s.generation_batch_size % s.num_generations == 0 if s.num_generations >= 2 else True,
             f"rl.generation_batch_size {s.generation_batch_size} is not a multiple of rl.num_generations "
             f"{s.num_generations}: a round holds whole groups"),
            (s.num_iterations >= 1, "rl.num_iterations must be >= 1"),
            (s.generation_rows >= 0, "rl.generation_rows must be >= 0 (0 = the whole round)"),
            (all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in s.eos_token_ids),
             f"rl.eos_token_ids must be token ids (integers >= 0), got {s.eos_token_ids}"),
            (s.beta >= 0, f"rl.beta must be >= 0, got {s.beta}"),
            (s.epsilon > 0 and s.epsilon_high >= 0, "rl.epsilon must be > 0 and rl.epsilon_high >= 0"),
            (s.positions in POSITIONS, f"rl.positions {s.positions!r}: one of {list(POSITIONS)}"),
            (bool(s.reward_funcs) and all(isinstance(f, str) and f.strip() for f in s.reward_funcs),
             'rl.reward_funcs: a list of one or more rewards ("label_match", a reward model folder, '
             '"package.module:function")'),
            (not s.reward_weights or len(s.reward_weights) == len(s.reward_funcs),
             f"rl.reward_weights has {len(s.reward_weights)} weights for {len(s.reward_funcs)} rewards: give "
             f"one per reward (or none: 1 each)"),
            (all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                 for w in s.reward_weights),
             f"rl.reward_weights must be finite numbers, got {s.reward_weights}"),
            (s.reward_batch_size >= 1, "rl.reward_batch_size must be >= 1"),
            (s.prompts.strip() != "", 'rl.prompts is empty: "tweets" or a prompt dataset'),
            (s.eval_sampling in EVAL_SAMPLING, f"rl.eval_sampling {s.eval_sampling!r}: one of "
                                               f"{list(EVAL_SAMPLING)}"),
        ]

    def sampling_settings(self):
        """The ``SamplingSettings`` of the policy's draws (checked: one line per bad value)."""
        from .generation import SamplingSettings

        return SamplingSettings(self.max_completion_length, self.temperature, self.top_p, self.top_k,
                                self.min_p, self.repetition_penalty).check()


@dataclass
class GRPOSection(RLSection):
    """``minift grpo``: TRL's ``GRPOConfig`` options on top of the shared ones."""

    loss_type: str = option("dapo", '"dapo" (TRL\'s default), "grpo", "dr_grpo", "bnpo"')
    scale_rewards: str = option("group", '"group" / "batch": divide the advantage by that std; "none"')
    importance_sampling_level: str = option("token", '"token" ratios, or one per "sequence" (GSPO)')
    use_bias_correction_kl: bool = option(True, "weight the k3 KL by the ratio (the tokens came from the old "
                                                "policy)")

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.loss_type in LOSS_TYPES, f"rl.loss_type {self.loss_type!r}: one of {list(LOSS_TYPES)}"),
            (self.scale_rewards in SCALE_REWARDS, f"rl.scale_rewards {self.scale_rewards!r}: one of "
                                                  f"{list(SCALE_REWARDS)}"),
            (self.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS,
             f"rl.importance_sampling_level {self.importance_sampling_level!r}: one of "
             f"{list(IMPORTANCE_SAMPLING_LEVELS)}"),
        ]


@dataclass
class RLOOSection(RLSection):
    """``minift rloo``: TRL's ``RLOOConfig`` defaults and options."""

    algorithm: str = option("rloo", 'set by the command (minift grpo / minift rloo); a config may state it')
    num_generations: int = option(2, "completions sampled per prompt (a group); >= 2")
    beta: float = option(0.05, "weight of the KL penalty subtracted from the reward (0 = no reference)")
    normalize_advantages: bool = option(False, "normalise the advantages over the round (mean 0, std 1)")
    reward_clip_range: list = option([], "[low, high]: clip the reward before the KL penalty (empty = off)")

    ALGORITHM = "rloo"

    def checks(self) -> list[tuple[bool, str]]:
        clip = self.reward_clip_range
        return super().checks() + [
            (not clip or (len(clip) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 and math.isfinite(v) for v in clip) and clip[0] < clip[1]),
             f"rl.reward_clip_range must be [low, high] with low < high, or [] (off); got {clip}"),
        ]


class _StageConfig:
    """The stage's sections (``cfg.stage``): the checks ``config.from_dict`` runs."""

    rl: RLSection

    def validate(self):
        for ok, message in self.rl.checks():
            if not ok:
                raise RunConfigError(message)
        try:
            self.rl.sampling_settings()
        except InputError as err:  # "generation: top_p ...; top_k ..." in the config's names
            problems = str(err).removeprefix("generation: ").split("; ")
            raise RunConfigError("; ".join(f"rl.{p}" for p in problems)) from None
        return self

    def validate_with(self, cfg) -> None:
        """The common sections' settings the RL stage cannot honour, refused rather than ignored."""
        t = cfg.train
        if t.compat == "trainer":
            raise RunConfigError('train.compat = "trainer" reproduces Trainer\'s fine-tuning; the RL stage '
                                 'follows TRL\'s trainers on its own — set train.compat = "minift"')

    def input_paths(self) -> dict[str, str]:
        """Local inputs of the stage (checked before the output folder is touched)."""
        from .rewards import BUILTIN_REWARDS, CALLABLE_SPEC

        named = {} if self.rl.prompts == TWEETS else {"rl.prompts": self.rl.prompts}
        if self.rl.completions:
            named["rl.completions"] = self.rl.completions
        for i, spec in enumerate(self.rl.reward_funcs):
            if spec not in BUILTIN_REWARDS and not CALLABLE_SPEC.match(spec):
                named[f"rl.reward_funcs[{i}]"] = spec
        return named


@dataclass
class GRPOConfig(_StageConfig):
    rl: GRPOSection = dataclasses.field(default_factory=GRPOSection)


@dataclass
class RLOOConfig(_StageConfig):
    rl: RLOOSection = dataclasses.field(default_factory=RLOOSection)


STAGE_CONFIGS = {"grpo": GRPOConfig, "rloo": RLOOConfig}
