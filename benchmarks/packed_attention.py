"""Attention over packed rows (documents confined to themselves): SDPA with a block-diagonal
causal bias (minift's path) against FlexAttention with a document block mask, forward + backward.

    python3 benchmarks/packed_attention.py [--rows 8] [--time 128] [--heads 12] [--head-dim 64] [--repeats 5]
                                           [--forward-only]

Rows hold documents of 8..48 tokens (tweets), packed back to back. Rows: ``sdpa causal`` (no
documents: the floor at this shape), ``sdpa + document bias`` (a dense [B, 1, T, T] additive mask),
``flex (compiled)`` (``torch.nn.attention.flex_attention`` with ``create_block_mask``; compiled, as
FlexAttention must be to be fast). Median seconds of ``--repeats`` after one warm-up (the flex
row's compile time shows in its first call). FlexAttention has no backward on CPU (torch 2.13):
there, ``--forward-only`` is the only comparison it allows.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from minift.models.layers import attention_bias


def document_ids(rows: int, time_: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.full((rows, time_), -1, dtype=torch.long)
    for r in range(rows):
        start, doc = 0, 0
        while True:
            n = int(torch.randint(8, 49, (1,), generator=generator))
            if start + n > time_:
                break
            ids[r, start:start + n] = doc
            start, doc = start + n, doc + 1
    return ids


def timed(fn, q, k, v, repeats: int) -> tuple[float, float]:
    """(first call s, median of the next ``repeats``) of forward (+ backward when q needs a gradient)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = fn(q, k, v)
        if q.requires_grad:
            out.sum().backward()
            q.grad = k.grad = v.grad = None
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--time", type=int, default=128)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forward-only", action="store_true", help="no backward (FlexAttention on CPU)")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.heads, args.time, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).requires_grad_(not args.forward_only) for _ in range(3))
    docs = document_ids(args.rows, args.time, g)
    bias = attention_bias(None, docs, args.time, q.device)

    rows = {"sdpa causal (no documents)":
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "sdpa + document bias": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def same_document_causal(b, h, q_idx, kv_idx):
            return (docs[b, q_idx] == docs[b, kv_idx]) & (kv_idx <= q_idx)

        block_mask = create_block_mask(same_document_causal, args.rows, None, args.time, args.time,
                                       device="cpu")
        compiled = torch.compile(flex_attention)

        def flex(q, k, v):
            return compiled(q, k, v, block_mask=block_mask)
        # same numbers as the dense bias before timing anything (padding rows aside: no key there)
        real = docs[:, None, :, None] >= 0
        torch.testing.assert_close(flex(q, k, v) * real, rows["sdpa + document bias"](q, k, v) * real,
                                   rtol=1e-4, atol=1e-4)
        rows["flex (compiled)"] = flex
    except Exception as err:  # flex needs a C++ compiler on CPU: say why the row is missing
        print(f"flex_attention unavailable here: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    print(f"packed attention {'forward' if args.forward_only else 'fwd+bwd'}, "
          f"[{args.rows} x {args.heads} x {args.time} x {args.head_dim}], "
          f"{torch.get_num_threads()} threads, {int(docs.max(1).values.add(1).sum())} documents")
    print("| path | first call s | median s | vs sdpa + bias |")
    print("|---|---|---|---|")
    results = {name: timed(fn, q, k, v, args.repeats) for name, fn in rows.items()}
    reference = results["sdpa + document bias"][1]
    for name, (first, median) in results.items():
        print(f"| {name} | {first:.3f} | {median:.4f} | {reference / median:.2f}x |")


if __name__ == "__main__":
    main()
