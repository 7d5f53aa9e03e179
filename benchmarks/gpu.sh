#!/usr/bin/env bash
# The GPU benchmark, prepared to run in under 5 minutes on one GPU (H100/H200): bf16 MFU on real
# tokens (MFU = 6 N real_tokens/s / the vendor's dense bf16 peak, minift/bench.py KNOWN_PEAKS) and
# the side by side with Trainer, every contender in one process.
#
#   MINIFT_SHARED=/path/to/shared benchmarks/gpu.sh            # defaults below
#   MINIFT_SHARED=/path/to/shared benchmarks/gpu.sh --steps 10 # extra arguments go to throughput.py
#
# 512 sequences per optimizer step (minift 512x1; Trainer at its best 256x2): at the CPU setting of
# 32 tweets (~800 tokens) a step is a few hundred kernel launches and no GPU is compute-bound.
# Needs torch with CUDA, tokenizers, datasets, safetensors, numpy (and transformers + accelerate
# for the Trainer rows). On a GPU machine without a package index, install `datasets` (with its
# `dill`, `multiprocess`) from wheels copied there, and copy the shared tweets and tokenizer beside
# the repo (MINIFT_SHARED points at them).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
timeout "${MINIFT_GPU_BENCH_TIMEOUT:-290}" python3 benchmarks/throughput.py --device cuda --precision bf16 \
    --sequences-per-step 512 --warmup 3 --steps 20 --compile "$@"
