"""Run configuration: TOML (stdlib ``tomllib``) mapped onto typed dataclasses.

Sections ``[model]``, ``[data]``, ``[train]``, ``[eval]``; ``--set section.key=value``
overrides (values parsed as TOML, bare words as strings). Unknown keys and wrong types are
errors naming the key; ``describe()`` lists every option with its default for ``--help``.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the choice lists live with the code that implements them; validation reads them from there
from .collate import OBJECTIVES, PADDINGS
from .models.lm_loss import LOSS_ROWS
from .optim import SCHEDULES
from .precision import AUTOCAST_PRECISIONS, DTYPES
from .sampling import SAMPLERS

# torch's spellings of a dtype, accepted in a config and stored as minift's one spelling
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
YES_NO_AUTO = ("auto", "yes", "no")


class RunConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    name: str = "openai-gpt"  # hub name or local checkpoint directory; "random" = init from `config`
    tokenizer: str = ""  # hub name or directory; "" = same as `name`
    config: dict = field(default_factory=dict)  # model config.json fields (random init) or overrides
    model_type: str = "openai-gpt"  # architecture for name = "random"
    pad_token: str = "auto"  # "auto": [PAD] when the tokenizer has none and no EOS; "eos": pad with EOS
    dtype: str = "fp32"  # storage dtype of the weights: fp32, bf16, fp16 or fp64
    compile: bool = False  # torch.compile the model (pair with data.sampler = "packed": one shape, one graph)
    pad_vocab_to: int = 64  # embedding/head rows rounded up to a multiple (GPU GEMM widths); 0 or 1 = off
    loss_rows: str = "auto"  # "labelled": LM head on labelled rows; "all": fixed shapes, no sync (auto: compile/CUDA)
    fused_lm_head: bool = True  # chunked head + CE with its own backward: no [tokens x vocab] logits kept

    def hot_path(self, device_type: str) -> dict[str, Any]:
        """``CausalLM.set_hot_path`` settings, ``loss_rows = "auto"`` resolved for the device: label rows
        only on CPU (fewest FLOPs, fastest there: benchmarks/RESULTS.md); every row under compile and on
        CUDA (fixed shapes, no host sync)."""
        static = self.compile or device_type == "cuda"
        rows = ("all" if static else "labelled") if self.loss_rows == "auto" else self.loss_rows
        return {"loss_rows": rows, "fused_head": self.fused_lm_head}


@dataclass
class DataSection:
    source: str = "mteb/tweet_sentiment_extraction"  # hub id, local dir/file/glob, or "synthetic"
    train_split: str = "train"
    eval_split: str = "test"
    validation_fraction: float = 0.0  # > 0: carve a seeded validation split from train and evaluate on it
    text_column: str = "text"
    label_column: str = "label_text"
    labels: list = field(default_factory=lambda: ["negative", "neutral", "positive"])
    template: str = "{text} sentiment: {label}"
    objective: str = "all"  # "all" (loss on every real token, as Trainer) or "completion" (label only)
    max_length: int = 128  # truncation, <= the model's n_positions
    append_eos: str = "auto"  # "auto" (when the tokenizer has EOS), "yes", "no"
    padding: str = "longest"  # "longest" or "max_length" (the classic recipe, benchmarks only)
    pad_to_multiple_of: int = 0
    sampler: str = "length_grouped"  # random, sequential, length_grouped; packed: batch_size rows x max_length

    packing: bool = False
    max_train_examples: int = 0  # 0 = all
    num_workers: int = 0


@dataclass
class TrainSection:
    output_dir: str = "runs/minift"
    seed: int = 0
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 4  # micro-batches per optimizer step
    lr: float = 5e-5
    schedule: str = "linear"  # "constant", "linear", "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    fused_adamw: str = "auto"  # "auto", "yes", "no"
    precision: str = "fp32"  # "fp32", "bf16", "fp16"
    loss_denominator: str = "targets"  # "targets" (next-token targets) or "trainer" (Trainer's count)
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    keep_large_allocations: bool = True  # CPU: reuse big buffers instead of re-faulting them (minift/runtime.py)
    log_every: int = 1
    eval_every: int = 0  # optimizer steps between evaluations; 0 = only before and after
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"  # "stop" or "skip" a step whose loss is NaN/inf
    progress: bool = True
    plot: bool = True


@dataclass
class EvalSection:
    batch_size: int = 32
    max_examples: int = 0  # 0 = the whole eval split
    before_training: bool = True
    accuracy: bool = True


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        t, d = self.train, self.data
        self.model.dtype = DTYPE_ALIASES.get(self.model.dtype, self.model.dtype)
        checks = [
            (t.batch_size > 0, "train.batch_size must be positive"),
            (t.grad_accum > 0, "train.grad_accum must be positive"),
            (t.epochs > 0 or t.max_steps > 0, "train.epochs or train.max_steps must be positive"),
            (t.max_steps >= 0, "train.max_steps must be >= 0"),
            (math.isfinite(t.lr) and t.lr >= 0, f"train.lr must be a finite number >= 0, got {t.lr}"),
            (t.warmup_steps >= 0 and 0 <= t.warmup_ratio < 1, "train.warmup_steps >= 0 and 0 <= warmup_ratio < 1"),
            (t.weight_decay >= 0 and t.max_grad_norm >= 0, "train.weight_decay and max_grad_norm must be >= 0"),
            (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1 and t.eps > 0, "train.beta1/beta2 in [0, 1), eps > 0"),
            (t.schedule in SCHEDULES, f"train.schedule {t.schedule!r}: one of {list(SCHEDULES)}"),
            (t.precision in AUTOCAST_PRECISIONS, f"train.precision {t.precision!r}: one of {list(AUTOCAST_PRECISIONS)}"),
            (self.model.dtype in DTYPES, f"model.dtype {self.model.dtype!r}: one of {list(DTYPES)}"),
            (self.model.pad_vocab_to >= 0, "model.pad_vocab_to must be >= 0"),
            (self.model.loss_rows in ("auto", *LOSS_ROWS), f"model.loss_rows must be one of {['auto', *LOSS_ROWS]}"),
            (t.fused_adamw in YES_NO_AUTO, f"train.fused_adamw must be one of {list(YES_NO_AUTO)}"),
            (t.loss_denominator in ("targets", "trainer"), "train.loss_denominator must be targets or trainer"),
            (t.on_nonfinite in ("stop", "skip"), "train.on_nonfinite must be stop or skip"),
            (t.log_every > 0 and t.eval_every >= 0 and t.checkpoint_every >= 0 and t.keep_checkpoints > 0,
             "train.log_every and keep_checkpoints must be positive, eval_every/checkpoint_every >= 0"),
            (d.max_length > 0, "data.max_length must be positive"),
            (d.objective in OBJECTIVES, f"data.objective {d.objective!r}: one of {list(OBJECTIVES)}"),
            (d.sampler in SAMPLERS, f"data.sampler {d.sampler!r}: one of {list(SAMPLERS)}"),
            (d.padding in PADDINGS, f"data.padding {d.padding!r}: one of {list(PADDINGS)}"),
            (d.append_eos in YES_NO_AUTO, f"data.append_eos must be one of {list(YES_NO_AUTO)}"),
            (d.pad_to_multiple_of >= 0 and d.max_train_examples >= 0 and d.num_workers >= 0,
             "data.pad_to_multiple_of, max_train_examples, num_workers must be >= 0"),
            (0 <= d.validation_fraction < 1, "data.validation_fraction must be in [0, 1)"),
            (len(d.labels) >= 2 and all(isinstance(x, str) for x in d.labels), "data.labels: two or more strings"),
            (self.eval.batch_size > 0 and self.eval.max_examples >= 0, "eval.batch_size > 0, max_examples >= 0"),
            (self.model.pad_token in ("auto", "eos") or self.model.pad_token.strip() != "",
             "model.pad_token must be auto, eos or a token"),
        ]
        for ok, message in checks:
            if not ok:
                raise RunConfigError(message)
        return self


_SECTION_CLASSES = {"model": ModelSection, "data": DataSection, "train": TrainSection, "eval": EvalSection}


def _check_value(section: str, key: str, value: Any, default: Any, source: str) -> Any:
    where = f"{source}: [{section}] {key}"
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        raise RunConfigError(f"{where} must be a number, got the string {value!r}")
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise RunConfigError(f"{where} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    if expected is float and not math.isfinite(value):
        raise RunConfigError(f"{where} must be a finite number, got {value!r}")
    return value


def from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    config = RunConfig()
    for section, values in raw.items():
        if section not in _SECTION_CLASSES:
            raise RunConfigError(f"{source}: unknown section [{section}]; sections are {sorted(_SECTION_CLASSES)}")
        if not isinstance(values, dict):
            raise RunConfigError(f"{source}: [{section}] must be a table")
        target = getattr(config, section)
        names = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in names:
                raise RunConfigError(f"{source}: unknown key [{section}] {key}; known keys: {sorted(names)}")
            setattr(target, key, _check_value(section, key, value, getattr(target, key), source))
    return config.validate()


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise RunConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw_value = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value  # a bare word: a string
    return section, key, value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise RunConfigError(f"{path}: invalid TOML ({err})") from None
    for text in overrides:
        section, key, value = _parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise RunConfigError(f"--set {text!r}: [{section}] is not a table")
        if key.startswith("config.") and section == "model":
            raw[section].setdefault("config", {})[key[len("config."):]] = value
        else:
            raw[section][key] = value
    return from_dict(raw, source=source if not overrides else f"{source} (with --set)")


def describe() -> str:
    """Every option with its default, for ``minift train --help``."""
    lines = []
    for section, cls in _SECTION_CLASSES.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section}.{f.name} = {default!r}")
    return "\n".join(lines)
