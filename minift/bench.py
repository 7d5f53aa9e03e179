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
import json
import os
import statistics
import threading
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


class PeakRSS:
    """Peak resident memory while a block runs (sampled from /proc every 5 ms)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.005)

    def __enter__(self):
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


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
    peak_memory: int = 0

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
            "peak_memory_mb": self.peak_memory / 2**20,
        }
        for phase, values in self.phases.items():
            out[f"{phase}_s"] = statistics.median(values)
        return out


def shared_dir() -> Path:
    return Path(os.environ.get("MINIFT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def tweet_examples(model_type: str, max_length: int = 128) -> tuple[TokenizedExamples, Any]:
    """The real train tweets, formatted and tokenized as in training."""
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
    with PeakRSS() as mem:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train(model, optimizer, scheduler, batch_sampler, lambda s: loader, total_steps=warmup + steps,
              grad_accum=grad_accum, device=device, precision=precision, log=records.append, sync=sync)
    timed = records[warmup:]
    row = Row(name, [r["step_time"] for r in timed], [r["real_tokens"] for r in timed],
              [r["padded_tokens"] for r in timed], [r["loss_tokens"] for r in timed],
              [r["sequences"] for r in timed],
              {p: [r[f"{p}_time"] for r in timed] for p in ("data", "forward", "backward", "optimizer")})
    row.peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else mem.peak
    return row


def markdown_table(summaries: list[dict[str, Any]], baseline: str | None = None) -> str:
    head = ("| run | real tok/s | padded tok/s | loss tok/s | samples/s | pad eff | median step s [min, max] "
            "| data / fwd / bwd / opt s | MFU real / padded | peak MB |")
    lines = [head, "|" + "---|" * 10]
    base = next((s for s in summaries if s["name"] == baseline), None)
    for s in summaries:
        phases = " / ".join(f"{s.get(p + '_s', float('nan')):.2f}" for p in ("data", "forward", "backward", "optimizer"))
        ratio = f" ({s['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x)" if base else ""
        lines.append(f"| {s['name']} | {s['real_tokens_per_s']:.1f}{ratio} | {s['padded_tokens_per_s']:.1f} | "
                     f"{s['loss_tokens_per_s']:.1f} | {s['samples_per_s']:.2f} | {s['padding_efficiency']:.3f} | "
                     f"{s['median_step_s']:.2f} [{s['spread_step_s'][0]:.2f}, {s['spread_step_s'][1]:.2f}] | "
                     f"{phases} | {100 * s['mfu_real']:.1f}% / {100 * s['mfu_padded']:.1f}% | "
                     f"{s['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


# The configurations `minift bench` compares: the hot path against plainer paths.
def minift_contenders(quick: bool) -> list[dict[str, Any]]:
    """The hot path first, then one lever removed at a time (the allocator lever is
    process-wide, so it is compared in separate processes: see benchmarks/RESULTS.md)."""
    rows = [dict(name="minift (length-grouped 32x1, fused AdamW)", batch_size=32, grad_accum=1,
                 sampler="length_grouped")]
    if not quick:
        rows += [dict(name="minift (length-grouped 16x2)", batch_size=16, grad_accum=2, sampler="length_grouped"),
                 dict(name="minift (random order 16x2)", batch_size=16, grad_accum=2, sampler="random"),
                 dict(name="minift (length-grouped 32x1, for-loop AdamW)", batch_size=32, grad_accum=1,
                      sampler="length_grouped", fused="no")]
    return rows


def run_benchmark(args, extra_contenders: list[tuple[str, Callable[[], Row]]] = ()) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and not args.no_keep_large_allocations:
        keep_large_allocations()  # process-wide: the Trainer rows of the same run get it too
    examples, tokenizer = tweet_examples(args.model_type)
    config = SHAPES[args.model_type](tokenizer.vocab_size)
    peak_flops = gemm_peak_flops(device, torch.float32 if args.precision == "fp32" else torch.bfloat16)  # and at the end
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    rows: list[Row] = []
    n_params = 0
    for round_index in range(args.rounds):  # interleaved: every contender once per round
        for spec in minift_contenders(args.quick):
            torch.manual_seed(0)
            model = build_model(config).to(device)
            n_params = model.num_parameters()
            row = run_minift(spec["name"], model, examples, tokenizer.pad_id, steps=steps, warmup=warmup,
                             device=device, precision=args.precision, seed=round_index,
                             **{k: v for k, v in spec.items() if k != "name"})
            rows.append(row)
            del model
        for name, fn in extra_contenders:
            rows.append(fn())
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
        m.peak_memory = max(m.peak_memory, row.peak_memory)
    peak_flops = max(peak_flops, gemm_peak_flops(device, torch.float32 if args.precision == "fp32" else torch.bfloat16))
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-type", choices=sorted(SHAPES), default="openai-gpt")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per contender and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds over all contenders")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-keep-large-allocations", action="store_true",
                        help="leave glibc's mmap/trim thresholds alone (minift/runtime.py)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 contender, 1 warm-up + 2 steps")
    parser.add_argument("--profile", metavar="TRACE_JSON", help="also write a torch.profiler Chrome trace")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON record and table")


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
    (out / f"bench-{stamp}.md").write_text(header + "\n\n" + table + "\n")
    return header + "\n\n" + table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minift bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not (shared_dir() / "data" / "tweet_sentiment_extraction").exists():
        print(f"the benchmark needs the shared tweets: set MINIFT_SHARED (looked in {shared_dir()})")
        return 2
    record = run_benchmark(args)
    print(write_outputs(record, args.out, baseline=None))
    if args.profile:
        print(profile_steps(args, args.profile))
        print(f"trace written to {args.profile}")
    return 0
