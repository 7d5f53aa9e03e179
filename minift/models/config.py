"""Model configs that read and write a transformers ``config.json``.

Each config is a dataclass whose fields carry the names transformers uses, so
``config.json`` maps onto it one key to one field. Keys we do not model (``summary_*``,
``initializer_range``, ``transformers_version``...) are kept in ``extra`` and written
back unchanged, so a save → load round trip through transformers loses nothing.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InputError, MissingFile


class ConfigError(InputError):
    """A model config with impossible or malformed values."""


@dataclass
class ModelConfig:
    """What GPT-1 and GPT-2 configs share: reading/writing ``config.json``, type and range checks."""

    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""  # transformers class name written to "architectures"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config", strict: bool = False) -> "ModelConfig":
        """``strict``: a key minift does not model is an error (a user's config, where it is a typo)
        instead of being kept in ``extra`` (a config.json, where transformers may have written it)."""
        known = {}
        extra = {}
        for key, value in raw.items():
            if key in cls.field_names():
                known[key] = value
            elif strict and key not in ("model_type", "architectures"):
                cls.refuse_unknown(key, source)
            elif key != "model_type":
                extra[key] = value
        if raw.get("model_type", cls.model_type) != cls.model_type:
            raise ConfigError(f"{source}: model_type {raw.get('model_type')!r}, expected {cls.model_type!r}")
        config = cls(**known, extra=extra)
        config.validate(source)
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({name: getattr(self, name) for name in self.field_names()})
        out["model_type"] = self.model_type
        out["architectures"] = [self.architecture]
        return dict(sorted(out.items()))

    def save_json(self, path: str | Path, weights_dtype: str | None = None) -> None:
        """Write ``config.json``; ``weights_dtype`` (e.g. "float32") replaces a recorded ``dtype`` /
        ``torch_dtype``, which transformers 5 loads the weights in by default."""
        out = self.to_dict()
        for key in ("dtype", "torch_dtype"):
            if weights_dtype is not None and key in out:
                out[key] = weights_dtype
        Path(path).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def refuse_unknown(cls, key: str, source: str) -> None:
        raise ConfigError(f"{source}: unknown key {key!r} for {cls.model_type}; "
                          f"known keys: {cls.field_names()}")

    def replace(self, **changes: Any) -> "ModelConfig":
        for key in changes:
            if key not in self.field_names():
                self.refuse_unknown(key, "[model] config")
        new = dataclasses.replace(self, **changes)
        new.validate("config")
        return new

    # -- checks ---------------------------------------------------------------------------
    def _check_types(self, source: str) -> None:
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            expected = f.type if isinstance(f.type, str) else f.type.__name__
            ok = _matches(value, expected)
            if not ok:
                raise ConfigError(f"{source}: {f.name} must be {expected}, got {value!r}")

    def validate(self, source: str = "config") -> None:
        self._check_types(source)
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"{source}: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{source}: {name} must be in [0, 1), got {getattr(self, name)}")
        if self.layer_norm_epsilon <= 0:
            raise ConfigError(f"{source}: layer_norm_epsilon must be positive")

    def parameter_count(self) -> int:
        """Parameters of the model this config builds (embeddings, blocks, final norm for GPT-2;
        a tied head adds none), computed without allocating anything."""
        d, inner = self.n_embd, getattr(self, "inner_dim", 4 * self.n_embd)
        per_block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        final_norm = 2 * d if self.model_type == "gpt2" else 0
        return self.vocab_size * d + self.n_positions * d + self.n_layer * per_block + final_norm + head

    def check_fits(self, available_bytes: int | None, bytes_per_parameter: int = 4,
                   source: str = "config") -> None:
        """Refuse, before anything is allocated, a model whose weights alone exceed ``available_bytes``."""
        needed = self.parameter_count() * bytes_per_parameter
        if available_bytes is not None and needed > available_bytes:
            raise ConfigError(f"{source}: n_layer={self.n_layer}, n_embd={self.n_embd}, "
                              f"vocab_size={self.vocab_size} make {self.parameter_count() / 1e6:,.0f} M "
                              f"parameters ({needed / 2**30:,.1f} GiB), more than the "
                              f"{available_bytes / 2**30:,.1f} GiB of memory available — "
                              f"check the config's sizes")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def read_json_object(path: str | Path) -> dict[str, Any]:
    """Parse a JSON file that must hold an object; errors name the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFile(f"model config not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _matches(value: Any, type_name: str) -> bool:
    type_name = type_name.replace(" ", "")
    if type_name.endswith("|None"):
        if value is None:
            return True
        type_name = type_name[: -len("|None")]
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "str":
        return isinstance(value, str)
    return True


@dataclass
class GPTConfig(ModelConfig):
    """openai-gpt (GPT-1): transformers' ``OpenAIGPTConfig`` fields and defaults."""

    model_type: ClassVar[str] = "openai-gpt"
    architecture: ClassVar[str] = "OpenAIGPTLMHeadModel"
    vocab_size: int = 40478
    n_positions: int = 512
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    afn: str = "gelu"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True


@dataclass
class GPT2Config(ModelConfig):
    """GPT-2: transformers' ``GPT2Config`` fields and defaults."""

    model_type: ClassVar[str] = "gpt2"
    architecture: ClassVar[str] = "GPT2LMHeadModel"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    tie_word_embeddings: bool = True

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def validate(self, source: str = "config") -> None:
        super().validate(source)
        if self.n_inner is not None and self.n_inner <= 0:
            raise ConfigError(f"{source}: n_inner must be positive or null, got {self.n_inner}")


CONFIG_CLASSES: dict[str, type[ModelConfig]] = {c.model_type: c for c in (GPTConfig, GPT2Config)}


def config_from_json_file(path: str | Path) -> ModelConfig:
    """Read ``config.json`` and return the config class its ``model_type`` names."""
    raw = read_json_object(path)
    model_type = raw.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(
            f"{path}: model_type {model_type!r} is not supported; minift knows {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[model_type].from_dict(raw, source=str(path))
