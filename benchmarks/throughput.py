"""Throughput of minift's training recipe, side by side with transformers.Trainer.

    python3 benchmarks/throughput.py                    # minift's contenders + Trainer (when installed)
    python3 benchmarks/throughput.py --no-trainer       # minift only
    python3 benchmarks/throughput.py --quick            # smoke run (CI): no speed claims
    python3 benchmarks/throughput.py --only hot --only trainer-best --rounds 4
    python3 benchmarks/throughput.py --profile trace.json
    python3 benchmarks/throughput.py --model-type llama --shape smollm2-135m --only hot --only trainer-best

Contender ids: hot, compile, compile-packed, compile-cudagraphs (--compile; the last on CUDA), grouped-2x,
random-2x, forloop-adamw, unfused-head, lm-head-all, packed, eager-attention, trainer-classic, trainer-best,
trainer-best-compile (--compile). Every contender runs in this one process,
interleaved round by round; ratios are of real (non-pad) tokens per second against Trainer at its
best. Results go to benchmarks/results/ (JSON + markdown). The harness is benchmarks/harness.py.
"""
from __future__ import annotations

import argparse
import sys

import harness


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_arguments(parser)
    parser.add_argument("--no-trainer", action="store_true", help="skip the transformers side-by-side")
    args = parser.parse_args(argv)
    harness.finish_arguments(args)
    if not (harness.shared_dir() / "data" / "tweet_sentiment_extraction").exists():
        print(f"needs the shared tweets: set MINIFT_SHARED (looked in {harness.shared_dir()})")
        return 2
    contenders = harness.minift_contenders(args)
    # a minift process never imports transformers: its memory figure must not carry it
    wants_trainer = not args.no_trainer and (args.memory_of is None or args.memory_of.startswith("trainer"))
    if wants_trainer:
        try:
            import transformers  # noqa: F401
            from compare_trainer import trainer_contenders

            contenders += trainer_contenders(args)
        except ImportError:
            print("transformers is not installed: minift rows only (pip install -e '.[bench]')")
    if args.only:
        contenders = [c for c in contenders if c.id in args.only]
    if args.memory_of:
        return harness.report_own_peak_memory(args, contenders)
    memory = None if args.no_isolated_memory else (
        [sys.executable, __file__] + harness.forwarded_arguments(args)
        + (["--no-trainer"] if args.no_trainer else []))
    record = harness.run_benchmark(args, contenders, memory_command=memory)
    from compare_trainer import BEST

    print(harness.write_outputs(record, args.out, baseline=BEST))
    if args.profile:
        print(harness.profile_steps(args, args.profile))
        print(f"trace written to {args.profile}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
