"""Run configuration: TOML (stdlib ``tomllib``) mapped onto typed dataclasses.

Sections ``[model]``, ``[data]``, ``[train]``, ``[eval]``; ``--set section.key=value``
overrides (values parsed as TOML, bare words as strings). Unknown keys and wrong types are
errors naming the key; ``describe()`` lists every option with its default for ``--help``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the choice lists live with the code that implements them; validation reads them from there
from .collate import OBJECTIVES, PADDINGS
from .errors import InputError
from .models.config import CONFIG_CLASSES
from .models.lm_loss import LOSS_ROWS
from .optim import SCHEDULES
from .precision import AUTOCAST_PRECISIONS, DTYPES
from .sampling import SAMPLERS

# torch's spellings of a dtype, accepted in a config and stored as minift's one spelling
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
YES_NO_AUTO = ("auto", "yes", "no")
DATA_FORMATS = ("text", "chat")
# torch.compile's modes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class RunConfigError(InputError):
    pass


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its one-line help (shown by ``minift train --help``); list and dict
    defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def yes_no_auto(default: str, help: str) -> Any:
    """An ``"auto"`` / ``"yes"`` / ``"no"`` option; ``true`` / ``false`` are read as "yes" / "no"."""
    return option(default, help, yes_no_auto=True)


@dataclass
class ModelSection:
    name: str = option("openai-gpt", 'hub name or local checkpoint directory; "random" = init from `config`')
    tokenizer: str = option("", 'hub name or directory; "" = same as `name`; "synthetic" = the offline '
                                'vocabulary')
    config: dict = option({}, "model config.json fields (random init) or overrides, e.g. { n_layer = 2 }")
    model_type: str = option("openai-gpt", 'architecture for name = "random": "openai-gpt", "gpt2", "llama", '
                                           '"qwen2", "qwen3" or "mistral"')
    pad_token: str = option("auto", '"auto": keep the tokenizer\'s, else EOS, else add [PAD]; '
                                    '"eos"; or a token')
    dtype: str = option("fp32", "storage dtype of the weights: fp32, bf16, fp16 or fp64 "
                                "(or torch's spelling)")
    compile: bool = option(False, "torch.compile the model (pair with data.sampler = \"packed\": one shape, "
                                  "one graph)")
    compile_mode: str = option("default", 'torch.compile mode: "default", "reduce-overhead" (CUDA graphs: '
                                          'static shapes only), "max-autotune", "max-autotune-no-cudagraphs"')
    pad_vocab_to: int = option(64, "embedding/head rows rounded up to a multiple (GPU GEMM widths); "
                                   "0 or 1 = off")
    loss_rows: str = option("auto", '"labelled": LM head on labelled rows only; "all": fixed shapes, no host '
                                    'sync; "auto": labelled on CPU, all under compile or on CUDA')
    fused_lm_head: bool = option(True, "chunked LM head + cross-entropy with its own backward: "
                                       "no [tokens x vocab] logits kept")
    activation_checkpointing: bool = option(False, "keep only each block's input for backward and recompute "
                                                   "the rest there (less activation memory, ~1 more forward)")

    def hot_path(self, device_type: str) -> dict[str, Any]:
        """``CausalLM.set_hot_path`` settings, ``loss_rows = "auto"`` resolved for the device: label rows
        only on CPU (fewest FLOPs, fastest there: benchmarks/RESULTS.md); every row under compile and on
        CUDA (fixed shapes, no host sync)."""
        static = self.compile or device_type == "cuda"
        rows = ("all" if static else "labelled") if self.loss_rows == "auto" else self.loss_rows
        return {"loss_rows": rows, "fused_head": self.fused_lm_head}


@dataclass
class DataSection:
    source: str = option("mteb/tweet_sentiment_extraction", 'hub id, local dir/file/glob, or "synthetic"')
    train_split: str = option("train", "split to train on")
    eval_split: str = option("test", "split to evaluate on (unless validation_fraction > 0)")
    validation_fraction: float = option(0.0, "> 0: carve a seeded validation split from train and evaluate "
                                             "on it")
    text_column: str = option("text", "column holding the text")
    label_column: str = option("label_text", "column holding the label, one of `labels`")
    labels: list = option(["negative", "neutral", "positive"],
                          "the label words (the label column's values), scored for accuracy")
    template: str = option("{text} sentiment: {label}", "how an example becomes one training text")
    format: str = option("text", '"text": `template` strings; "chat": conversations rendered by the '
                                 'chat template (a `messages` column, `prompt`/`completion` columns, or text '
                                 '+ label)')
    chat_template: str = option("", 'format "chat": "" = the tokenizer\'s own; "chatml"; a .jinja file; or '
                                    'the Jinja text')
    system_prompt: str = option("", 'format "chat", text + label rows: a system turn before each user turn')
    messages_column: str = option("messages", 'format "chat": column of {"role", "content"} turns (TRL\'s '
                                              'conversational format)')
    prompt_column: str = option("prompt", 'format "chat": prompt column (a string or turns)')
    completion_column: str = option("completion", 'format "chat": completion column (a string or turns)')
    objective: str = option("all", '"all": loss on every real token (as Trainer); "completion": label only; '
                                   '"assistant": the assistant turns of chat data')
    max_length: int = option(128, "truncate longer examples to this many tokens (<= the model's n_positions)")
    append_eos: str = yes_no_auto("auto", 'end every example with EOS: "auto" (when the tokenizer has one), '
                                          '"yes", "no"')
    padding: str = option("longest", '"longest" in the batch, or "max_length" (the classic recipe, '
                                     'benchmarks only)')
    pad_to_multiple_of: int = option(0, "round padded lengths up to a multiple of this (0 = off)")
    sampler: str = option("length_grouped", '"random", "sequential", "length_grouped" (less padding) or '
                                            '"packed" (batch_size rows of max_length tokens: one shape, for '
                                            'compile/GPU)')
    packing: bool = option(False, "concatenate examples into rows of max_length instead of padding")
    max_train_examples: int = option(0, "train on the first N kept examples (0 = all)")
    num_workers: int = option(0, "DataLoader worker processes (0 = load in the main process; at most the "
                                 "CPUs)")


@dataclass
class TrainSection:
    output_dir: str = option("runs/minift", "metrics, checkpoints, summary and the final model go here")
    seed: int = option(0, "seed for init, shuffling and dropout")
    epochs: float = option(1.0, "passes over the training set (fractions allowed)")
    max_steps: int = option(0, "optimizer steps; > 0 overrides epochs")
    batch_size: int = option(8, "sequences per micro-batch (per process)")
    grad_accum: int = option(4, "micro-batches per optimizer step")
    lr: float = option(5e-5, "peak learning rate (AdamW)")
    schedule: str = option("linear", 'lr after warm-up: "linear", "cosine" or "constant" (Trainer\'s '
                                     '"constant_with_warmup"); compat = "trainer" takes Trainer\'s names')
    warmup_steps: int = option(0, "steps of linear warm-up from 0 to lr")
    warmup_ratio: float = option(0.0, "warm-up as a fraction of all steps (when warmup_steps = 0)")
    weight_decay: float = option(0.0, "AdamW weight decay (not on biases and LayerNorm weights, as Trainer)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "clip the gradient's global norm to this (0 = no clipping)")
    fused_adamw: str = yes_no_auto("auto", 'fused AdamW kernel: "auto" (where supported), "yes", "no"')
    precision: str = option("fp32", '"fp32", "bf16" or "fp16" (autocast; fp16 with a gradient scaler)')
    loss_denominator: str = option("targets", '"targets" (next-token targets) or '
                                              '"trainer" (Trainer\'s count)')
    compat: str = option("minift", '"trainer": every number a learner can see is Trainer\'s '
                                   '(see resolve_compat)')
    device: str = option("auto", '"auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...')
    threads: int = option(0, "torch intra-op threads; 0 = leave torch's default")
    keep_large_allocations: bool = option(True, "CPU: reuse big buffers instead of re-faulting them "
                                                "(runtime.py)")
    log_every: int = option(1, "write a metrics.jsonl line every N optimizer steps")
    eval_every: int = option(0, "optimizer steps between evaluations; 0 = only before and after")
    checkpoint_every: int = option(0, "optimizer steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = option(2, "how many checkpoint-<step>/ folders to keep")
    on_nonfinite: str = option("stop", '"stop" or "skip" a step whose loss is NaN/inf')
    progress: bool = option(True, "show a progress bar (only on a terminal; plain lines otherwise)")
    plot: bool = option(True, "write curves.png at the end (needs matplotlib)")
    report_to: list = option([], 'also log the metrics to: ["tensorboard"] (pip install '
                                 '"minift[tensorboard]")')
    # Trainer's features, each as Trainer does it (docs/trainer-map.md)
    label_smoothing: float = option(0.0, "smooth the next-token targets: (1 - e) NLL + e mean_vocab(-log p) "
                                         "(Trainer's label_smoothing_factor; minift train only)")
    eval_strategy: str = option("steps", '"steps": every eval_every steps and after the last one; '
                                         '"epoch": after every epoch; "no": none during training')
    save_strategy: str = option("steps", '"steps": every checkpoint_every steps; "epoch": after every '
                                         'epoch; "no": none during training (the final one is written)')
    metric_for_best_model: str = option("", 'eval metric of the best checkpoint, e.g. "loss", "accuracy" '
                                            '("" = none; "loss" with load_best_model_at_end or '
                                            'early stopping)')
    greater_is_better: str = option("auto", '"auto": lower is better for a metric ending in "loss", higher '
                                            'otherwise; "yes"; "no"')
    load_best_model_at_end: bool = option(False, "after training, load the best checkpoint's weights "
                                                 "(kept from pruning), evaluate and export them")
    early_stopping_patience: int = option(0, "stop after this many evaluations without improvement "
                                             "(0 = never)")
    early_stopping_threshold: float = option(0.0, "an improvement must beat the best metric by more "
                                                  "than this")
    logging_first_step: bool = option(False, "also write step 1's record when log_every > 1")
    data_seed: int = option(-1, "seed of the data order (shuffling, batches); -1 = train.seed")
    neftune_noise_alpha: float = option(0.0, "NEFTune: uniform noise of +-alpha/sqrt(length x width) on "
                                             "the input embeddings in training (0 = off)")
    # fitting bigger models (docs/lora.md)
    distributed: str = option("ddp", 'under torchrun: "ddp" (each rank holds the whole model) or "fsdp" '
                                     '(parameters, gradients and AdamW state sharded over the ranks: FSDP2)')
    fsdp_accumulation: str = option("sharded", 'fsdp with grad_accum > 1: "sharded" (gradients '
                                               'reduce-scattered after every micro-batch: least memory) or '
                                               '"unsharded" (whole parameters and gradients kept until the '
                                               'last one: less communication)')
    check_memory: bool = option(True, "refuse at start-up a setup whose estimated memory (weights, "
                                      "gradients, AdamW, activations) exceeds what the device has")


@dataclass
class LoraSection:
    """``[lora]``: train a low-rank adapter instead of the weights (minift.lora, peft's LoraConfig)."""

    r: int = option(0, "rank of the adapter; 0 = no LoRA (every weight trains)")
    alpha: float = option(8.0, "the update B A is scaled by alpha / r (peft's lora_alpha)")
    dropout: float = option(0.0, "dropout on the adapter's input (peft's lora_dropout)")
    target_modules: list = option([], 'modules to wrap: names matched by suffix ("c_attn", "q_proj"), '
                                      'a regex string, or "all-linear"; [] = peft\'s default for the model '
                                      'type',
                                  list_or_string=True)
    use_rslora: bool = option(False, "scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    bias: str = option("none", '"none", "lora_only" (biases of wrapped layers train) or "all"')
    modules_to_save: list = option([], "modules trained in full beside the adapter, e.g. [\"ln_f\"]")
    init: str = option("kaiming", '"kaiming" (peft\'s default: A Kaiming-uniform, B zeros) or "gaussian"')

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def settings(self):
        """The ``minift.lora.LoraSettings`` of this section (None when LoRA is off)."""
        from .lora.settings import LoraSettings

        if not self.enabled:
            return None
        targets = self.target_modules
        return LoraSettings(r=self.r, alpha=self.alpha, dropout=self.dropout,
                            target_modules=(targets or None) if isinstance(targets, list) else targets,
                            use_rslora=self.use_rslora, bias=self.bias, modules_to_save=self.modules_to_save,
                            init=self.init)


@dataclass
class EvalSection:
    batch_size: int = option(32, "sequences per evaluation batch")
    max_examples: int = option(0, "evaluate on the first N examples (0 = the whole eval split)")
    before_training: bool = option(True, "evaluate once before the first step")
    accuracy: bool = option(True, "also score the label words for accuracy and macro-F1")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    lora: LoraSection = field(default_factory=LoraSection)
    # a stage's own sections (a dataclass whose fields are sections: [pairs], [dpo], [rl] ...)
    stage: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Every section by name, the stage's beside the common four (what run_config.json holds)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTION_CLASSES}
        return {**out, **(dataclasses.asdict(self.stage) if self.stage is not None else {})}

    def validate(self) -> "RunConfig":
        t, d = self.train, self.data
        self.model.dtype = DTYPE_ALIASES.get(self.model.dtype, self.model.dtype)
        checks = [
            (t.batch_size > 0, "train.batch_size must be positive"),
            (t.output_dir.strip() != "", 'train.output_dir is empty — name a folder ("." for this one)'),
            (d.source.strip() != "", 'data.source is empty — a hub id, a local file or folder, or '
                                     '"synthetic"'),
            (self.model.name.strip() != "", 'model.name is empty — a hub name, a model folder, or "random"'),
            (0 <= t.seed < 2**32, f"train.seed must be in [0, 2**32 - 1] (numpy's range), got {t.seed}"),
            (t.threads >= 0, f"train.threads must be >= 0 (0 = torch's default), got {t.threads}"),
            (self.model.model_type in CONFIG_CLASSES,
             f"model.model_type {self.model.model_type!r}: one of {sorted(CONFIG_CLASSES)}"),
            (t.grad_accum > 0, "train.grad_accum must be positive"),
            (t.epochs > 0 or t.max_steps > 0, "train.epochs or train.max_steps must be positive"),
            (t.max_steps >= 0, "train.max_steps must be >= 0"),
            (math.isfinite(t.lr) and t.lr >= 0, f"train.lr must be a finite number >= 0, got {t.lr}"),
            (t.warmup_steps >= 0 and 0 <= t.warmup_ratio < 1,
             "train.warmup_steps >= 0 and 0 <= warmup_ratio < 1"),
            (t.weight_decay >= 0 and t.max_grad_norm >= 0,
             "train.weight_decay and max_grad_norm must be >= 0"),
            (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1 and t.eps > 0, "train.beta1/beta2 in [0, 1), eps > 0"),
            (t.schedule in SCHEDULES, f"train.schedule {t.schedule!r}: one of {list(SCHEDULES)}"),
            (t.precision in AUTOCAST_PRECISIONS,
             f"train.precision {t.precision!r}: one of {list(AUTOCAST_PRECISIONS)}"),
            (self.model.dtype in DTYPES, f"model.dtype {self.model.dtype!r}: one of {list(DTYPES)}"),
            (self.model.pad_vocab_to >= 0, "model.pad_vocab_to must be >= 0"),
            (self.model.loss_rows in ("auto", *LOSS_ROWS),
             f"model.loss_rows must be one of {['auto', *LOSS_ROWS]}"),
            (t.fused_adamw in YES_NO_AUTO, f"train.fused_adamw must be one of {list(YES_NO_AUTO)}"),
            (t.loss_denominator in ("targets", "trainer"),
             "train.loss_denominator must be targets or trainer"),
            (t.on_nonfinite in ("stop", "skip"), "train.on_nonfinite must be stop or skip"),
            (self.model.compile_mode in COMPILE_MODES,
             f"model.compile_mode {self.model.compile_mode!r}: one of {list(COMPILE_MODES)}"),
            (t.compat in COMPAT_MODES, f"train.compat {t.compat!r}: minift or trainer"),
            (t.compat != "trainer" or d.sampler != "packed",
             "train.compat = \"trainer\" reproduces Trainer, which has no packed sampler: use random, "
             "sequential or length_grouped"),
            (t.log_every > 0 and t.eval_every >= 0 and t.checkpoint_every >= 0 and t.keep_checkpoints > 0,
             "train.log_every and keep_checkpoints must be positive, eval_every/checkpoint_every >= 0"),
            (d.max_length > 0, "data.max_length must be positive"),
            (d.objective in OBJECTIVES, f"data.objective {d.objective!r}: one of {list(OBJECTIVES)}"),
            (d.format in DATA_FORMATS, f"data.format {d.format!r}: one of {list(DATA_FORMATS)}"),
            (d.objective != "assistant" or d.format == "chat",
             "data.objective = \"assistant\" trains on the assistant turns of chat data: set "
             "data.format = \"chat\""),
            (d.sampler in SAMPLERS, f"data.sampler {d.sampler!r}: one of {list(SAMPLERS)}"),
            (d.padding in PADDINGS, f"data.padding {d.padding!r}: one of {list(PADDINGS)}"),
            (d.append_eos in YES_NO_AUTO, f"data.append_eos must be one of {list(YES_NO_AUTO)}"),
            (d.pad_to_multiple_of >= 0 and d.max_train_examples >= 0 and d.num_workers >= 0,
             "data.pad_to_multiple_of, max_train_examples, num_workers must be >= 0"),
            (0 <= d.validation_fraction < 1, "data.validation_fraction must be in [0, 1)"),
            (len(d.labels) >= 2 and all(isinstance(x, str) for x in d.labels),
             "data.labels: two or more strings"),
            (all(isinstance(x, str) and x.strip() for x in d.labels),
             f"data.labels {d.labels}: a label must have a word in it (an empty label adds no token to "
             "score)"),
            (len(set(d.labels)) == len(d.labels),
             f"data.labels {d.labels}: {sorted({x for x in d.labels if d.labels.count(x) > 1})} appear more "
             f"than once — list each label once"),
            (not (unknown := template_fields(d.template) - TEMPLATE_FIELDS),
             f"data.template {d.template!r}: unknown field(s) {sorted(unknown)}; a template can use "
             f"{{text}} (the column data.text_column = {d.text_column!r}) and {{label}} (data.label_column = "
             f"{d.label_column!r})"),
            (self.eval.batch_size > 0 and self.eval.max_examples >= 0,
             "eval.batch_size > 0, max_examples >= 0"),
            (self.model.pad_token in ("auto", "eos") or self.model.pad_token.strip() != "",
             "model.pad_token must be auto, eos or a token"),
        ]
        for ok, message in checks + trainer_feature_checks(t) + fitting_checks(self):
            if not ok:
                raise RunConfigError(message)
        check_template(d.template)
        check_device(t.device)
        check_reporters(t.report_to)
        return self


STRATEGIES = ("no", "steps", "epoch")  # eval_strategy and save_strategy, as Trainer's
DISTRIBUTED = ("ddp", "fsdp")
FSDP_ACCUMULATION = ("sharded", "unsharded")


def fitting_checks(cfg: "RunConfig") -> list[tuple[bool, str]]:
    """(ok, message) for LoRA, activation checkpointing and FSDP: the combinations minift refuses."""
    t, lora = cfg.train, cfg.lora
    if lora.r < 0:
        return [(False, f"[lora] r must be >= 0 (0 = no LoRA), got {lora.r}")]
    if lora.enabled:
        from .lora.settings import LoraSettingsError

        try:
            lora.settings()  # LoraSettings.validate: one line naming the [lora] key
        except LoraSettingsError as err:
            raise RunConfigError(str(err)) from None
    fsdp = t.distributed == "fsdp"
    return [
        (t.distributed in DISTRIBUTED, f"train.distributed {t.distributed!r}: one of {list(DISTRIBUTED)}"),
        (t.fsdp_accumulation in FSDP_ACCUMULATION,
         f"train.fsdp_accumulation {t.fsdp_accumulation!r}: one of {list(FSDP_ACCUMULATION)}"),
        (not lora.enabled or cfg.model.name != "random",
         '[lora] trains an adapter on a pretrained base, and model.name = "random" is none that the saved '
         "adapter could name — save the base first (minift.build_model(...).save_pretrained(DIR)) and set "
         "model.name = DIR"),
        (not (fsdp and t.compat == "trainer"),
         'train.distributed = "fsdp" with train.compat = "trainer": Trainer\'s numbers are those of one '
         'process — use train.distributed = "ddp" or compat = "minift"'),
        (not (fsdp and t.precision == "fp16"),
         'train.distributed = "fsdp" with train.precision = "fp16": the gradient scaler would skip steps on '
         'some shards and not others — use "bf16" (no scaler) or "fp32"'),
        (not (fsdp and cfg.model.compile),
         'train.distributed = "fsdp" with model.compile = true is not supported by minift yet — set '
         "model.compile = false (or use train.distributed = \"ddp\")"),
        (not (fsdp and t.load_best_model_at_end),
         'train.distributed = "fsdp" with train.load_best_model_at_end = true is not supported — the best '
         "checkpoint's shards are not reloaded; set it to false (the best checkpoint is still kept)"),
    ]


def trainer_feature_checks(t: TrainSection) -> list[tuple[bool, str]]:
    """(ok, message) for the ``[train]`` keys of Trainer's features."""
    evaluates = t.eval_strategy == "epoch" or (t.eval_strategy == "steps" and t.eval_every > 0)
    return [
        (0 <= t.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}"),
        (t.eval_strategy in STRATEGIES and t.save_strategy in STRATEGIES,
         f"train.eval_strategy and save_strategy: one of {list(STRATEGIES)}"),
        (t.greater_is_better in YES_NO_AUTO, f"train.greater_is_better must be one of {list(YES_NO_AUTO)}"),
        (t.early_stopping_patience >= 0 and t.early_stopping_threshold >= 0,
         "train.early_stopping_patience and early_stopping_threshold must be >= 0"),
        (t.data_seed >= -1, "train.data_seed: a seed >= 0, or -1 for train.seed"),
        (t.neftune_noise_alpha >= 0, "train.neftune_noise_alpha must be >= 0"),
        (not t.early_stopping_patience or evaluates,
         "train.early_stopping_patience needs evaluations during training: set train.eval_every > 0 or "
         "train.eval_strategy = \"epoch\""),
        (not t.load_best_model_at_end or (evaluates and t.save_strategy == t.eval_strategy),
         "train.load_best_model_at_end needs evaluations during training and checkpoints on the same "
         "cadence: train.eval_strategy and save_strategy both \"epoch\", or both \"steps\""),
        (not (t.load_best_model_at_end and t.eval_strategy == "steps") or
         (t.checkpoint_every > 0 and t.checkpoint_every % max(t.eval_every, 1) == 0),
         f"train.load_best_model_at_end: checkpoint_every ({t.checkpoint_every}) must be a multiple of "
         f"eval_every ({t.eval_every}), so the best evaluation has a checkpoint"),
    ]


TEMPLATE_FIELDS = {"text", "label"}
REPORTERS = {"tensorboard": "tensorboard"}  # train.report_to name -> the package it needs


def check_template(template: str) -> None:
    """Refuse a ``{text:d}`` or ``{text!r}``: a template only places the text and the label."""
    if unknown := template_fields(template) - TEMPLATE_FIELDS:
        raise RunConfigError(f"data.template {template!r}: unknown field(s) {sorted(unknown)}; a template "
                             "can use {text} and {label}")
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is not None and (spec or conversion):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise RunConfigError(f"data.template {template!r}: {shown} — a template field takes no format "
                                 f"spec or conversion; write {{{name}}}")


def check_device(device: str) -> None:
    """``train.device`` as torch spells a device (whether this machine has one: when the run starts)."""
    if device == "auto":
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise RunConfigError(f"train.device {device!r} is not a device: \"auto\", \"cpu\", \"cuda\", "
                             "\"cuda:1\", \"mps\" ...") from None


def check_reporters(names: list) -> None:
    """``train.report_to``: known trackers whose package is installed, refused now rather than after
    the data and the model are loaded."""
    for name in names:
        if not isinstance(name, str) or name not in REPORTERS:
            raise RunConfigError(f"train.report_to: unknown {name!r}; known: {sorted(REPORTERS)}")
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise RunConfigError(f"train.report_to = [{name!r}] needs the {REPORTERS[name]} package: pip "
                                 f"install \"minift[{name}]\", or drop it from train.report_to")


def template_fields(template: str) -> set[str]:
    """The ``{field}`` names of a prompt template (format syntax)."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:  # an unmatched brace
        raise RunConfigError(f"data.template {template!r}: {err} (write a literal brace as "
                             f"{{{{ or }}}})") from None


_SECTION_CLASSES = {"model": ModelSection, "data": DataSection, "train": TrainSection, "eval": EvalSection,
                    "lora": LoraSection}


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


# -- train.compat ------------------------------------------------------------------------------------
COMPAT_MODES = ("minift", "trainer")

# transformers 5.24 TrainingArguments defaults that differ from minift's (training_args.py: seed 1293,
# gradient_accumulation_steps 849, num_train_epochs 778, logging_steps 1001, train_sampling_strategy 1380,
# per_device_eval_batch_size 1128), plus Trainer's unshifted loss count.
TRAINER_DEFAULTS = {
    ("train", "seed"): 42,
    ("train", "grad_accum"): 1,
    ("train", "epochs"): 3.0,
    ("train", "log_every"): 500,
    ("train", "loss_denominator"): "trainer",
    ("data", "sampler"): "random",
    ("eval", "batch_size"): 8,
    ("train", "eval_strategy"): "no",  # training_args.py: eval_strategy 1106, save_strategy 1177,
    # save_steps 1183
    ("train", "save_strategy"): "steps",
    ("train", "checkpoint_every"): 500,
}

# Trainer's lr_scheduler_type names (optimization.py) -> minift's: Trainer's "constant" ignores any warmup,
# its "constant_with_warmup" is minift's "constant".
TRAINER_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant",
                     "constant_with_warmup": "constant"}


def resolve_compat(raw: dict[str, Any]) -> dict[str, Any]:
    """What ``train.compat = "trainer"`` implies for the settings, in one place. Returns the raw
    TOML tables with Trainer's defaults filled in for every key of ``TRAINER_DEFAULTS`` the
    user did not write (a key given in the file or by ``--set`` is never overridden), and
    Trainer's ``warmup_steps < 1`` read as a ratio (``training_args.py:2159``) moved to
    ``warmup_ratio``. The behaviours without a key of their own (Trainer's eval-loss formula,
    logged loss averaged over the ``log_every`` window, Trainer's sampler order) are switched
    on by ``train.compat`` itself where they happen. ``compat = "minift"``: ``raw`` unchanged."""
    train = raw.get("train")
    if not isinstance(train, dict) or train.get("compat", "minift") != "trainer":
        return raw
    resolved = {section: dict(values) if isinstance(values, dict) else values
                for section, values in raw.items()}
    for (section, key), value in TRAINER_DEFAULTS.items():
        table = resolved.setdefault(section, {})
        if isinstance(table, dict):
            table.setdefault(key, value)
    warmup = resolved["train"].get("warmup_steps")
    if isinstance(warmup, float) and 0 <= warmup < 1:
        if "warmup_ratio" in resolved["train"]:
            raise RunConfigError("[train] warmup_steps < 1 is Trainer's warmup ratio under "
                                 "compat = \"trainer\"; give it or warmup_ratio, not both")
        resolved["train"]["warmup_ratio"] = resolved["train"].pop("warmup_steps")
    elif isinstance(warmup, float) and warmup.is_integer():
        resolved["train"]["warmup_steps"] = int(warmup)  # Trainer's int(warmup_steps)
    return _trainer_names(resolved, train)


def _trainer_names(resolved: dict[str, Any], written: dict[str, Any]) -> dict[str, Any]:
    """Trainer's meaning of the schedule names, and ``eval_steps`` defaulting to ``logging_steps``
    (training_args.py:1575) when the user wrote no ``eval_every``."""
    t = resolved["train"]
    schedule = t.get("schedule", "linear")
    if not isinstance(schedule, str) or schedule not in TRAINER_SCHEDULES:
        raise RunConfigError(f"[train] schedule {schedule!r}: under compat = \"trainer\" one of Trainer's "
                             f"names {list(TRAINER_SCHEDULES)}")
    if schedule == "constant":  # get_scheduler returns before reading num_warmup_steps (optimization.py:1014)
        t["warmup_steps"], t["warmup_ratio"] = 0, 0.0
    t["schedule"] = TRAINER_SCHEDULES[schedule]
    if t.get("eval_strategy") == "steps" and "eval_every" not in written:
        t["eval_every"] = t["log_every"]
    return resolved


def from_dict(raw: dict[str, Any], source: str = "config", stage: type | None = None) -> RunConfig:
    """A validated ``RunConfig`` from TOML tables. ``stage``: a dataclass whose fields are a stage's own
    sections (each a dataclass of options); its ``validate()`` runs after the common sections'."""
    config = RunConfig(stage=stage() if stage is not None else None)
    raw = resolve_compat(raw)
    sections = {name: getattr(config, name) for name in _SECTION_CLASSES}
    if config.stage is not None:
        sections.update({f.name: getattr(config.stage, f.name) for f in dataclasses.fields(config.stage)})
    for section, values in raw.items():
        if section not in sections:
            raise RunConfigError(f"{source}: unknown section [{section}]; sections are {sorted(sections)}")
        if not isinstance(values, dict):
            raise RunConfigError(f"{source}: [{section}] must be a table")
        target = sections[section]
        fields = {f.name: f for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in fields:
                raise RunConfigError(f"{source}: unknown key [{section}] {key}; known keys: {sorted(fields)}")
            if fields[key].metadata.get("yes_no_auto") and isinstance(value, bool):
                value = "yes" if value else "no"  # a yes/no/auto option written as true / false
            if fields[key].metadata.get("list_or_string") and isinstance(value, str):
                setattr(target, key, value)  # e.g. [lora] target_modules = "all-linear" (or a regex)
                continue
            setattr(target, key, _check_value(section, key, value, getattr(target, key), source))
    config.validate()
    if config.stage is not None and hasattr(config.stage, "validate"):
        config.stage.validate()
    if config.stage is not None and hasattr(config.stage, "validate_with"):  # its checks of [data], [train]
        config.stage.validate_with(config)
    return config


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


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config file as a dict; a missing file or bad TOML is a RunConfigError naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark is skipped
    except FileNotFoundError:
        raise RunConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise RunConfigError(f"{path}: invalid TOML ({err})") from None
    except UnicodeDecodeError as err:
        raise RunConfigError(f"{path}: not UTF-8 text (byte {err.start}: "
                             f"{err.object[err.start:err.start + 1]!r}) — save the file as UTF-8") from None
    except IsADirectoryError:
        raise RunConfigError(f"{path}: a directory, not a TOML file") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set section.key=value`` overrides written into ``raw`` (``model.config.*`` into the table)."""
    for text in overrides:
        section, key, value = _parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise RunConfigError(f"--set {text!r}: [{section}] is not a table")
        if key.startswith("config.") and section == "model":
            table = raw[section].setdefault("config", {})
            if not isinstance(table, dict):
                raise RunConfigError(f"--set {text!r}: [model] config is {table!r}, not a table — write it "
                                     "as { n_layer = 2 }")
            table[key[len("config."):]] = value
        else:
            raw[section][key] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] = (), stage: type | None = None) -> RunConfig:
    """A TOML config (defaults when ``path`` is None) with ``--set`` overrides; ``stage``: the stage's
    own sections (``from_dict``)."""
    raw = apply_overrides(read_toml(path) if path is not None else {}, overrides)
    source = str(path) if path is not None else "defaults"
    return from_dict(raw, source=source if not overrides else f"{source} (with --set)", stage=stage)


def describe(stage: type | None = None) -> str:
    """Every option, grouped by section, with its default and its one-line help, for
    ``minift <command> --help``. The help is the ``option(...)`` text of the field."""
    classes = dict(_SECTION_CLASSES)
    if stage is not None:
        classes.update({f.name: f.default_factory for f in dataclasses.fields(stage)})
    lines = []
    for section, cls in classes.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section}.{f.name} = {default!r}".ljust(40) + f"  {f.metadata.get('help', '')}")
    return "\n".join(lines)
