"""Generation speed: minift's batched KV-cache sampler (``minift.rl.generation``, what the RL step
samples completions with) beside transformers' ``generate`` on the same model, batch and lengths.

    python benchmarks/generation.py                                  # CPU, small sizes (about a minute)
    python benchmarks/generation.py --device cuda --dtype bf16 --batch-size 64 --max-new-tokens 128

Both contenders get the same weights (a transformers model with random init, saved and loaded by minift;
or a fixture / checkpoint folder), the same left-padded prompts (the first tweets of the shared data,
``"{text} sentiment:"``), and sample with the settings TRL's ``GRPOTrainer`` passes (temperature 1, no
top-k/top-p, the KV cache). No EOS stops a row, so both draw exactly batch x max-new-tokens tokens.
They run in one process, interleaved round by round (minift, transformers, minift, ...), after one
untimed call each; the table gives median seconds and new tokens per second. "same tokens": whether
both drew identical tokens from the same seed (expected on CPU in fp32; kernels may differ elsewhere).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from minift.data import format_prompt
from minift.hub import from_pretrained
from minift.rl.generation import SamplingSettings, generate_completions, new_generator
from minift.runtime import pick_device
from minift.tokenizer import load_tokenizer

from harness import device_sync, shared_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPT2_SMALL = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
TEMPLATE = "{text} sentiment: {label}"


def random_gpt2_small(directory: Path) -> Path:
    """GPT-2 small's shape with transformers' random init (weights do not change speed), saved."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**GPT2_SMALL)).save_pretrained(directory)
    load_tokenizer(shared_dir() / "tokenizers" / "gpt2").save(directory)
    return directory


def model_folders(names: list[str], scratch: Path) -> dict[str, Path]:
    folders = {}
    for name in names:
        if name == "gpt2-small":
            folders[name] = random_gpt2_small(scratch / name)
        elif (shared_dir() / "fixtures" / name).is_dir():
            folders[name] = shared_dir() / "fixtures" / name
        else:
            folders[name] = Path(name)
    return folders


def tweet_prompts(tokenizer, n: int, max_tokens: int) -> list[list[int]]:
    """The first ``n`` test tweets as prompt ids that leave room for the new tokens."""
    lines = (shared_dir() / "data" / "tweet_sentiment_extraction" / "test.jsonl").read_text().splitlines()
    prompts = []
    for row in map(json.loads, lines):
        if row["text"].strip():
            ids = tokenizer.encode(format_prompt(row["text"], TEMPLATE))
            if len(ids) <= max_tokens:
                prompts.append(ids)
        if len(prompts) == n:
            return prompts
    raise SystemExit(f"only {len(prompts)} tweets fit {max_tokens} prompt tokens")


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def contenders(folder: Path, args, device, dtype):
    """The two generate calls on the same weights, each returning the new tokens [B, N] on the CPU."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(folder)
    ours = from_pretrained(folder).to(device=device, dtype=dtype).eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    new_tokens = args.max_new_tokens
    prompts = tweet_prompts(tokenizer, args.batch_size, ours.config.n_positions - new_tokens)
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    settings = SamplingSettings(max_completion_length=new_tokens, temperature=1.0)
    ids, mask = left_padded(prompts, pad_id, device)

    def minift_generate(seed: int) -> torch.Tensor:
        out = generate_completions(ours, prompts, settings, eos_ids=[], pad_id=pad_id,
                                   generator=new_generator(seed, device))
        return out.ids

    def transformers_generate(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=pad_id, eos_token_id=None, use_cache=True)
        return out[:, ids.shape[1]:].cpu()

    lengths = [len(p) for p in prompts]
    return {"minift": minift_generate, "transformers": transformers_generate}, lengths


def measure(name: str, folder: Path, args, device, dtype) -> dict:
    calls, lengths = contenders(folder, args, device, dtype)
    sync = device_sync(device)
    tokens = {who: call(args.seed) for who, call in calls.items()}  # untimed: warm-up, and the same draws?
    times: dict[str, list[float]] = {who: [] for who in calls}
    for round_index in range(args.rounds):
        for who, call in calls.items():
            sync()
            start = time.perf_counter()
            call(args.seed + 1 + round_index)
            sync()
            times[who].append(time.perf_counter() - start)
    new = args.batch_size * args.max_new_tokens
    medians = {who: statistics.median(t) for who, t in times.items()}
    return {"model": name, "device": str(device), "dtype": args.dtype, "batch": args.batch_size,
            "prompt_tokens_mean": statistics.mean(lengths), "prompt_tokens_max": max(lengths),
            "new_tokens": args.max_new_tokens, "rounds": args.rounds, "times_s": times,
            "median_s": medians, "tokens_per_s": {who: new / t for who, t in medians.items()},
            "same_tokens": bool(torch.equal(tokens["minift"].cpu(), tokens["transformers"].cpu()))}


def table(records: list[dict]) -> str:
    lines = [("| model | device, dtype | batch | prompt tokens (mean / max) | new tokens | minift s | "
              "transformers s | minift tok/s | transformers tok/s | minift / transformers | same tokens |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ours, theirs = r["tokens_per_s"]["minift"], r["tokens_per_s"]["transformers"]
        lines.append(f"| {r['model']} | {r['device']}, {r['dtype']} | {r['batch']} | "
                     f"{r['prompt_tokens_mean']:.1f} / {r['prompt_tokens_max']} | {r['new_tokens']} | "
                     f"{r['median_s']['minift']:.3f} | {r['median_s']['transformers']:.3f} | {ours:.0f} | "
                     f"{theirs:.0f} | {ours / theirs:.2f}x | {'yes' if r['same_tokens'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "tiny-gpt2", "tiny-openai-gpt"],
                        help="gpt2-small (random init), a fixture name, or a checkpoint folder")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda", "auto"')
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per contender, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--out", help="also write the records as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {device}, {args.dtype}, {torch.get_num_threads()} threads",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        folders = model_folders(args.models, Path(scratch))
        records = [measure(name, folder, args, device, dtype) for name, folder in folders.items()]
    print(table(records))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
