#!/usr/bin/env bash
# The GPU benchmark, sized to run in about 10 minutes on one GPU (H100/H200):
#  1. the hot path and its levers side by side with Trainer, every contender in one process: bf16 MFU on
#     real tokens against the vendor's dense peak (benchmarks/harness.py KNOWN_PEAKS) and against a bf16
#     8192^3 GEMM probe of the same process; each contender's steps run once untimed first (--warm-pass,
#     the default on CUDA), so every shape of the timed steps is warm; timings from CUDA events;
#  2. the Llama-shaped rows: SmolLM2-135M's shape and a ~0.5B Llama (GQA, SwiGLU, RMSNorm, rotary; random
#     init, the GPT-2 BPE), minift's hot path and compiled static path beside Trainer at its best with
#     transformers' LlamaForCausalLM, MFU from the matrices' FLOPs (GQA and SwiGLU counted as they are);
#  3. the end-to-end `minift train` epoch with configs/openai-gpt-tweets-gpu.toml (data, eval and
#     compile included), its summary next to the hot-path figure.
#
#   MINIFT_SHARED=/path/to/shared benchmarks/gpu.sh            # defaults below
#   MINIFT_SHARED=/path/to/shared benchmarks/gpu.sh --steps 80 # extra arguments go to throughput.py
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
SHARED="${MINIFT_SHARED:-$(cd .. && pwd)/shared}"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
timeout "${MINIFT_GPU_BENCH_TIMEOUT:-200}" python3 benchmarks/throughput.py --device cuda --precision bf16 \
    --sequences-per-step 512 --warmup 3 --steps 50 --rounds 1 --compile --no-isolated-memory \
    --only hot --only packed --only compile-packed --only compile-cudagraphs --only lm-head-all \
    --only trainer-classic --only trainer-best \
    --only trainer-best-compile "$@"
# 2. the Llama-shaped decoders, ~135M and ~0.5B parameters
for shape in smollm2-135m llama-0.5b; do
    timeout "${MINIFT_GPU_LLAMA_TIMEOUT:-200}" python3 benchmarks/throughput.py --model-type llama --shape "$shape" \
        --device cuda --precision bf16 --sequences-per-step 512 --warmup 3 --steps 30 --rounds 1 --compile \
        --no-isolated-memory --only hot --only compile-packed --only trainer-best --only trainer-best-compile "$@"
done
# 3. one epoch end to end, random init of the full shape on the shared tweets (no hub needed)
out="$(mktemp -d)"
start=$(date +%s)
timeout "${MINIFT_GPU_EPOCH_TIMEOUT:-90}" python3 -m minift train configs/openai-gpt-tweets-gpu.toml \
    --set model.name=random --set "model.tokenizer=\"$SHARED/tokenizers/openai-gpt\"" \
    --set "data.source=\"$SHARED/data/tweet_sentiment_extraction\"" --set "train.output_dir=\"$out\"" \
    --set train.progress=false --set train.plot=false --set eval.max_examples=1024
echo "end-to-end epoch: $(( $(date +%s) - start )) s wall-clock (tokenization, compile and evaluation included)"
python3 - "$out/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"end-to-end: {s['real_tokens_per_s']:.0f} real tokens/s over {s['logged_steps']} steps "
      f"(median step {s['median_step_s'] * 1000:.1f} ms), peak {s['peak_memory_mb']:.0f} MiB; "
      f"eval accuracy {s['eval_before'].get('accuracy', float('nan')):.3f} -> {s['eval_after'].get('accuracy', float('nan')):.3f}")
PY
