"""examples/: a researcher's first five changes and the copied recipe. Each runs here on tiny settings,
checked against a second computation (torch's label-smoothed cross-entropy, the stock recipe's
losses, the lr formula, the weights on disk, the rows of the data file); the slow tests run each
command of examples/README.md as written and compare what it prints with the text."""
from __future__ import annotations

import csv
import functools
import importlib.util
import json
import math
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from shell_blocks import (
    Run,
    Skip,
    assert_prints,
    bash_blocks,
    environment,
    has_policy,
    policy_of,
    run_commands,
)
from shell_blocks import repo_view as make_repo_view
from test_hub import _make_hub_cache

import minift
from minift.cli import main as minift_main
from minift.config import load_config
from minift.finetune import run

from conftest import REPO, SHARED, shared_path

EXAMPLES = REPO / "examples"
OFFLINE = str(REPO / "configs" / "offline-default.toml")
TINY = ["train.max_steps=3", "eval.max_examples=16", "train.plot=false"]  # the offline default, 3 steps


def as_flags(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@functools.cache
def load_example(name: str):
    """examples/<name>.py as a module, as ``python3 examples/<name>.py`` loads it (no package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_records(out: Path) -> list[dict]:
    return [r for r in records_of(out) if "step_time" in r]


def run_example(name: str, out: Path, capsys, *overrides: str) -> tuple[str, list[dict]]:
    capsys.readouterr()
    code = load_example(name).main([OFFLINE, *as_flags([*TINY, *overrides, f'train.output_dir="{out}"'])])
    printed = capsys.readouterr().out
    assert code == 0, printed[-2000:]
    return printed, step_records(out)


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> list[dict]:
    """The stock recipe's step records on the TINY settings: what an example that keeps the maths
    must reproduce."""
    out = tmp_path_factory.mktemp("stock")
    run(load_config(OFFLINE, [*TINY, f'train.output_dir="{out}"']), log=lambda line: None)
    return step_records(out)


@pytest.fixture
def fixture_batch():
    """The tiny GPT-1 of the shared fixtures, dropout off, and a collated batch of uneven rows."""
    path = shared_path("fixtures", "tiny-openai-gpt")
    model = minift.from_pretrained(path, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    tok = minift.load_tokenizer(path)
    texts = ["i love it sentiment: positive", "so sad today , nothing works sentiment: negative", "ok"]
    return model, minift.Collator(pad_id=tok.pad_token_id)([{"input_ids": tok.encode(t)} for t in texts])


def logits_and_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of logits and their next-token targets, as F.cross_entropy takes them, and the summed
    cross-entropy of the model's fused head (the stock loss)."""
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        fused_sum, _ = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"])
    return logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), fused_sum


# -- 1. a new loss -------------------------------------------------------------------------------------------
def test_label_smoothed_loss_is_torchs_label_smoothing(fixture_batch):
    model, batch = fixture_batch
    loss = load_example("loss_label_smoothing").LabelSmoothedLoss(0.1)
    with torch.no_grad():
        out = loss(model, batch, torch.device("cpu"))
    rows, targets, fused_sum = logits_and_loss(model, batch)
    rows, counted = rows.double(), targets != -100
    assert loss.count(batch) == int(counted.sum())
    reference = F.cross_entropy(rows, targets, ignore_index=-100, label_smoothing=0.1, reduction="sum")
    assert float(out.loss_sum) == pytest.approx(float(reference), rel=1e-6)
    assert float(out.metric_sums["nll"]) == pytest.approx(float(fused_sum), rel=1e-6)  # the fused head's CE
    uniform = -torch.log_softmax(rows, -1).mean(-1)[counted].sum()
    assert float(out.metric_sums["uniform"]) == pytest.approx(float(uniform), rel=1e-6)


def test_label_smoothing_example_trains_as_the_built_in_smoothing_and_prints_its_metrics(tmp_path, capsys):
    printed, records = run_example("loss_label_smoothing", tmp_path / "example", capsys)
    built_in = tmp_path / "built-in"  # minift's own train.label_smoothing (minift/label_smoothing.py)
    run(load_config(OFFLINE, [*TINY, "train.label_smoothing=0.1", f'train.output_dir="{built_in}"']),
        log=lambda line: None)
    for key in ("loss", "nll"):
        assert [r[key] for r in records] == pytest.approx([r[key] for r in step_records(built_in)], rel=1e-5)
    assert records[0]["loss"] != pytest.approx(records[0]["nll"], rel=1e-3)
    for record in records:
        assert record["loss"] == pytest.approx(0.9 * record["nll"] + 0.1 * record["uniform"], rel=1e-6)
    last = records[-1]
    assert printed.splitlines()[-1] == (f"step 3: loss {last['loss']:.4f} is 0.9 x nll {last['nll']:.4f} "
                                        f"+ 0.1 x uniform {last['uniform']:.4f} (label smoothing 0.1)")
    assert f"train loss: step 1 {records[0]['loss']:.4f} -> step 3 {last['loss']:.4f}" in printed


# -- 2. another optimizer and schedule -----------------------------------------------------------------------
def test_sgd_cosine_example_steps_with_sgd_on_its_schedule(tmp_path, capsys):
    printed, records = run_example("optimizer_sgd_cosine", tmp_path, capsys, "train.max_steps=8",
                                   "train.lr=0.5", "train.warmup_ratio=0.25")
    warmup, total, floor = 2, 8, 0.1  # ceil(0.25 x 8) warm-up steps, then a cosine from 0.5 to 0.1 x 0.5
    expected = [0.5 * k / warmup if k < warmup else
                0.5 * (floor + (1 - floor) * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) / 2)
                for k in range(total)]
    assert [r["lr"] for r in records] == pytest.approx(expected, abs=1e-12)
    state = torch.load(tmp_path / "checkpoint-8" / "training_state.pt", weights_only=False)["optimizer"]
    assert all("momentum_buffer" in s and "exp_avg" not in s for s in state["state"].values())  # SGD's
    assert state["param_groups"][0]["nesterov"] and state["param_groups"][0]["momentum"] == 0.9
    shown = dict(re.findall(r"(\d+) ([\d.]+)", printed.splitlines()[-1].split(":", 1)[1]))
    assert {int(s): float(v) for s, v in shown.items()} == {s: round(expected[s - 1], 4)
                                                            for s in (1, 2, 3, 5, 8)}
    assert records[-1]["loss"] < records[0]["loss"]


# -- 3. an extra metric --------------------------------------------------------------------------------------
def test_token_accuracy_loss_is_the_stock_loss_and_counts_argmax_hits(fixture_batch):
    model, batch = fixture_batch
    with torch.no_grad():
        loss = load_example("metric_token_accuracy").NextTokenLossWithAccuracy()
        out = loss(model, batch, torch.device("cpu"))
    rows, targets, fused_sum = logits_and_loss(model, batch)
    assert float(out.loss_sum) == pytest.approx(float(fused_sum), rel=1e-6)
    hits = sum(int(row.argmax()) == int(target) for row, target in zip(rows, targets) if target != -100)
    assert int(out.metric_sums["token_accuracy"]) == hits


def test_metric_example_keeps_the_loss_and_logs_both_metrics(tmp_path, capsys, stock):
    from safetensors.torch import load_file

    printed, records = run_example("metric_token_accuracy", tmp_path, capsys)
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in stock], rel=1e-5)  # stock maths
    assert all(0.0 <= r["token_accuracy"] <= 1.0 for r in records)
    evals = [r for r in records_of(tmp_path) if "eval" in r]
    assert [e["step"] for e in evals] == [0, 3]
    saved = load_file(tmp_path / "model" / "model.safetensors")  # the final weights, read back from disk
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in saved.values()))
    assert evals[-1]["eval"]["weight_norm"] == pytest.approx(norm, rel=1e-9)
    assert f"weight_norm {evals[-1]['eval']['weight_norm']:.4f}" in printed  # the summary's eval_after line
    assert printed.splitlines()[-1] == "token_accuracy by step: " + ", ".join(
        f"{s} {records[s - 1]['token_accuracy']:.4f}" for s in (1, 3))


# -- 4. your own data ----------------------------------------------------------------------------------------
@pytest.fixture
def repo_view(tmp_path, monkeypatch) -> Path:
    """The commands' working directory, laid out as the docs assume: the repo's folders in it, and
    shared/ beside it."""
    view = make_repo_view(tmp_path, REPO, SHARED)
    monkeypatch.chdir(view)
    return view


def run_command(argv: list[str], capsys) -> tuple[int, str, str]:
    """``python3 -m minift ARGV``, in this process."""
    capsys.readouterr()
    code = minift_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("source", ["examples/data/support.csv", "examples/data/support.jsonl"])
def test_own_data_holds_out_a_validation_split(repo_view, capsys, source):
    shared_path("fixtures", "tiny-openai-gpt")
    path = REPO / source
    rows = (list(csv.DictReader(path.open())) if source.endswith(".csv")
            else [json.loads(line) for line in path.read_text().splitlines()])
    n_eval = math.ceil(0.25 * len(rows))  # datasets' train_test_split rounds the held-out share up
    code, out, err = run_command(["train", "examples/own-data.toml", "--set", f'data.source="{source}"',
                                  "--set", "train.max_steps=2"], capsys)
    assert code == 0, err[-2000:]
    assert f"data: train: {len(rows) - n_eval} rows read, {len(rows) - n_eval} kept" in out
    assert f"data: validation: {n_eval} rows read, {n_eval} kept" in out
    assert f"({n_eval} examples)" in out  # the evaluation scores the held-out rows' labels
    assert {row["topic"] for row in rows} == {"bug", "question", "praise"}


def test_own_data_without_a_test_file_says_to_hold_out_a_split(repo_view, capsys):
    shared_path("fixtures", "tiny-openai-gpt")
    code, _, err = run_command(["train", "examples/own-data.toml", "--set", "data.validation_fraction=0.0"],
                               capsys)
    error = err.strip().split("\n")[-1]  # (in this process datasets' progress lines come before it)
    assert code == 2 and error.startswith("minift: error: ") and "\r" not in error
    assert "no 'test' split (found ['train'])" in error and "data.validation_fraction" in error
    assert error in (EXAMPLES / "README.md").read_text().splitlines()  # as the text shows it


# -- 5. another model ----------------------------------------------------------------------------------------
GPT2_FOLDER = ["--set", "model.name=../shared/fixtures/tiny-gpt2",
               "--set", "train.output_dir=runs/own-data-gpt2"]


def test_gpt2_from_a_folder(repo_view, capsys):
    from safetensors.torch import load_file

    fixture = shared_path("fixtures", "tiny-gpt2")
    code, out, err = run_command(["train", "examples/own-data.toml", *GPT2_FOLDER,
                                  "--set", "train.max_steps=2"], capsys)
    assert code == 0, err[-2000:]
    n_params = sum(t.numel() for t in load_file(fixture / "model.safetensors").values())  # tied head: once
    assert (f"model: ../shared/fixtures/tiny-gpt2 (GPT2LMHeadModel, {n_params / 1e6:.2f} M parameters), "
            f"tokenizer: ../shared/fixtures/tiny-gpt2 (50257 ids, pad '<|endoftext|>' = 50256)") in out
    saved = json.loads((repo_view / "runs" / "own-data-gpt2" / "model" / "config.json").read_text())
    assert saved["model_type"] == "gpt2" and saved["n_positions"] == 64


@pytest.mark.slow  # a fresh process: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when imported
def test_gpt2_by_hub_name_from_the_local_cache_trains_as_the_folder(repo_view, capsys, tmp_path):
    """examples/README.md's hub command, with a hub cache holding the tiny GPT-2 as "gpt2": the same
    run as from the folder with the same flags."""
    _make_hub_cache(tmp_path / "hub", "openai-community/gpt2", shared_path("fixtures", "tiny-gpt2"))
    command = next(c for b in EXAMPLE_BLOCKS for c in b.commands if "model.name=gpt2 " in c.text)
    env = {**environment(REPO, SHARED), "HF_HUB_CACHE": str(tmp_path / "hub")}
    by_name = subprocess.run(["bash", "-c", command.text], cwd=repo_view, env=env, capture_output=True,
                             text=True, timeout=1800)
    assert by_name.returncode == 0, by_name.stderr[-2000:]
    flags = shlex.split(command.text.replace("\\\n", " "))[4:]  # after "python3 -m minift train"
    code, by_folder, err = run_command(["train", *flags, *GPT2_FOLDER], capsys)
    assert code == 0, err[-2000:]

    def numbers(output: str) -> list[str]:
        return [line for line in output.splitlines()
                if line.startswith(("  train loss", "  eval_", "eval @"))]

    assert numbers(by_name.stdout) == numbers(by_folder) and len(numbers(by_folder)) == 5
    assert "model: gpt2 (GPT2LMHeadModel" in by_name.stdout


# -- the copied recipe ---------------------------------------------------------------------------------------
def test_a_copy_of_the_recipe_runs_as_a_script(tmp_path, monkeypatch, stock):
    recipe = (REPO / "minift" / "finetune.py").read_text()
    assert 'return Stage("train"' in recipe and "from ." not in recipe  # absolute imports: runs anywhere
    copy = tmp_path / "my_recipe.py"
    copy.write_text(recipe.replace('return Stage("train"', 'return Stage("my-recipe"'))  # a change of its own
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(copy), OFFLINE, *as_flags([*TINY, 'train.output_dir="run"'])])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(copy), run_name="__main__")  # as `python3 my_recipe.py`: no package around it
    assert exit_.value.code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stage"] == "my-recipe"  # the copy's build_stage ran ...
    assert [r["loss"] for r in step_records(tmp_path / "run")] == [r["loss"] for r in stock]  # ... as stock


# -- the text: every command as written, printing what the text says -----------------------------------------
EXAMPLE_BLOCKS = bash_blocks(EXAMPLES / "README.md")
RUN_AS_WRITTEN = (r"^python3 examples/\w+\.py "
                  r"|^python3 -m minift train examples/own-data\.toml(?!.* model\.name=gpt2 )"
                  r"|^python3 -m minift train configs/offline-default\.toml$"
                  r"|^cp minift/finetune\.py my_recipe\.py$|^python3 my_recipe\.py ")
EXAMPLE_POLICIES = [
    (r"model\.name=gpt2 ", Skip("the hub's gpt2: test_gpt2_by_hub_name_from_the_local_cache_trains_as_the_"
                                "folder runs this command on a hub cache made from the tiny GPT-2 fixture")),
    (RUN_AS_WRITTEN, Run()),
]
SCRIPTS = ["loss_label_smoothing", "optimizer_sgd_cosine", "metric_token_accuracy"]
RUNNABLE = [block for block in EXAMPLE_BLOCKS
            if any(has_policy(c, EXAMPLE_POLICIES, Run) for c in block.commands)]


def test_every_example_command_has_one_policy_and_its_output():
    assert len(EXAMPLE_BLOCKS) >= 7
    for block in EXAMPLE_BLOCKS:
        for command in block.commands:
            policy_of(command, EXAMPLE_POLICIES)
        assert block.expected or "model.name=gpt2 " in block.text, f"line {block.line}: no output shown"


def docstring_blocks(doc: str) -> list[str]:
    """The indented blocks of a docstring (the commands and outputs it shows), dedented."""
    blocks = re.findall(r"(?:^    .*\n|^\n)+", doc + "\n", re.MULTILINE)
    return [textwrap.dedent(block).strip("\n") for block in blocks if block.strip()]


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_scripts_docstring_shows_the_command_and_output_of_the_readme(name):
    block = next(b for b in EXAMPLE_BLOCKS if f"examples/{name}.py" in b.text)
    shown = docstring_blocks(load_example(name).__doc__)
    assert block.text in shown and block.expected.strip("\n") in shown


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line {b.line}" for b in RUNNABLE])
def test_an_example_prints_what_its_text_says(block, tmp_path):
    if "own-data" in block.text:
        shared_path("fixtures")
    view = make_repo_view(tmp_path, REPO, SHARED)
    result = run_commands(block.commands, EXAMPLE_POLICIES, view, environment(REPO, SHARED), timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:]
    assert_prints(block.expected, result.stdout)
