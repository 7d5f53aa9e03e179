"""A GRPO optimizer step of minift beside TRL's GRPOTrainer: same model shape, prompts, reward and batch,
each contender in a fresh process, contenders interleaved over rounds, the step split into phases.

    python3 benchmarks/rl_step.py                          # both contenders, 2 interleaved rounds
    python3 benchmarks/rl_step.py --device cuda --precision bf16 --layers 12 --width 768
    python3 benchmarks/rl_step.py --contender minift       # one (prints a JSON line)

The setup: a random GPT-2-shaped model (--layers x --width, the GPT-2 vocabulary, dropout 0) saved in the
transformers layout, the first train tweets as prompts "{text} sentiment:" with their gold label, the label
rule as the reward (the same function on both sides: ``minift.rl.rewards.label_match`` with TRL's
signature), --per-device completions per micro-batch, --grad-accum micro-batches per step,
--num-generations per prompt, completions of at most --max-completion-length tokens (a random model
rarely stops early: both sides generate about that many), beta 0 (no reference), one update per round.
Each process runs --warmup + --steps optimizer steps; the timed steps' medians are reported.

Phases (seconds per optimizer step): generate (sampling), reward, logps (the rest of making the round:
layout, old / reference log-probs when needed, advantages), fwd+bwd (the policy's forward and backward),
optimizer (clip, AdamW, schedule, zero_grad; for TRL everything outside its ``training_step``s). minift
logs them in metrics.jsonl; TRL's are measured around its own methods (``_generate``,
``_calculate_rewards``, ``_generate_and_score_completions``, ``training_step``, the step callbacks).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTENDERS = ("minift", "trl")
PHASES = ("generate", "reward", "logps", "fwd+bwd", "optimizer", "step")


def prepare(args) -> tuple[Path, Path]:
    """The random model (saved once per shape) and the prompts file (prompt, label)."""
    import torch

    from minift.models import GPT2Config, build_model
    from minift.tokenizer import load_tokenizer

    work = Path(args.work_dir)
    model_dir = work / f"gpt2-{args.layers}x{args.width}"
    if not (model_dir / "model.safetensors").exists():
        tokenizer = load_tokenizer(Path(args.shared) / "tokenizers" / "gpt2")
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=128, n_embd=args.width,
                            n_layer=args.layers, n_head=max(1, args.width // 64), resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        build_model(config).save_pretrained(model_dir)
        tokenizer.save(model_dir)
    prompts = work / "prompts.jsonl"
    if not prompts.exists():
        source = Path(args.shared) / "data" / "tweet_sentiment_extraction" / "train.jsonl"
        lines = []
        for row in map(json.loads, source.read_text().splitlines()):
            if row["text"].strip() and len(row["text"]) < 120:
                prompt = f"{row['text'].strip()} sentiment:"
                lines.append(json.dumps({"prompt": prompt, "label": row["label_text"]}))
            if len(lines) == 512:
                break
        prompts.write_text("\n".join(lines) + "\n")
    return model_dir, prompts


def run_minift(args, model_dir: Path, prompts: Path) -> dict:
    """The recipe itself (``minift grpo`` in this process); phases from its metrics.jsonl."""
    from minift.rl.recipe import load_rl_config, run_rl

    out = Path(tempfile.mkdtemp(prefix="rl-step-minift-"))
    cfg = load_rl_config(None, [
        f'model.name="{model_dir}"', f'train.output_dir="{out}"',
        f"train.max_steps={args.warmup + args.steps}",
        f"train.batch_size={args.per_device}", f"train.grad_accum={args.grad_accum}", "train.lr=1e-6",
        'train.schedule="constant"', f'train.device="{args.device}"', f'train.precision="{args.precision}"',
        f"train.threads={args.threads}", "train.progress=false", "train.plot=false",
        "eval.before_training=false", f"rl.num_generations={args.num_generations}",
        f"rl.max_completion_length={args.max_completion_length}", f'rl.prompts="{prompts}"',
        'rl.reward_funcs=["label_match"]'], "grpo")
    run_rl(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_time" in r][args.warmup:]
    phases = {"generate": [r.get("generate_time", 0.0) for r in timed],
              "reward": [r.get("reward_time", 0.0) for r in timed],
              "logps": [r["data_time"] - r.get("generate_time", 0.0) - r.get("reward_time", 0.0)
                        for r in timed],
              "fwd+bwd": [r["forward_time"] + r["backward_time"] for r in timed],
              "optimizer": [r["optimizer_time"] for r in timed], "step": [r["step_time"] for r in timed]}
    tokens = [r["real_tokens"] for r in timed]
    return summarize("minift", phases, tokens, out)


def run_trl(args, model_dir: Path, prompts: Path) -> dict:
    """TRL's GRPOTrainer with the same settings; its phases timed around its own methods."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from minift.rl.rewards import label_match

    out = tempfile.mkdtemp(prefix="rl-step-trl-")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.per_device,
                        gradient_accumulation_steps=args.grad_accum, num_generations=args.num_generations,
                        max_completion_length=args.max_completion_length, max_steps=args.warmup + args.steps,
                        learning_rate=1e-6, lr_scheduler_type="constant", logging_steps=1, report_to="none",
                        save_strategy="no", use_cpu=args.device == "cpu", bf16=args.precision == "bf16",
                        gradient_checkpointing=False, disable_dropout=True, dataloader_num_workers=0, seed=0)
    dataset = datasets.load_dataset("json", data_files=str(prompts), split="train")
    trainer = GRPOTrainer(model=model, reward_funcs=[label_match], args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    spent: dict[str, float] = {"generate": 0.0, "reward": 0.0, "round": 0.0, "training_step": 0.0}

    def timed(name, function):
        def wrapper(*a, **k):
            sync(args.device)
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                sync(args.device)
                spent[name] += time.perf_counter() - start
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("round", trainer._generate_and_score_completions)
    trainer.training_step = timed("training_step", trainer.training_step)
    phases: dict[str, list[float]] = {p: [] for p in PHASES}

    class Steps(TrainerCallback):
        def on_step_begin(self, *_, **__):
            sync(args.device)
            self.start, self.before = time.perf_counter(), dict(spent)

        def on_step_end(self, *_, **__):
            sync(args.device)
            d = {k: spent[k] - self.before[k] for k in spent}
            total = time.perf_counter() - self.start
            phases["generate"].append(d["generate"])
            phases["reward"].append(d["reward"])
            phases["logps"].append(d["round"] - d["generate"] - d["reward"])
            phases["fwd+bwd"].append(d["training_step"] - d["round"])
            phases["optimizer"].append(total - d["training_step"])
            phases["step"].append(total)

    trainer.add_callback(Steps())
    trainer.train()
    phases = {k: v[args.warmup:] for k, v in phases.items()}
    logs = [r for r in trainer.state.log_history if "loss" in r and "train_loss" not in r][args.warmup:]
    tokens = [r.get("num_tokens", 0) for r in logs]
    tokens = [b - a for a, b in zip([0, *tokens], tokens)] if tokens else []
    return summarize("trl", phases, tokens, Path(out))


def sync(device: str) -> None:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(name: str, phases: dict[str, list[float]], tokens: list[int], out: Path) -> dict:
    medians = {k: statistics.median(v) for k, v in phases.items()}
    return {"contender": name, **medians, "steps": len(phases["step"]), "peak_memory_mb": peak_memory_mb(),
            "tokens_per_step": statistics.median(tokens) if tokens else None, "out": str(out)}


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir, prompts = prepare(args)
    result = (run_minift if args.contender == "minift" else run_trl)(args, model_dir, prompts)
    print(json.dumps(result))
    return 0


def table(results: list[dict]) -> str:
    lines = ["| contender | " + " | ".join(f"{p} s" for p in PHASES) + " | vs TRL | peak MB |",
             "|---|" + "---|" * (len(PHASES) + 2)]
    by = {c: [r for r in results if r["contender"] == c] for c in CONTENDERS}
    med = {c: {p: statistics.median(r[p] for r in rs) for p in (*PHASES, "peak_memory_mb")}
           for c, rs in by.items() if rs}
    for c, m in med.items():
        ratio = med["trl"]["step"] / m["step"] if "trl" in med else float("nan")
        lines.append(f"| {c} | " + " | ".join(f"{m[p]:.3f}" for p in PHASES) + f" | {ratio:.2f}x | "
                     f"{m['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contender", choices=CONTENDERS)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of fresh processes")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--per-device", type=int, default=8, help="completions per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--shared", default=os.environ.get("MINIFT_SHARED", str(REPO.parent / "shared")))
    parser.add_argument("--work-dir", default="runs/bench-rl-step")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.contender:
        return one(args)
    prepare(args)  # once, before the timed processes
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for round_index in range(args.rounds):
        for contender in (CONTENDERS if round_index % 2 == 0 else CONTENDERS[::-1]):
            command = [sys.executable, str(Path(__file__).resolve()), *passed, "--contender", contender]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            if done.returncode:
                raise SystemExit(f"{contender} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1} {contender}: step {results[-1]['step']:.3f} s", flush=True)
    text = table(results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python3 benchmarks/rl_step.py " + " ".join(passed)
    record = {"args": vars(args), "results": results}
    (out / f"rl-step-{args.device}-{stamp}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"rl-step-{args.device}-{stamp}.md").write_text(f"`{command.strip()}`\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
