"""Hostile and careless use: nothing lost, nothing silent (docs/robustness.md lists every case).

One tiny finished run (4 steps, checkpoints at 2 and 4) is made once per module and copied;
each test breaks its copy the way a user would, and checks the refusal or the recovery.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file, save_file

from minift import checkpoint as ckpt
from minift import hub
from minift.cli import main
from minift.errors import InputError, ResumeRefused
from minift.finetune import run
from minift.loop import NonFiniteLoss
from minift.models import ConfigError, GPTConfig, build_model
from minift.optim import lr_lambda
from minift.run_dir import OutputDirBusy, claim_output_dir

from conftest import REPO

QUIET = dict(log=lambda *_: None)
SMALL = ("train.max_steps=4", "train.checkpoint_every=2", "data.max_train_examples=64", "eval.max_examples=8",
         "train.keep_checkpoints=2")


def small_config(out, *overrides):
    return tiny_config(out, *SMALL, *overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run(small_config(out), **QUIET)
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    (dst / ".minift.lock").unlink(missing_ok=True)
    return dst


def step_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tiny_model():
    return build_model(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def cli(capsys, *argv):
    """``minift ARGV`` in this process: (exit code, its ``minift:`` lines on stderr). Progress bars
    (datasets, tqdm) may share stderr; a traceback may not."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("minift")]


# -- 1, 7: checkpoints are counted only when verified ----------------------------------------------
def test_corrupt_checkpoints_never_push_out_good_ones_and_half_deleted_ones_are_finished(tmp_path):
    model = tiny_model()
    for step in (18, 20):
        ckpt.save_checkpoint(tmp_path, step, model, {}, {}, keep=5, **QUIET)
        weights = tmp_path / f"checkpoint-{step}" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])  # truncated after the write
    (tmp_path / "checkpoint-28").mkdir()  # a deletion killed half-way: only run_config.json left
    (tmp_path / "checkpoint-28" / "run_config.json").write_text("{}")
    (tmp_path / ".deleting-checkpoint-3-99999").mkdir()
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, model, {}, {}, keep=2, **QUIET)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.glob("corrupt-*")) == ["corrupt-checkpoint-18-1",
                                                                  "corrupt-checkpoint-20-1"]
    assert not list(tmp_path.glob(".deleting-*"))
    assert ckpt.find_resumable(tmp_path, **QUIET) == tmp_path / "checkpoint-6"


def test_the_last_good_checkpoint_is_never_deleted(tmp_path):
    model = tiny_model()
    ckpt.save_checkpoint(tmp_path, 2, model, {}, {}, keep=1, **QUIET)
    ckpt.save_checkpoint(tmp_path, 4, model, {}, {}, keep=1, **QUIET)
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"\0")
    (tmp_path / "checkpoint-2").mkdir()  # impossible to mistake for a checkpoint: no manifest
    ckpt.prune_checkpoints(tmp_path, keep=1, **QUIET)
    assert ckpt.list_checkpoints(tmp_path) == [] and list(tmp_path.glob("corrupt-checkpoint-4-1"))
    ckpt.save_checkpoint(tmp_path, 6, model, {}, {}, keep=1, **QUIET)
    ckpt.verify_checkpoint(tmp_path / "checkpoint-6")


@pytest.mark.parametrize("files", [
    {"model.safetensors": "abc"},
    {"model.safetensors": {"bytes": "12", "sha256": "x"}},
    ["model.safetensors"],
    {"../escape": {"bytes": 1, "sha256": "x"}},
])
def test_a_manifest_of_the_wrong_shape_is_corrupt_and_skipped(tmp_path, files):
    model = tiny_model()
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, model, {}, {}, keep=5, **QUIET)
    (tmp_path / "checkpoint-4" / ckpt.MANIFEST).write_text(json.dumps({"step": 4, "files": files}))
    with pytest.raises(ckpt.CheckpointCorrupt, match="unreadable manifest"):
        ckpt.verify_checkpoint(tmp_path / "checkpoint-4")
    assert ckpt.find_resumable(tmp_path, **QUIET) == tmp_path / "checkpoint-2"


# -- 2, 3: one owner per output folder --------------------------------------------------------------
def test_a_second_run_on_a_held_folder_refuses_naming_the_holder(tmp_path):
    code = f"""
        import sys, time
        from minift.run_dir import claim_output_dir
        with claim_output_dir({str(tmp_path)!r}, resume=False):
            print("held", flush=True)
            time.sleep(60)
    """
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirBusy, match=f"in use by another minift run \\(pid {holder.pid}\\)"):
            with claim_output_dir(tmp_path, resume=True):
                pass
    finally:
        holder.kill()
        holder.wait()
    with claim_output_dir(tmp_path, resume=True):  # the kernel dropped the dead holder's lock
        pass


def test_a_fresh_run_into_a_finished_run_refuses_and_overwrite_moves_it_aside(tmp_path, finished):
    out = copy_run(finished, tmp_path / "run")
    with pytest.raises(InputError, match="holds another run .* --resume.* --overwrite"):
        run(small_config(out), **QUIET)
    assert sorted(p.name for p in ckpt.list_checkpoints(out)) == ["checkpoint-2", "checkpoint-4"]  # untouched
    lines = []
    summary = run(small_config(out, "train.max_steps=2"), overwrite=True, log=lines.append)
    aside = tmp_path / "run.previous-1"
    assert sorted(p.name for p in ckpt.list_checkpoints(aside)) == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert summary["steps"] == 2 and f"checkpoint: {out / 'checkpoint-2'}" in "\n".join(lines)
    records = step_records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert sum("summary" in r for r in records) == 1


# -- 4: metrics.jsonl never holds a step twice ---------------------------------------------------------
def test_resuming_a_finished_run_or_restarting_from_scratch_writes_each_record_once(tmp_path, finished):
    out = copy_run(finished, tmp_path / "run")
    for _ in range(2):
        run(small_config(out), resume=True, **QUIET)
    records = step_records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval" in r] == [4]
    assert sum("summary" in r for r in records) == 1
    for path in ckpt.list_checkpoints(out):  # no checkpoint left: --resume starts from scratch
        shutil.rmtree(path)
    run(small_config(out), resume=True, **QUIET)
    records = step_records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval" in r] == [4]


# -- 5, 6: resume refuses what it cannot honour ----------------------------------------------------------
def test_resume_with_other_settings_refuses_with_a_table_or_uses_and_records_them(tmp_path, finished):
    out = copy_run(finished, tmp_path / "run")
    shutil.rmtree(out / "checkpoint-4")  # resume from step 2 of 4
    old_lr = json.loads((out / "checkpoint-2" / "run_config.json").read_text())["train"]["lr"]
    with pytest.raises(ResumeRefused, match=rf"(?s)train.lr: {old_lr!r} -> 1e-05.*--resume-with-changes"):
        run(small_config(out, "train.lr=1e-5"), resume=True, **QUIET)
    with pytest.raises(ResumeRefused, match="train.grad_accum: 2 -> 4") as refused:
        run(small_config(out, "train.grad_accum=4"), resume=True, **QUIET)
    assert "\n" not in str(refused.value) and "(checkpoint -> this run: train.grad_accum: 2 -> 4); " \
        in str(refused.value)  # one line that reads as a sentence
    run(small_config(out, "train.lr=1e-5"), resume=True, resume_with_changes=True, **QUIET)
    cfg = small_config(out)
    warmup = math.ceil(cfg.train.warmup_ratio * 4)
    logged = {r["step"]: r["lr"] for r in step_records(out) if "loss" in r}
    assert logged[3] == pytest.approx(1e-5 * lr_lambda(cfg.train.schedule, warmup, 4)(2), rel=1e-12)
    assert logged[2] == pytest.approx(old_lr * lr_lambda(cfg.train.schedule, warmup, 4)(1), rel=1e-12)
    for saved in (out / "checkpoint-4" / "run_config.json", out / "model" / "run_config.json"):
        assert json.loads(saved.read_text())["train"]["lr"] == 1e-5  # the saved config says what ran


def test_resume_refuses_a_changed_tokenizer_and_the_checkpoint_carries_its_own(tmp_path, finished):
    out = copy_run(finished, tmp_path / "run")
    manifest = json.loads((out / "checkpoint-4" / ckpt.MANIFEST).read_text())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])
    merges = out / "synthetic" / "tokenizer" / "merges.txt"
    lines = merges.read_text().splitlines(keepends=True)
    merges.write_text("".join(lines[: len(lines) // 2]))  # a cut merges.txt
    with pytest.raises(ResumeRefused, match="tokenizer sha256"):
        run(small_config(out), resume=True, **QUIET)


# -- 8, 11: strict configs ----------------------------------------------------------------------------
def test_unknown_model_config_keys_are_refused_naming_the_known_ones(fixtures_dir):
    with pytest.raises(ConfigError,
                       match=r"unknown key 'n_layers' for openai-gpt; known keys: \[.*'n_layer'"):
        GPTConfig.from_dict({"n_layers": 8}, source="[model] config", strict=True)
    with pytest.raises(ConfigError, match="unknown key 'n_layers'"):
        hub.from_pretrained(fixtures_dir / "tiny-openai-gpt", n_layers=8)
    # config.json stays lenient
    assert GPTConfig.from_dict({"summary_type": "x"}).extra == {"summary_type": "x"}


# -- 9: non-finite is loud ----------------------------------------------------------------------------------
def test_a_run_that_skipped_most_steps_fails_after_writing_its_outputs(tmp_path, monkeypatch):
    from minift import finetune

    class NanLoss(finetune.NextTokenLoss):
        def __call__(self, model, batch, device):
            out = super().__call__(model, batch, device)
            return out._replace(loss_sum=out.loss_sum * float("nan"))

    monkeypatch.setattr(finetune, "build_loss", lambda cfg: NanLoss())
    lines = []
    with pytest.raises(NonFiniteLoss, match="2 of 2 optimizer steps were skipped"):
        run(small_config(tmp_path, "train.on_nonfinite=skip", "train.max_steps=2"), log=lines.append)
    assert "skipped: 2 of 2 steps had a NaN/inf loss" in "\n".join(lines)
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_nonfinite"] == 2


# -- 10-13: every refusal is one line; inference refuses what it cannot use ------------------------------
@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cases = {"malformed": '{"text": "fine", "label_text": "positive"}\n{"text": "cut\n',
             "empty": "", "csv": "text,label_text\nhello,positive\n"}
    for name, text in cases.items():
        (root / name).mkdir()
        (root / name / "train.jsonl").write_text(text)
        (root / name / "test.jsonl").write_text('{"text": "fine", "label_text": "positive"}\n')
    (root / "latin1.toml").write_bytes("[train]\nlr = 1e-3  # caf\xe9\n".encode("latin-1"))
    good = [{"text": f"tweet {i} was fine", "label_text": label} for i, label in
            enumerate(["negative", "neutral", "positive"] * 4)]
    files = {"header_only/train.csv": "text,label_text\n",
             "header_only/test.csv": "text,label_text\nhi,positive\n",
             "number_text/train.jsonl": good,
             "number_text/test.jsonl": good[:1] + [{"text": 5, "label_text": "neutral"}],
             "nested/train.jsonl": good, "nested/test.jsonl": [{"text": {"a": 1}, "label_text": "neutral"}],
             "extra_column/train.jsonl": good,
             "extra_column/test.jsonl": [{**row, "extra": 1} for row in good],
             "small/train.jsonl": good[:4], "small/test.jsonl": good[:2],
             "emoji/train.jsonl": [{**row, "label_text": "\U0001F622\U0001F610\U0001F600"[i % 3]}
                                   for i, row in enumerate(good)]}
    files["emoji/test.jsonl"] = files["emoji/train.jsonl"]
    for name, rows in files.items():
        (root / name).parent.mkdir(exist_ok=True)
        text = rows if isinstance(rows, str) else "".join(json.dumps(row) + "\n" for row in rows)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("args,message", [
    (["--set", "data.source=@/malformed"], "malformed/train.jsonl: line 2 is not valid JSON"),
    (["--set", "data.source=@/empty"], "empty/train.jsonl: empty (no rows)"),
    (["--set", "data.source=@/csv"], "csv/train.jsonl: line 1 is not valid JSON "
                                     "(Expecting value at column 1): 'text,label_text' — is it CSV?"),
    (["@/latin1.toml"], "latin1.toml: not UTF-8 text (byte 24: b'\\xe9')"),
    (["--set", "data.template={foo} {text} {label}"], "unknown field(s) ['foo']; a template can use {text}"),
    (["--set", "model.dtype=bogus"], "model.dtype 'bogus'"),
    (["--set", "data.labels=['positive', 'negative', 'positive']"], "['positive'] appear more than once"),
    (["--set", "model.config.n_layers=8"], "unknown key 'n_layers' for openai-gpt"),
    (["--resume", "@/no/such/checkpoint"], "no such checkpoint directory"),
    (["--set", "data.source=@/header_only"], "header_only/train.csv: a header line and no rows"),
    (["--set", "data.source=@/number_text"], "number_text/test.jsonl: line 2: 'text' is a number (5), not "
                                             "text"),
    (["--set", "data.source=@/nested"], "nested/test.jsonl: line 1: 'text' is an object ({\"a\": 1}), not "
                                        "text"),
    (["--set", "data.source=@/extra_column"], "extra_column/train.jsonl lacks column(s) ['extra'] that "
                                              "other files"),
    (["--set", "data.source=@/small", "--set", "data.validation_fraction=0.999"],
     "data.validation_fraction = 0.999 of the 4 train rows of @/small holds out 4 and leaves none to train "
     "on"),
    (["--set", "data.source=@/emoji", "--set", "data.labels=['\U0001F622', '\U0001F610', '\U0001F600']"],
     "are the same tokens with"),
    (["--set", "data.max_length=1"], "no training example keeps a second token to predict within "
                                     "data.max_length = 1 (data.objective = 'all')"),
    (["--set", "data.max_length=3", "--set", "data.objective=completion"],
     "no training example keeps a label to predict within data.max_length = 3"),
    (["--set", "data.pad_to_multiple_of=100"], "pads sequences of data.max_length = 64 tokens to 100, more "
                                               "than the model's n_positions (64)"),
])
def test_train_refusals_are_one_line_with_exit_code_2(tmp_path, capsys, finished, bad_data, args, message):
    args = [a.replace("@", str(bad_data)) for a in args]
    config = args.pop(0) if args[0].endswith(".toml") else REPO / "configs" / "offline-default.toml"
    tokenizer = finished / "synthetic" / "tokenizer"
    code, err = cli(capsys, "train", config, "--set", f"train.output_dir={tmp_path}", "--set",
                    f"model.tokenizer={tokenizer}", *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("minift: error: "), err
    assert message.replace("@", str(bad_data)) in err[0]


def test_debug_shows_the_traceback(tmp_path, capsys, bad_data, monkeypatch):
    monkeypatch.setenv("MINIFT_DEBUG", "1")
    with pytest.raises(InputError, match="not UTF-8"):
        main(["train", str(bad_data / "latin1.toml")])
    monkeypatch.delenv("MINIFT_DEBUG")
    with pytest.raises(InputError, match="not UTF-8"):
        main(["train", str(bad_data / "latin1.toml"), "--debug"])


@pytest.mark.parametrize("flags,message", [(["--temperature", "nan"],
                                            "--temperature nan: must be a finite number"),
                                           (["--top-k", "-3"], "--top-k -3: must be >= 0")])
def test_generation_arguments_are_refused_before_loading(capsys, flags, message):
    code, err = cli(capsys, "generate", "hello", "--model", "/no/such/model", *flags)
    assert code == 2 and err == [f"minift: error: {message}" + err[0].split(message, 1)[1]]


def test_predict_refuses_nan_weights_and_an_impossible_config_fails_at_once(tmp_path, capsys, finished):
    model_dir = copy_run(finished / "model", tmp_path / "model")
    weights = load_file(str(model_dir / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name][0] = float("nan")
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    code, err = cli(capsys, "predict", "so happy", "--model", model_dir)
    assert code == 2 and len(err) == 1 and "NaN/inf" in err[0] and name in err[0]
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "n_layer": 10_000_000}))
    start = time.perf_counter()
    code, err = cli(capsys, "predict", "so happy", "--model", model_dir)
    assert time.perf_counter() - start < 1.0
    assert code == 2 and "n_layer=10000000" in err[0] and "memory available" in err[0]


def test_eval_refuses_a_random_model_and_names_the_model_it_scored(tmp_path, capsys, finished):
    config = REPO / "configs" / "offline-default.toml"
    code, err = cli(capsys, "eval", config, "--set", f"train.output_dir={tmp_path}")
    assert code == 2 and "the config's model is \"random\"" in err[0] and "--model" in err[0]
    out = copy_run(finished, tmp_path / "run")
    code = main(["eval", str(config), "--model", str(out / "model"), "--set", f"train.output_dir={out}",
                 "--set", "eval.max_examples=8", "--set", f"model.tokenizer={out / 'model'}"])
    printed = capsys.readouterr().out
    assert code == 0
    assert json.loads(printed[printed.index("{"):])["model"] == str(out / "model")


# -- 11: disk full -----------------------------------------------------------------------------------------
def test_disk_full_says_so_and_loses_no_earlier_checkpoint(tmp_path, capsys, finished):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a 4 MiB tmpfs to fill ({result.stderr.strip() or 'not root'})")
    try:
        code, err = cli(capsys, "train", REPO / "configs" / "offline-default.toml", *sum(
            (["--set", s] for s in (*SMALL[1:], f"train.output_dir={mount / 'run'}", "train.max_steps=20",
                                    "train.checkpoint_every=1", "train.keep_checkpoints=20",
                                    "train.progress=false",
                                    f"model.tokenizer={finished / 'synthetic' / 'tokenizer'}")), []))
        assert code == 1 and len(err) == 1 and "No space left on device" in err[0], err
        good = ckpt.list_checkpoints(mount / "run")
        assert good and not list((mount / "run").glob(".tmp-*"))
        for path in good:
            ckpt.verify_checkpoint(path)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# -- 14: an unknown name fails fast --------------------------------------------------------------------------
def test_a_name_neither_local_nor_cached_fails_fast_without_a_reachable_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_reachable", {})
    start = time.perf_counter()
    with pytest.raises(hub.CheckpointError, match="not in the cache, and the hub is not reachable"):
        hub.resolve_checkpoint("no-such-org/no-such-model")
    assert time.perf_counter() - start < 5.0


# -- refused before anything is loaded, created or moved --------------------------------------------------
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("args,message", [
    (["CONFIG", "--set", "model.config=5", "--set", "model.config.n_layer=2"],
     "--set 'model.config.n_layer=2': [model] config is 5, not a table"),
    (["CONFIG", "--set", "train.seed=-1"], "train.seed must be in [0, 2**32 - 1] (numpy's range), got -1"),
    (["CONFIG", "--set", "train.seed=4294967296"], "train.seed must be in [0, 2**32 - 1]"),
    (["CONFIG", "--set", "train.device=bogus"], "train.device 'bogus' is not a device"),
    pytest.param(["CONFIG", "--set", "train.device=cuda"], 'train.device = "cuda", but this machine has no '
                                                           'CUDA device', marks=NO_CUDA),
    (["CONFIG", "--set", "train.threads=-1"], "train.threads must be >= 0"),
    (["CONFIG", "--set", "train.output_dir="], 'train.output_dir is empty — name a folder ("." for this'),
    (["CONFIG", "--set", "data.source="], "data.source is empty"),
    (["CONFIG", "--set", "model.name="], "model.name is empty"),
    (["CONFIG", "--set", "model.model_type=bert"], "model.model_type 'bert': one of ['gpt2', 'llama', "
                                                   "'mistral', 'openai-gpt', 'qwen2', 'qwen3']"),
    (["CONFIG", "--set", "data.template={text:d} sentiment: {label}"],
     "{text:d} — a template field takes no format spec or conversion; write {text}"),
    (["CONFIG", "--set", "data.template={text!r} sentiment: {label}"], "{text!r} — a template field takes "
                                                                       "no"),
    (["CONFIG", "--set", "data.labels=['positive', ' ']"], "a label must have a word in it"),
    (["CONFIG", "--set", 'train.report_to=["wandb"]'], "train.report_to: unknown 'wandb'; known: "
                                                       "['tensorboard']"),
    (["--resume", "CONFIG"], "offline-default.toml: a config file, not a checkpoint — minift train"),
    (["CONFIG", "--resume", "CONFIG"], "a config file, not a checkpoint — minift train"),
    (["CONFIG", "--resume", "FINISHED/model"], "a finished model folder, not a checkpoint (it holds no "
                                               "training "
                                              "state) — resume from a checkpoint-N folder"),
    (["CONFIG", "--set", "model.name=./no/such/model"], "model.name = ./no/such/model: no such file or "
                                                        "directory"),
    (["CONFIG", "--set", "data.source=/no/such/data.jsonl"], "data.source = /no/such/data.jsonl: no such "
                                                             "file"),
    (["CONFIG", "--resume", "--overwrite"],
     "--overwrite starts afresh (the old run moved aside) and --resume continues it: give one"),
    (["CONFIG", "--set", "train.output_dir=FILE"], "is a file, not a folder — set train.output_dir to a "
                                                   "folder"),
    (["CONFIG", "--set", "train.output_dir=LINK"], "is a symbolic link to"),
])
def test_start_up_refusals_are_one_line_and_create_nothing(tmp_path, capsys, finished, args, message):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    names = {"CONFIG": str(REPO / "configs" / "offline-default.toml"), "FINISHED": str(finished),
             "FILE": str(tmp_path / "file"), "LINK": str(tmp_path / "link")}
    args = [next((a.replace(k, v) for k, v in names.items() if k in a), a) for a in args]
    out = tmp_path / "run"
    if "train.output_dir" not in " ".join(args):
        args += ["--set", f"train.output_dir={out}"]
    code, err = cli(capsys, "train", *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("minift: error: "), err
    assert message in err[0]
    assert not out.exists() and not (tmp_path / "nowhere").exists() and (tmp_path / "file").is_file()


def test_report_to_a_missing_package_is_refused_before_the_data_loads(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    code, err = cli(capsys, "train", REPO / "configs" / "offline-default.toml", "--set",
                    f"train.output_dir={tmp_path}", "--set", 'train.report_to=["tensorboard"]')
    assert code == 2 and err == ['minift: error: train.report_to = [\'tensorboard\'] needs the tensorboard '
                                 'package: pip install "minift[tensorboard]", or drop it from '
                                 'train.report_to']


def test_a_byte_order_mark_is_read_past_in_a_config_and_a_data_file(tmp_path):
    from minift.config import load_config
    from minift.data import load_splits

    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf[train]\nlr = 0.001\n")
    assert load_config(tmp_path / "bom.toml").train.lr == 0.001
    rows = "".join(json.dumps({"text": f"t{i}", "label_text": "positive"}) + "\n" for i in range(3))
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_bytes(b"\xef\xbb\xbf" + rows.encode())
    splits = load_splits(str(tmp_path))
    assert splits["train"].column_names == ["text", "label_text"]
    assert list(splits["test"]["text"]) == ["t0", "t1", "t2"]


# -- a model folder is used with its own tokenizer and its own config ---------------------------------------
def test_eval_uses_the_model_folders_config_and_refuses_another_tokenizer(tmp_path, capsys, finished):
    config = REPO / "configs" / "offline-default.toml"  # sizes for a random init in model.config
    common = ["--set", f"train.output_dir={tmp_path / 'out'}", "--set", "eval.max_examples=8"]
    code = main(["eval", str(config), "--model", str(finished / "model"), *common])
    printed = capsys.readouterr().out
    assert code == 0 and json.loads(printed[printed.index("{"):])["model"] == str(finished / "model")
    other = shutil.copytree(finished / "synthetic" / "tokenizer", tmp_path / "other")
    merges = (other / "merges.txt").read_text().splitlines(keepends=True)
    (other / "merges.txt").write_text("".join(merges[: len(merges) // 2]))  # the same ids, other splits
    code, err = cli(capsys, "eval", config, "--model", finished / "model", *common, "--set",
                    f"model.tokenizer={other}")
    assert code == 2 and len(err) == 1
    assert f"model.tokenizer = {other} is not the tokenizer saved with the model in {finished}/" in err[0]
    code, err = cli(capsys, "train", config, "--set", f"model.name={finished / 'model'}", "--set",
                    "model.config.n_embd=32", "--set", f"train.output_dir={tmp_path / 'train'}")
    assert code == 2 and len(err) == 1
    assert "model.config sets n_embd = 32 (the checkpoint has 64)" in err[0]
    assert "remove n_embd from model.config" in err[0]


def test_predict_refuses_a_text_longer_than_the_model_holds_and_a_bad_template(capsys, finished):
    code, err = cli(capsys, "predict", "fine", "word " * 100, "--model", finished / "model")
    assert code == 2 and len(err) == 1
    assert "text 2 ('word word word word word word word word '...) makes a prompt of" in err[0]
    assert "the model holds 64 with the label — shorten it" in err[0]
    code, err = cli(capsys, "predict", "fine", "--model", finished / "model", "--template",
                    "{text:d} is {label}")
    assert code == 2 and err == ["minift: error: data.template '{text:d} is {label}': {text:d} — a template "
                                 "field takes no format spec or conversion; write {text}"]


# -- labels the tokenizer cannot tell apart ------------------------------------------------------------------
def test_labels_with_the_same_tokens_or_one_starting_another_are_refused(finished):
    from minift.data import DataError, label_token_ids
    from minift.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(finished / "synthetic" / "tokenizer")
    template = "{text} sentiment: {label}"
    ids = label_token_ids(tokenizer, template, ("negative", "neutral", "positive"))
    assert ids == [tokenizer.encode(f"x sentiment: {w}")[len(tokenizer.encode("x sentiment:")):]
                   for w in ("negative", "neutral", "positive")]
    with pytest.raises(DataError, match=r"'\U0001F622' \(0: '<unk>'\) and '\U0001F600' \(0: '<unk>'\) are "
                                        r"the same"):
        label_token_ids(tokenizer, template, ("\U0001F622", "\U0001F600"))
    with pytest.raises(DataError, match="'good' .* is the start of 'good day' .*: its score is never below "
                                        "the longer label's, so 'good day' could never be predicted"):
        label_token_ids(tokenizer, template, ("good", "good day"))


# -- loader workers: at most one per CPU, and none outlives the run ----------------------------------------
def test_loader_workers_are_capped_at_the_cpus_and_said(tmp_path):
    from minift.components import build_loader, machine_notes
    from minift.runtime import usable_cpus

    cfg = small_config(tmp_path, "data.num_workers=100000")
    assert machine_notes(cfg) == [f"data.num_workers = 100000 is more than the {usable_cpus()} CPUs this "
                                  f"process may use: {usable_cpus()} workers load the data"]
    assert build_loader(cfg, [], None, None, torch.device("cpu")).num_workers == usable_cpus()
    assert machine_notes(small_config(tmp_path, "data.num_workers=1")) == []


class _WorkerPid(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return os.getpid()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_loader_workers_leave_signals_to_the_run_and_die_with_it(tmp_path):
    """A worker ignores SIGTERM (the run decides when to stop) and dies with its parent, even by SIGKILL."""
    from minift.components import build_loader
    from minift.sampling import SequentialSampler

    cfg = small_config(tmp_path, "data.num_workers=1")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the "run": a loader with one worker, which reports its pid, then the run hangs
        try:
            loader = build_loader(cfg, _WorkerPid(), SequentialSampler(1000, 1), lambda batch: batch[0],
                                  torch.device("cpu"))
            batches = iter(loader)  # kept: the iterator owns the worker
            os.write(write, f"{next(batches)}\n".encode())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write)
    worker = int(os.read(read, 64).decode())
    os.close(read)
    os.kill(worker, signal.SIGTERM)
    time.sleep(0.3)
    assert _alive(worker)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    deadline = time.monotonic() + 2  # within torch's own watchdog interval (5 s): the kernel's doing
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


# -- settings the run cannot honour as written are said at start-up -----------------------------------------
def test_accumulation_longer_than_an_epoch_and_warmup_longer_than_the_run_are_said(tmp_path):
    from minift.components import schedule_notes
    from minift.optim import make_scheduler

    cfg = small_config(tmp_path, "train.grad_accum=1000", "train.warmup_steps=1000", "train.lr=1e-3",
                       "train.schedule=linear")
    accumulation, warmup = schedule_notes(cfg, micro_batches_per_epoch=38, total_steps=3)
    assert accumulation.startswith("train.grad_accum = 1000, but an epoch has 38 micro-batches: a step "
                                   "never spans two epochs, so each step takes 38 micro-batches of 8, not "
                                   "1000")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler, lrs = make_scheduler(optimizer, "linear", 3, 1000), []
    for _ in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert warmup == ("the warm-up (1000 steps) is as long as the run (3 steps): the lr rises only to "
                      f"{max(lrs):.3g} of train.lr = 0.001 — lower train.warmup_steps (or warmup_ratio)")
    assert schedule_notes(small_config(tmp_path), 38, 3) == []
    lines = []
    run(small_config(tmp_path / "run", "train.grad_accum=1000", "train.max_steps=1",
                     "data.max_train_examples=16"), log=lines.append)
    assert "train.grad_accum = 1000, but an epoch has 2 micro-batches" in "\n".join(lines)


# -- resume: a stop during the first evaluation, a changed batch size, a finished run's summary ---------
def test_a_stop_during_the_first_evaluation_is_not_evaluated_twice(tmp_path, monkeypatch):
    from minift import finetune

    evaluate, calls = finetune.evaluate_held_out, []

    def sigterm_during_the_first(*args, **kwargs):
        if not calls:
            os.kill(os.getpid(), signal.SIGTERM)  # StopRequest: stop at the next step boundary
        calls.append(1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(finetune, "evaluate_held_out", sigterm_during_the_first)
    out = tmp_path / "run"
    stopped = run(small_config(out, "eval.before_training=true"), **QUIET)
    assert stopped["stopped_by"] == "SIGTERM" and stopped["step"] == 0
    summary = run(small_config(out, "eval.before_training=true"), resume=True, **QUIET)
    records = step_records(out)
    assert [r["step"] for r in records if "eval" in r] == [0, 4] and len(calls) == 2
    assert summary["eval_before"] == next(r["eval"] for r in records if "eval" in r)


def test_resume_with_changes_continues_with_a_new_batch_size(tmp_path, finished):
    from minift.sampling import RandomSampler

    first = RandomSampler(64, 8, seed=0)
    first.consumed = 4  # checkpoint-2: 2 steps of 2 micro-batches of 8
    second = RandomSampler(64, 16, seed=0)
    with pytest.raises(InputError, match="sampler state has batch_size=8 but this run has 16"):
        second.load_state_dict(first.state_dict())
    second.load_state_dict(first.state_dict(), allow_changes=True)
    used = [i for batch in first.batches(0)[:4] + list(second) for i in batch]
    assert sorted(used) == list(range(64))  # the rest of the epoch, each example once

    out = copy_run(finished, tmp_path / "run")
    shutil.rmtree(out / "checkpoint-4")
    with pytest.raises(ResumeRefused, match="train.batch_size: 8 -> 16"):
        run(small_config(out, "train.batch_size=16", "train.grad_accum=1"), resume=True, **QUIET)
    lines = []
    summary = run(small_config(out, "train.batch_size=16", "train.grad_accum=1"), resume=True,
                  resume_with_changes=True, log=lines.append)
    assert summary["steps"] == 4 and "resume: " in "\n".join(lines) and "batch 2)" in "\n".join(lines)
    records = [r for r in step_records(out) if "loss" in r]
    assert [r["sequences"] for r in records] == [16, 16, 16, 16]  # 2 x 8 before, 16 after
    saved = torch.load(out / "checkpoint-4" / ckpt.STATE_FILE, weights_only=True)["sampler"][0]
    assert (saved["batch_size"], saved["epoch"], saved["consumed"]) == (16, 0, 4)


def test_a_resumed_finished_run_keeps_the_whole_runs_summary(tmp_path, finished):
    out = copy_run(finished, tmp_path / "run")
    before = json.loads((out / "summary.json").read_text())
    run(small_config(out), resume=True, **QUIET)
    after = run(small_config(out), resume=True, **QUIET)  # twice from the same checkpoint: one marker
    for key in ("first_loss", "last_loss", "steps", "eval_after", "timed_steps", "real_tokens_per_s"):
        assert after[key] == before[key], key
    assert after["resumed_at"] == [4]
    with pytest.raises(ResumeRefused, match="checkpoint-4 is at step 4, past this run's 2 steps — raise"):
        run(small_config(out, "train.max_steps=2"), resume=True, resume_with_changes=True, **QUIET)


def test_overwrite_moves_only_a_runs_own_folder_even_as_dot(tmp_path, monkeypatch):
    run_dir = tmp_path / "work"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / "README.md").write_text("the user's own file")
    monkeypatch.chdir(run_dir)
    with pytest.raises(InputError, match=r"holds files no run writes \(README.md\) beside the previous run"):
        with claim_output_dir(".", resume=False, overwrite=True, **QUIET):
            pass
    assert (run_dir / "metrics.jsonl").exists()
    (run_dir / "README.md").unlink()
    with claim_output_dir(".", resume=False, overwrite=True, **QUIET):
        pass
    assert (tmp_path / "work.previous-1" / "metrics.jsonl").exists() \
        and not (run_dir / "metrics.jsonl").exists()
