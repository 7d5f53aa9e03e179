"""Throughput of minift's training loop, side by side with transformers.Trainer.

    python benchmarks/throughput.py                 # minift configurations + Trainer (when installed)
    python benchmarks/throughput.py --no-trainer    # minift only (same as `minift bench`)
    python benchmarks/throughput.py --quick         # smoke run (CI): no speed claims
    python benchmarks/throughput.py --profile trace.json

Every contender runs in this one process, interleaved round by round; ratios are computed
from real (non-pad) tokens per second. Results go to benchmarks/results/ (JSON + markdown).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_trainer import BEST  # noqa: E402  (imports transformers only when a Trainer row runs)
from minift import bench  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    parser.add_argument("--no-trainer", action="store_true", help="skip the transformers side-by-side")
    args = parser.parse_args(argv)
    if not (bench.shared_dir() / "data" / "tweet_sentiment_extraction").exists():
        print(f"needs the shared tweets: set MINIFT_SHARED (looked in {bench.shared_dir()})")
        return 2
    extra = []
    try:
        if args.memory_of and not args.memory_of.startswith("Trainer"):
            raise ImportError  # minift's own figure must not carry transformers' import
        import transformers  # noqa: F401
        have_transformers = True
    except ImportError:
        have_transformers = False
        if not args.memory_of:
            print("transformers is not installed: minift rows only (pip install -e '.[bench]')")
    with tempfile.TemporaryDirectory() as tmp:
        if have_transformers and not args.no_trainer:
            from compare_trainer import trainer_contenders

            examples, _ = bench.tweet_examples(args.model_type)
            extra = trainer_contenders(args, examples, tmp)
        if args.memory_of:
            bench.report_own_peak_memory(args, extra)
            return 0
        memory = None if args.no_isolated_memory else (
            [sys.executable, str(Path(__file__).resolve())] + bench.forwarded_arguments(args)
            + (["--no-trainer"] if args.no_trainer else []))
        record = bench.run_benchmark(args, extra, memory_command=memory)
    baseline = next((r["name"] for r in record["runs"] if r["name"].startswith(BEST)), None)
    print(bench.write_outputs(record, args.out, baseline))
    if args.profile:
        print(bench.profile_steps(args, args.profile))
        print(f"trace written to {args.profile}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
