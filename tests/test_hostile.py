"""Hostile and careless use: nothing lost, nothing silent (docs/robustness.md lists every case).

One tiny finished run (4 steps, checkpoints at 2 and 4) is made once per module and copied;
each test breaks its copy the way a user would, and checks the refusal or the recovery.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
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
from helpers import tiny_config

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
    assert sorted(p.name for p in tmp_path.glob("corrupt-*")) == ["corrupt-checkpoint-18-1", "corrupt-checkpoint-20-1"]
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
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
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
    with pytest.raises(ResumeRefused, match="train.grad_accum: 2 -> 4"):
        run(small_config(out, "train.grad_accum=4"), resume=True, **QUIET)
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
    with pytest.raises(ConfigError, match=r"unknown key 'n_layers' for openai-gpt; known keys: \[.*'n_layer'"):
        GPTConfig.from_dict({"n_layers": 8}, source="[model] config", strict=True)
    with pytest.raises(ConfigError, match="unknown key 'n_layers'"):
        hub.from_pretrained(fixtures_dir / "tiny-openai-gpt", n_layers=8)
    assert GPTConfig.from_dict({"summary_type": "x"}).extra == {"summary_type": "x"}  # config.json stays lenient


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
    return root


@pytest.mark.parametrize("args,message", [
    (["--set", "data.source=@/malformed"], "malformed/train.jsonl: line 2 is not valid JSON"),
    (["--set", "data.source=@/empty"], "empty/train.jsonl: empty (no rows)"),
    (["--set", "data.source=@/csv"], "csv/train.jsonl: line 1 is not valid JSON (Expecting value at column 1): "
                                     "'text,label_text' — is it CSV?"),
    (["@/latin1.toml"], "latin1.toml: not UTF-8 text (byte 24: b'\\xe9')"),
    (["--set", "data.template={foo} {text} {label}"], "unknown field(s) ['foo']; a template can use {text}"),
    (["--set", "model.dtype=bogus"], "model.dtype 'bogus'"),
    (["--set", "data.labels=['positive', 'negative', 'positive']"], "['positive'] appear more than once"),
    (["--set", "model.config.n_layers=8"], "unknown key 'n_layers' for openai-gpt"),
    (["--resume", "@/no/such/checkpoint"], "no such checkpoint directory"),
])
def test_train_refusals_are_one_line_with_exit_code_2(tmp_path, capsys, finished, bad_data, args, message):
    args = [a.replace("@", str(bad_data)) for a in args]
    config = args.pop(0) if args[0].endswith(".toml") else REPO / "configs" / "offline-default.toml"
    tokenizer = finished / "synthetic" / "tokenizer"
    code, err = cli(capsys, "train", config, "--set", f"train.output_dir={tmp_path}", "--set",
                    f"model.tokenizer={tokenizer}", *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("minift: error: "), err
    assert message in err[0]


def test_debug_shows_the_traceback(tmp_path, capsys, bad_data, monkeypatch):
    monkeypatch.setenv("MINIFT_DEBUG", "1")
    with pytest.raises(InputError, match="not UTF-8"):
        main(["train", str(bad_data / "latin1.toml")])
    monkeypatch.delenv("MINIFT_DEBUG")
    with pytest.raises(InputError, match="not UTF-8"):
        main(["train", str(bad_data / "latin1.toml"), "--debug"])


@pytest.mark.parametrize("flags,message", [(["--temperature", "nan"], "--temperature nan: must be a finite number"),
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
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a 4 MiB tmpfs to fill ({result.stderr.strip() or 'not root'})")
    try:
        code, err = cli(capsys, "train", REPO / "configs" / "offline-default.toml", *sum(
            (["--set", s] for s in (*SMALL[1:], f"train.output_dir={mount / 'run'}", "train.max_steps=20",
                                    "train.checkpoint_every=1", "train.keep_checkpoints=20", "train.progress=false",
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
