"""The components every training stage builds the same way, one ``build_*`` function each:

    build_tokenizer -> build_model -> build_sampler -> build_loader -> count_steps
    -> build_optimizer -> build_scheduler -> build_hooks -> wrap_for_training

A stage (``finetune``, ``preference``, ``rl``) calls the ones it needs and adds its own (its data,
its loss object, its evaluation); ``orchestration.run_stage`` calls the optimizer, schedule, hooks
and wrapping ones for every stage. To change one component for every stage, change it here; to
change it for one run, pass your own function (see the README: "Change one piece").
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import chat_data, synthetic
from .config import RunConfig, RunConfigError
from .data import DataError, check_something_to_learn, load_splits
from .distributed import SINGLE_PROCESS, Distributed
from .hub import from_pretrained, resolve_checkpoint
from .loop import Hooks, TrainState, skip_nonfinite, stop_on_nonfinite
from .lora import apply_lora
from .lora.peft_format import adapter_base_name, is_adapter_folder
from .memory import check_memory
from .models import CONFIG_CLASSES, config_from_json_file
from .models import build_model as build_random_model
from .optim import make_adamw, make_scheduler, warmup_steps_for
from .precision import dtype_of
from .runtime import init_loader_worker, usable_cpus
from .sampling import BatchSampler, make_sampler
from .tokenizer import (
    TokenizerError,
    check_vocab_matches,
    ensure_pad_token,
    has_tokenizer_files,
    load_tokenizer,
    same_tokenizer,
)

SYNTHETIC = "synthetic"  # data.source / model.tokenizer: the offline default's own material


def build_tokenizer(cfg: RunConfig):
    """``model.tokenizer`` (or the model's own); refused when ``model.name`` is a folder holding another
    tokenizer: the model's embedding rows mean that folder's tokens."""
    name = cfg.model.tokenizer or cfg.model.name
    if name == SYNTHETIC:
        name = synthetic.prepare(Path(cfg.train.output_dir) / SYNTHETIC, seed=cfg.train.seed)[1]
    if name == "random":
        raise DataError("model.name = \"random\" needs model.tokenizer")
    tok = ensure_pad_token(chat_data.chat_tokenizer(load_tokenizer(name), cfg.data), cfg.model.pad_token)
    if cfg.model.tokenizer and cfg.model.name != "random":
        check_model_folder_tokenizer(Path(cfg.model.name).expanduser(), tok, cfg.model.pad_token)
    return tok


def check_model_folder_tokenizer(model_dir: Path, tokenizer, pad_policy: str) -> None:
    """A model folder that carries its own tokenizer (every folder minift writes does) is used with that
    tokenizer only: another one would silently grow the embedding and score other tokens."""
    if not (model_dir.is_dir() and has_tokenizer_files(model_dir)):
        return
    own = ensure_pad_token(load_tokenizer(model_dir), pad_policy)
    if not same_tokenizer(own, tokenizer):
        raise TokenizerError(f"model.tokenizer = {tokenizer.source} is not the tokenizer saved with the "
                             f"model in {model_dir} ({tokenizer.vocab_size} ids vs {own.vocab_size}): the "
                             "model's embedding rows are that tokenizer's tokens — drop model.tokenizer to "
                             "use the folder's own")


def check_overrides(cfg: RunConfig) -> None:
    """``model.config`` on a checkpoint may change settings such as dropout, not the sizes its weights
    were saved with (those are for ``model.name = "random"``)."""
    changed = {key: value for key, value in cfg.model.config.items() if key in SIZE_KEYS}
    if not changed:
        return
    directory = resolve_checkpoint(cfg.model.name)
    saved = config_from_json_file(directory / "config.json").to_dict()
    differing = {key: value for key, value in changed.items() if saved.get(key) != value}
    if differing:
        shown = ", ".join(f"{key} = {value!r} (the checkpoint has {saved.get(key)!r})"
                          for key, value in differing.items())
        raise RunConfigError(f"model.config sets {shown}, but model.name = {cfg.model.name} is a checkpoint "
                             f"whose sizes are fixed by its config.json — remove {', '.join(differing)} from "
                             "model.config (sizes apply to model.name = \"random\")")


SIZE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings")


def check_lengths(max_length: int, pad_to_multiple_of: int, n_positions: int, setting: str) -> None:
    """Refuse at start-up a length the model cannot hold (rather than at the first long batch)."""
    if max_length > n_positions:
        raise DataError(f"{setting} ({max_length}) exceeds the model's n_positions ({n_positions})")
    padded = -(-max_length // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else max_length
    if padded > n_positions:
        raise DataError(f"data.pad_to_multiple_of = {pad_to_multiple_of} pads sequences of {setting} = "
                        f"{max_length} tokens to {padded}, more than the model's n_positions ({n_positions}) "
                        f"— use a multiple that keeps {setting} within it, or 0")


def build_model(cfg: RunConfig, tokenizer, device: torch.device, say: Callable[[str], None] | None = None,
                training: bool = True):
    """The pretrained checkpoint (or a random init), its vocabulary grown to the tokenizer's. For
    training (``fit_model``): the memory it will need said first, and refused when it cannot fit;
    then the LoRA adapter (``[lora]``) and activation checkpointing."""
    if training:
        check_memory(cfg, model_config_of(cfg, tokenizer), device, say or main_process_print)
    if cfg.model.name == "random":
        model = build_random_model(model_config_of(cfg, tokenizer))
    else:
        check_overrides(cfg)
        model = from_pretrained(cfg.model.name, **cfg.model.config)
    if tokenizer.vocab_size > model.config.vocab_size:
        model.resize_token_embeddings(tokenizer.vocab_size)  # e.g. the added [PAD]: mean-initialized row
    check_vocab_matches(model, tokenizer)
    d = cfg.data
    check_lengths(d.max_length, d.pad_to_multiple_of, model.config.n_positions, "data.max_length")
    model.pad_vocab(cfg.model.pad_vocab_to).set_hot_path(**cfg.model.hot_path(device.type))
    model.to(dtype=dtype_of(cfg.model.dtype, "model.dtype"))
    if training:
        fit_model(cfg, model)
    return model.to(device=device)


def fit_model(cfg: RunConfig, model) -> None:
    """``[lora]``: freeze the model and add the adapter, its A matrices drawn from a generator seeded
    ``train.seed`` (the global RNG, dropout's, is left alone); ``model.activation_checkpointing``."""
    settings = cfg.lora.settings()
    if settings is not None:
        apply_lora(model, settings, generator=torch.Generator().manual_seed(cfg.train.seed))
    if cfg.model.activation_checkpointing:
        model.set_activation_checkpointing(True)


def model_config_of(cfg: RunConfig, tokenizer):
    """The config of the model ``build_model`` builds (read from the checkpoint: nothing allocated),
    its vocabulary at least the tokenizer's."""
    if cfg.model.name == "random":
        config_cls = CONFIG_CLASSES[cfg.model.model_type]
        return config_cls.from_dict({"vocab_size": tokenizer.vocab_size, **cfg.model.config},
                                    source="[model] config", strict=True)
    name = cfg.model.name
    if is_adapter_folder(name) and not (Path(name).expanduser() / "config.json").exists():
        name = adapter_base_name(name)  # peft's adapter folder: the base's config
    config = config_from_json_file(resolve_checkpoint(name) / "config.json")
    config = config.replace(**cfg.model.config) if cfg.model.config else config
    if tokenizer.vocab_size > config.vocab_size:
        config = config.replace(vocab_size=tokenizer.vocab_size)
    return config


def main_process_print(line: str) -> None:
    """``print`` on rank 0 only (torchrun's ``RANK``): a line every rank would say once."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)


def load_dataset_splits(cfg: RunConfig):
    """The raw splits of ``data.source`` (the synthetic set is written first when asked for)."""
    d = cfg.data
    source = d.source
    if source == SYNTHETIC:
        source = str(synthetic.prepare(Path(cfg.train.output_dir) / SYNTHETIC, seed=cfg.train.seed)[0])
    return load_splits(source, validation_fraction=d.validation_fraction, seed=cfg.train.seed,
                       text_columns=(d.text_column, d.label_column))


def local_inputs(cfg: RunConfig) -> dict[str, str]:
    """The run's inputs that name local files or folders (setting -> path), checked before the output
    folder is touched (``run_dir.claim_output_dir``); a stage adds its own through ``input_paths()``."""
    named = {"model.name": cfg.model.name, "model.tokenizer": cfg.model.tokenizer,
             "data.source": cfg.data.source}
    if cfg.stage is not None and hasattr(cfg.stage, "input_paths"):
        named.update(cfg.stage.input_paths())
    return {key: value for key, value in named.items()
            if value not in ("", SYNTHETIC, "random") and is_local(value)}


def is_local(name: str) -> bool:
    """Whether ``name`` can only mean a local path (not a hub id; a glob is left to the data loader)."""
    if any(ch in name for ch in "*?["):
        return False
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()
            or Path(name).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"))


def data_seed(cfg: RunConfig) -> int:
    """The data order's seed: ``train.data_seed``, or ``train.seed`` when it is -1 (Trainer's
    ``data_seed``)."""
    return cfg.train.seed if cfg.train.data_seed < 0 else cfg.train.data_seed


def build_sampler(cfg: RunConfig, examples, dist: Distributed = SINGLE_PROCESS) -> BatchSampler:
    """minift's samplers over ``examples`` (anything with ``lengths``: sequences, pairs), seeded
    ``data_seed``; under ``train.compat = "trainer"`` Trainer's (its seeded order, its
    group_by_length megabatches of batch x accumulation, whose permutations come from Trainer's
    global RNG, seeded ``train.seed`` even when ``data_seed`` is given), in one process only."""
    t = cfg.train
    if hasattr(examples, "prompt_length"):  # sequences (pairs always keep a completion token)
        check_something_to_learn(examples, cfg.data.objective, cfg.data.max_length)
    if t.compat == "trainer" and dist.enabled:
        raise DataError("train.compat = \"trainer\" reproduces one-process Trainer runs; "
                        "run it without torchrun")
    global_rng = t.compat == "trainer" and cfg.data.sampler == "length_grouped"
    seed = t.seed if global_rng else data_seed(cfg)
    return make_sampler(cfg.data.sampler, examples.lengths, t.batch_size, seed, rank=dist.rank,
                        world_size=dist.world_size, order="trainer" if t.compat == "trainer" else "minift",
                        grad_accum=t.grad_accum, row_length=cfg.data.max_length)


def build_loader(cfg: RunConfig, examples, sampler: BatchSampler, collator: Callable, device: torch.device
                 ) -> DataLoader:
    """Batches in the sampler's order. Its own generator keeps worker seeding off the global RNG
    (exact resume); pinned memory on CUDA only. ``data.num_workers`` workers, at most one per usable
    CPU (``machine_notes`` says so); each dies with this process (``runtime.init_loader_worker``)."""
    workers = loader_workers(cfg)
    return DataLoader(examples, batch_sampler=sampler, collate_fn=collator, num_workers=workers,
                      worker_init_fn=partial(init_loader_worker, os.getpid()) if workers else None,
                      pin_memory=device.type == "cuda", generator=torch.Generator(), persistent_workers=False)


def loader_workers(cfg: RunConfig) -> int:
    return min(cfg.data.num_workers, usable_cpus())


def machine_notes(cfg: RunConfig) -> list[str]:
    """What this machine changes of the config, said at start-up."""
    if cfg.data.num_workers > loader_workers(cfg):
        return [(f"data.num_workers = {cfg.data.num_workers} is more than the {usable_cpus()} CPUs this "
                 f"process may use: {loader_workers(cfg)} workers load the data")]
    return []


def schedule_notes(cfg: RunConfig, micro_batches_per_epoch: int | None, total_steps: int) -> list[str]:
    """Settings the run cannot honour as written, said at start-up: an accumulation longer than an
    epoch (a step never spans two epochs) and a warm-up as long as the run."""
    t, notes = cfg.train, []
    if micro_batches_per_epoch is not None and t.grad_accum > micro_batches_per_epoch:
        notes.append(f"train.grad_accum = {t.grad_accum}, but an epoch has {micro_batches_per_epoch} "
                     "micro-batches: a step never spans two epochs, so each step takes "
                     f"{micro_batches_per_epoch} micro-batches of {t.batch_size}, not {t.grad_accum} — lower "
                     "train.grad_accum or raise train.batch_size")
    warmup = warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio)
    if total_steps and warmup >= total_steps and t.lr > 0:
        reached = t.lr * (total_steps - 1) / warmup
        notes.append(f"the warm-up ({warmup} steps) is as long as the run ({total_steps} steps): the lr "
                     f"rises only to {reached:.3g} of train.lr = {t.lr:g} — lower train.warmup_steps (or "
                     "warmup_ratio)")
    return notes


def count_steps(cfg: RunConfig, sampler: BatchSampler) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``epochs`` x steps per epoch (the last
    step of an epoch may have fewer micro-batches)."""
    return cfg.train.max_steps or math.ceil(cfg.train.epochs * math.ceil(len(sampler) / cfg.train.grad_accum))


def build_optimizer(cfg: RunConfig, model) -> torch.optim.AdamW:
    t = cfg.train
    return make_adamw(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, t.fused_adamw)


def build_scheduler(cfg: RunConfig, optimizer, total_steps: int):
    t = cfg.train
    return make_scheduler(optimizer, t.schedule, total_steps, warmup_steps_for(total_steps, t.warmup_steps,
                                                                              t.warmup_ratio))


def build_hooks(cfg: RunConfig, log: Callable[[dict], None], evaluate: Callable[[TrainState], Any],
                save: Callable[[TrainState], Any], stop: Callable[[], bool],
                on_epoch_end: Callable[[TrainState], Any] | None = None) -> Hooks:
    """What the loop calls between steps, with ``[train]``'s cadences (``eval_strategy`` and
    ``save_strategy``: every ``eval_every`` / ``checkpoint_every`` steps, or per epoch, or neither)
    and its non-finite policy."""
    t = cfg.train
    return Hooks(log=log, evaluate=evaluate, eval_every=t.eval_every if t.eval_strategy == "steps" else 0,
                 eval_per_epoch=t.eval_strategy == "epoch", checkpoint=save,
                 checkpoint_every=t.checkpoint_every if t.save_strategy == "steps" else 0,
                 checkpoint_per_epoch=t.save_strategy == "epoch", should_stop=stop, log_every=t.log_every,
                 on_nonfinite=skip_nonfinite if t.on_nonfinite == "skip" else stop_on_nonfinite,
                 on_epoch_end=on_epoch_end)


def wrap_for_training(cfg: RunConfig, model, dist: Distributed):
    """DDP (or FSDP2: ``train.distributed``) under torchrun, then ``torch.compile`` when asked
    (``model.compile_mode``: "reduce-overhead" replays CUDA graphs, which needs the static path); the
    unwrapped model is what is saved. FSDP shards ``model`` in place: build the optimizer after."""
    t = cfg.train
    model = dist.wrap(model, mode=t.distributed, precision=t.precision, accumulation=t.fsdp_accumulation)
    return torch.compile(model, mode=cfg.model.compile_mode) if cfg.model.compile else model
