"""Tokenizers against transformers' reference ids, and the two ways of building them."""
from __future__ import annotations

import json

import pytest
import torch

import minift
from minift.models import GPTConfig, build_model
from minift.tokenizer import TokenizerError, check_vocab_matches, ensure_pad_token

from conftest import shared_path


def _reference(name):
    with open(shared_path("fixtures", name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.shared
@pytest.mark.parametrize("source,reference", [
    (("fixtures", "tiny-openai-gpt"), "openai_gpt_tokenizer_reference.jsonl"),
    (("tokenizers", "openai-gpt"), "openai_gpt_tokenizer_reference.jsonl"),
    (("fixtures", "tiny-gpt2"), "gpt2_tokenizer_reference.jsonl"),
    (("tokenizers", "gpt2"), "gpt2_tokenizer_reference.jsonl"),
])
def test_ids_equal_the_reference(source, reference):
    tok = minift.load_tokenizer(shared_path(*source))
    rows = _reference(reference)
    assert [tok.encode(r["text"]) for r in rows] == [r["ids"] for r in rows]
    assert tok.encode_batch([r["text"] for r in rows]) == [r["ids"] for r in rows]


@pytest.mark.shared
@pytest.mark.parametrize("name", ["openai-gpt", "gpt2"])
def test_vocab_and_merges_build_equals_tokenizer_json(tmp_path, name):
    """Built from vocab.json + merges.txt alone, the pipeline gives tokenizer.json's ids on every tweet."""
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / f).write_bytes(shared_path("tokenizers", name, f).read_bytes())
    built = minift.load_tokenizer(tmp_path)
    serialized = minift.load_tokenizer(shared_path("tokenizers", name, "tokenizer.json"))
    with open(shared_path("data", "tweet_sentiment_extraction", "train.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert built.encode_batch(texts) == serialized.encode_batch(texts)
    assert built.vocab_size == serialized.vocab_size
    assert built.eos_id == serialized.eos_id


@pytest.mark.shared
def test_openai_gpt_specials_and_decode():
    tok = minift.load_tokenizer(shared_path("tokenizers", "openai-gpt"))
    assert tok.vocab_size == 40478 and tok.pad_id is None and tok.eos_id is None
    assert tok.token_to_id("<unk>") == 0
    assert tok.decode(tok.encode("Hello, World!")) == "hello , world !"
    assert tok.add_pad_token() == 40478 and tok.pad_id == 40478 and tok.vocab_size == 40479
    assert tok.encode("x [PAD]")[-1] == 40478  # matched as a special token, never split
    fixture_tok = minift.load_tokenizer(shared_path("fixtures", "tiny-openai-gpt"))
    assert fixture_tok.pad_id == 40478


@pytest.mark.shared
def test_gpt2_eos():
    tok = minift.load_tokenizer(shared_path("tokenizers", "gpt2"))
    assert tok.eos_id == 50256 and tok.pad_id is None
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    text = "caf\u00e9  \u2014 ok"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.shared
def test_pad_then_resize_keeps_model_consistent(tmp_path):
    tok = minift.load_tokenizer(shared_path("tokenizers", "openai-gpt"))
    model = build_model(GPTConfig(vocab_size=40478, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    check_vocab_matches(model, tok)
    tok.add_pad_token()
    with pytest.raises(TokenizerError, match="40479 ids but the model's vocab_size is 40478"):
        check_vocab_matches(model, tok)
    minift.resize_model_embeddings(model, tok)
    check_vocab_matches(model, tok)
    assert model(torch.tensor([[tok.pad_id]])).shape == (1, 1, 40479)
    tok.save(tmp_path)
    again = minift.load_tokenizer(tmp_path)
    assert again.pad_id == 40478 and again.encode("hi there") == tok.encode("hi there")


def test_missing_tokenizer_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json and no vocab.json"):
        minift.load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerError, match="vocab.json: not valid JSON"):
        minift.load_tokenizer(tmp_path)


@pytest.mark.shared
@pytest.mark.parametrize("checkpoint", ["tiny-openai-gpt", "tiny-gpt2"])
def test_call_pads_like_transformers(checkpoint):
    """tok(texts, padding=True, return_tensors="pt") gives the batch transformers built for the reference."""
    import numpy as np

    ref = np.load(shared_path("fixtures", checkpoint, "reference_logits.npz"))
    tok = ensure_pad_token(minift.load_tokenizer(shared_path("fixtures", checkpoint)))  # GPT-2: pads with EOS
    assert tok.pad_token_id == int(ref["pad_token_id"])
    texts = [str(t) for t in ref["texts"]]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], torch.from_numpy(ref["input_ids"]))
    assert torch.equal(batch["attention_mask"], torch.from_numpy(ref["attention_mask"]))
    cut = tok(texts, padding=True, truncation=True, max_length=5, return_tensors="pt")
    assert torch.equal(cut["input_ids"], torch.from_numpy(ref["input_ids"][:, :5]))
    assert torch.equal(cut["attention_mask"], torch.from_numpy(ref["attention_mask"][:, :5]))
    lists = tok(texts)
    assert lists["input_ids"] == tok.encode_batch(texts) and [sum(m) for m in lists["attention_mask"]] == \
        ref["attention_mask"].sum(1).tolist()
    assert tok(texts[0]) == {"input_ids": tok.encode(texts[0]),
                             "attention_mask": [1] * len(tok.encode(texts[0]))}
    with pytest.raises(TokenizerError, match="padding=True"):
        tok(texts, return_tensors="pt")  # ragged rows


@pytest.mark.shared
def test_model_and_tokenizer_save_pretrained_round_trip(tmp_path):
    import numpy as np

    source = shared_path("fixtures", "tiny-openai-gpt")
    ref = np.load(source / "reference_logits.npz")
    minift.from_pretrained(source).save_pretrained(tmp_path)
    minift.load_tokenizer(source).save_pretrained(tmp_path)
    model, tok = minift.from_pretrained(tmp_path).eval(), minift.load_tokenizer(tmp_path)
    assert (tok.pad_token, tok.vocab_size) == ("[PAD]", model.config.vocab_size)
    batch = tok([str(t) for t in ref["texts"]], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch)
    real = batch["attention_mask"].bool()
    assert torch.allclose(logits[real], torch.from_numpy(ref["logits"])[real], atol=1e-4)


def test_padding_without_a_pad_token_says_what_to_do():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    tok = minift.Tokenizer(Backend(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>")))
    with pytest.raises(TokenizerError, match="no pad token: call add_pad_token"):
        tok(["a b", "a"], padding=True)
