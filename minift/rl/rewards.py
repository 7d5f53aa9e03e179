"""Rewards for the RL stage: TRL's ``reward_funcs``, three kinds, several at once.

Every reward is a callable with TRL's signature (``GRPOTrainer._calculate_rewards``)::

    reward(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns,
           trainer_state=..., log_extra=..., log_metric=...) -> [float | None, ...]   # one per completion

where ``columns`` are the prompt dataset's other columns as keyword lists (row for row with the
completions) and ``trainer_state.global_step`` is the optimizer step. A spec names one:

    "label_match"            the rule for the tweets: 1 when the completion's first word is the gold
                             ``label``, else 0 (see ``label_match``)
    "path/to/folder"         a reward model: ``minift reward``'s ``<output_dir>/model``, or any transformers
                             ``…ForSequenceClassification`` folder with one label (or a hub id); scored on
                             prompt + completion as it was trained (``RewardModelReward``)
    "package.module:name"    any importable callable with the signature above (async ones too)

``None`` means "does not apply to this completion": it becomes NaN, which the weighted sum over rewards
skips (``nansum``), as TRL does; a completion no reward applies to keeps a NaN total (TRL leaves it out
of the reward statistics and gives it no advantage). Anything else that is not a finite number —
NaN, inf, a string — and a list of the wrong length are refused with one line naming the reward and
the step; so is an exception inside a reward.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import math
import numbers
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import InputError, MiniftError
from ..hub import resolve_checkpoint

CALLABLE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class RewardError(InputError):
    """A reward that cannot be built or that misbehaved; the message names it (and the step)."""


# -- (1) the rule for the tweets -------------------------------------------------------------------
def first_word(text: str) -> str:
    """The first whitespace-separated word, lowercased, without surrounding punctuation."""
    words = text.split()
    return words[0].strip(string.punctuation).lower() if words else ""


def label_match(prompts: list[str], completions: list[str], label: list[str] | None = None, **kwargs
                ) -> list[float]:
    """1.0 when the completion's first word is the row's gold ``label`` (case and surrounding
    punctuation ignored: `` Positive.`` matches ``positive``), else 0.0. The tweet prompts built from
    [data] carry ``label``; a prompt dataset must have a ``label`` column to use this rule."""
    if label is None:
        raise RewardError("label_match needs a 'label' column (the gold label word): the tweet prompts from "
                          "[data] have one; add it to the prompt dataset, or use another reward")
    return [1.0 if first_word(c) == str(gold).strip().lower() else 0.0 for c, gold in zip(completions, label)]


BUILTIN_REWARDS: dict[str, Callable] = {"label_match": label_match}


# -- (2) a reward model folder -------------------------------------------------------------------------
def check_reward_model_folder(spec: str, directory: Path) -> None:
    """Refuse, in one line, a folder that is no sequence-classification model with one label."""
    config_path = directory / "config.json"
    if not config_path.exists():
        raise RewardError(f"reward {spec!r}: {directory} has no config.json — give a reward model "
                          f"folder (<output_dir>/model of minift reward) or a …ForSequenceClassification "
                          f"checkpoint")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RewardError(f"reward {spec!r}: {config_path} is not valid JSON ({err})") from None
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise RewardError(f"reward {spec!r}: {directory} holds a {architectures[0]}, not a reward model "
                          f"(…ForSequenceClassification with one label, as minift reward saves it)")
    labels = config.get("id2label") or {"0": "LABEL_0"}
    if len(labels) != 1:
        raise RewardError(f"reward {spec!r}: {directory} is a classifier with {len(labels)} labels; a reward "
                          f"model has one (num_labels = 1)")


class RewardModelReward:
    """A reward model as a reward function: rewards of prompt + completion, one forward per ``batch_size``.

    As it was trained: the text is ``prompt + completion`` (TRL concatenates the strings; minift's
    preference pairs encode ``prompt + chosen`` the same way), encoded by the reward model's own
    tokenizer, with its EOS appended when the training appended it (``append_eos``: None reads the
    folder's ``run_config.json``: ``preference.reward.trained_with_eos``). The score is read at the last
    real token (the attention mask, as ``minift reward`` trains it). A sequence longer than the reward
    model's positions keeps its start (the end is cut, as the pairs were truncated); ``truncated``
    counts them."""

    def __init__(self, spec: str, device: torch.device | str = "cpu", batch_size: int = 64,
                 append_eos: bool | None = None, dtype: torch.dtype | None = None):
        from ..preference.reward import load_reward_model, saved_run_config, trained_with_eos
        from ..tokenizer import load_tokenizer

        try:
            directory = resolve_checkpoint(spec)
            check_reward_model_folder(spec, directory)
            self.model = load_reward_model(directory).to(device=device, dtype=dtype).eval()
            self.tokenizer = load_tokenizer(directory)
        except RewardError:
            raise
        except MiniftError as err:
            problems = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise RewardError(f"reward {spec!r} is not a usable reward model: {problems}") from None
        self.model.requires_grad_(False)
        self.__name__ = Path(str(spec).rstrip("/")).name  # TRL's name: the last part of the model's path
        self.device, self.batch_size = torch.device(device), batch_size
        if append_eos is None:
            try:
                append_eos = trained_with_eos(saved_run_config(directory), self.tokenizer)
            except InputError as err:
                raise RewardError(f"reward {spec!r}: {err}") from None
        self.append_eos = append_eos
        if self.append_eos and self.tokenizer.eos_id is None:
            raise RewardError(f"reward {spec!r}: trained with EOS appended, but its tokenizer has no "
                              f"EOS token")
        self.truncated = 0
        self.pad_id = next(i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id, 0) if i is not None)

    def sequences(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
        """The token ids the reward model scores, one row per completion."""
        eos = [self.tokenizer.eos_id] if self.append_eos else []
        limit = self.model.config.n_positions
        texts = [p + c for p, c in zip(prompts, completions)]
        rows = [ids + eos for ids in self.tokenizer.encode_batch(texts)]
        self.truncated += sum(len(r) > limit for r in rows)
        return [r[:limit] or [self.pad_id] for r in rows]  # an empty text (GPT-1 drops whitespace): one pad

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        from ..preference.reward import score_texts

        rows = self.sequences(prompts, completions)
        scores = [score_texts(self.model, rows[i:i + self.batch_size], self.pad_id, self.device)
                  for i in range(0, len(rows), self.batch_size)]
        return torch.cat(scores).tolist()


# -- (3) any importable callable ---------------------------------------------------------------------
def import_callable(spec: str) -> Callable:
    """``"package.module:function"`` (or ``module:Class.attribute``) -> the callable, or one line why not."""
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001  (ImportError, or the module raised while importing)
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: "
                          f"{first_line}) — is it on PYTHONPATH?") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise RewardError(f"reward {spec!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise RewardError(f"reward {spec!r}: {attribute} is a {type(target).__name__}, not a function")
    return target


def callable_name(function: Callable) -> str:
    """TRL's ``get_callable_name``: the function's ``__name__``, else its class's name."""
    while hasattr(function, "func") and hasattr(function, "args"):  # functools.partial
        function = function.func
    return getattr(function, "__name__", type(function).__name__)


# -- several rewards at once ------------------------------------------------------------------------
@dataclass
class Reward:
    name: str  # metrics: rewards/<name>/mean and /std
    function: Callable
    kind: str  # "rule", "model" or "callable"


def build_reward(spec: str, device: torch.device | str = "cpu", batch_size: int = 64) -> Reward:
    """A reward from its spec: a built-in rule's name, ``module:function``, or a reward model folder."""
    if spec in BUILTIN_REWARDS:
        return Reward(spec, BUILTIN_REWARDS[spec], "rule")
    if CALLABLE_SPEC.match(spec):
        function = import_callable(spec)
        return Reward(callable_name(function), function, "callable")
    model = RewardModelReward(spec, device=device, batch_size=batch_size)
    return Reward(model.__name__, model, "model")


@dataclass
class RewardScores:
    """The rewards of one generation batch: ``per_function`` [N, F] float32, NaN where a reward
    returned None (TRL's ``rewards_per_func``), the rewards' ``names`` (metrics: ``rewards/<name>/*``)
    and ``weights``; what the functions logged through ``log_extra`` / ``log_metric``. The weighted sum,
    the advantages and the reward metrics are the update's business (``minift.rl.advantages``)."""

    per_function: torch.Tensor
    names: list[str]
    weights: torch.Tensor
    extra_columns: dict[str, list] = field(default_factory=dict)
    extra_metrics: dict[str, list[float]] = field(default_factory=dict)


class RewardSet:
    """Rewards with their weights (``reward_weights``; default 1 each), called as TRL calls them."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None):
        if not rewards:
            raise RewardError("no reward: name at least one (label_match, a reward model folder, "
                              "module:function)")
        weights = [1.0] * len(rewards) if weights is None else list(weights)
        if len(weights) != len(rewards):
            raise RewardError(f"{len(weights)} reward_weights for {len(rewards)} rewards: give one weight "
                              f"per reward")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
            raise RewardError(f"reward_weights must be finite numbers, got {weights}")
        self.rewards = list(rewards)
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.names = unique_names([r.name for r in self.rewards])

    @classmethod
    def from_specs(cls, specs: Sequence[str], weights: Sequence[float] | None = None,
                   device: torch.device | str = "cpu", batch_size: int = 64) -> RewardSet:
        return cls([build_reward(spec, device, batch_size) for spec in specs], weights)

    def score(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
              columns: dict[str, list] | None = None, step: int = 0) -> RewardScores:
        """Call every reward on the batch (``columns``: the prompts' other columns, row for row)."""
        n = len(prompts)
        extra_columns: dict[str, list] = {}
        extra_metrics: dict[str, list[float]] = {}
        kwargs = {**(columns or {}), "trainer_state": SimpleNamespace(global_step=step),
                  "log_extra": lambda column, values: extra_columns.__setitem__(column, list(values)),
                  "log_metric": lambda name, value: extra_metrics.setdefault(name, []).append(float(value))}
        per_function = torch.zeros(n, len(self.rewards), dtype=torch.float32)
        for i, (reward, name) in enumerate(zip(self.rewards, self.names)):
            values = call_reward(reward, name, step, prompts, completions, completion_ids, kwargs)
            per_function[:, i] = torch.tensor(checked_values(values, n, name, step), dtype=torch.float32)
        return RewardScores(per_function, list(self.names), self.weights.clone(), extra_columns,
                            extra_metrics)


def unique_names(names: Sequence[str]) -> list[str]:
    """Names as given, a repeated one suffixed ``_2``, ``_3`` ... so each reward has its own metrics."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def call_reward(reward: Reward, name: str, step: int, prompts, completions, completion_ids, kwargs) -> Any:
    """One reward's values; an exception inside it becomes one line naming it and the step."""
    try:
        values = reward.function(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                 **kwargs)
        if inspect.isawaitable(values):
            values = asyncio.run(_awaited(values))
    except Exception as err:
        hint = ""
        if isinstance(err, TypeError) and "unexpected keyword" in str(err):
            hint = " — a reward takes (prompts, completions, completion_ids, **kwargs), as TRL calls it"
        message = str(err).splitlines()[0] if str(err) else ""
        raise RewardError(f"reward {name!r} raised at step {step}: {type(err).__name__}: "
                          f"{message}{hint}") from err
    return values


async def _awaited(awaitable):
    return await awaitable


def checked_values(values: Any, n: int, name: str, step: int) -> list[float]:
    """``values`` as n floats (None -> NaN), or one line saying what is wrong with them."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward {name!r} returned a {type(values).__name__} at step {step}, not a list of "
                          f"{n} numbers") from None
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values at step {step} for {n} "
                          f"completions: return one float (or None) per completion")
    out = []
    for row, value in enumerate(values):
        if value is None:
            out.append(float("nan"))
            continue
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"reward {name!r} returned {value!r} for completion {row} at step {step}: "
                              f"a reward is a finite number, or None where it does not apply")
        out.append(float(value))
    return out
