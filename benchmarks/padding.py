"""Padding efficiency (real tokens / padded tokens) over one epoch of the real train tweets.

    python benchmarks/padding.py [--batch-size 32] [--tokenizer openai-gpt]

Prints random batches padded to the longest, length-grouped batches, the classic recipe's
max_length=512 padding, padding to a multiple of 8, and packing into 128-token rows.
"""
from __future__ import annotations

import argparse

from minift.collate import Collator, PackingCollator, padding_efficiency
from minift.data import load_splits, prepare_split
from minift.sampling import LengthGroupedSampler, RandomSampler
from minift.tokenizer import ensure_pad_token, load_tokenizer

from harness import shared_dir


def packing_efficiency(lengths, batches, row_length: int) -> tuple[float, float]:
    """(real / padded tokens, rows per batch) when each batch's examples are packed into rows."""
    collator = PackingCollator(pad_id=0, row_length=row_length)
    real = padded = rows = 0
    for batch in batches:
        out = collator([{"input_ids": [1] * lengths[i]} for i in batch])
        real += out["n_real_tokens"]
        padded += out["n_padded_tokens"]
        rows += out["input_ids"].shape[0]
    return real / padded, rows / len(batches)


def efficiencies(batch_size: int = 32,
                 tokenizer_name: str = "openai-gpt") -> tuple[str, list[tuple[str, float]]]:
    """(the train split's cleaning report, [(batching, padding efficiency)]) over one epoch of the
    real train tweets; docs/trainer-map.md quotes these (checked by tests/test_docs.py)."""
    tokenizer = ensure_pad_token(load_tokenizer(shared_dir() / "tokenizers" / tokenizer_name))
    splits = load_splits(str(shared_dir() / "data" / "tweet_sentiment_extraction"))
    examples, report = prepare_split(splits, "train", tokenizer, max_length=128)
    lengths = examples.lengths
    random_batches = RandomSampler(len(lengths), batch_size, seed=0).batches(0)
    grouped = LengthGroupedSampler(lengths, batch_size, seed=0).batches(0)
    pad = tokenizer.pad_id
    rows = [
        ("random batches, padded to the longest", padding_efficiency(lengths, random_batches, Collator(pad))),
        ("random batches, padded to 512 (classic recipe)",
         padding_efficiency(lengths, random_batches, Collator(pad, padding="max_length", max_length=512))),
        ("length-grouped, padded to the longest", padding_efficiency(lengths, grouped, Collator(pad))),
        ("length-grouped, padded to a multiple of 8",
         padding_efficiency(lengths, grouped, Collator(pad, pad_to_multiple_of=8))),
    ]
    packed, rows_per_batch = packing_efficiency(lengths, random_batches, 128)
    rows.append((f"random batches packed into 128-token rows ({rows_per_batch:.1f} rows per batch)", packed))
    summary = f"{report.line()}\nbatch size {batch_size}, one epoch ({len(random_batches)} batches)"
    return summary, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokenizer", default="openai-gpt", choices=["openai-gpt", "gpt2"])
    args = parser.parse_args()
    summary, rows = efficiencies(args.batch_size, args.tokenizer)
    print(f"{summary}\n")
    print("| batching | padding efficiency |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
