"""Throughput of the real training loop on the full openai-gpt (or gpt2) shape.

What is measured: ``loop.train`` itself (no copy of it), random init (weights do not change
speed), the real tweets formatted as in training, a seeded sample order, a fixed number of
sequences per optimizer step, fp32, warm-up steps excluded, median and spread over the
timed steps. MFU = 6 * N * (real tokens/s) / peak, the peak measured on the spot with a
large fp32 GEMM (or taken from a table for known GPUs).

``minift bench`` runs minift's own configurations; ``benchmarks/throughput.py`` adds the
side-by-side with ``transformers.Trainer`` (minift itself never imports transformers).
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

from .collate import Collator
from .distributed import device_sync
from .data import DEFAULT_LABELS, DEFAULT_TEMPLATE, TokenizedExamples, load_splits, prepare_split
from .loop import train
from .models import GPT2Config, GPTConfig, build_model
from .optim import make_adamw, make_scheduler
from .runtime import keep_large_allocations
from .sampling import make_sampler
from .tokenizer import ensure_pad_token, load_tokenizer

# dense bf16 / fp32 peak FLOP/s of known accelerators (vendor figures, no sparsity)
KNOWN_PEAKS = {"H100": {"bf16": 989e12, "fp32": 67e12}, "H200": {"bf16": 989e12, "fp32": 67e12},
               "A100": {"bf16": 312e12, "fp32": 19.5e12}}
SHAPES = {"openai-gpt": lambda vocab: GPTConfig(vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
          "gpt2": lambda vocab: GPT2Config(vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def known_peak_flops(device: torch.device, precision: str) -> float | None:
    """The vendor's dense peak for a known GPU (``KNOWN_PEAKS``), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model, peaks in KNOWN_PEAKS.items():
        if model in name:
            return peaks[precision]
    return None


def gemm_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 9) -> float:
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


@dataclass
class Row:
    """One contender's timed steps, and what the report derives from them."""

    name: str
    step_times: list[float]
    real_tokens: list[int]
    padded_tokens: list[int]
    loss_tokens: list[int]
    sequences: list[int]
    phases: dict[str, list[float]] = field(default_factory=dict)  # data / forward / backward / optimizer
    peak_memory: int | None = None  # bytes; None where not measured
    local_peaks: list[float] = field(default_factory=list)  # GEMM probes just before and after this contender

    def summary(self, n_params: int, peak_flops: float) -> dict[str, Any]:
        total = sum(self.step_times)
        real_s = sum(self.real_tokens) / total
        padded_s = sum(self.padded_tokens) / total
        out = {
            "name": self.name, "timed_steps": len(self.step_times),
            "median_step_s": statistics.median(self.step_times),
            "spread_step_s": [min(self.step_times), max(self.step_times)],
            "real_tokens_per_s": real_s, "padded_tokens_per_s": padded_s,
            "loss_tokens_per_s": sum(self.loss_tokens) / total, "samples_per_s": sum(self.sequences) / total,
            "padding_efficiency": sum(self.real_tokens) / max(1, sum(self.padded_tokens)),
            "mfu_real": 6 * n_params * real_s / peak_flops, "mfu_padded": 6 * n_params * padded_s / peak_flops,
            "peak_memory_mb": None if self.peak_memory is None else self.peak_memory / 2**20,
        }
        if self.local_peaks:  # against the machine's speed at the time: corrects for drift during a run
            out["local_gemm_flops"] = statistics.median(self.local_peaks)
            out["mfu_real_local"] = 6 * n_params * real_s / out["local_gemm_flops"]
        for phase, values in self.phases.items():
            out[f"{phase}_s"] = statistics.median(values)
        return out


def shared_dir() -> Path:
    return Path(os.environ.get("MINIFT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@functools.lru_cache(maxsize=2)
def tweet_examples(model_type: str, max_length: int = 128) -> tuple[TokenizedExamples, Any]:
    """The real train tweets, formatted and tokenized as in training (once per process)."""
    shared = shared_dir()
    tokenizer = ensure_pad_token(load_tokenizer(shared / "tokenizers" / model_type))
    splits = load_splits(str(shared / "data" / "tweet_sentiment_extraction"))
    examples, _, _ = prepare_split(splits, "train", tokenizer, DEFAULT_TEMPLATE, DEFAULT_LABELS, max_length)
    return examples, tokenizer


def run_minift(name: str, model, examples: TokenizedExamples, pad_id: int, *, batch_size: int, grad_accum: int,
               sampler: str, steps: int, warmup: int, device: torch.device, padding: str = "longest",
               pad_to_multiple_of: int | None = None, fused: str = "auto", precision: str = "fp32",
               seed: int = 0) -> Row:
    collator = Collator(pad_id=pad_id, padding=padding, max_length=512 if padding == "max_length" else None,
                        pad_to_multiple_of=pad_to_multiple_of)
    batch_sampler = make_sampler(sampler, examples.lengths, batch_size, seed=seed)
    optimizer = make_adamw(model, lr=5e-5, fused=fused)
    scheduler = make_scheduler(optimizer, "constant", warmup + steps)
    records: list[dict] = []
    sync = device_sync(device)
    loader = torch.utils.data.DataLoader(examples, batch_sampler=batch_sampler, collate_fn=collator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train(model, optimizer, scheduler, batch_sampler, lambda s: loader, total_steps=warmup + steps,
          grad_accum=grad_accum, device=device, precision=precision, log=records.append, sync=sync)
    timed = records[warmup:]
    row = Row(name, [r["step_time"] for r in timed], [r["real_tokens"] for r in timed],
              [r["padded_tokens"] for r in timed], [r["loss_tokens"] for r in timed],
              [r["sequences"] for r in timed],
              {p: [r[f"{p}_time"] for r in timed] for p in ("data", "forward", "backward", "optimizer")})
    # CPU: measured in a fresh process instead (peak_memory_in_fresh_process)
    row.peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return row


def markdown_table(summaries: list[dict[str, Any]], baseline: str | None = None) -> str:
    head = ("| run | real tok/s | padded tok/s | loss tok/s | samples/s | pad eff | median step s [min, max] "
            "| data / fwd / bwd / opt s | MFU real / padded | peak MB* |")
    lines = [head, "|" + "---|" * 10]
    base = next((s for s in summaries if s["name"] == baseline), None)
    for s in summaries:
        names = ("data", "forward", "backward", "optimizer")  # Trainer rows have no phase split: "–"
        phases = " / ".join(f"{s[p + '_s']:.2f}" for p in names) if all(p + "_s" in s for p in names) else "–"
        ratio = f" ({s['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x)" if base else ""
        if base and "mfu_real_local" in s and "mfu_real_local" in base:
            ratio = ratio[:-1] + f"; {s['mfu_real_local'] / base['mfu_real_local']:.2f}x at equal GEMM speed)"
        lines.append(f"| {s['name']} | {s['real_tokens_per_s']:.1f}{ratio} | {s['padded_tokens_per_s']:.1f} | "
                     f"{s['loss_tokens_per_s']:.1f} | {s['samples_per_s']:.2f} | {s['padding_efficiency']:.3f} | "
                     f"{s['median_step_s']:.2f} [{s['spread_step_s'][0]:.2f}, {s['spread_step_s'][1]:.2f}] | "
                     f"{phases} | {100 * s['mfu_real']:.1f}% / {100 * s['mfu_padded']:.1f}% | "
                     f"{'–' if s['peak_memory_mb'] is None else format(s['peak_memory_mb'], '.0f')} |")
    return "\n".join(lines)


# The configurations `minift bench` compares: the hot path against plainer paths.
def minift_contenders(quick: bool, sequences: int = 32, compile_model: bool = False) -> list[dict[str, Any]]:
    """The hot path first, then one lever removed at a time, all at ``sequences`` per optimizer
    step (the allocator lever is process-wide, so it is compared in separate processes: see
    benchmarks/RESULTS.md)."""
    full, half = f"{sequences}x1", f"{sequences // 2}x2"
    hot = dict(batch_size=sequences, grad_accum=1, sampler="length_grouped")
    # memory=True: its peak memory is also measured in a fresh process (CPU; see run_benchmark)
    rows = [dict(name=f"minift (length-grouped {full}, fused AdamW)", memory=True, **hot)]  # the hot path
    if compile_model:  # dynamic shapes: one graph for every length, no padding to buckets
        rows.append(dict(name=f"minift (length-grouped {full}, torch.compile dynamic)", compile_model=True, **hot))
    if not quick:
        rows += [dict(name=f"minift (length-grouped {half})", batch_size=sequences // 2, grad_accum=2,
                      sampler="length_grouped"),
                 dict(name=f"minift (random order {half})", batch_size=sequences // 2, grad_accum=2, sampler="random"),
                 dict(name=f"minift (length-grouped {full}, for-loop AdamW)", fused="no", **hot),
                 dict(name=f"minift (length-grouped {full}, LM head at every position)",
                      hot_path={"loss_rows": "all"}, memory=True, **hot),
                 dict(name=f"minift (length-grouped {full}, eager attention + mask)",
                      hot_path={"attention": "eager"}, **hot)]
    return rows


def step_counts(args) -> tuple[int, int]:
    """(timed steps, warm-up steps): 4 and 1 by default, 2 and 1 under --quick, unless given;
    1 and 1 in a ``--memory-of`` process."""
    if args.memory_of:
        return 1, 1
    steps = args.steps if args.steps is not None else (2 if args.quick else 4)
    return steps, args.warmup if args.warmup is not None else 1


def run_benchmark(args, extra_contenders: list[tuple[str, Callable[[], Row]]] = (),
                  memory_command: list[str] | None = None, only: str | None = None) -> dict[str, Any]:
    """Time every contender (minift's configurations, then ``extra_contenders``) in this process,
    interleaved round by round. On CPU the peak memory of the hot path and of the extra
    contenders is measured each in a fresh process (``memory_command`` + ``--memory-of NAME``):
    in one long-lived process the resident set only grows, so a later contender would be
    charged for an earlier one's heap. ``only`` runs a single contender (that fresh process)."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and not args.no_keep_large_allocations:
        keep_large_allocations()  # process-wide: the Trainer rows of the same run get it too
    examples, tokenizer = tweet_examples(args.model_type)
    config = SHAPES[args.model_type](tokenizer.vocab_size)
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    peak_flops = gemm_peak_flops(device, dtype) if only is None else 0.0  # and again at the end
    steps, warmup = step_counts(args)

    def local_probe() -> float:  # the machine's speed right next to each contender (drift check)
        return gemm_peak_flops(device, dtype, repeats=5) if only is None else 0.0

    contenders = minift_contenders(args.quick, args.sequences_per_step, args.compile)
    rows: list[Row] = []
    n_params = 0
    for round_index in range(1 if only else args.rounds):  # interleaved: every contender once per round
        for spec in contenders:
            spec = dict(spec)
            spec.pop("memory", None)
            if only is not None and spec["name"] != only:
                continue
            torch.manual_seed(0)
            # a lever switched off (CausalLM.set_hot_path) changes speed only, never the loss
            model = build_model(config).to(device).set_hot_path(**spec.pop("hot_path", {}))
            n_params = model.num_parameters()
            if spec.pop("compile_model", False):
                model = torch.compile(model, dynamic=True)
            probe_before = local_probe()
            row = run_minift(spec.pop("name"), model, examples, tokenizer.pad_id, steps=steps, warmup=warmup,
                             device=device, precision=args.precision, seed=round_index, **spec)
            row.local_peaks = [probe_before, local_probe()]
            rows.append(row)
            del model
        for name, fn in extra_contenders:
            if only is None or name == only:
                probe_before = local_probe()
                rows.append(fn())
                rows[-1].local_peaks = [probe_before, local_probe()]
    if only is not None:
        return {"runs": [r.name for r in rows]}
    merged: dict[str, Row] = {}
    for row in rows:  # pool the timed steps of every round
        if row.name not in merged:
            merged[row.name] = row
            continue
        m = merged[row.name]
        for attr in ("step_times", "real_tokens", "padded_tokens", "loss_tokens", "sequences"):
            getattr(m, attr).extend(getattr(row, attr))
        for phase, values in row.phases.items():
            m.phases.setdefault(phase, []).extend(values)
        if row.peak_memory is not None:
            m.peak_memory = max(m.peak_memory or 0, row.peak_memory)
        m.local_peaks.extend(row.local_peaks)
    if device.type == "cpu" and memory_command:
        isolated = [spec["name"] for spec in contenders if spec.get("memory")] + [name for name, _ in extra_contenders]
        for name in isolated:
            if name in merged:
                merged[name].peak_memory = peak_memory_in_fresh_process(memory_command, name)
    peak_flops = max(peak_flops, gemm_peak_flops(device, dtype))
    peak_source = "GEMM probe"
    if known_peak_flops(device, args.precision):  # MFU against the vendor's figure on a known GPU
        peak_flops, peak_source = known_peak_flops(device, args.precision), "vendor table"
    summaries = [r.summary(n_params, peak_flops) for r in merged.values()]
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": _device_name(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "model_type": args.model_type,
              "n_params": n_params, "precision": args.precision, "peak_gemm_flops": peak_flops,
              "peak_source": peak_source,
              "ceiling_real_tokens_per_s": peak_flops / (6 * n_params), "steps": steps, "warmup": warmup,
              "rounds": args.rounds, "runs": summaries}
    return record


def peak_memory_in_fresh_process(command: list[str], name: str) -> int | None:
    """Peak RSS (bytes) of a new process that loads the data, builds the model and runs one
    warm-up + one step of contender ``name`` (the longest batch comes first in both length-grouped
    samplers). The same data loading is in every contender's figure."""
    result = subprocess.run(command + ["--memory-of", name], capture_output=True, text=True)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{") and "peak_rss_bytes" in line:
            return json.loads(line)["peak_rss_bytes"]
    print(f"memory of {name!r}: no figure (exit {result.returncode}): {result.stderr[-2000:]}", file=sys.stderr)
    return None


def report_own_peak_memory(args, extra_contenders=()) -> None:
    """The ``--memory-of NAME`` side of ``peak_memory_in_fresh_process``."""
    ran = run_benchmark(args, extra_contenders, only=args.memory_of)["runs"]
    if not ran:
        raise SystemExit(f"--memory-of: no contender named {args.memory_of!r}")
    print(json.dumps({"name": args.memory_of, "peak_rss_bytes": high_water_rss()}))


def high_water_rss() -> int:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that across
    fork + exec, so a child started by a 4 GB parent would report at least 4 GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-type", choices=sorted(SHAPES), default="openai-gpt")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per contender and round (default 4; "
                        "--quick: 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 1)")
    parser.add_argument("--sequences-per-step", type=int, default=32,
                        help="sequences per optimizer step (the issue's CPU setting is 32; a GPU wants more)")
    parser.add_argument("--compile", action="store_true",
                        help="add a torch.compile row (its compile time falls in the warm-up steps)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds over all contenders")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-keep-large-allocations", action="store_true",
                        help="leave glibc's mmap/trim thresholds alone (minift/runtime.py)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the hot path only (and the --compile row), 1 warm-up + 2 steps")
    parser.add_argument("--profile", metavar="TRACE_JSON", help="also write a torch.profiler Chrome trace")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON record and table")
    parser.add_argument("--no-isolated-memory", action="store_true",
                        help="skip the per-contender peak-memory runs in fresh processes (CPU)")
    parser.add_argument("--memory-of", metavar="NAME", help=argparse.SUPPRESS)  # internal: one contender's peak


def forwarded_arguments(args) -> list[str]:
    """The options a fresh memory-measuring process needs to build the same contenders."""
    out = ["--model-type", args.model_type, "--precision", args.precision, "--device", args.device,
           "--sequences-per-step", str(args.sequences_per_step)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.no_keep_large_allocations:
        out.append("--no-keep-large-allocations")
    if args.quick:
        out.append("--quick")
    return out


def profile_steps(args, path: str) -> str:
    """A torch.profiler trace of 2 steps of the hot path; returns the top-ops table."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    examples, tokenizer = tweet_examples(args.model_type)
    model = build_model(SHAPES[args.model_type](tokenizer.vocab_size)).to(device)
    run_minift("warm-up", model, examples, tokenizer.pad_id, batch_size=32, grad_accum=1, sampler="length_grouped",
               steps=1, warmup=0, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        run_minift("profiled", model, examples, tokenizer.pad_id, batch_size=32, grad_accum=1,
                   sampler="length_grouped", steps=2, warmup=0, device=device, seed=1)
    prof.export_chrome_trace(path)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15)


def write_outputs(record: dict[str, Any], out_dir: str, baseline: str | None) -> str:
    table = markdown_table(record["runs"], baseline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    header = (f"{record['date']}, {record['device']}, {record['threads']} threads, torch {record['torch']}, "
              f"{record['model_type']} ({record['n_params'] / 1e6:.1f} M parameters), {record['precision']}; "
              f"GEMM peak {record['peak_gemm_flops'] / 1e9:.1f} GFLOP/s -> ceiling "
              f"{record['ceiling_real_tokens_per_s']:.1f} real tokens/s; {record['warmup']} warm-up + "
              f"{record['steps']} timed steps x {record['rounds']} rounds per run")
    note = ("\n\n*peak MB: CUDA max_memory_allocated; on CPU the peak RSS of a fresh process running that "
            "contender alone (1 warm-up + 1 step, data loading included), – where not measured. "
            "'at equal GEMM speed': the ratio of real tokens/s each divided by the median GEMM probe taken just "
            "before and after that contender (the machine's speed drifts during a run).")
    report = header + "\n\n" + table + note
    (out / f"bench-{stamp}.md").write_text(report + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minift bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not (shared_dir() / "data" / "tweet_sentiment_extraction").exists():
        print(f"the benchmark needs the shared tweets: set MINIFT_SHARED (looked in {shared_dir()})")
        return 2
    if args.memory_of:
        report_own_peak_memory(args)
        return 0
    memory = None if args.no_isolated_memory else [sys.executable, "-m", "minift", "bench"] + forwarded_arguments(args)
    record = run_benchmark(args, memory_command=memory)
    print(write_outputs(record, args.out, baseline=None))
    if args.profile:
        print(profile_steps(args, args.profile))
        print(f"trace written to {args.profile}")
    return 0
