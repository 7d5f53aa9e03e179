"""Loading, cleaning, formatting and cached tokenization, on the real tweets and on bad input."""
from __future__ import annotations

import json

import pytest

import minift
from minift.collate import Collator, padding_efficiency
from minift.data import (
    DEFAULT_LABELS,
    DEFAULT_TEMPLATE,
    DataError,
    clean_split,
    label_token_ids,
    load_splits,
    prepare_split,
    split_template,
    tokenize_split,
)
from minift.sampling import LengthGroupedSampler, RandomSampler

from conftest import shared_path


@pytest.fixture(scope="module")
def real_train():
    tok = minift.load_tokenizer(shared_path("fixtures", "tiny-openai-gpt"))
    splits = load_splits(str(shared_path("data", "tweet_sentiment_extraction")))
    examples, report = prepare_split(splits, "train", tok, max_length=128)
    return tok, splits, examples, report


@pytest.mark.shared
def test_real_tweets_empty_row_skipped_and_counted(real_train):
    tok, splits, examples, report = real_train
    assert report.rows_read == 27481 and report.rows_kept == 27480
    assert report.skipped_empty == [314]
    assert "1 skipped (empty text; rows 314)" in report.line()
    assert report.truncated == 0
    # the fixtures' README: formatted train texts total 588028 tokens, 3 of them from the empty row
    assert report.tokens == 588028 - 3 == sum(examples.lengths)
    assert 314 not in examples.rows and examples.rows[314] == 315
    # prompt_length: every token but the label
    assert all(p == n - 1 for p, n in zip(examples.prompt_length, examples.lengths))


@pytest.mark.shared
def test_trainer_trace_texts_are_formatted_and_tokenized_identically(real_train):
    tok, splits, examples, _ = real_train
    with open(shared_path("fixtures", "trainer_trace", "batches.json")) as f:
        reference = json.load(f)["examples"]
    for ref in reference:
        assert examples.input_ids[ref["train_row"]] == ref["input_ids"], ref["train_row"]


@pytest.mark.shared
def test_padding_efficiency_length_grouping_vs_random_vs_max_length(real_train):
    _, _, examples, _ = real_train
    collator = Collator(pad_id=40478)
    grouped = LengthGroupedSampler(examples.lengths, 32, seed=0).batches(0)
    random_batches = RandomSampler(len(examples), 32, seed=0).batches(0)
    eff_grouped = padding_efficiency(examples.lengths, grouped, collator)
    eff_random = padding_efficiency(examples.lengths, random_batches, collator)
    eff_512 = padding_efficiency(examples.lengths, random_batches,
                                 Collator(40478, padding="max_length", max_length=512))
    assert eff_grouped >= 0.95
    assert 0.4 < eff_random < 0.6
    assert eff_512 == pytest.approx(sum(examples.lengths) / (512 * len(examples)))


@pytest.mark.shared
@pytest.mark.parametrize("tokenizer", [("tokenizers", "openai-gpt"), ("tokenizers", "gpt2")])
def test_each_label_is_one_token_after_the_template(tokenizer):
    tok = minift.load_tokenizer(shared_path(*tokenizer))
    ids = label_token_ids(tok, DEFAULT_TEMPLATE, DEFAULT_LABELS)
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 3


@pytest.mark.shared
def test_gpt2_appends_eos_and_truncation_is_counted(tmp_path):
    tok = minift.load_tokenizer(shared_path("tokenizers", "gpt2"))
    rows = [{"text": "good day " * 30, "label_text": "positive"}, {"text": "meh", "label_text": "neutral"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits(str(tmp_path))
    examples, report = prepare_split(splits, "train", tok, max_length=16)
    assert examples.input_ids[1][-1] == 50256 and examples.lengths[0] == 16
    assert report.truncated == 1 and report.completion_lost == 1
    assert "1 truncated" in report.line()


@pytest.mark.shared
def test_tokenization_is_cached_by_datasets(real_train):
    tok, splits, _, _ = real_train
    cleaned, _ = clean_split(splits["test"], "test")
    first = tokenize_split(cleaned, tok, DEFAULT_TEMPLATE, DEFAULT_LABELS, 128)
    second = tokenize_split(cleaned, tok, DEFAULT_TEMPLATE, DEFAULT_LABELS, 128)
    assert first.cache_files and first.cache_files == second.cache_files
    other = tokenize_split(cleaned, tok, DEFAULT_TEMPLATE, DEFAULT_LABELS, 32)  # other args, other cache
    assert other.cache_files != first.cache_files


def _write(tmp_path, rows, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_validation_split_is_carved_with_a_seed(tmp_path):
    _write(tmp_path, [{"text": f"t{i}", "label_text": "neutral"} for i in range(100)])
    a = load_splits(str(tmp_path), validation_fraction=0.2, seed=1)
    b = load_splits(str(tmp_path), validation_fraction=0.2, seed=1)
    assert len(a["validation"]) == 20 and len(a["train"]) == 80
    assert a["validation"]["text"] == b["validation"]["text"]


def test_csv_glob_and_explicit_files(tmp_path):
    (tmp_path / "a.csv").write_text("text,label_text\nhello,positive\n")
    (tmp_path / "b.csv").write_text("text,label_text\nbye,negative\n")
    splits = load_splits(str(tmp_path / "*.csv"))
    assert sorted(splits["train"]["text"]) == ["bye", "hello"]
    splits = load_splits("unused", data_files={"train": str(tmp_path / "a.csv"),
                                               "test": str(tmp_path / "b.csv")})
    assert splits["test"]["text"] == ["bye"]


def test_missing_column_lists_the_columns(tmp_path):
    _write(tmp_path, [{"tweet": "hi", "label_text": "neutral"}])
    splits = load_splits(str(tmp_path))
    with pytest.raises(DataError,
                       match=r"split 'train' has no column 'text'; columns are \['tweet', 'label_text'\]"):
        clean_split(splits["train"], "train")


def test_unknown_label_names_the_row(tmp_path):
    _write(tmp_path, [{"text": "a", "label_text": "neutral"}, {"text": "b", "label_text": "angry"}])
    with pytest.raises(DataError, match=r"split 'train' row 1: unknown label 'angry'"):
        clean_split(load_splits(str(tmp_path))["train"], "train")


def test_none_and_blank_texts_are_skipped_and_counted(tmp_path):
    _write(tmp_path, [{"text": None, "label_text": "neutral"}, {"text": "  \t", "label_text": "neutral"},
                      {"text": "ok", "label_text": "positive"}])
    cleaned, report = clean_split(load_splits(str(tmp_path))["train"], "train")
    assert report.skipped_empty == [0, 1] and cleaned["row"] == [2]


def test_split_with_no_usable_rows_is_an_error(tmp_path):
    _write(tmp_path, [{"text": "", "label_text": "neutral"}])
    with pytest.raises(DataError, match="split 'train' has no usable rows"):
        clean_split(load_splits(str(tmp_path))["train"], "train")


def test_non_string_text_names_the_row(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"text": [["a list"], ["x"]], "label_text": ["neutral", "neutral"]})
    with pytest.raises(DataError, match=r"row 0: 'text' must be a string"):
        clean_split(ds, "train")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_splits(str(tmp_path / "nope.jsonl"))
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"train.jsonl: empty \(no rows\)"):
        load_splits(str(tmp_path / "train.jsonl"))
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "ok", "label_text": "neutral"}\n'
                                           b'{"text": "\xff\xfe bad", "label_text": "neutral"}\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 2 is not valid UTF-8 \(byte 10"):
        load_splits(str(tmp_path / "train.jsonl"))


def test_template_split_and_checks():
    assert split_template("{text} sentiment: {label}") == ("{text} sentiment:", " {label}")
    assert split_template("Tweet: {text}\nLabel:{label}.") == ("Tweet: {text}\nLabel:", "{label}.")
    with pytest.raises(DataError, match="must contain"):
        split_template("{text} only")
    with pytest.raises(DataError, match="must come before"):
        split_template("{label} {text}")
