"""Checkpoint resolution (local and hub cache), strict loading, errors, and saving."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import minift
from minift.hub import CheckpointError
from minift.models import ConfigError

from conftest import REPO, shared_path


def _copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(shared_path("fixtures", name), dst)
    return dst


def _logits(model, name="tiny-openai-gpt"):
    ref = np.load(shared_path("fixtures", name, "reference_logits.npz"))
    with torch.no_grad():
        return model(torch.from_numpy(ref["input_ids"]),
                     attention_mask=torch.from_numpy(ref["attention_mask"]))


def _make_hub_cache(cache, repo_id, files_from):
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files_from.iterdir():
        shutil.copy(file, snapshot / file.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def _run_offline(cache, code):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.shared
@pytest.mark.parametrize("hub_repo", ["openai-community/openai-gpt",
                                      pytest.param("openai-gpt", marks=pytest.mark.slow)])
def test_hub_names_resolve_through_the_cache(tmp_path, hub_repo):
    _make_hub_cache(tmp_path / "hub", hub_repo, shared_path("fixtures", "tiny-openai-gpt"))
    ref = shared_path("fixtures", "tiny-openai-gpt", "reference_logits.npz")
    result = _run_offline(tmp_path / "hub", f"""
        import numpy as np, torch, minift
        for name in ("openai-gpt", "openai-community/openai-gpt"):
            model = minift.from_pretrained(name)
            tok = minift.load_tokenizer(name)
            ref = np.load({str(ref)!r})
            with torch.no_grad():
                logits = model(torch.from_numpy(ref["input_ids"]),
                               attention_mask=torch.from_numpy(ref["attention_mask"]))
            real = torch.from_numpy(ref["attention_mask"]).bool()
            print(name, float((logits - torch.from_numpy(ref["logits"]))[real].abs().max()), tok.pad_id)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    for line in lines[:2]:
        name, err, pad = line.split()
        assert float(err) < 1e-5 and pad == "40478"


def test_no_network_and_no_cache_says_how_to_fix(tmp_path):
    result = _run_offline(tmp_path / "empty-cache", """
        import minift
        try:
            minift.from_pretrained("openai-gpt")
        except minift.CheckpointError as err:
            print("ERROR", err)
    """)
    assert "ERROR could not find 'openai-gpt'" in result.stdout, result.stdout + result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stdout
    assert "local directory" in result.stdout


@pytest.mark.shared
def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = minift.from_pretrained(shared_path("fixtures", "tiny-openai-gpt-perturbed"))
    model.save_pretrained(tmp_path / "saved")
    again = minift.from_pretrained(tmp_path / "saved")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(_logits(model), _logits(again))
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    original = load_file(str(shared_path("fixtures", "tiny-openai-gpt-perturbed", "model.safetensors")))
    assert saved.keys() == original.keys()  # transformers key names, no lm_head
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "openai-gpt" and config["architectures"] == ["OpenAIGPTLMHeadModel"]
    assert config["summary_type"] == "cls_index"  # keys we do not model are kept


@pytest.mark.shared
def test_bin_with_tied_lm_head_and_unprefixed_keys_with_legacy_buffers(tmp_path):
    src = load_file(str(shared_path("fixtures", "tiny-openai-gpt", "model.safetensors")))
    # the hub's openai-gpt file: saved from the base model, with causal-mask buffers
    bare = {k[len("transformer."):]: v for k, v in src.items()}
    for i in range(2):
        bare[f"h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
    d = tmp_path / "legacy"
    d.mkdir()
    torch.save(bare, d / "pytorch_model.bin")
    shutil.copy(shared_path("fixtures", "tiny-openai-gpt", "config.json"), d)
    model = minift.from_pretrained(d)
    reference = minift.from_pretrained(shared_path("fixtures", "tiny-openai-gpt"))
    assert torch.equal(_logits(model), _logits(reference))


@pytest.mark.shared
def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    d = _copy_fixture("tiny-openai-gpt", tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["transformer.h.1.ln_2.bias"]
    tensors["transformer.h.0.attn.extra"] = torch.zeros(3)
    tensors["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(256, 64)  # transposed
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        minift.from_pretrained(d)
    text = str(err.value)
    assert "missing key transformer.h.1.ln_2.bias (expected shape (64,))" in text
    assert "unexpected key transformer.h.0.attn.extra (shape (3,))" in text
    assert "shape mismatch for transformer.h.0.mlp.c_fc.weight: checkpoint (256, 64)" in text
    assert "model expects (64, 256)" in text
    assert str(d / "model.safetensors") in text


@pytest.mark.shared
def test_truncated_and_missing_files_are_named(tmp_path):
    d = _copy_fixture("tiny-openai-gpt", tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read weights file .*model\.safetensors"):
        minift.from_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights file"):
        minift.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="does-not-exist: no such directory"):
        minift.from_pretrained(d / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="config.json"):
        minift.from_pretrained(d)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.shared
def test_bin_with_pickled_code_is_refused(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(shared_path("fixtures", "tiny-openai-gpt", "config.json"), d)
    torch.save({"transformer.tokens_embed.weight": torch.zeros(2), "x": _Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle code"):
        minift.from_pretrained(d)


@pytest.mark.shared
@pytest.mark.parametrize("change,message", [
    ({"n_embd": 65}, "n_embd (65) must be divisible by n_head (4)"),
    ({"n_layer": 0}, "n_layer must be positive"),
    ({"vocab_size": "big"}, "vocab_size must be int"),
    ({"model_type": "mixtral"}, "model_type 'mixtral' is not supported; minift knows ['gpt2', 'llama', "
                                "'mistral', 'openai-gpt', 'qwen2', 'qwen3']"),
])
def test_impossible_configs_are_refused(tmp_path, change, message):
    d = _copy_fixture("tiny-openai-gpt", tmp_path)
    config = json.loads((d / "config.json").read_text())
    config.update(change)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape(message)):
        minift.from_pretrained(d)


@pytest.mark.shared
def test_dtype_and_overrides():
    model = minift.from_pretrained(shared_path("fixtures", "tiny-openai-gpt"), dtype=torch.bfloat16,
                                   attn_pdrop=0.0)
    assert model.transformer.tokens_embed.weight.dtype == torch.bfloat16
    assert model.config.attn_pdrop == 0.0 and not model.training


@pytest.mark.requires("transformers")
@pytest.mark.shared
@pytest.mark.parametrize("name,cls", [("tiny-openai-gpt-perturbed", "OpenAIGPTLMHeadModel"),
                                      ("tiny-gpt2", "GPT2LMHeadModel")])
def test_transformers_loads_what_minift_saves(tmp_path, name, cls):
    import transformers

    model = minift.from_pretrained(shared_path("fixtures", name))
    model.resize_token_embeddings(model.config.vocab_size + 3)  # a changed model, not the fixture
    model.save_pretrained(tmp_path)
    theirs = getattr(transformers, cls).from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(ids), rtol=0, atol=1e-5)
