"""The benchmark harness runs (a smoke test: no speed assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minift.bench import Row, gemm_peak_flops, high_water_rss, markdown_table

from conftest import REPO, SHARED, shared_path


def test_row_summary_arithmetic():
    row = Row("x", step_times=[1.0, 3.0], real_tokens=[100, 300], padded_tokens=[200, 400], loss_tokens=[90, 290],
              sequences=[4, 4], phases={"forward": [0.5, 1.0]})
    s = row.summary(n_params=1000, peak_flops=6e6)
    assert s["real_tokens_per_s"] == 100 and s["padded_tokens_per_s"] == 150 and s["samples_per_s"] == 2
    assert s["padding_efficiency"] == pytest.approx(400 / 600)
    assert s["mfu_real"] == pytest.approx(6 * 1000 * 100 / 6e6) and s["median_step_s"] == 2.0
    assert "| x | 100.0 (1.00x) |" in markdown_table([s], baseline="x")
    assert gemm_peak_flops(__import__("torch").device("cpu"), n=256, repeats=2) > 1e8


def test_ratio_at_equal_gemm_speed_corrects_for_drift():
    """A contender timed while the machine ran twice as fast gets half the credit in the drift-corrected ratio."""
    slow = Row("base", [2.0], [200], [200], [200], [8], local_peaks=[5e6, 7e6])
    fast = Row("fast", [2.0], [300], [300], [300], [8], local_peaks=[12e6, 12e6])
    summaries = [slow.summary(1000, 6e6), fast.summary(1000, 6e6)]
    assert summaries[0]["local_gemm_flops"] == 6e6
    assert summaries[1]["mfu_real_local"] == pytest.approx(6 * 1000 * 150 / 12e6)
    assert "| fast | 150.0 (1.50x; 0.75x at equal GEMM speed) |" in markdown_table(summaries, baseline="base")


@pytest.mark.shared
def test_quick_benchmark_writes_a_record(tmp_path):
    shared_path("data", "tweet_sentiment_extraction")
    result = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--no-trainer",
                             "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MINIFT_SHARED": str(SHARED), "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert record["n_params"] == 116_535_552 and record["model_type"] == "openai-gpt"
    run = record["runs"][0]
    assert run["timed_steps"] == 2 and run["padding_efficiency"] > 0.9 and run["real_tokens_per_s"] > 0
    assert "| minift (length-grouped 32x1, fused AdamW) |" in result.stdout
    # peak memory from a fresh process: at least weights + gradients + two AdamW moments in fp32
    assert run["peak_memory_mb"] > 4 * record["n_params"] * 4 / 2**20


def test_peak_memory_of_a_child_is_its_own():
    """ru_maxrss survives fork + exec on Linux; the harness reads VmHWM, which starts afresh."""
    import torch

    ballast = torch.ones(400 * 2**20 // 4)  # 400 MB resident in this process
    ballast.add_(1)
    parent = high_water_rss()
    child = subprocess.run([sys.executable, "-c", "from minift.bench import high_water_rss as h; print(h())"],
                           capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert parent > 400 * 2**20
    assert int(child.stdout) < parent - 300 * 2**20, (int(child.stdout), parent)
