"""Train transformers' Trainer and minift (``train.compat = "trainer"``) side by side and print
both columns: every logged loss, learning rate and grad-norm, the final eval loss, and the
largest difference between the two sets of final weights.

    python3 benchmarks/trainer_side_by_side.py                       # tiny GPT-1, both samplers
    python3 benchmarks/trainer_side_by_side.py --model tiny-gpt2 --seed 7 --steps 9 --log-every 3
    python3 benchmarks/trainer_side_by_side.py --sampling random --stages   # + step 2, stage by stage
    python3 benchmarks/trainer_side_by_side.py --verbose   # with the libraries' progress bars and logs
    python3 benchmarks/trainer_side_by_side.py --sampling --features neftune early_stopping --seed 3

After the two samplings, one row per Trainer feature (``FEATURES``: label smoothing, evaluation and
checkpoints per steps or per epoch, the best model loaded at the end, early stopping, ``train_loss``,
``logging_first_step``, ``data_seed``, NEFTune, the schedule names), each the same settings given to
both as ``TrainingArguments`` and ``[train]`` keys: its largest differences in logged losses, eval
losses during and after training, ``train_loss`` and final weights, and whether both ran the same
steps, picked the same best checkpoint and kept the same checkpoint folders.

Both start from the same checkpoint of the shared fixtures (dropout 0) and the same token ids:
minift tokenizes the tweets and Trainer receives those ids with its own
``DataCollatorForLanguageModeling``, sampler, loss, optimizer, schedule and evaluation. The
run's settings are the same TOML keys for minift and the matching ``TrainingArguments``;
nothing else is told to minift. transformers is an optional extra (pip install .[bench]).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLINGS = {"random": "random", "group_by_length": "length_grouped"}  # Trainer's name -> minift's


def shared_dir() -> Path:
    return Path(os.environ.get("MINIFT_SHARED", REPO.parent / "shared")).expanduser()


def quiet_libraries() -> None:
    """No progress bars ("Loading weights", "Generating split", "tokenizing") and no info or
    warning lines from datasets and transformers, so the tables print on their own (--verbose
    keeps them, e.g. transformers' `loss_type=None` warning explained in docs/how-trainer-works.md)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


@dataclass
class Columns:
    """What one trainer observably did: logged rows (step, loss, lr, grad_norm), eval loss, weights."""

    logged: list[tuple[int, float, float, float]] = field(default_factory=list)
    eval_loss: float = float("nan")
    eval_loss_per_target: float = float("nan")  # minift's own eval loss, for contrast
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    # Trainer: per training_step
    micro_steps: list[tuple[int, tuple, int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss) during training
    train_loss: float = float("nan")
    steps: int = 0  # optimizer steps run
    best_step: int | None = None  # the step of the best checkpoint
    checkpoints: list[str] = field(default_factory=list)  # checkpoint folders left at the end


def minift_settings(args, sampling: str, output_dir: str) -> dict:
    """The run as minift TOML tables (what a learner would write)."""
    fixture = shared_dir() / "fixtures" / args.model
    return {
        "model": {"name": str(fixture), "config": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}},
        "data": {"source": str(shared_dir() / "data" / "tweet_sentiment_extraction"),
                 "sampler": SAMPLINGS[sampling], "max_train_examples": args.rows, "max_length": 64,
                 "append_eos": "no"},
        "train": {"compat": "trainer", "output_dir": output_dir, "seed": args.seed, "max_steps": args.steps,
                  "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr,
                  "warmup_steps": args.warmup, "weight_decay": args.weight_decay, "log_every": args.log_every,
                  "progress": False, "plot": False, "device": "cpu"},
        "eval": {"batch_size": args.eval_batch_size, "max_examples": args.eval_rows, "before_training": False,
                 "accuracy": False},
    }


def run_minift(settings: dict) -> Columns:
    from safetensors.torch import load_file

    from minift import finetune
    from minift.config import from_dict

    cfg = from_dict(settings, source="side-by-side")
    summary = finetune.run(cfg, log=lambda *_: None)
    out = Path(cfg.train.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cols = Columns(logged=[(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in records
                           if "step_time" in r])
    evals = [r for r in records if "eval" in r]
    last_eval = evals[-1]["eval"]
    cols.eval_loss = last_eval["loss"]
    cols.eval_loss_per_target = math.log(last_eval["perplexity"])  # perplexity stays exp(mean CE per target)
    cols.weights = load_file(str(out / "model" / "model.safetensors"))
    during = cfg.train.eval_strategy != "no"  # else the one evaluation is the one after training
    cols.evals = [(r["step"], r["eval"]["loss"]) for r in evals if during and "best_model_step" not in r]
    cols.train_loss, cols.steps = summary["train_loss"], summary["steps"]
    cols.best_step = summary.get("best_model", {}).get("checkpoint_step")
    cols.checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    return cols


def minift_data(settings: dict):
    """(config, tokenizer, train examples, eval examples) as minift's recipe prepares them."""
    from minift import finetune
    from minift.config import from_dict

    cfg = from_dict(settings, source="side-by-side")
    tokenizer = finetune.build_tokenizer(cfg)
    data = finetune.build_datasets(cfg, tokenizer)
    return cfg, tokenizer, data.train, data.eval_examples


def trainer_examples(settings: dict):
    """The train and eval token ids exactly as minift prepared them, as ``datasets.Dataset``s."""
    import datasets

    cfg, _, train, evaluation = minift_data(settings)
    n_eval = min(cfg.eval.max_examples, len(evaluation.input_ids))

    def dataset(ids):
        return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})

    return dataset(train.input_ids), dataset(evaluation.input_ids[:n_eval])


def run_trainer(args, sampling: str, settings: dict, output_dir: str, extra: dict | None = None,
                callbacks: list | None = None) -> Columns:
    """Trainer on the same ids; ``extra``: more (or other) ``TrainingArguments``, ``callbacks``: Trainer's."""
    import transformers

    fixture = shared_dir() / "fixtures" / args.model
    tok = transformers.AutoTokenizer.from_pretrained(str(fixture))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-2: pad with EOS, as minift's model.pad_token = "auto" does
    model = transformers.AutoModelForCausalLM.from_pretrained(str(fixture), resid_pdrop=0.0, embd_pdrop=0.0,
                                                              attn_pdrop=0.0)
    train, evaluation = trainer_examples(settings)
    training_args = transformers.TrainingArguments(**{
        "output_dir": output_dir, "seed": args.seed, "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": args.grad_accum,
        "learning_rate": args.lr, "warmup_steps": args.warmup, "weight_decay": args.weight_decay,
        "logging_steps": args.log_every, "per_device_eval_batch_size": args.eval_batch_size,
        "train_sampling_strategy": sampling, "report_to": "none", "save_strategy": "no", "disable_tqdm": True,
        "use_cpu": True, **(extra or {})})
    micro_steps = []

    class RecordingTrainer(transformers.Trainer):
        """Trainer, recording what each ``training_step`` got and returned (for --stages)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            micro_steps.append((self.state.global_step + 1, tuple(inputs["input_ids"].shape),
                                int(num_items_in_batch), float(loss)))
            return loss

    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                               data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False),
                               callbacks=callbacks)
    if not args.verbose:
        trainer.remove_callback(transformers.PrinterCallback)  # its log dicts would split the tables
    output = trainer.train()
    history = trainer.state.log_history
    cols = Columns(logged=[(h["step"], h["loss"], h["learning_rate"], h["grad_norm"])
                           for h in history if "loss" in h],
                   evals=[(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h],
                   train_loss=output.training_loss, steps=trainer.state.global_step)
    best = trainer.state.best_model_checkpoint
    cols.best_step = int(Path(best).name.split("-")[-1]) if best else None
    cols.checkpoints = sorted(p.name for p in Path(output_dir).glob("checkpoint-*"))
    cols.eval_loss = trainer.evaluate()["eval_loss"]
    cols.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cols.micro_steps = micro_steps
    return cols


def minift_stage_numbers(settings: dict, step: int) -> dict:
    """Optimizer step ``step`` recomputed from minift's parts, stage by stage. Valid while the
    weights are still the checkpoint's (every earlier step had lr 0: warmup from 0)."""
    from minift import finetune
    from minift.collate import model_inputs
    from minift.optim import make_adamw, make_scheduler, warmup_steps_for
    from minift.sampling import make_sampler

    cfg, tokenizer, train, _ = minift_data(settings)
    t = cfg.train
    model = finetune.build_model(cfg, tokenizer, torch.device("cpu"))
    sampler = make_sampler(cfg.data.sampler, train.lengths, t.batch_size, t.seed, order="trainer",
                           grad_accum=t.grad_accum)
    window = sampler.batches(0)[(step - 1) * t.grad_accum:step * t.grad_accum]
    collate = finetune.build_collator(cfg, tokenizer.pad_id)
    batches = [collate([train[i] for i in indices]) for indices in window]
    n_items = sum(b["n_label_tokens"] for b in batches)
    model.train()
    micro_losses = []
    for batch in batches:
        loss = model(**model_inputs(batch, "cpu")).loss_sum / n_items
        loss.backward()
        micro_losses.append((list(batch["input_ids"].shape), float(loss.detach())))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
    optimizer = make_adamw(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, t.fused_adamw)
    scheduler = make_scheduler(optimizer, t.schedule, t.max_steps,
                               warmup_steps_for(t.max_steps, t.warmup_steps, t.warmup_ratio))
    for _ in range(step - 1):
        optimizer.step()  # no gradients yet: only the schedule moves
        scheduler.step()
    return {"window": window, "lengths": [[train.lengths[i] for i in b] for b in window], "n_items": n_items,
            "n_targets": sum(b["n_loss_targets"] for b in batches),
            "first_tokens": sum(len(b) for b in window),
            "micro_losses": micro_losses, "step_loss": sum(loss for _, loss in micro_losses),
            "grad_norm": float(norm), "lr": optimizer.param_groups[0]["lr"]}


def minift_stages(numbers: dict) -> list[str]:
    """``minift_stage_numbers`` as the lines --stages prints."""
    lines = [f"sampler: micro-batches {numbers['window']} (lengths {numbers['lengths']})",
             (f"num_items_in_batch = {numbers['n_items']} counted labels ({numbers['n_targets']} "
              f"next-token targets + {numbers['first_tokens']} first tokens)")]
    lines += [f"micro-batch {shape}: loss_sum / {numbers['n_items']} = {loss:.7f}"
              for shape, loss in numbers["micro_losses"]]
    lines.append(f"step loss = {numbers['step_loss']:.7f}; "
                 f"grad-norm before clipping {numbers['grad_norm']:.7f}; lr {numbers['lr']:.6g}")
    return lines


def print_stages(theirs: Columns, minift_lines: list[str], step: int) -> None:
    print(f"-- optimizer step {step}, stage by stage --")
    print("Trainer, per training_step: (global step, input_ids shape, num_items_in_batch, returned loss)")
    for row in theirs.micro_steps:
        if row[0] == step:
            print(f"  {row[0]}, {list(row[1])}, {row[2]}, {row[3]:.7f}")
    per_step = [sum(r[3] for r in theirs.micro_steps if r[0] == k) for k in range(1, step + 1)]
    print(f"  step losses {[round(x, 7) for x in per_step]}; logged at step {step}: their mean "
          f"{sum(per_step) / step:.7f}")
    print("minift, recomputed from its parts:")
    for line in minift_lines:
        print("  " + line)


def compare(args, sampling: str) -> dict:
    """Run both for one sampling strategy, print the columns, return the largest differences."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = minift_settings(args, sampling, str(Path(tmp) / "minift"))
        theirs = run_trainer(args, sampling, settings, str(Path(tmp) / "trainer"))
        mine = run_minift(settings)
        stages = minift_stages(minift_stage_numbers(settings, 2)) if args.stages else []
    print(f"\n== {args.model}, train_sampling_strategy={sampling!r} / data.sampler={SAMPLINGS[sampling]!r}, "
          f"seed {args.seed}, {args.steps} steps of {args.batch_size} x {args.grad_accum}, "
          f"logging window {args.log_every} ==")
    print(f"{'step':>4} | {'Trainer loss':>12} {'minift loss':>12} | {'Trainer lr':>11} {'minift lr':>11} | "
          f"{'Trainer gnorm':>13} {'minift gnorm':>13}")
    for (step, loss_t, lr_t, gn_t), (_, loss_m, lr_m, gn_m) in zip(theirs.logged, mine.logged):
        print(f"{step:>4} | {loss_t:>12.7f} {loss_m:>12.7f} | {lr_t:>11.4e} {lr_m:>11.4e} | "
              f"{gn_t:>13.7f} {gn_m:>13.7f}")
    shared = sorted(set(theirs.weights) & set(mine.weights))
    weight_diff = max(float((theirs.weights[k] - mine.weights[k]).abs().max()) for k in shared)
    result = {
        "logged_steps": ([r[0] for r in theirs.logged], [r[0] for r in mine.logged]),
        "loss": max(abs(a[1] - b[1]) for a, b in zip(theirs.logged, mine.logged)),
        "lr": max(abs(a[2] - b[2]) for a, b in zip(theirs.logged, mine.logged)),
        "grad_norm": max(abs(a[3] - b[3]) / a[3] for a, b in zip(theirs.logged, mine.logged)),
        "eval_loss": abs(theirs.eval_loss - mine.eval_loss), "weights": weight_diff,
        "weight_tensors": len(shared),
    }
    if stages:
        print_stages(theirs, stages, step=2)
    print(f"eval loss: Trainer {theirs.eval_loss:.7f}, minift {mine.eval_loss:.7f} (minift's own formula, "
          f"mean CE per next-token target: {mine.eval_loss_per_target:.7f})")
    print(f"largest difference: loss {result['loss']:.2e}, lr {result['lr']:.1e}, grad-norm (relative) "
          f"{result['grad_norm']:.1e}, eval loss {result['eval_loss']:.2e}, "
          f"final weights {weight_diff:.2e} over {len(shared)} tensors")
    return result


# -- Trainer's features, one row each -------------------------------------------------------------------
@dataclass
class Feature:
    """One feature's settings: ``trainer`` as ``TrainingArguments``, ``minift`` as ``[train]`` keys."""

    trainer: dict
    minift: dict
    sampling: str = "random"
    patience: int = 0  # > 0: Trainer gets an EarlyStoppingCallback(patience, threshold)
    threshold: float = 0.0


def features(args) -> dict[str, Feature]:
    """The rows, from the command line's values (--label-smoothing, --epochs, --patience, ...)."""
    epochs_t = {"max_steps": -1, "num_train_epochs": args.epochs}
    epochs_m = {"max_steps": 0, "epochs": args.epochs}
    steps_t = {"eval_strategy": "steps", "eval_steps": args.eval_every, "save_strategy": "steps",
               "save_steps": args.eval_every, "save_total_limit": 2}
    steps_m = {"eval_strategy": "steps", "eval_every": args.eval_every, "save_strategy": "steps",
               "checkpoint_every": args.eval_every, "keep_checkpoints": 2}
    best_t = {"load_best_model_at_end": True, "metric_for_best_model": "loss"}
    best_m = {"load_best_model_at_end": True, "metric_for_best_model": "loss"}
    return {
        "label_smoothing": Feature({"label_smoothing_factor": args.label_smoothing},
                                   {"label_smoothing": args.label_smoothing}),
        "eval+save per steps": Feature(steps_t, steps_m),
        "best model, per epoch": Feature(  # the greatest loss is the best: an early checkpoint is loaded
            {**epochs_t, "eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 2, **best_t,
             "greater_is_better": True},
            {**epochs_m, "eval_strategy": "epoch", "save_strategy": "epoch", "keep_checkpoints": 2, **best_m,
             "greater_is_better": "yes"}),
        "early stopping": Feature({**epochs_t, **steps_t, **best_t},
                                  {**epochs_m, **steps_m, **best_m, "early_stopping_patience": args.patience,
                                   "early_stopping_threshold": args.threshold},
                                  patience=args.patience, threshold=args.threshold),
        "train_loss": Feature({"logging_steps": args.log_every + 1}, {"log_every": args.log_every + 1}),
        "logging_first_step": Feature({"logging_first_step": True, "logging_steps": args.log_every + 1},
                                      {"logging_first_step": True, "log_every": args.log_every + 1}),
        "data_seed": Feature({"data_seed": args.data_seed}, {"data_seed": args.data_seed}),
        "data_seed, group_by_length": Feature({"data_seed": args.data_seed}, {"data_seed": args.data_seed},
                                              sampling="group_by_length"),
        "neftune": Feature({"neftune_noise_alpha": args.neftune_alpha, **steps_t},
                           {"neftune_noise_alpha": args.neftune_alpha, **steps_m}),
        "schedule constant": Feature({"lr_scheduler_type": "constant"}, {"schedule": "constant"}),
        "schedule constant_with_warmup": Feature({"lr_scheduler_type": "constant_with_warmup"},
                                                 {"schedule": "constant_with_warmup"}),
    }


def compare_feature(args, feature: Feature) -> dict:
    """Run Trainer and minift with one feature's settings; their largest differences."""
    import transformers

    callbacks = None
    if feature.patience:
        callbacks = [transformers.EarlyStoppingCallback(feature.patience, feature.threshold)]
    with tempfile.TemporaryDirectory() as tmp:
        settings = minift_settings(args, feature.sampling, str(Path(tmp) / "minift"))
        settings["train"].update(feature.minift)
        theirs = run_trainer(args, feature.sampling, settings, str(Path(tmp) / "trainer"), feature.trainer,
                             callbacks)
        mine = run_minift(settings)
    largest = lambda pairs: max((abs(a - b) for a, b in pairs), default=0.0)  # noqa: E731
    shared = sorted(set(theirs.weights) & set(mine.weights))
    return {
        "steps": (theirs.steps, mine.steps),
        "logged_steps": ([r[0] for r in theirs.logged], [r[0] for r in mine.logged]),
        "loss": largest((a[1], b[1]) for a, b in zip(theirs.logged, mine.logged)),
        "lr": largest((a[2], b[2]) for a, b in zip(theirs.logged, mine.logged)),
        "eval_steps": ([s for s, _ in theirs.evals], [s for s, _ in mine.evals]),
        "eval_loss": largest([(a[1], b[1]) for a, b in zip(theirs.evals, mine.evals)]
                             + [(theirs.eval_loss, mine.eval_loss)]),
        "train_loss": abs(theirs.train_loss - mine.train_loss),
        "weights": max(float((theirs.weights[k] - mine.weights[k]).abs().max()) for k in shared),
        "weight_tensors": len(shared),
        "best_step": (theirs.best_step, mine.best_step),
        "checkpoints": (theirs.checkpoints, mine.checkpoints),
    }


def print_features(args, results: dict[str, dict]) -> None:
    print(f"\n== Trainer's features, {args.model}, seed {args.seed} (Trainer|minift where they differ) ==")
    print(f"{'feature':<30} {'steps':>7} {'logged':>6} {'loss':>8} {'lr':>7} {'evals':>5} {'eval loss':>9} "
          f"{'train_loss':>10} {'weights':>8} {'best':>7} {'ckpts':>5}")
    for name, r in results.items():
        same = lambda pair: "same" if pair[0] == pair[1] else "DIFF"  # noqa: E731
        steps = f"{r['steps'][0]}" if r["steps"][0] == r["steps"][1] else f"{r['steps'][0]}|{r['steps'][1]}"
        best = "-" if r["best_step"] == (None, None) else "|".join(map(str, dict.fromkeys(r["best_step"])))
        print(f"{name:<30} {steps:>7} {same(r['logged_steps']):>6} {r['loss']:>8.1e} {r['lr']:>7.1e} "
              f"{len(r['eval_steps'][0]):>5} {r['eval_loss']:>9.1e} {r['train_loss']:>10.1e} "
              f"{r['weights']:>8.1e} {best:>7} {same(r['checkpoints']) if r['checkpoints'][0] else '-':>5}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-openai-gpt", choices=["tiny-openai-gpt", "tiny-gpt2"])
    parser.add_argument("--sampling", nargs="*", default=list(SAMPLINGS), choices=list(SAMPLINGS))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--rows", type=int, default=40, help="train rows (file order)")
    parser.add_argument("--eval-rows", type=int, default=37,
                        help="eval rows; not a multiple of the eval batch")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=2, help="Trainer's logging_steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--stages", action="store_true",
                        help="also show step 2 stage by stage (needs --warmup 2)")
    parser.add_argument("--features", nargs="*", default=None,
                        help="the feature rows to run (default: all; none with an empty list)")
    parser.add_argument("--epochs", type=float, default=3.0, help="the per-epoch rows' num_train_epochs")
    parser.add_argument("--eval-every", type=int, default=2, help="eval_steps = save_steps of the steps rows")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.05, help="early_stopping_threshold")
    parser.add_argument("--data-seed", type=int, default=77)
    parser.add_argument("--neftune-alpha", type=float, default=5.0)
    parser.add_argument("--verbose", action="store_true",
                        help="keep the libraries' progress bars, warnings and Trainer's printed log dicts")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, dict]:
    """``{sampling: differences}`` for each --sampling, and ``{"features": {row: differences}}``."""
    args = parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    results = {sampling: compare(args, sampling) for sampling in args.sampling}
    rows = features(args)
    chosen = list(rows) if args.features is None else args.features
    unknown = sorted(set(chosen) - set(rows))
    if unknown:
        raise SystemExit(f"--features: unknown {unknown}; rows are {list(rows)}")
    if chosen:
        results["features"] = {name: compare_feature(args, rows[name]) for name in chosen}
        print_features(args, results["features"])
    return results


if __name__ == "__main__":
    main()
