"""One process vs N processes under torchrun (gloo on CPU, NCCL on GPU), through the real recipe.

    python benchmarks/distributed.py --nproc 2 --steps 4

Full openai-gpt shape (random init), the shared tweets, 32 sequences per optimizer step in both
runs (32 x 1 process, 32/N x N processes). On a 2-core CPU expect no speed-up: the point is that
the recipe runs and what the all-reduce costs. Real tokens/s comes from each run's summary.json
(the first step excluded), counted over all ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import shared_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = shared_dir()


def config(path: Path, output_dir: Path, batch_size: int, steps: int) -> Path:
    path.write_text(f"""
[model]
name = "random"
model_type = "openai-gpt"
tokenizer = "{SHARED / 'tokenizers' / 'openai-gpt'}"
config = {{ resid_pdrop = 0.0, embd_pdrop = 0.0, attn_pdrop = 0.0 }}
[data]
source = "{SHARED / 'data' / 'tweet_sentiment_extraction'}"
sampler = "length_grouped"
[train]
output_dir = "{output_dir}"
max_steps = {steps}
batch_size = {batch_size}
grad_accum = 1
progress = false
plot = false
[eval]
before_training = false
accuracy = false
max_examples = 32
""")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for nproc in (1, args.nproc):
            cfg = config(tmp / f"n{nproc}.toml", tmp / f"n{nproc}", 32 // nproc, args.steps)
            launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m"]
                      if nproc > 1 else [sys.executable, "-m"])
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            if nproc > 1:  # split the cores between the processes
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
            result = subprocess.run(launch + ["minift", "train", str(cfg)], env=env, capture_output=True,
                                    text=True)
            if result.returncode:
                print(result.stderr[-3000:])
                return 1
            summary = json.loads((tmp / f"n{nproc}" / "summary.json").read_text())
            rows.append((nproc, summary))
    print("| processes | sequences per step | real tok/s | median step s | peak MB (rank 0) |")
    print("|---|---|---|---|---|")
    for nproc, s in rows:
        print(f"| {nproc} | {32 // nproc} x {nproc} | {s['real_tokens_per_s']:.1f} | "
              f"{s['median_step_s']:.2f} | {s['peak_memory_mb']:.0f} |")
    print(f"ratio {args.nproc} processes / 1: "
          f"{rows[1][1]['real_tokens_per_s'] / rows[0][1]['real_tokens_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
