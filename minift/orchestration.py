"""One orchestration for every training stage: ``minift train``, ``dpo``, ``reward`` and the RL stage.

A stage only builds its parts (``Stage``): the module the loop trains, the model it saves, its loss
object, its batches, its held-out evaluation, the fingerprints of what it trains on, what its
exported model folder holds. ``run_stage`` runs any stage the same way:

    check the local inputs, claim the output folder -> set up the process (device, seeds, threads, precision)
    -> the stage builds its parts -> AdamW + schedule -> resume (refusing changed settings or data)
    -> metrics -> evaluation before -> loop.train (under DDP and torch.compile when asked; NEFTune's
       noise hook on; evaluations and checkpoints per steps or epochs, each evaluation tracking the
       best model and early stopping: selection.py) -> final checkpoint -> the best checkpoint's
    weights when asked -> evaluation after -> model/ written atomically -> summary of the whole run
    -> exit 1 if most steps were skipped for a NaN/inf loss

So everything around the loop — resume, checkpoints, compile, atomic export, summaries, failure on
a mostly-NaN run — is written once and holds for every stage.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from .components import (
    build_hooks,
    build_optimizer,
    build_scheduler,
    local_inputs,
    machine_notes,
    schedule_notes,
    wrap_for_training,
)
from .config import RunConfig, RunConfigError
from .distributed import Distributed
from .errors import ResumeRefused
from .hub import load_weights
from .loop import TrainState, fail_if_mostly_skipped, train
from .metrics import (
    MetricsLogger,
    eval_at,
    eval_line,
    plot_curves,
    read_records,
    run_summary,
    summary_text,
    trim_metrics,
)
from .models.base import CONFIG_NAME
from .neftune import build_neftune
from .precision import Precision
from .run_dir import claim_output_dir
from .runtime import StopRequest, peak_memory_bytes, pick_device, setup_process
from .selection import ModelSelection

MODEL_DIR, SUMMARY_FILE = "model", "summary.json"  # in train.output_dir


@dataclass
class RunContext:
    """What the orchestration sets up before a stage builds its parts."""

    cfg: RunConfig
    dist: Distributed
    device: torch.device
    precision: Precision
    say: Callable[[str], None]  # a line for the user (rank 0 only)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


@dataclass
class Stage:
    """A stage's parts, as ``run_stage`` takes them."""

    name: str  # "train", "dpo", "reward", "grpo", "rloo": the summary says which
    model: nn.Module  # what the loop trains (run_stage wraps it for DDP and compile)
    saved_model: Any  # what checkpoints and model/ hold (``save_pretrained``); may be ``model`` itself
    loss: Any  # the loop's loss object: ``count(batch)`` and ``__call__(model, batch, device)``
    batches: Any  # a DataLoader over ``sampler``, or a step source (``loop.LoaderSteps``' two methods)
    sampler: Any  # what a checkpoint saves of the data position (``state_dict``, ``epoch``, ``consumed``)
    total_steps: int
    tokenizer: Any
    evaluate: Callable[[], dict[str, Any]] | None = None  # held-out numbers (eval mode, no gradients)
    eval_line: Callable[[int, dict[str, Any]], str] = eval_line
    # sha256 of tokenizer and data: resume compares
    fingerprints: dict[str, str] = field(default_factory=dict)
    export: Callable[[Path], None] | None = None  # extra files of model/ (weights, tokenizer, config: always)
    extra_state: dict[str, Any] | None = None  # a stage's own checkpoint entries (tensors, restored in place)
    load_model_weights: Callable[[Any, Path], None] = load_weights  # the reward model has its own layout
    summary: dict[str, Any] = field(default_factory=dict)  # the stage's own summary entries (data reports)
    build_optimizer: Callable[[RunConfig, nn.Module], Any] = build_optimizer  # components.py's: AdamW
    build_scheduler: Callable[[RunConfig, Any, int], Any] = build_scheduler  # components.py's: train.schedule
    finish_record: Callable[[dict], dict] | None = None  # each step record before it is logged (RL)


def set_up(cfg: RunConfig, dist: Distributed, log: Callable[[str], None]) -> RunContext:
    """Device, seeds, threads and the CPU allocator; the precision (warning when it would be slow)."""
    device = dist.device if dist.enabled else pick_device(cfg.train.device)
    setup_process(cfg.train.seed, device, cfg.train.threads, cfg.train.keep_large_allocations)
    precision = Precision(cfg.train.precision, device)
    precision.warn_if_slow()
    context = RunContext(cfg, dist, device, precision, log if dist.is_main else (lambda *_: None))
    for line in machine_notes(cfg):
        context.say(line)
    return context


def run_stage(cfg: RunConfig, build_stage: Callable[[RunContext], Stage], resume: str | bool | None = None,
              log: Callable[[str], None] = print, overwrite: bool = False, resume_with_changes: bool = False
              ) -> dict[str, Any]:
    """Run the stage ``build_stage`` builds, as ``cfg`` says. ``resume``: True = newest intact
    checkpoint in output_dir, a path = that checkpoint; ``resume_with_changes``: resume although
    settings that change the maths differ (they are used and recorded). ``overwrite``: a fresh run
    into a folder holding another run moves that run aside. Returns the summary of the whole run
    (also in ``summary.json``), or ``{"stopped_by": ...}`` after SIGINT/SIGTERM."""
    dist = Distributed.from_env()
    try:
        with claim_output_dir(cfg.train.output_dir, resume=bool(resume), overwrite=overwrite,
                              enabled=dist.is_main, log=log, inputs=local_inputs(cfg)):
            ctx = set_up(cfg, dist, log)
            return _run(ctx, build_stage(ctx), resume, resume_with_changes)
    finally:
        dist.shutdown()


def _run(ctx: RunContext, stage: Stage, resume, resume_with_changes: bool) -> dict[str, Any]:
    cfg, dist, say, out_dir = ctx.cfg, ctx.dist, ctx.say, ctx.out_dir
    if cfg.train.label_smoothing and stage.name != "train":
        raise RunConfigError(f"train.label_smoothing smooths minift train's next-token targets; the "
                             f"{stage.name} stage has its own loss (DPO: dpo.label_smoothing) — set it to 0")
    check_sharding(cfg, stage, dist, say)
    trained = wrap_for_training(cfg, stage.model, dist)  # FSDP shards the parameters: the optimizer after
    optimizer = stage.build_optimizer(cfg, stage.model)
    scheduler = stage.build_scheduler(cfg, optimizer, stage.total_steps)
    for line in schedule_notes(cfg, len(stage.sampler) if hasattr(stage.sampler, "__len__") else None,
                               stage.total_steps):
        say(line)
    selection = ModelSelection.from_config(cfg)
    neftune = build_neftune(cfg, stage.saved_model, stage.sampler, ctx.device)
    rng = neftune.rng if neftune is not None else None  # Trainer's global RNG replayed (compat = "trainer")
    extra_state = {**(stage.extra_state or {}), **(rng.checkpoint_entries() if rng is not None else {})}
    parts = ckpt.TrainingParts(stage.saved_model, optimizer, scheduler, ctx.precision, stage.sampler,
                               stage.tokenizer, extra_state or None, stage.load_model_weights)
    state, run_config, resumed = TrainState(), cfg.to_dict(), None
    if resume:  # metrics.jsonl cut back to the resumed step (all of it when starting from scratch)
        resumed = ckpt.resume_training(resume, out_dir, state, parts, dist, run_config, stage.fingerprints,
                                       allow_changes=resume_with_changes, log=say)
        if state.step > stage.total_steps:
            raise ResumeRefused(f"{resumed} is at step {state.step}, past this run's {stage.total_steps} "
                                f"steps — raise train.max_steps (or epochs) above {state.step}")
        trim_metrics(out_dir, state.step if resumed else -1,
                     keep_evals_at_step=state.step < stage.total_steps)

    metrics = MetricsLogger(out_dir, stage.total_steps, initial_step=state.step, enabled=dist.is_main,
                            progress=cfg.train.progress, log_every=cfg.train.log_every, echo=say,
                            report_to=cfg.train.report_to, window_mean=cfg.train.compat == "trainer",
                            first_step=cfg.train.logging_first_step)
    say = metrics.say  # from here on, lines go around the progress bar instead of onto it
    if resumed:
        metrics.write({"step": state.step, "resume": str(resumed)})
    evaluate_at = partial(_evaluate_and_log, stage, metrics, dist)
    save = partial(ckpt.save_training_state, out_dir, parts=parts, dist=dist, run_config=run_config,
                   total_steps=stage.total_steps, keep=cfg.train.keep_checkpoints,
                   fingerprints=stage.fingerprints, log=say)
    saved, evaluated = {}, set()  # checkpoints written and evaluations run in this process, by step

    def checkpoint_at(state: TrainState):
        """A checkpoint, keeping the best one from pruning (written once per step)."""
        selection.before_checkpoint(state)
        best = state.best_checkpoint
        saved[state.step] = save(state, protect=None if best is None else out_dir / f"checkpoint-{best}")
        return saved[state.step]

    def evaluate_in_training(state: TrainState) -> None:
        result = evaluate_at(state.step)
        evaluated.add(state.step)
        selection.after_evaluation(state, result)
        if rng is not None and result is not None:
            rng.evaluation()

    hook = neftune.attach(stage.saved_model) if neftune is not None else None
    try:
        with StopRequest() as stop:
            if cfg.eval.before_training and state.step == 0 and not _evaluated_before(out_dir, dist, resumed):
                evaluate_at(0)
            hooks = build_hooks(cfg, _step_log(stage, metrics), evaluate_in_training, checkpoint_at,
                                lambda: stop() or selection.should_stop(state),
                                on_epoch_end=rng.epoch_ended if rng is not None else None)
            state = train(trained, optimizer, scheduler, stage.batches,
                          total_steps=stage.total_steps, grad_accum=cfg.train.grad_accum,
                          max_grad_norm=cfg.train.max_grad_norm, precision=ctx.precision, loss=stage.loss,
                          dist=dist, state=state, hooks=hooks)
        if hook is not None:
            hook.remove()
        checkpoint = saved[state.step] if state.step in saved else checkpoint_at(state)
        if stop():
            say(f"stopped by {stop.signal_name} at step {state.step}; checkpoint {checkpoint}; "
                f"resume with --resume")
            return {"stopped_by": stop.signal_name, "step": state.step, "checkpoint": str(checkpoint)}
        best = _load_best_model(stage, state, ctx, selection) if cfg.train.load_best_model_at_end else None
        if best is not None or state.step not in evaluated:
            evaluate_at(state.step, **({"best_model_step": best} if best is not None else {}))
        records = read_records(out_dir) if dist.is_main else metrics.records
        summary = run_summary(stage.name, records, state, stage.total_steps, peak_memory_bytes(ctx.device),
                              {**stage.summary, "train_loss": mean_step_loss(metrics.records),
                               **selection.summary(state)})
        tensors = dist.gather_state_dict(stage.saved_model) if dist.sharded else None  # every rank takes part
        if dist.is_main:
            model_dir = export_model(out_dir, stage, cfg, tensors)
            write_json_atomically(out_dir / SUMMARY_FILE, summary)
            metrics.write({"summary": summary})
            say(summary_text(summary))
            say(f"checkpoint: {checkpoint}; model: {model_dir}")
            if cfg.train.plot:
                say(plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png"))
        fail_if_mostly_skipped(state)
        return summary
    finally:
        metrics.close()


def _step_log(stage: Stage, metrics: MetricsLogger) -> Callable[[dict], None]:
    """What each step record goes through before ``metrics`` logs it (the stage's ``finish_record``)."""
    if stage.finish_record is None:
        return metrics
    return lambda record: metrics(stage.finish_record(record))


def _evaluate_and_log(stage: Stage, metrics: MetricsLogger, dist: Distributed, step: int, **extra
                      ) -> dict[str, Any] | None:
    if stage.evaluate is None:
        return None
    with dist.whole_model():  # FSDP: the parameters gathered for the evaluation's forward passes
        result = stage.evaluate()
    metrics.write({"step": step, "eval": result, **extra})
    metrics.say(stage.eval_line(step, result))
    return result


def _load_best_model(stage: Stage, state: TrainState, ctx: RunContext, selection: ModelSelection
                     ) -> int | None:
    """``load_best_model_at_end``: the best checkpoint's weights into the model (Trainer's
    ``_load_best_model``); its step, or None when the model in memory already is the best one or
    no checkpoint was written at the best evaluation."""
    best = state.best_checkpoint
    if best is None or best == state.step:
        if best is None:
            ctx.say(f"load_best_model_at_end: no checkpoint holds a best {selection.metric}; keeping the "
                    f"last weights")
        return None
    ckpt.load_model_state(stage.saved_model, ctx.out_dir / f"checkpoint-{best}", stage.load_model_weights)
    stage.saved_model.to(ctx.device)
    ctx.say(f"best model: checkpoint-{best} ({selection.metric} {state.best_metric:.4f}) loaded")
    return best


def mean_step_loss(records: list[dict[str, Any]]) -> float | None:
    """Trainer's ``train_loss``: the mean of every step's loss in this process (since a resume, as
    each ``train()`` call of Trainer), logged or not; steps with a NaN/inf loss left out."""
    losses = [r["loss"] for r in records if "step_time" in r and math.isfinite(r["loss"])]
    return sum(losses) / len(losses) if losses else None


def _evaluated_before(out_dir: Path, dist: Distributed, resumed) -> bool:
    """A run stopped after its evaluation at step 0 and resumed there has it in metrics.jsonl
    already (decided on rank 0, which writes the file, for every rank)."""
    return bool(resumed) and dist.gather(dist.is_main and eval_at(read_records(out_dir), 0) is not None)[0]


def export_model(out_dir: Path, stage: Stage, cfg: RunConfig, tensors: dict[str, Any] | None = None) -> Path:
    """``<output_dir>/model``: the saved model, its tokenizer, the run config (and what the stage
    adds), written into a temporary folder and renamed into place: a kill leaves the previous
    ``model/`` or the complete new one, never a half-written folder. ``tensors``: the saved model's
    state dict gathered from FSDP's shards (rank 0)."""
    def write(directory: Path) -> None:
        save_model_folder(stage.saved_model, directory, base_model_name(cfg), tensors)
        stage.tokenizer.save(directory)
        (directory / ckpt.RUN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if stage.export is not None:
            stage.export(directory)

    return ckpt.write_dir_atomically(out_dir / MODEL_DIR, write)


def save_model_folder(model, directory: Path, base: str, tensors: dict[str, Any] | None = None) -> None:
    """The model of ``model/``: a language model holding a LoRA adapter as peft saves it
    (``adapter_config.json`` naming ``base``, ``adapter_model.safetensors``, and ``config.json``
    with the vocabulary the run grew: ``from_pretrained`` loads the folder as base + adapter); any
    other model holding an adapter (a reward model) with the adapter merged into full weights; a
    plain model as it saves itself. ``tensors``: the values to write instead of the parameters'
    own (gathered from FSDP's shards)."""
    from .lora import holds_adapter, lora_settings, merged_state_dict, save_adapter

    if lora_settings(model) is not None:
        save_adapter(model, directory, base_model_name_or_path=base, tensors=tensors)
        weights_dtype = str(model.padded_head_weight.dtype).removeprefix("torch.")
        model.config.save_json(directory / CONFIG_NAME, weights_dtype)
    elif holds_adapter(model):
        with state_dict_replaced(model, merged_state_dict(model, tensors)):
            model.save_pretrained(directory)
    elif tensors is not None:
        with state_dict_replaced(model, tensors):
            model.save_pretrained(directory)
    else:
        model.save_pretrained(directory)


@contextmanager
def state_dict_replaced(module: nn.Module, tensors: dict[str, Any]):
    """Inside, ``module.state_dict()`` returns ``tensors`` (a gathered or merged state dict), so a
    model's own ``save_pretrained`` writes them in its layout."""
    def replace(_module, state_dict, prefix, _metadata):
        if not prefix:
            state_dict.clear()
            state_dict.update(tensors)

    handle = module.register_state_dict_post_hook(replace)
    try:
        yield module
    finally:
        handle.remove()


def base_model_name(cfg: RunConfig) -> str:
    """``model.name`` as an adapter names its base: a local folder by its absolute path."""
    path = Path(cfg.model.name).expanduser()
    return str(path.resolve()) if path.exists() else cfg.model.name


FSDP_STAGES = ("train", "dpo", "reward")  # stages that call the model only through its forward in training


def check_sharding(cfg: RunConfig, stage: Stage, dist: Distributed, say: Callable[[str], None]) -> None:
    """``train.distributed = "fsdp"``: refused for a stage that runs the model outside its forward
    between steps (generation), said to change nothing in one process."""
    if cfg.train.distributed != "fsdp":
        return
    if not dist.enabled:
        say('train.distributed = "fsdp": one process, nothing to shard (start with torchrun '
            '--nproc-per-node N)')
    elif stage.name not in FSDP_STAGES:
        raise RunConfigError(f'train.distributed = "fsdp" is not supported by the {stage.name} stage (it '
                             f'generates with the model between steps) — use train.distributed = "ddp"')


def write_json_atomically(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)
