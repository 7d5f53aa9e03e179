"""The LM head + cross-entropy alone: time of forward + backward and peak memory, per path.

    python3 benchmarks/lm_head.py [--rows 1024] [--memory-rows 4096] [--width 768] [--vocab 40478]
                                  [--repeats 3] [--device cpu]

Paths (minift/models/lm_loss.py): ``labelled`` (label rows gathered, plain chunks: autograd keeps
each chunk's logits), ``all`` (logits at every position, transformers' way), ``fused`` /
``fused-labelled`` (LinearCrossEntropy: chunked, its own backward, no [rows x vocab] logits
kept), each at the true vocabulary and padded to a multiple of 64; ``liger`` (liger-kernel's
fused linear cross-entropy) where it is installed and a GPU is present.

Time: median seconds of forward + backward over ``--repeats`` interleaved rounds in one process.
Peak memory, at ``--memory-rows`` positions (where [rows x vocab] logits dominate), true vocabulary
only (padding adds 0.1 %): CUDA: ``max_memory_allocated`` above the inputs; CPU: the rise of the
peak resident set (VmHWM) over one forward + backward in a fresh process per path (CPU memory
has no allocator statistics; a fresh process keeps one path's peak from hiding another's).
A quarter of the positions carry no label (pads, prompts), as in a padded tweet batch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from minift.models.lm_loss import IGNORE_INDEX, fused_lm_loss_sum, lm_loss_sum, lm_loss_sum_all_positions
from minift.runtime import high_water_rss

from harness import device_sync

PATHS = {
    "labelled": lambda h, w, y, v: lm_loss_sum(h, w, y, vocab_size=v),
    "all": lambda h, w, y, v: lm_loss_sum_all_positions(h, w, y, vocab_size=v),
    "fused": lambda h, w, y, v: fused_lm_loss_sum(h, w, y, rows="all", vocab_size=v),
    "fused-labelled": lambda h, w, y, v: fused_lm_loss_sum(h, w, y, rows="labelled", vocab_size=v),
}


def liger_path():
    """liger-kernel's fused linear CE (Triton: CUDA only), or None where it cannot run."""
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

    def run(h, w, y, v):
        return loss(w[:v], h[:, :-1].reshape(-1, h.shape[-1]), y[:, 1:].reshape(-1))
    return run


def inputs(args, padded: bool):
    g = torch.Generator().manual_seed(0)
    batch = args.rows // 64
    hidden = torch.randn(batch, 65, args.width, generator=g).to(args.device)
    rows = -(-args.vocab // 64) * 64 if padded else args.vocab
    weight = (torch.randn(rows, args.width, generator=g) * 0.02).to(args.device)
    weight[args.vocab:] = 0
    labels = torch.randint(0, args.vocab, (batch, 65), generator=g)
    labels[:, 49:] = IGNORE_INDEX  # a quarter of the 64 predicted positions: no label
    return hidden.requires_grad_(), weight.requires_grad_(), labels.to(args.device)


def step(path, hidden, weight, labels, vocab):
    out = path(hidden, weight, labels, vocab)
    (out.loss_sum if hasattr(out, "loss_sum") else out).backward()
    hidden.grad = weight.grad = None


def variants(args):
    out = {f"{name} ({'padded' if padded else 'vocab'} "
           f"{-(-args.vocab // 64) * 64 if padded else args.vocab})": (fn, padded)
           for name, fn in PATHS.items() for padded in (False, True)}
    liger = liger_path()
    if liger is not None:
        out[f"liger (vocab {args.vocab})"] = (liger, False)
    return out


def peak_bytes(args, name: str) -> int:
    fn, padded = variants(args)[name]
    hidden, weight, labels = inputs(args, padded)
    sync = device_sync(torch.device(args.device))
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, hidden, weight, labels, args.vocab)
        sync()
        return torch.cuda.max_memory_allocated() - base
    base = high_water_rss()
    step(fn, hidden, weight, labels, args.vocab)
    return high_water_rss() - base


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="positions per batch (64 per sequence)")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=40478)
    parser.add_argument("--memory-rows", type=int, default=4096, help="positions for the peak-memory runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one path's peak, in this process
    args = parser.parse_args(argv)
    if args.peak_of:
        args.rows = args.memory_rows
        print(peak_bytes(args, args.peak_of))
        return
    table = variants(args)
    prepared = {name: (fn, inputs(args, padded)) for name, (fn, padded) in table.items()}
    sync = device_sync(torch.device(args.device))
    seconds: dict[str, list[float]] = {name: [] for name in table}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        for name, (fn, (hidden, weight, labels)) in prepared.items():
            sync()
            start = time.perf_counter()
            step(fn, hidden, weight, labels, args.vocab)
            sync()
            if round_index:
                seconds[name].append(time.perf_counter() - start)
    flops = 3 * 2 * args.rows * args.width * args.vocab  # forward GEMM + two backward GEMMs
    base = statistics.median(seconds[next(iter(table))])
    print(f"LM head + CE, {args.rows} positions x {args.width} -> {args.vocab}, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"| path | fwd+bwd s | vs first row | GFLOP/s (3 GEMMs) | "
          f"peak MB above inputs ({args.memory_rows} rows) |")
    print("|---|---|---|---|---|")
    results = {}
    for name in table:
        median = statistics.median(seconds[name])
        if table[name][1]:  # padded: the same memory as its true-vocabulary row
            peak = None
        elif args.device == "cuda":
            peak = peak_bytes(argparse.Namespace(**{**vars(args), "rows": args.memory_rows}), name)
        else:
            peak = int(subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--peak-of", name],
                                      check=True, capture_output=True, text=True).stdout.split()[-1])
        results[name] = {"seconds": median, "peak_bytes": peak}
        shown = "–" if peak is None else f"{peak / 2**20:.0f}"
        print(f"| {name} | {median:.3f} | {base / median:.2f}x | {flops / median / 1e9:.1f} | {shown} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
