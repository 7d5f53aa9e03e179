"""The benchmark harness (benchmarks/harness.py): its arithmetic, and a smoke run (no speed assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from minift.runtime import high_water_rss

from conftest import REPO, SHARED, shared_path
from harness import Row, gemm_peak_flops, markdown_table


def _steps(times, real, padded, loss, sequences, **phases):
    return [{"step_time": t, "real_tokens": r, "padded_tokens": p, "loss_tokens": lo, "sequences": s,
             **{f"{name}_time": values[i] for name, values in phases.items()}}
            for i, (t, r, p, lo, s) in enumerate(zip(times, real, padded, loss, sequences))]


def test_row_summary_arithmetic():
    row = Row("x", "x", _steps([1.0, 3.0], [100, 300], [200, 400], [90, 290], [4, 4], forward=[0.5, 1.0]))
    s = row.summary(n_params=1000, peak_flops=6e6)
    assert s["real_tokens_per_s"] == 100 and s["padded_tokens_per_s"] == 150 and s["sequences_per_s"] == 2
    assert s["padding_efficiency"] == pytest.approx(400 / 600) and s["forward_s"] == 0.75
    assert s["mfu_real"] == pytest.approx(6 * 1000 * 100 / 6e6) and s["median_step_s"] == 2.0
    assert "| x | 100.0 (1.00x) |" in markdown_table([s], baseline="x")
    assert gemm_peak_flops(torch.device("cpu"), n=256, repeats=2) > 1e8


def test_summary_takes_the_model_s_flops_per_token():
    row = Row("x", "x", _steps([1.0, 3.0], [100, 300], [200, 400], [90, 290], [4, 4]))
    s = row.summary(n_params=1000, peak_flops=6e6, flops_per_token=9000)
    assert s["mfu_real"] == pytest.approx(9000 * 100 / 6e6)
    assert s["mfu_padded"] == pytest.approx(9000 * 150 / 6e6)


def test_rounds_pool_their_steps():
    first = Row("a", "a", _steps([1.0], [100], [100], [100], [4]), local_peaks=[1e6, 1e6])
    first.add(Row("a", "a", _steps([3.0], [300], [300], [300], [4]), local_peaks=[3e6, 3e6]))
    s = first.summary(1000, 6e6)
    assert s["timed_steps"] == 2 and s["real_tokens_per_s"] == 100 and s["local_gemm_flops"] == 2e6


def test_ratio_at_equal_gemm_speed_corrects_for_drift():
    """A contender timed while the machine ran twice as fast gets half the credit in the drift-corrected
    ratio."""
    slow = Row("base", "base", _steps([2.0], [200], [200], [200], [8]), local_peaks=[5e6, 7e6])
    fast = Row("fast", "fast", _steps([2.0], [300], [300], [300], [8]), local_peaks=[12e6, 12e6])
    summaries = [slow.summary(1000, 6e6), fast.summary(1000, 6e6)]
    assert summaries[0]["local_gemm_flops"] == 6e6
    assert summaries[1]["mfu_real_local"] == pytest.approx(6 * 1000 * 150 / 12e6)
    assert "| fast | 150.0 (1.50x; 0.75x at equal GEMM speed) |" in markdown_table(summaries, baseline="base")


@pytest.mark.shared
@pytest.mark.slow
def test_quick_benchmark_writes_a_record(tmp_path):
    shared_path("data", "tweet_sentiment_extraction")
    result = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--no-trainer",
                             "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "MINIFT_SHARED": str(SHARED), "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert record["n_params"] == 116_535_552 and record["model_type"] == "openai-gpt"
    run = record["runs"][0]
    assert run["id"] == "hot" and run["timed_steps"] == 2 and run["padding_efficiency"] > 0.9
    assert run["real_tokens_per_s"] > 0
    assert "| minift (length-grouped 32x1, fused AdamW) |" in result.stdout
    # peak memory from a fresh process: at least weights + gradients + two AdamW moments in fp32
    assert run["peak_memory_mb"] > 4 * record["n_params"] * 4 / 2**20


def test_peak_memory_of_a_child_is_its_own():
    """ru_maxrss survives fork + exec on Linux; minift reads VmHWM, which starts afresh."""
    ballast = torch.ones(400 * 2**20 // 4)  # 400 MB resident in this process
    ballast.add_(1)
    parent = high_water_rss()
    child = subprocess.run([sys.executable, "-c",
                            "from minift.runtime import high_water_rss as h; print(h())"],
                           capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert parent > 400 * 2**20
    assert int(child.stdout) < parent - 300 * 2**20, (int(child.stdout), parent)
