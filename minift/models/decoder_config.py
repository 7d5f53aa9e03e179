"""Configs of the Llama-shaped decoders: ``llama``, ``qwen2``, ``qwen3`` and ``mistral``.

One decoder shape (rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention) with a few
switches, each family's ``config.json`` read under transformers' field names and defaults
(transformers 5.24 ``LlamaConfig``, ``Qwen2Config``, ``Qwen3Config``, ``MistralConfig``). What a
family decides is said by a property the model reads (``qkv_bias``, ``o_bias``, ``mlp_proj_bias``,
``qk_norm``, ``layer_windows``), so the model itself has no per-family branches:

=========  ===================  ==========  ==========  ===================================
family     q/k/v bias           o bias      q/k norm    sliding window
=========  ===================  ==========  ==========  ===================================
llama      ``attention_bias``   same        no          never (``mlp_bias`` on the MLP)
qwen2      always               never       no          ``use_sliding_window``: layers >=
                                                        ``max_window_layers`` (or
                                                        ``layer_types``)
qwen3      ``attention_bias``   same        per head    as qwen2
mistral    never                never       no          every layer when ``sliding_window``
=========  ===================  ==========  ==========  ===================================

Rotary positions: ``rope_theta`` and ``rope_scaling`` (None or type ``llama3``); transformers 5's
``rope_parameters`` is read into them. Features minift does not implement (other rope scaling
types, partial rotary, mixture-of-experts fields, quantized weights) are refused naming the field,
never loaded silently wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .config import ConfigError, ModelConfig
from .layers import ACTIVATIONS

ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor")
LAYER_TYPES = ("full_attention", "sliding_attention")
# config.json fields of features minift does not implement: present with a value, the config is refused
UNSUPPORTED_FIELDS = {
    "quantization_config": "quantized weights",
    "num_experts": "mixture of experts", "num_local_experts": "mixture of experts",
    "num_experts_per_tok": "mixture of experts", "moe_intermediate_size": "mixture of experts",
    "shared_expert_intermediate_size": "mixture of experts", "n_routed_experts": "mixture of experts",
    "attn_logit_softcapping": "attention logit soft-capping", "final_logit_softcapping": "logit soft-capping",
    "no_rope_layers": "layers without rotary positions",
}


@dataclass
class DecoderConfig(ModelConfig):
    """The fields every Llama-shaped family has; a subclass per ``model_type`` adds its switches."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        sizes = (self.hidden_size, self.num_attention_heads)
        if self.head_dim is None and all(isinstance(n, int) for n in sizes) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads

    # -- reading config.json --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config", strict: bool = False) -> DecoderConfig:
        if strict:  # a user's settings may say dropout in GPT's words
            raw = gpt_dropout_fields(raw, source)
        return super().from_dict(rope_fields(raw, source), source=source, strict=strict)

    def replace(self, **changes: Any) -> DecoderConfig:
        return super().replace(**gpt_dropout_fields(changes, "[model] config"))

    # -- the names the shared CausalLM code reads -----------------------------------------------
    @property
    def n_embd(self) -> int:
        return self.hidden_size

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def n_positions(self) -> int:
        return self.max_position_embeddings

    # -- the switches the model reads (overridden per family) -----------------------------------
    qkv_bias: ClassVar[bool] = False
    o_bias: ClassVar[bool] = False
    mlp_proj_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = False

    def layer_windows(self) -> list[int | None]:
        """Per layer: the sliding window (a key is seen from at most this many positions back,
        itself included) or None for full causal attention."""
        return [None] * self.num_hidden_layers

    # -- checks -----------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        self._check_types(source)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
            raise ConfigError(f"{source}: num_attention_heads ({heads}) must be a multiple of "
                              f"num_key_value_heads ({kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for rotary positions, got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"{source}: rms_norm_eps must be > 0 and attention_dropout in [0, 1)")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {self.hidden_act!r} is not implemented; known: "
                              f"{sorted(ACTIVATIONS)}")
        if not self.rope_theta > 0:
            raise ConfigError(f"{source}: rope_theta must be positive, got {self.rope_theta}")
        check_rope_scaling(self.rope_scaling, source)
        for key, feature in UNSUPPORTED_FIELDS.items():
            if self.extra.get(key):
                raise ConfigError(f"{source}: {key} = {self.extra[key]!r} ({feature}) is not implemented by "
                                  f"minift's {self.model_type} decoder; refusing to load it without")
        partial = self.extra.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor = {partial!r} (rotary on part of each head) "
                              f"is not implemented; minift rotates the whole head")

    def parameter_count(self) -> int:
        d, inner, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q_out, kv_out = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attention = d * q_out + 2 * d * kv_out + q_out * d
        attention += (q_out + 2 * kv_out) * self.qkv_bias + d * self.o_bias + 2 * self.head_dim * self.qk_norm
        mlp = 3 * d * inner + (2 * inner + d) * self.mlp_proj_bias
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + layers * (attention + mlp + 2 * d) + d + head

    def flops_per_token(self, sequence_length: int = 0) -> int:
        """Training FLOPs per token (forward + backward = 3 x forward, 2 per multiply-add): every
        weight matrix (GQA's narrower k/v and SwiGLU's three matrices counted as they are) and,
        with ``sequence_length``, attention's scores and weighted sum (causal: half of T^2)."""
        d, inner = self.hidden_size, self.intermediate_size
        q_out, kv_out = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        matrices = self.num_hidden_layers * (d * q_out + 2 * d * kv_out + q_out * d + 3 * d * inner)
        matrices += self.vocab_size * d  # the LM head (tied or not, it is a GEMM)
        attention = self.num_hidden_layers * 2 * q_out * sequence_length // 2  # QK^T and AV, causal half
        return 6 * matrices + 6 * attention


def gpt_dropout_fields(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """GPT's dropout settings in a decoder's terms, so recipes that switch dropout off by name (TRL's
    ``disable_dropout``) work for every model: ``attn_pdrop`` is ``attention_dropout``; the decoder
    has no residual or embedding dropout, so ``resid_pdrop`` / ``embd_pdrop`` may only be 0."""
    out = dict(settings)
    if "attn_pdrop" in out:
        out.setdefault("attention_dropout", out.pop("attn_pdrop"))
    for name in ("resid_pdrop", "embd_pdrop"):
        if name in out and out.pop(name) != 0:
            raise ConfigError(f"{source}: {name} = {settings[name]!r}: the Llama-shaped decoders have no "
                              f"residual or embedding dropout (only attention_dropout)")
    return out


def rope_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """``raw`` with transformers 5's ``rope_parameters`` moved into ``rope_theta`` / ``rope_scaling``
    (the fields transformers 4 and 5 both read back), and ``rope_scaling``'s old ``type`` key named
    ``rope_type``."""
    raw = dict(raw)
    params = raw.pop("rope_parameters", None)
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object, got {params!r}")
        if any(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"{source}: rope_parameters per layer type ({sorted(params)}) are not "
                              f"implemented")
        params = dict(params)
        if "rope_theta" in params:
            raw["rope_theta"] = params.pop("rope_theta")
        if "partial_rotary_factor" in params:
            raw["partial_rotary_factor"] = params.pop("partial_rotary_factor")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" and raw.get("rope_scaling") is None:
            raw["rope_scaling"] = params
    scaling = raw.get("rope_scaling")
    if isinstance(scaling, dict) and "rope_type" not in scaling and "type" in scaling:
        scaling = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
        raw["rope_scaling"] = scaling
    return raw


def check_rope_scaling(scaling: dict | None, source: str) -> None:
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope_scaling.rope_type = {rope_type!r} is not implemented; minift "
                          f"implements {list(ROPE_TYPES)} (Llama 3's frequency scaling)")
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_ROPE_KEYS if not isinstance(scaling.get(k), (int, float))]
        if missing:
            raise ConfigError(f"{source}: rope_scaling of type llama3 needs numbers for {missing}")
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ConfigError(f"{source}: rope_scaling.high_freq_factor must exceed low_freq_factor")


@dataclass
class LlamaConfig(DecoderConfig):
    """``llama``: Llama 2/3, SmolLM2, TinyLlama. ``attention_bias`` on q/k/v/o, ``mlp_bias`` on the MLP."""

    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def mlp_proj_bias(self) -> bool:
        return self.mlp_bias


@dataclass
class SlidingLayersConfig(DecoderConfig):
    """Qwen's sliding-window switch: with ``use_sliding_window`` the layers from ``max_window_layers``
    on attend to the last ``sliding_window`` positions (transformers' ``layer_types``, which, when
    given, says it per layer)."""

    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list | None = None

    def layer_windows(self) -> list[int | None]:
        window = self.sliding_window if self.use_sliding_window else None
        types = self.layer_types or ["sliding_attention" if window is not None and i >= self.max_window_layers
                                     else "full_attention" for i in range(self.num_hidden_layers)]
        return [window if kind == "sliding_attention" else None for kind in types]

    def validate(self, source: str = "config") -> None:
        super().validate(source)
        if self.layer_types is not None and (len(self.layer_types) != self.num_hidden_layers
                                             or set(self.layer_types) - set(LAYER_TYPES)):
            raise ConfigError(f"{source}: layer_types must list one of {list(LAYER_TYPES)} per layer "
                              f"({self.num_hidden_layers}), got {self.layer_types}")
        if self.use_sliding_window and (self.sliding_window is None or self.sliding_window <= 0):
            raise ConfigError(f"{source}: use_sliding_window needs a positive sliding_window, got "
                              f"{self.sliding_window!r}")


@dataclass
class Qwen2Config(SlidingLayersConfig):
    """``qwen2``: Qwen2 / Qwen2.5. Bias on q/k/v (never on o or the MLP)."""

    model_type: ClassVar[str] = "qwen2"
    architecture: ClassVar[str] = "Qwen2ForCausalLM"
    qkv_bias: ClassVar[bool] = True
    vocab_size: int = 151936
    intermediate_size: int = 22016
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 32768


@dataclass
class Qwen3Config(SlidingLayersConfig):
    """``qwen3``: Qwen3 (dense). RMSNorm over each head of q and k before the rotation."""

    model_type: ClassVar[str] = "qwen3"
    architecture: ClassVar[str] = "Qwen3ForCausalLM"
    qk_norm: ClassVar[bool] = True
    vocab_size: int = 151936
    intermediate_size: int = 22016
    num_key_value_heads: int | None = 32
    head_dim: int | None = 128
    max_position_embeddings: int = 32768
    attention_bias: bool = False

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias


@dataclass
class MistralConfig(DecoderConfig):
    """``mistral``: Mistral 7B. With ``sliding_window`` set, every layer attends to the last
    ``sliding_window`` positions (v0.1: 4096; null from v0.2 on)."""

    model_type: ClassVar[str] = "mistral"
    architecture: ClassVar[str] = "MistralForCausalLM"
    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = 4096

    def layer_windows(self) -> list[int | None]:
        return [self.sliding_window] * self.num_hidden_layers

    def validate(self, source: str = "config") -> None:
        super().validate(source)
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"{source}: sliding_window must be positive or null, got {self.sliding_window}")


DECODER_CONFIGS: dict[str, type[DecoderConfig]] = {
    c.model_type: c for c in (LlamaConfig, Qwen2Config, Qwen3Config, MistralConfig)}
