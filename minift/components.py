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
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from . import synthetic
from .config import RunConfig
from .data import DataError, load_splits
from .distributed import SINGLE_PROCESS, Distributed
from .hub import from_pretrained
from .loop import Hooks, TrainState, skip_nonfinite, stop_on_nonfinite
from .models import CONFIG_CLASSES, build_model as build_random_model
from .optim import make_adamw, make_scheduler, warmup_steps_for
from .precision import dtype_of
from .sampling import BatchSampler, make_sampler
from .tokenizer import check_vocab_matches, ensure_pad_token, load_tokenizer

SYNTHETIC = "synthetic"  # data.source / model.tokenizer: the offline default's own material


def build_tokenizer(cfg: RunConfig):
    name = cfg.model.tokenizer or cfg.model.name
    if name == SYNTHETIC:
        name = synthetic.prepare(Path(cfg.train.output_dir) / SYNTHETIC, seed=cfg.train.seed)[1]
    if name == "random":
        raise DataError("model.name = \"random\" needs model.tokenizer")
    return ensure_pad_token(load_tokenizer(name), cfg.model.pad_token)


def build_model(cfg: RunConfig, tokenizer, device: torch.device):
    """The pretrained checkpoint (or a random init), its vocabulary grown to the tokenizer's."""
    if cfg.model.name == "random":
        config_cls = CONFIG_CLASSES[cfg.model.model_type]
        model = build_random_model(config_cls.from_dict({"vocab_size": tokenizer.vocab_size, **cfg.model.config},
                                                        source="[model] config", strict=True))
    else:
        model = from_pretrained(cfg.model.name, **cfg.model.config)
    if tokenizer.vocab_size > model.config.vocab_size:
        model.resize_token_embeddings(tokenizer.vocab_size)  # e.g. the added [PAD]: mean-initialized row
    check_vocab_matches(model, tokenizer)
    if cfg.data.max_length > model.config.n_positions:
        raise DataError(f"data.max_length ({cfg.data.max_length}) exceeds the model's n_positions "
                        f"({model.config.n_positions})")
    model.pad_vocab(cfg.model.pad_vocab_to).set_hot_path(**cfg.model.hot_path(device.type))
    return model.to(device=device, dtype=dtype_of(cfg.model.dtype, "model.dtype"))


def load_dataset_splits(cfg: RunConfig):
    """The raw splits of ``data.source`` (the synthetic set is written first when asked for)."""
    d = cfg.data
    source = d.source
    if source == SYNTHETIC:
        source = str(synthetic.prepare(Path(cfg.train.output_dir) / SYNTHETIC, seed=cfg.train.seed)[0])
    return load_splits(source, validation_fraction=d.validation_fraction, seed=cfg.train.seed)


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
    if t.compat == "trainer" and dist.enabled:
        raise DataError("train.compat = \"trainer\" reproduces one-process Trainer runs; run it without torchrun")
    global_rng = t.compat == "trainer" and cfg.data.sampler == "length_grouped"
    seed = t.seed if global_rng else data_seed(cfg)
    return make_sampler(cfg.data.sampler, examples.lengths, t.batch_size, seed, rank=dist.rank,
                        world_size=dist.world_size, order="trainer" if t.compat == "trainer" else "minift",
                        grad_accum=t.grad_accum, row_length=cfg.data.max_length)


def build_loader(cfg: RunConfig, examples, sampler: BatchSampler, collator: Callable, device: torch.device
                 ) -> DataLoader:
    """Batches in the sampler's order. Its own generator keeps worker seeding off the global RNG
    (exact resume); pinned memory on CUDA only."""
    return DataLoader(examples, batch_sampler=sampler, collate_fn=collator, num_workers=cfg.data.num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator(), persistent_workers=False)


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
    """DDP under torchrun, then ``torch.compile`` when asked (``model.compile_mode``: "reduce-overhead"
    replays CUDA graphs, which needs the static path); the unwrapped model is what is saved."""
    model = dist.wrap(model)
    return torch.compile(model, mode=cfg.model.compile_mode) if cfg.model.compile else model
