"""The benchmark harness: contenders, timing, MFU, peak memory, the report. Outside the library.

What is measured: the recipe's own wiring (``minift.finetune``'s ``build_*`` functions and
``loop.train``, as ``minift train`` runs them) on the full openai-gpt (or gpt2) shape, random init
(weights do not change speed), the real tweets formatted as in training, a seeded sample order, a
fixed number of sequences per optimizer step, warm-up steps excluded. Every contender runs in one
process, interleaved round by round (A B C ... A B C ...) so the machine's drift hits all alike;
the timed steps of all rounds are pooled. MFU = 6 N (real tokens/s) / peak, the peak measured on
the spot with a large GEMM (or the vendor's figure for known GPUs). Peak memory: CUDA's
``max_memory_allocated``; on CPU the peak resident set of a fresh process running that contender
alone (a long-lived process's resident set only grows).

``--model-type llama``: a Llama-shaped decoder of a real checkpoint's shape (``--shape``, ``LLAMA_SHAPES``:
SmolLM2-135M, or a ~0.5B Llama), the GPT-2 BPE standing in for its tokenizer. Its FLOPs per token
are counted matrix by matrix (``DecoderConfig.flops_per_token``: GQA's narrower k/v projections,
SwiGLU's three MLP matrices, the LM head), not 6 N.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from minift.components import (
    build_loader,
    build_model,
    build_optimizer,
    build_sampler,
    build_scheduler,
    build_tokenizer,
    wrap_for_training,
)
from minift.config import load_config
from minift.distributed import SINGLE_PROCESS
from minift.finetune import build_collator, build_datasets, build_loss
from minift.loop import Hooks, train
from minift.metrics import throughput
from minift.precision import Precision
from minift.runtime import high_water_rss, peak_memory_bytes, pick_device, setup_process

REPO = Path(__file__).resolve().parents[1]
# dense bf16 / fp32 peak FLOP/s of known accelerators (vendor figures, no sparsity)
KNOWN_PEAKS = {"H100": {"bf16": 989e12, "fp32": 67e12}, "H200": {"bf16": 989e12, "fp32": 67e12},
               "A100": {"bf16": 312e12, "fp32": 19.5e12}}
# Llama-shaped benchmark models (random init; speed does not depend on the weights). The tokenizer is the
# GPT-2 BPE (50,257 ids; SmolLM2's own has 49,152: the LM head's GEMM is 2 % wider).
LLAMA_SHAPES = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
                     "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "llama-0.5b": {"hidden_size": 1280, "intermediate_size": 3584, "num_hidden_layers": 24,
                   "num_attention_heads": 20, "num_key_value_heads": 4, "max_position_embeddings": 2048,
                   "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
}
DEFAULT_SHAPE = "smollm2-135m"
TOKENIZER_OF = {"openai-gpt": "openai-gpt", "gpt2": "gpt2", "llama": "gpt2"}  # shared/tokenizers/<name>


def shared_dir() -> Path:
    """The shared material: ``$MINIFT_SHARED``, default ``../shared`` beside the repo."""
    return Path(os.environ.get("MINIFT_SHARED", REPO.parent / "shared")).expanduser()


# -- measurements -----------------------------------------------------------------------------------
def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for ``device`` (CUDA kernels run asynchronously; CPU needs nothing)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def gemm_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                    repeats: int = 9) -> float:
    """FLOP/s of the fastest of ``repeats`` n x n x n matmuls: the ceiling MFU is measured against.
    The best, not the median: on a shared machine a slow probe would inflate MFU past 100 %."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = device_sync(device)
    torch.mm(a, b)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def known_peak_flops(device: torch.device, precision: str) -> float | None:
    """The vendor's dense peak for a known GPU (``KNOWN_PEAKS``), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for model, peaks in KNOWN_PEAKS.items() if model in name), None)


@dataclass
class Row:
    """One contender's timed steps (the loop's per-step records, or the same keys from Trainer)."""

    id: str
    name: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    peak_memory: int | None = None  # bytes; None where not measured
    local_peaks: list[float] = field(default_factory=list)  # GEMM probes just before and after each round

    def add(self, other: "Row") -> None:
        """Pool another round of the same contender."""
        self.steps += other.steps
        self.local_peaks += other.local_peaks
        if other.peak_memory is not None:
            self.peak_memory = max(self.peak_memory or 0, other.peak_memory)

    def summary(self, n_params: int, peak_flops: float,
                flops_per_token: float | None = None) -> dict[str, Any]:
        """Throughput and MFU; training FLOPs per token 6 N unless ``flops_per_token`` says otherwise."""
        flops = flops_per_token or 6 * n_params
        out = {"id": self.id, "name": self.name, **throughput(self.steps)}
        out["mfu_real"] = flops * out["real_tokens_per_s"] / peak_flops
        out["mfu_padded"] = flops * out["padded_tokens_per_s"] / peak_flops
        out["peak_memory_mb"] = None if self.peak_memory is None else self.peak_memory / 2**20
        if self.local_peaks:  # against the machine's speed at the time: corrects for drift during a run
            out["local_gemm_flops"] = statistics.median(self.local_peaks)
            out["mfu_real_local"] = flops * out["real_tokens_per_s"] / out["local_gemm_flops"]
        return out


# -- minift contenders: a config override set each, run through the recipe's builders -----------------
@dataclass
class Contender:
    id: str
    name: str
    run: Callable[[argparse.Namespace, int], Row]  # (args, round index) -> the round's timed steps
    memory: bool = False  # also measure its peak memory in a fresh process (CPU)


def shape_overrides(args) -> list[str]:
    """``model.config`` of the benchmarked shape: GPT-1/GPT-2's full default shape with dropout 0 (as the
    Trainer rows), or the ``--shape`` of a Llama-shaped model (no dropout by default)."""
    if args.model_type != "llama":
        return ["model.config.resid_pdrop=0.0", "model.config.embd_pdrop=0.0", "model.config.attn_pdrop=0.0"]
    return [f"model.config.{key}={json.dumps(value)}" for key, value in LLAMA_SHAPES[args.shape].items()]


def base_config(args, overrides: list[str]):
    """The benchmark's RunConfig: random init of the full shape, the shared tweets and tokenizer,
    constant lr, dropout 0 (as the Trainer rows), ``overrides`` in ``--set`` syntax."""
    shared = shared_dir()
    return load_config(None, [
        "model.name=random", f"model.model_type={args.model_type}",
        f'model.tokenizer="{shared / "tokenizers" / TOKENIZER_OF[args.model_type]}"', *shape_overrides(args),
        f'data.source="{shared / "data" / "tweet_sentiment_extraction"}"', "data.eval_split=test",
        "train.lr=5e-5", "train.schedule=constant", f"train.precision={args.precision}",
        f"train.device={args.device}", "train.progress=false", *overrides])


@functools.lru_cache(maxsize=2)
def tokenized_tweets(model_type: str):
    """Tokenizer and training examples, once per process (every contender shares them)."""
    args = argparse.Namespace(model_type=model_type, shape=DEFAULT_SHAPE, precision="fp32", device="cpu")
    cfg = base_config(args, [])
    tokenizer = build_tokenizer(cfg)
    return tokenizer, build_datasets(cfg, tokenizer).train


def run_recipe(args, overrides: list[str], hot_path: dict | None = None, round_index: int = 0) -> list[dict]:
    """``warmup + steps`` optimizer steps wired exactly as ``minift.finetune.run`` wires them;
    returns the timed steps' records."""
    cfg = base_config(args, [f"train.max_steps={args.warmup + args.steps}", f"train.seed={round_index}",
                             *overrides])
    device = pick_device(cfg.train.device)
    setup_process(cfg.train.seed, device, args.threads, keep_allocations=not args.no_keep_large_allocations)
    tokenizer, examples = tokenized_tweets(args.model_type)
    model = build_model(cfg, tokenizer, device).set_hot_path(**(hot_path or {}))
    sampler = build_sampler(cfg, examples)
    loader = build_loader(cfg, examples, sampler, build_collator(cfg, tokenizer.pad_id), device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, cfg.train.max_steps)
    records: list[dict] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train(wrap_for_training(cfg, model, SINGLE_PROCESS), optimizer, scheduler, loader,
          total_steps=cfg.train.max_steps, grad_accum=cfg.train.grad_accum,
          max_grad_norm=cfg.train.max_grad_norm, precision=Precision(cfg.train.precision, device),
          loss=build_loss(cfg), hooks=Hooks(log=records.append))
    return records[args.warmup:]


def minift_contenders(args) -> list[Contender]:
    """The hot path first, then one lever removed at a time, all at ``--sequences-per-step``."""
    n = args.sequences_per_step
    hot = [f"train.batch_size={n}", "train.grad_accum=1", "data.sampler=length_grouped"]
    half = [f"train.batch_size={n // 2}", "train.grad_accum=2"]
    specs = [("hot", f"minift (length-grouped {n}x1, fused AdamW)", hot, None, True)]
    if args.compile:  # length-grouped: dynamic shapes; packed: one shape, one graph (CUDA graphs on a GPU)
        packed = [f"train.batch_size={n // 2}", "train.grad_accum=1", "data.sampler=packed",
                  "model.compile=true"]
        specs += [("compile", f"minift (length-grouped {n}x1, torch.compile)", hot + ["model.compile=true"],
                   None, False),
                  ("compile-packed", f"minift (packed {n // 2} rows x 128, torch.compile)", packed, None,
                   False)]
        if pick_device(args.device).type == "cuda":
            specs.append(("compile-cudagraphs",
                          f"minift (packed {n // 2} rows x 128, torch.compile reduce-overhead)",
                          packed + ["model.compile_mode=reduce-overhead"], None, False))
    if not args.quick:
        specs += [("grouped-2x", f"minift (length-grouped {n // 2}x2)",
                   half + ["data.sampler=length_grouped"], None, False),
                  ("random-2x", f"minift (random order {n // 2}x2)", half + ["data.sampler=random"],
                   None, False),
                  ("forloop-adamw", f"minift (length-grouped {n}x1, for-loop AdamW)",
                   hot + ["train.fused_adamw=no"], None, False),
                  ("unfused-head", f"minift (length-grouped {n}x1, LM head + CE unfused)",
                   hot + ["model.fused_lm_head=false"], None, False),
                  ("lm-head-all", f"minift (length-grouped {n}x1, logits at every position, unfused)", hot,
                   {"loss_rows": "all", "fused_head": False}, True),
                  ("packed", f"minift (packed {n // 2} rows x 128 tokens, static shapes)",
                   [f"train.batch_size={n // 2}", "train.grad_accum=1", "data.sampler=packed"], None, False),
                  ("eager-attention", f"minift (length-grouped {n}x1, eager attention + mask)", hot,
                   {"attention": "eager"}, False)]

    def runner(id_, name, overrides, hot_path):
        def run(args, round_index):
            if args.warm_pass:  # the same steps once untimed: every shape of the timed run seen before
                run_recipe(args, overrides, hot_path, round_index)
            row = Row(id_, name, run_recipe(args, overrides, hot_path, round_index))
            if pick_device(args.device).type == "cuda":
                row.peak_memory = peak_memory_bytes(pick_device(args.device))
            return row
        return run

    return [Contender(id_, name, runner(id_, name, overrides, hot_path), memory)
            for id_, name, overrides, hot_path, memory in specs]


def benchmarked_model(args):
    """The benchmarked model on the meta device (shapes only, no memory)."""
    tokenizer, _ = tokenized_tweets(args.model_type)
    with torch.device("meta"):
        return build_model(base_config(args, []), tokenizer, torch.device("meta"))


def n_parameters(args) -> int:
    return benchmarked_model(args).num_parameters()


def training_flops_per_token(args) -> float:
    """6 N for GPT-1/GPT-2 (as the earlier records); the Llama-shaped decoders count their matrices."""
    model = benchmarked_model(args)
    if hasattr(model.config, "flops_per_token"):
        return float(model.config.flops_per_token())
    return 6.0 * model.num_parameters()


# -- the run ------------------------------------------------------------------------------------------
def run_benchmark(args, contenders: list[Contender], memory_command: list[str] | None) -> dict[str, Any]:
    """Every contender once per round, ``args.rounds`` rounds; GEMM probes around each contender's
    round (drift check); on CPU the peak memory of ``memory`` contenders from fresh processes."""
    device = pick_device(args.device)
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    probe_n = 8192 if device.type == "cuda" else 2048  # a GPU needs a big GEMM to reach its peak
    peak_flops = gemm_peak_flops(device, dtype, n=probe_n)
    rows: dict[str, Row] = {}
    for round_index in range(args.rounds):
        for contender in contenders:
            probe_before = gemm_peak_flops(device, dtype, repeats=5)
            row = contender.run(args, round_index)
            row.local_peaks = [probe_before, gemm_peak_flops(device, dtype, repeats=5)]
            rows.setdefault(contender.id, Row(contender.id, contender.name)).add(row)
    if device.type == "cpu" and memory_command:
        for contender in contenders:
            if contender.memory:
                rows[contender.id].peak_memory = peak_memory_in_fresh_process(memory_command, contender.id)
    probe_flops = max(peak_flops, gemm_peak_flops(device, dtype, n=probe_n))
    peak_flops, peak_source = probe_flops, f"GEMM probe ({probe_n}^3)"
    if known_peak_flops(device, args.precision):  # MFU against the vendor's figure on a known GPU
        peak_flops, peak_source = known_peak_flops(device, args.precision), "vendor table"
    n_params, flops = n_parameters(args), training_flops_per_token(args)
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device_name(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "model_type": args.model_type,
            "shape": args.shape if args.model_type == "llama" else None,
            "n_params": n_params, "flops_per_token": flops, "precision": args.precision,
            "peak_gemm_flops": peak_flops, "peak_source": peak_source, "probe_gemm_flops": probe_flops,
            "ceiling_real_tokens_per_s": peak_flops / flops,
            "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
            "runs": [row.summary(n_params, peak_flops, flops) for row in rows.values()]}


def peak_memory_in_fresh_process(command: list[str], contender_id: str) -> int | None:
    """Peak resident set (bytes) of a new process that loads the data, builds the model and runs
    1 warm-up + 1 step of one contender (the longest batch comes first in both length-grouped
    samplers). The same data loading is in every contender's figure."""
    result = subprocess.run(command + ["--memory-of", contender_id], capture_output=True, text=True)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{") and "peak_rss_bytes" in line:
            return json.loads(line)["peak_rss_bytes"]
    print(f"memory of {contender_id!r}: no figure (exit {result.returncode}): {result.stderr[-2000:]}",
          file=sys.stderr)
    return None


def report_own_peak_memory(args, contenders: list[Contender]) -> int:
    """The ``--memory-of ID`` side of ``peak_memory_in_fresh_process``: one contender, 1 + 1 steps."""
    chosen = [c for c in contenders if c.id == args.memory_of]
    if not chosen:
        raise SystemExit(f"--memory-of: no contender {args.memory_of!r}; ids: {[c.id for c in contenders]}")
    args.warmup, args.steps = 1, 1
    chosen[0].run(args, 0)
    print(json.dumps({"id": args.memory_of, "peak_rss_bytes": high_water_rss()}))
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


# -- the command line and the report -------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-type", choices=["openai-gpt", "gpt2", "llama"], default="openai-gpt")
    parser.add_argument("--shape", choices=sorted(LLAMA_SHAPES), default=DEFAULT_SHAPE,
                        help="the Llama-shaped model of --model-type llama")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per contender and round "
                        "(default 2; --quick: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=int,
                        help="interleaved rounds over all contenders (default 2; --quick: 1)")
    parser.add_argument("--sequences-per-step", type=int, default=32,
                        help="sequences per optimizer step (32 suits a CPU; a GPU wants more)")
    parser.add_argument("--compile", action="store_true",
                        help="add a torch.compile row (its compile time falls in the warm-up steps)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-keep-large-allocations", action="store_true",
                        help="leave glibc's mmap/trim thresholds alone (minift/runtime.py)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the hot path (and --compile) only, "
                        "1 round of 1 warm-up + 2 steps")
    parser.add_argument("--only", metavar="ID", action="append", help="run only these contender ids")
    parser.add_argument("--warm-pass", action=argparse.BooleanOptionalAction, default=None,
                        help="run each contender's steps once untimed before timing them, so every shape "
                             "is warm (default: on CUDA)")
    parser.add_argument("--profile", metavar="TRACE_JSON", help="also write a torch.profiler Chrome trace")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                        help="folder for the JSON record and table")
    parser.add_argument("--no-isolated-memory", action="store_true",
                        help="skip the per-contender peak-memory runs in fresh processes (CPU)")
    parser.add_argument("--memory-of", metavar="ID", help=argparse.SUPPRESS)  # internal: one contender's peak


def finish_arguments(args) -> None:
    args.steps = args.steps if args.steps is not None else 2
    if args.warm_pass is None:
        args.warm_pass = pick_device(args.device).type == "cuda"
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)


def forwarded_arguments(args) -> list[str]:
    """The options a fresh memory-measuring process needs to build the same contenders."""
    out = ["--model-type", args.model_type, "--shape", args.shape, "--precision", args.precision,
           "--device", args.device,
           "--sequences-per-step", str(args.sequences_per_step), "--no-warm-pass"]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.no_keep_large_allocations:
        out.append("--no-keep-large-allocations")
    if args.quick:
        out.append("--quick")
    if args.compile:
        out.append("--compile")
    return out


def mfu_line(record: dict[str, Any]) -> str:
    """MFU of each row against the vendor peak and against the GEMM probe of the same process."""
    lines = []
    for s in record["runs"]:
        flops = record.get("flops_per_token", 6 * record["n_params"])
        probe = flops * s["real_tokens_per_s"] / record["probe_gemm_flops"]
        lines.append(f"- {s['name']}: MFU on real tokens {100 * s['mfu_real']:.1f} % "
                     f"({record['peak_source']}), {100 * probe:.1f} % of the GEMM probe")
    return "\n".join(lines)


def markdown_table(summaries: list[dict[str, Any]], baseline: str | None = None) -> str:
    head = ("| run | real tok/s | padded tok/s | loss tok/s | sequences/s | pad eff "
            "| median step s [min, max] | data / fwd / bwd / opt s | MFU real / padded | peak MB* |")
    lines = [head, "|" + "---|" * 10]
    base = next((s for s in summaries if s["id"] == baseline), None)
    for s in summaries:
        names = ("data", "forward", "backward", "optimizer")  # Trainer rows have no phase split: "–"
        phases = " / ".join(f"{s[p + '_s']:.2f}" for p in names) if all(p + "_s" in s for p in names) else "–"
        ratio = f" ({s['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x)" if base else ""
        if base and "mfu_real_local" in s and "mfu_real_local" in base:
            ratio = ratio[:-1] + f"; {s['mfu_real_local'] / base['mfu_real_local']:.2f}x at equal GEMM speed)"
        lines.append(f"| {s['name']} | {s['real_tokens_per_s']:.1f}{ratio} | "
                     f"{s['padded_tokens_per_s']:.1f} | {s['loss_tokens_per_s']:.1f} | "
                     f"{s['sequences_per_s']:.2f} | {s['padding_efficiency']:.3f} | "
                     f"{s['median_step_s']:.2f} [{s['spread_step_s'][0]:.2f}, {s['spread_step_s'][1]:.2f}] | "
                     f"{phases} | {100 * s['mfu_real']:.1f}% / {100 * s['mfu_padded']:.1f}% | "
                     f"{'–' if s['peak_memory_mb'] is None else format(s['peak_memory_mb'], '.0f')} |")
    return "\n".join(lines)


def write_outputs(record: dict[str, Any], out_dir: str, baseline: str | None) -> str:
    table = markdown_table(record["runs"], baseline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    header = (f"{record['date']}, {record['device']}, {record['threads']} threads, torch {record['torch']}, "
              f"{record.get('shape') or record['model_type']} ({record['n_params'] / 1e6:.1f} M parameters, "
              f"{record.get('flops_per_token', 6 * record['n_params']) / 1e9:.2f} GFLOP per trained token), "
              f"{record['precision']}; "
              f"GEMM peak {record['peak_gemm_flops'] / 1e9:.1f} GFLOP/s -> ceiling "
              f"{record['ceiling_real_tokens_per_s']:.1f} real tokens/s; "
              f"{record['rounds']} interleaved rounds of "
              f"{record['warmup']} warm-up + {record['steps']} timed steps per contender")
    note = ("\n\n*peak MB: CUDA max_memory_allocated; on CPU the peak RSS of a fresh process running that "
            "contender alone (1 warm-up + 1 step, data loading included), – where not measured. "
            "'at equal GEMM speed': the ratio of real tokens/s each divided by the median GEMM probe "
            "taken just before and after that contender (the machine's speed drifts during a run).")
    report = header + "\n\n" + table + note + "\n\n" + mfu_line(record)
    (out / f"bench-{stamp}.md").write_text(report + "\n")
    return report


def profile_steps(args, path: str) -> str:
    """A torch.profiler trace of 2 steps of the hot path; returns the top-ops table."""
    from torch.profiler import ProfilerActivity, profile

    device = pick_device(args.device)
    hot = [f"train.batch_size={args.sequences_per_step}", "train.grad_accum=1", "data.sampler=length_grouped"]
    args.warmup, args.steps = 0, 1
    run_recipe(args, hot)  # warm-up, outside the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    args.steps = 2
    with profile(activities=activities, record_shapes=True) as prof:
        run_recipe(args, hot, round_index=1)
    prof.export_chrome_trace(path)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15)
