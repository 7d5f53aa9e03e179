"""Train transformers' Trainer and minift (``train.compat = "trainer"``) side by side and print
both columns: every logged loss, learning rate and grad-norm, the final eval loss, and the
largest difference between the two sets of final weights.

    python3 benchmarks/trainer_side_by_side.py                       # tiny GPT-1, both samplers
    python3 benchmarks/trainer_side_by_side.py --model tiny-gpt2 --seed 7 --steps 9 --log-every 3
    python3 benchmarks/trainer_side_by_side.py --sampling random --stages   # + step 2, stage by stage
    python3 benchmarks/trainer_side_by_side.py --verbose   # with the libraries' progress bars and logs

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
    micro_steps: list[tuple[int, tuple, int, float]] = field(default_factory=list)  # Trainer: per training_step


def minift_settings(args, sampling: str, output_dir: str) -> dict:
    """The run as minift TOML tables (what a learner would write)."""
    fixture = shared_dir() / "fixtures" / args.model
    return {
        "model": {"name": str(fixture), "config": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}},
        "data": {"source": str(shared_dir() / "data" / "tweet_sentiment_extraction"), "sampler": SAMPLINGS[sampling],
                 "max_train_examples": args.rows, "max_length": 64, "append_eos": "no"},
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
    finetune.run(cfg, log=lambda *_: None)
    out = Path(cfg.train.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cols = Columns(logged=[(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in records if "step_time" in r])
    last_eval = [r["eval"] for r in records if "eval" in r][-1]
    cols.eval_loss = last_eval["loss"]
    cols.eval_loss_per_target = math.log(last_eval["perplexity"])  # perplexity stays exp(mean CE per target)
    cols.weights = load_file(str(out / "model" / "model.safetensors"))
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


def run_trainer(args, sampling: str, settings: dict, output_dir: str) -> Columns:
    import transformers

    fixture = shared_dir() / "fixtures" / args.model
    tok = transformers.AutoTokenizer.from_pretrained(str(fixture))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-2: pad with EOS, as minift's model.pad_token = "auto" does
    model = transformers.AutoModelForCausalLM.from_pretrained(str(fixture), resid_pdrop=0.0, embd_pdrop=0.0,
                                                              attn_pdrop=0.0)
    train, evaluation = trainer_examples(settings)
    training_args = transformers.TrainingArguments(
        output_dir=output_dir, seed=args.seed, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, logging_steps=args.log_every, per_device_eval_batch_size=args.eval_batch_size,
        train_sampling_strategy=sampling, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True)
    micro_steps = []

    class RecordingTrainer(transformers.Trainer):
        """Trainer, recording what each ``training_step`` got and returned (for --stages)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            micro_steps.append((self.state.global_step + 1, tuple(inputs["input_ids"].shape),
                                int(num_items_in_batch), float(loss)))
            return loss

    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                                   data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False))
    if not args.verbose:
        trainer.remove_callback(transformers.PrinterCallback)  # its log dicts would split the tables
    trainer.train()
    cols = Columns(logged=[(h["step"], h["loss"], h["learning_rate"], h["grad_norm"])
                           for h in trainer.state.log_history if "loss" in h])
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
            "n_targets": sum(b["n_loss_targets"] for b in batches), "first_tokens": sum(len(b) for b in window),
            "micro_losses": micro_losses, "step_loss": sum(loss for _, loss in micro_losses),
            "grad_norm": float(norm), "lr": optimizer.param_groups[0]["lr"]}


def minift_stages(numbers: dict) -> list[str]:
    """``minift_stage_numbers`` as the lines --stages prints."""
    lines = [f"sampler: micro-batches {numbers['window']} (lengths {numbers['lengths']})",
             (f"num_items_in_batch = {numbers['n_items']} counted labels ({numbers['n_targets']} "
              f"next-token targets + {numbers['first_tokens']} first tokens)")]
    lines += [f"micro-batch {shape}: loss_sum / {numbers['n_items']} = {loss:.7f}"
              for shape, loss in numbers["micro_losses"]]
    lines.append(f"step loss = {numbers['step_loss']:.7f}; grad-norm before clipping {numbers['grad_norm']:.7f}; "
                 f"lr {numbers['lr']:.6g}")
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
        "eval_loss": abs(theirs.eval_loss - mine.eval_loss), "weights": weight_diff, "weight_tensors": len(shared),
    }
    if stages:
        print_stages(theirs, stages, step=2)
    print(f"eval loss: Trainer {theirs.eval_loss:.7f}, minift {mine.eval_loss:.7f} (minift's own formula, "
          f"mean CE per next-token target: {mine.eval_loss_per_target:.7f})")
    print(f"largest difference: loss {result['loss']:.2e}, lr {result['lr']:.1e}, grad-norm (relative) "
          f"{result['grad_norm']:.1e}, eval loss {result['eval_loss']:.2e}, "
          f"final weights {weight_diff:.2e} over {len(shared)} tensors")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-openai-gpt", choices=["tiny-openai-gpt", "tiny-gpt2"])
    parser.add_argument("--sampling", nargs="+", default=list(SAMPLINGS), choices=list(SAMPLINGS))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--rows", type=int, default=40, help="train rows (file order)")
    parser.add_argument("--eval-rows", type=int, default=37, help="eval rows; not a multiple of the eval batch")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=2, help="Trainer's logging_steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--stages", action="store_true", help="also show step 2 stage by stage (needs --warmup 2)")
    parser.add_argument("--verbose", action="store_true",
                        help="keep the libraries' progress bars, warnings and Trainer's printed log dicts")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, dict]:
    args = parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    return {sampling: compare(args, sampling) for sampling in args.sampling}


if __name__ == "__main__":
    main()
