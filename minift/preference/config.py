"""The preference stages' own config sections, ``[pairs]``, ``[dpo]`` and ``[reward]`` (beside the
``[model] [data] [train] [eval]`` every stage has). Light to import: ``minift --help`` lists them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import YES_NO_AUTO, RunConfigError, option, yes_no_auto

TWEETS = "tweets"
REJECTED_CHOICES = ("one", "both")  # tweets: the wrong labels a pair is built with
LOSS_TYPES = ("sigmoid", "ipo", "hinge")  # dpo.dpo_losses
REFERENCES = ("frozen", "precomputed")  # recipe.dpo_objectives


@dataclass
class PairsSection:
    source: str = option(TWEETS, '"tweets": pairs built from [data] (template, labels); else a TRL-format '
                                 'source (prompt, chosen, rejected): hub id, JSONL/Parquet file or folder '
                                 '(a single file: held-out pairs from data.validation_fraction)')
    rejected: str = option("one", 'tweets: one seeded wrong label per tweet, or "both"')
    max_length: int = option(0, "prompt + completion tokens; 0 = data.max_length")
    append_eos: str = yes_no_auto("auto", 'EOS after both completions: "auto" = as TRL when the tokenizer '
                                          'has one (reward model: not when EOS is the pad token), "yes", '
                                          '"no"')
    max_train_pairs: int = option(0, "use the first N train pairs; 0 = all")
    max_eval_pairs: int = option(0, "use the first N held-out pairs; 0 = all")


@dataclass
class DPOSection:
    beta: float = option(0.1, "strength of the KL leash to the reference")
    loss_type: str = option("sigmoid", '"sigmoid" (DPO), "ipo", "hinge"')
    label_smoothing: float = option(0.0, "cDPO's assumed label noise (sigmoid only)")
    reference: str = option("frozen", '"frozen" copy of the initial policy, or "precomputed" log-probs')
    disable_dropout: bool = option(True, "dropout off in policy and reference, as TRL")


@dataclass
class RewardSection:
    disable_dropout: bool = option(True, "dropout off, as TRL")


@dataclass
class PreferenceConfig:
    pairs: PairsSection = dataclasses.field(default_factory=PairsSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)

    def validate(self) -> "PreferenceConfig":
        p, d = self.pairs, self.dpo
        checks = [(p.rejected in REJECTED_CHOICES, f"pairs.rejected must be one of {REJECTED_CHOICES}"),
                  (p.append_eos in YES_NO_AUTO, f"pairs.append_eos must be one of {list(YES_NO_AUTO)}"),
                  (p.max_length >= 0 and p.max_train_pairs >= 0 and p.max_eval_pairs >= 0,
                   "pairs.max_length, max_train_pairs, max_eval_pairs must be >= 0"),
                  (d.beta > 0, "dpo.beta must be > 0"),
                  (d.loss_type in LOSS_TYPES, f"dpo.loss_type {d.loss_type!r}: one of {LOSS_TYPES}"),
                  (0 <= d.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)"),
                  (d.label_smoothing == 0 or d.loss_type == "sigmoid",
                   "dpo.label_smoothing applies to sigmoid only"),
                  (d.reference in REFERENCES, f"dpo.reference {d.reference!r}: one of {REFERENCES}")]
        for ok, message in checks:
            if not ok:
                raise RunConfigError(message)
        return self

    def validate_with(self, cfg) -> None:
        """The common sections' settings the pair commands cannot honour: the pair collator pads each
        batch to its longest pair, so packing and fixed-length padding are refused, not ignored."""
        d = cfg.data
        checks = [(d.sampler != "packed", ('data.sampler = "packed" fills rows with sequences; pairs are '
                                           'batched as pairs (batch_size of them): use random, sequential '
                                           'or length_grouped')),
                  (not d.packing, ("data.packing = true concatenates sequences; the pair commands keep each "
                                   "chosen and rejected row whole — set data.packing = false")),
                  (d.padding == "longest", ('data.padding = "max_length" is not supported for pairs (each '
                                            'batch pads to its longest pair): set data.padding = "longest"'))]
        for ok, message in checks:
            if not ok:
                raise RunConfigError(message)

    def input_paths(self) -> dict[str, str]:
        """Local inputs of the stage (checked before the output folder is touched)."""
        return {} if self.pairs.source == TWEETS else {"pairs.source": self.pairs.source}


