"""The run's log: the progress bar on a terminal, plain lines otherwise, TensorBoard scalars."""
from __future__ import annotations

import json
import sys

import pytest

from minift.config import RunConfigError
from minift.metrics import MetricsLogger


def step_record(step: int) -> dict:
    return {"step": step, "epoch": step / 4, "loss": 3.0 / step, "lr": 1e-3 * step, "grad_norm": 0.5 + step,
            "real_tokens": 100 * step, "padded_tokens": 110 * step, "step_time": 0.01, "overflow": False}


def eval_record(step: int) -> dict:
    return {"step": step, "eval": {"loss": 2.0 / step, "perplexity": 7.0, "accuracy": 0.25 * step}}


def test_on_a_terminal_lines_go_around_the_bar_and_the_bar_closes_at_the_last_step(tmp_path, capsys):
    lines_to_stderr = lambda line: print(line, file=sys.stderr)  # noqa: E731 - the bar's own stream
    logger = MetricsLogger(tmp_path, total_steps=3, echo=lines_to_stderr, on_terminal=True)
    logger(step_record(1))
    logger.say("eval @ step 1: loss 2.0")
    logger(step_record(2))
    logger(step_record(3))
    logger.say("done: 3 steps")
    logger.close()
    err = capsys.readouterr().err
    before_eval = err[:err.index("eval @ step 1")]
    assert before_eval.endswith(("\r", "\n")), "the log line was glued onto the bar"
    assert "train: 100%" in err[:err.index("done: 3 steps")]  # the bar finished before the summary ...
    assert err.endswith("done: 3 steps\n")  # ... and no stale frame is drawn after it


def test_off_a_terminal_progress_is_a_plain_line_about_every_tenth_of_the_run(tmp_path, capsys):
    said = []
    logger = MetricsLogger(tmp_path, total_steps=25, echo=said.append, on_terminal=False)
    for step in range(1, 26):
        logger(step_record(step))
    logger.close()
    assert [int(line.split()[1].split("/")[0]) for line in said] == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert said[-1].startswith("step 25/25: loss 0.1200, lr 2.50e-02")
    assert capsys.readouterr().err == ""  # no bar at all


def test_unknown_tracker_is_a_config_error(tmp_path):
    with pytest.raises(RunConfigError, match="train.report_to"):
        MetricsLogger(tmp_path, total_steps=1, report_to=["wandb"], progress=False)


@pytest.mark.requires("tensorboard")
def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, total_steps=4, report_to=["tensorboard"], progress=False, log_every=2)
    for step in range(1, 5):
        logger(step_record(step))
        if step % 2 == 0:
            logger.write(eval_record(step))
    logger.write({"summary": {"steps": 4}})
    logger.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected: dict[str, list] = {}
    for record in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()):
        if "summary" in record:
            continue
        prefix, values = ("eval", record["eval"]) if "eval" in record else ("train", record)
        for key, value in values.items():
            if key != "step":
                expected.setdefault(f"{prefix}/{key}", []).append((record["step"], float(value)))
    assert set(logged) == set(expected) and "train/loss" in logged and "eval/accuracy" in logged
    for tag, points in expected.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert [s for s, _ in logged["train/loss"]] == [2, 4]  # log_every thins both the same way


def test_a_resumed_runs_summary_says_which_steps_its_train_losses_cover():
    from minift.metrics import summary_text

    summary = {"steps": 500, "resumed_at": [400], "peak_memory_mb": 1.0, "first_loss": 5.0, "last_loss": 1.0,
               "train_loss": 1.2}  # first and last: the whole run's; the mean: this process's steps
    line = "  train loss: step 1 5.0000 -> step 500 1.0000, mean 1.2000 (steps 401-500)"
    assert line in summary_text(summary)
    assert "done: 500 steps (resumed at step 400)" in summary_text(summary)
    fresh = summary_text({**summary, "resumed_at": []})
    assert "  train loss: step 1 5.0000 -> step 500 1.0000, mean 1.2000\n" in fresh + "\n"
