"""DPO and reward-model steps, minift next to TRL, and minift's reference lever (frozen copy vs
log-probs precomputed once), on the same model shape and the same tweet pairs.

    python3 benchmarks/preference.py                 # every contender, each in a fresh process
    python3 benchmarks/preference.py --contender minift-dpo-frozen   # one (prints a JSON line)

Each contender runs in its own process so its peak resident memory (VmHWM; on CUDA
max_memory_allocated) is its own; in-process timing per optimizer step, first steps excluded as
warm-up. Tokens/s counts real (non-pad) tokens of chosen and rejected rows. Same pairs, same order
(sequential), same batch for every contender: a random GPT-1-shaped model (GPT-1 vocabulary,
--layers/--width), dropout 0, fp32, AdamW. Precomputation time is reported apart (it is paid once).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTENDERS = ("minift-dpo-frozen", "minift-dpo-precomputed", "trl-dpo-frozen", "trl-dpo-precomputed",
              "minift-reward", "trl-reward")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # this process's peak RSS (ru_maxrss is inherited across exec)
            return int(line.split()[1]) / 1024
    return float("nan")


def build(args, device):
    """Tokenizer, pairs (first N train tweets), a random model of the asked shape saved to disk."""
    import datasets

    from minift.data import DEFAULT_LABELS, DEFAULT_TEMPLATE
    from minift.models import GPTConfig, build_model
    from minift.preference.pairs import tokenize_pairs, tweet_pairs
    from minift.tokenizer import ensure_pad_token, load_tokenizer

    shared = Path(args.shared)
    tokenizer = ensure_pad_token(load_tokenizer(shared / "fixtures" / "tiny-openai-gpt"))
    rows = datasets.load_dataset("json", data_files=str(shared / "data" / "tweet_sentiment_extraction"
                                                        / "train.jsonl"),
                                 split="train").select(range(args.pairs + 10))
    pairs = tweet_pairs(rows, "train", DEFAULT_TEMPLATE, DEFAULT_LABELS, "one", 0)
    tokenized, _ = tokenize_pairs(pairs, tokenizer, 128)
    tokenized.truncate(args.pairs)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=128, n_embd=args.width,
                       n_layer=args.layers, n_head=max(1, args.width // 64), resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0)
    lm = build_model(config)
    model_dir = Path(args.work_dir) / f"model-{args.layers}x{args.width}"
    if not (model_dir / "model.safetensors").exists():
        lm.save_pretrained(model_dir)
        tokenizer.save(model_dir)
    return tokenizer, tokenized, lm.to(device), model_dir


def step_tokens(pairs, collator, batch_size: int, steps: int) -> list[int]:
    return [collator([pairs[i] for i in range(s * batch_size, (s + 1) * batch_size)])["n_real_tokens"]
            for s in range(steps)]


def run_minift(name: str, args, device) -> dict:
    from minift.loop import train
    from minift.optim import make_adamw, make_scheduler
    from minift.preference.dpo import DPOObjective, SequenceLogProbs, precompute_reference_logps
    from minift.preference.pairs import PairCollator, pair_batches
    from minift.preference.reward import RewardModel, reward_loss
    from minift.sampling import SequentialSampler

    tokenizer, pairs, lm, _ = build(args, device)
    collator = PairCollator(tokenizer.pad_id)
    precompute_s = 0.0
    if name == "minift-reward":
        module, compute_loss = RewardModel(lm, tokenizer.pad_id), reward_loss
    else:
        module = SequenceLogProbs(lm)
        if name.endswith("frozen"):
            compute_loss = DPOObjective(
                reference=SequenceLogProbs(copy.deepcopy(lm)).eval().requires_grad_(False))
        else:
            t0 = time.perf_counter()
            logps = precompute_reference_logps(module, pair_batches(pairs, collator, args.batch_size),
                                               len(pairs), device, torch.autocast(device.type, enabled=False))
            precompute_s = time.perf_counter() - t0
            compute_loss = DPOObjective(reference_logps=logps)
    optimizer = make_adamw(module, 1e-5, 0.0, fused="no")
    records: list[dict] = []
    train(module, optimizer, make_scheduler(optimizer, "constant", args.steps),
          SequentialSampler(len(pairs), args.batch_size),
          lambda s: torch.utils.data.DataLoader(pairs, batch_sampler=s, collate_fn=collator),
          total_steps=args.steps, grad_accum=1, device=device, count_key="n_pairs", log=records.append,
          compute_loss=compute_loss)
    times = [r["step_time"] for r in records[args.warmup:]]
    tokens = [r["real_tokens"] for r in records[args.warmup:]]
    return {"contender": name, "tokens_per_s": sum(tokens) / sum(times),
            "median_step_s": statistics.median(times), "precompute_s": precompute_s,
            "peak_mb": peak_memory_mb(device), "loss_first": records[0]["loss"]}


def run_trl(name: str, args, device) -> dict:
    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from minift.preference.pairs import PairCollator

    tokenizer, pairs, _, model_dir = build(args, torch.device("cpu"))
    tokens = step_tokens(pairs, PairCollator(tokenizer.pad_id), args.batch_size, args.steps)
    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t0)

    common = dict(output_dir=str(Path(args.work_dir) / name), per_device_train_batch_size=args.batch_size,
                  gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=1e-5,
                  lr_scheduler_type="constant", optim="adamw_torch", logging_steps=1, report_to="none",
                  save_strategy="no", use_cpu=device.type == "cpu", train_sampling_strategy="sequential",
                  disable_dropout=True, gradient_checkpointing=False, bf16=False, dataloader_num_workers=0)
    t_pre = 0.0
    if name.startswith("trl-dpo"):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        data = datasets.Dataset.from_dict({"prompt_ids": pairs.prompt_ids, "chosen_ids": pairs.chosen_ids,
                                           "rejected_ids": pairs.rejected_ids})

        class PreTokenized(DPOTrainer):  # the ids are minift's: same tokens for every contender
            def _prepare_dataset(self, dataset, *a, **k):
                return dataset

        t0 = time.perf_counter()
        trainer = PreTokenized(model=model, args=DPOConfig(**common, max_length=128,
                                                           precompute_ref_log_probs=name.endswith("precomputed")),
                               train_dataset=data, processing_class=hf_tokenizer, callbacks=[StepTimer()])
        t_pre = time.perf_counter() - t0 if name.endswith("precomputed") else 0.0
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
        data = datasets.Dataset.from_dict({"chosen_ids": [p + c for p, c in zip(pairs.prompt_ids,
                                                                                pairs.chosen_ids)],
                                           "rejected_ids": [p + r for p, r in zip(pairs.prompt_ids,
                                                                                  pairs.rejected_ids)]})
        trainer = RewardTrainer(model=model, args=RewardConfig(**common, max_length=128), train_dataset=data,
                                processing_class=hf_tokenizer, callbacks=[StepTimer()])
    trainer.train()
    times, timed_tokens = step_times[args.warmup:], tokens[args.warmup:]
    return {"contender": name, "tokens_per_s": sum(timed_tokens) / sum(times),
            "median_step_s": statistics.median(times),
            "precompute_s": t_pre, "peak_mb": peak_memory_mb(device),
            "loss_first": next(r["loss"] for r in trainer.state.log_history if "loss" in r)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contender", choices=CONTENDERS)
    parser.add_argument("--only", default="", help="comma-separated contenders (default: all)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (2x rows)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--shared", default=os.environ.get("MINIFT_SHARED", str(REPO.parent / "shared")))
    parser.add_argument("--work-dir", default="runs/bench-preference")
    args = parser.parse_args(argv)
    args.steps = min(args.steps, args.pairs // args.batch_size)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.contender:
        result = (run_trl if args.contender.startswith("trl") else run_minift)(args.contender, args, device)
        print(json.dumps({**result, "device": str(device), "shape": f"{args.layers}x{args.width}",
                          "pairs_per_step": args.batch_size, "timed_steps": args.steps - args.warmup}))
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--only")]
    rows = []
    for name in (args.only.split(",") if args.only else CONTENDERS):
        out = subprocess.run([sys.executable, __file__, "--contender", name, *forwarded], capture_output=True,
                             text=True)
        line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("{")), None)
        if out.returncode or line is None:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line))
    print("| contender | tokens/s | median step (s) | precompute (s, once) | peak memory (MiB) | "
          "first loss |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['contender']} | {r['tokens_per_s']:.0f} | {r['median_step_s']:.3f} | "
              f"{r['precompute_s']:.2f} | {r['peak_mb']:.0f} | {r['loss_first']:.4f} |")
    if rows:
        print(f"\ndevice {rows[0]['device']}, model {rows[0]['shape']} (layers x width), "
              f"{rows[0]['pairs_per_step']} pairs/step, {rows[0]['timed_steps']} timed steps after "
              f"{args.warmup} warm-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
