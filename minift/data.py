"""From rows to token ids: load (``datasets``), clean, format a prompt, tokenize (cached).

The stages, each a function:

    load_splits      hub id or local files -> DatasetDict(train, test[, validation])
    clean_split      drop empty texts (counted), refuse missing columns and unknown labels
    tokenize_split   ``datasets.map(batched=True)``: input_ids, prompt_length, length, label_index
"""
from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .config import DataSection
from .errors import InputError

_DEFAULTS = DataSection()  # one source for the defaults: the [data] section of the config
DEFAULT_DATASET = _DEFAULTS.source
DEFAULT_TEMPLATE = _DEFAULTS.template
DEFAULT_LABELS = tuple(_DEFAULTS.labels)
DEFAULT_MAX_LENGTH = _DEFAULTS.max_length
_EXTENSION_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROW = "row"  # the column that keeps each example's row number in its source split


class DataError(InputError):
    """Input data that cannot be used; the message names the file, split, row or column."""


@dataclass
class SplitReport:
    """What cleaning and tokenization did to one split (printed at the start of a run)."""

    split: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped_empty: list[int] = field(default_factory=list)  # row numbers of empty texts
    truncated: int = 0
    tokens: int = 0
    completion_lost: int = 0  # rows whose label tokens were cut by truncation

    def line(self) -> str:
        parts = [f"{self.split}: {self.rows_read} rows read, {self.rows_kept} kept"]
        if self.skipped_empty:
            shown = ", ".join(str(r) for r in sorted(self.skipped_empty)[:5])
            more = "..." if len(self.skipped_empty) > 5 else ""
            parts.append(f"{len(self.skipped_empty)} skipped (empty text; rows {shown}{more})")
        parts.append(f"{self.tokens} tokens")
        parts.append(f"{self.truncated} truncated")
        if self.completion_lost:
            parts.append(f"{self.completion_lost} lost their label to truncation")
        return ", ".join(parts)


# -- loading ------------------------------------------------------------------------------------
def _expand(pattern: str) -> list[str]:
    paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not paths:
        raise DataError(f"no data file matches {pattern!r}")
    return paths


def check_text_file(path: str, as_jsonl: bool = False, text_columns: tuple[str, ...] = ()) -> set[str]:
    """Refuse a text data file that ``datasets`` would mangle or fail on with a traceback that
    hides the row: invalid UTF-8 (replaced silently), no rows at all (a CSV header alone included),
    and for ``.jsonl`` a line that is not a JSON object (a malformed row, or CSV under a .jsonl name)
    or whose ``text_columns`` hold something other than text (``datasets`` would silently turn a
    number or a nested object into its JSON string). A UTF-8 byte-order mark is fine. Errors name
    the file and line. Returns the columns of a JSON-lines file (empty for CSV)."""
    jsonl = as_jsonl or Path(path).suffix.lower() == ".jsonl"
    rows, columns = 0, set()
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: line {line_no} is not valid UTF-8 (byte {err.start}: "
                                f"{line[err.start:err.start + 1]!r}); fix or re-encode the file") from None
            if not text.strip():
                continue
            rows += 1
            if jsonl:
                row = _check_json_object(text, path, line_no)
                _check_text_values(row, text_columns, path, line_no)
                columns.update(row)
    if rows == 0:
        raise DataError(f"{path}: empty (no rows) — fill it, or point data.source at another file")
    if rows == 1 and Path(path).suffix.lower() == ".csv":
        raise DataError(f"{path}: a header line and no rows — fill it, or point data.source at another file")
    return columns


def _check_json_object(text: str, path: str, line_no: int) -> dict[str, Any]:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        hint = " — is it CSV? name the file .csv" if line_no == 1 and "," in text \
            and text.lstrip()[:1] not in "{[" else " — fix or remove that line"
        raise DataError(f"{path}: line {line_no} is not valid JSON ({err.msg} at column {err.colno}): "
                        f"{text.strip()[:60]!r}{hint}") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}: line {line_no} is a JSON {type(row).__name__}, not an object of column "
                        f"-> value — one {{\"text\": ..., \"label_text\": ...}} object per line")
    return row


_JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}


def _check_text_values(row: dict[str, Any], text_columns: tuple[str, ...], path: str, line_no: int) -> None:
    for column in text_columns:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}: line {line_no}: {column!r} is "
                            f"{_JSON_KINDS.get(type(value), 'not text')} ({json.dumps(value)[:40]}), not "
                            "text — write it as a string, or fix the row")


def _column_differences(columns: dict[str, set[str]]) -> str | None:
    """Which file lacks which column, when the JSON-lines files of a source differ in columns."""
    every = set().union(*columns.values()) if columns else set()
    for path, found in columns.items():
        if found != every:
            return (f"{path} lacks column(s) {sorted(every - found)} that other files of the source have — "
                    "every file needs the same columns")
    return None


def _builder_for(paths: list[str]) -> str:
    suffixes = {Path(p).suffix.lower() for p in paths}
    builders = {_EXTENSION_BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) != 1:
        raise DataError(f"cannot read {paths}: use one of {sorted(_EXTENSION_BUILDERS)} files, "
                        f"all of one kind")
    return builders.pop()


def _local_files(source: str) -> dict[str, list[str]] | None:
    """``source`` as local files per split, or None when it is not a local path."""
    path = Path(source).expanduser()
    if path.is_dir():
        files: dict[str, list[str]] = {}
        for split in ("train", "validation", "test"):
            found = sorted(str(p) for p in path.iterdir()
                           if p.stem == split and p.suffix.lower() in _EXTENSION_BUILDERS)
            if found:
                files[split] = found
        if "train" not in files:
            raise DataError(f"{path}: expected train.jsonl / train.csv / train.parquet (and test.*) in it")
        return files
    if path.is_file() or any(ch in source for ch in "*?["):
        return {"train": _expand(source)}
    if path.suffix.lower() in _EXTENSION_BUILDERS or source.startswith((".", "/", "~")):
        raise DataError(f"data file not found: {source}")
    return None


def load_splits(source: str = DEFAULT_DATASET, data_files: dict[str, str] | None = None,
                validation_fraction: float = 0.0, seed: int = 0,
                cache_dir: str | None = None, text_columns: tuple[str, ...] = ()) -> datasets.DatasetDict:
    """Load a dataset by hub id, local directory, file or glob (or explicit ``data_files``
    per split) with ``datasets.load_dataset``. With ``validation_fraction`` > 0 a seeded
    validation split is carved from train. ``text_columns``: columns whose every value must be
    text (checked in local JSON-lines files, where ``datasets`` would convert them silently)."""
    if data_files:
        files = {split: _expand(pattern) for split, pattern in data_files.items()}
    else:
        files = _local_files(source)
    columns: dict[str, set[str]] = {}  # per JSON-lines file
    try:
        if files is None:
            dsd = datasets.load_dataset(source, cache_dir=cache_dir)
        else:
            builder = _builder_for([p for paths in files.values() for p in paths])
            if builder in ("json", "csv"):
                for paths in files.values():
                    for path in paths:
                        columns[path] = check_text_file(path, text_columns=text_columns)
            dsd = datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as err:
        for path in [p for paths in (files or {}).values() for p in paths if p.lower().endswith(".json")]:
            columns[path] = check_text_file(path, as_jsonl=True, text_columns=text_columns)  # name the line
        if differences := _column_differences({p: c for p, c in columns.items() if c}):
            raise DataError(differences) from None
        where = files if files is not None else source
        raise DataError(f"cannot load {where}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from err
    if not isinstance(dsd, datasets.DatasetDict):
        dsd = datasets.DatasetDict({"train": dsd})
    if "train" not in dsd:
        raise DataError(f"{source}: no train split (found {sorted(dsd)})")
    if validation_fraction:
        dsd["train"], dsd["validation"] = carve_validation(dsd["train"], validation_fraction, seed, source)
    return dsd


def carve_validation(train: datasets.Dataset, fraction: float, seed: int, source: str
                     ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded ``fraction`` of ``train`` held out (``datasets``' split: ceil for the held-out part)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation_fraction must be in (0, 1), got {fraction}")
    n_held_out = math.ceil(fraction * len(train))
    if len(train) - n_held_out < 1:
        raise DataError(f"data.validation_fraction = {fraction} of the {len(train)} train rows of {source} "
                        f"holds out {n_held_out} and leaves none to train on — lower "
                        "data.validation_fraction")
    if ROW not in train.column_names:  # each row keeps its number in the source, for reports
        train = train.add_column(ROW, list(range(len(train))))
    parts = train.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# -- cleaning ---------------------------------------------------------------------------------------
def clean_split(ds: datasets.Dataset, split: str, text_column: str = _DEFAULTS.text_column,
                label_column: str = _DEFAULTS.label_column,
                labels: tuple[str, ...] = DEFAULT_LABELS) -> tuple[datasets.Dataset, SplitReport]:
    """Keep rows with usable text; a ``row`` column keeps each row's number in the source.

    Empty, whitespace-only and None texts are skipped and counted. A missing column, a text
    that is not a string, or a label outside ``labels`` is an error naming the row."""
    for column in (text_column, label_column):
        if column not in ds.column_names:
            raise DataError(f"split {split!r} has no column {column!r}; columns are {ds.column_names}")
    report = SplitReport(split, rows_read=len(ds))
    columns = ds.select_columns([text_column, label_column]).to_dict()
    texts, label_values = columns[text_column], columns[label_column]
    numbers = list(ds[ROW]) if ROW in ds.column_names else list(range(len(ds)))  # row numbers in the source
    keep = []
    known = set(labels)
    for i, (row, text, label) in enumerate(zip(numbers, texts, label_values)):
        if text is not None and not isinstance(text, str):
            raise DataError(f"split {split!r} row {row}: {text_column!r} must be a string, got {text!r}")
        if text is None or not text.strip():
            report.skipped_empty.append(row)
            continue
        if label not in known:
            raise DataError(f"split {split!r} row {row}: unknown label {label!r} in column {label_column!r}; "
                            f"expected one of {list(labels)}")
        keep.append(i)
    if not keep:
        raise DataError(f"split {split!r} has no usable rows ({report.rows_read} read, all empty)")
    cleaned = (ds if ROW in ds.column_names else ds.add_column(ROW, numbers)).select(keep)
    report.rows_kept = len(cleaned)
    return cleaned, report


# -- formatting and tokenization ---------------------------------------------------------------------
def split_template(template: str) -> tuple[str, str]:
    """``"{text} sentiment: {label}"`` -> prompt template ``"{text} sentiment:"`` and the
    completion template ``" {label}"``: the completion is everything from the space before
    ``{label}`` on."""
    if "{text}" not in template or "{label}" not in template:
        raise DataError(f"template {template!r} must contain {{text}} and {{label}}")
    head, tail = template.split("{label}", 1)
    if "{text}" not in head:
        raise DataError(f"template {template!r}: {{text}} must come before {{label}}")
    stripped = head.rstrip(" ")
    return stripped, head[len(stripped):] + "{label}" + tail


def format_prompt(text: str, template: str) -> str:
    return split_template(template)[0].format(text=text.strip())


def format_example(text: str, label: str, template: str) -> str:
    return template.format(text=text.strip(), label=label)


def label_token_ids(tokenizer, template: str, labels: tuple[str, ...]) -> list[list[int]]:
    """The token ids each label adds after the prompt (checked on a sample prompt). Refused: labels
    the tokenizer cannot tell apart (the same tokens, e.g. symbols it maps to one unknown token), and
    a label whose tokens begin another's (its score is never below the longer one's, so the longer
    could never be predicted)."""
    prompt = format_prompt("example", template)
    prompt_ids = tokenizer.encode(prompt)
    out = []
    for label in labels:
        full = tokenizer.encode(format_example("example", label, template))
        if full[:len(prompt_ids)] != prompt_ids:
            raise DataError(f"template {template!r}: the prompt's tokens are not a prefix of the full text's")
        out.append(full[len(prompt_ids):])
    check_label_tokens(tokenizer, labels, out)
    return out


def check_label_tokens(tokenizer, labels: tuple[str, ...], ids: list[list[int]]) -> None:
    def shown(i: int) -> str:
        return f"{labels[i]!r} ({' '.join(map(str, ids[i]))}: {tokenizer.decode(ids[i])!r})"

    source = getattr(tokenizer, "source", "tokenizer")
    for i, label_ids in enumerate(ids):
        if not label_ids:
            raise DataError(f"data.labels: {labels[i]!r} adds no token after the prompt with {source} — "
                            "choose labels with words in them")
        for j, other in enumerate(ids):
            if i == j:
                continue
            if label_ids == other and i < j:
                raise DataError(f"data.labels {shown(i)} and {shown(j)} are the same tokens with {source}: "
                                "their scores would always tie — choose labels the tokenizer tells apart")
            if len(label_ids) < len(other) and other[:len(label_ids)] == label_ids:
                raise DataError(f"data.labels {shown(i)} is the start of {shown(j)}: its score is never "
                                f"below the longer label's, so {labels[j]!r} could never be predicted — "
                                "choose labels that start differently")


def tokenize_split(ds: datasets.Dataset, tokenizer, template: str, labels: tuple[str, ...], max_length: int,
                   text_column: str = _DEFAULTS.text_column, label_column: str = _DEFAULTS.label_column,
                   append_eos: bool = True,
                   report: SplitReport | None = None, num_proc: int | None = None) -> datasets.Dataset:
    """Tokenize with ``datasets.map(batched=True)``; the result is cached on disk by
    ``datasets`` (keyed by the input and this function's arguments) and reused.

    Columns: ``input_ids`` (truncated to ``max_length``), ``prompt_length`` (tokens before
    the label), ``length``, ``label_index`` (position of the label in ``labels``), ``row``.
    """
    label_index = {label: i for i, label in enumerate(labels)}
    eos = tokenizer.eos_id if append_eos else None

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = [format_example(t, lab, template) for t, lab in zip(batch[text_column], batch[label_column])]
        prompts = [format_prompt(t, template) for t in batch[text_column]]
        full_ids = tokenizer.encode_batch(texts)
        prompt_ids = tokenizer.encode_batch(prompts)
        out: dict[str, list[Any]] = {"input_ids": [], "prompt_length": [], "length": [], "label_index": [],
                                     "n_untruncated": []}
        for ids, p_ids, lab in zip(full_ids, prompt_ids, batch[label_column]):
            common = 0  # the prompt's tokens are a prefix of the full text's (checked per row)
            for a, b in zip(ids, p_ids):
                if a != b:
                    break
                common += 1
            if eos is not None:
                ids = ids + [eos]
            out["n_untruncated"].append(len(ids))
            ids = ids[:max_length]
            out["input_ids"].append(ids)
            out["prompt_length"].append(min(common, len(ids)))
            out["length"].append(len(ids))
            out["label_index"].append(label_index[lab])
        return out

    keep_columns = {"row"}
    remove = [c for c in ds.column_names if c not in keep_columns]
    tokenized = ds.map(encode, batched=True, batch_size=1000, remove_columns=remove, num_proc=num_proc,
                       desc="tokenizing")
    if report is not None:
        counts = tokenized.select_columns(["n_untruncated", "length", "prompt_length"]).to_dict()
        n_untruncated, lengths, prompt_lengths = (counts["n_untruncated"], counts["length"],
                                                  counts["prompt_length"])
        report.truncated = sum(n > max_length for n in n_untruncated)
        report.tokens = sum(lengths)
        report.completion_lost = sum(p >= n for p, n in zip(prompt_lengths, lengths))
    return tokenized.remove_columns("n_untruncated")


class TokenizedExamples:
    """A map-style dataset of python lists (fast to index, cheap to send to workers). Chat examples
    also carry ``assistant_mask`` (1 on the tokens that get loss under ``objective = "assistant"``)."""

    def __init__(self, tokenized: datasets.Dataset):
        # to_dict(): plain lists (datasets >= 4 returns lazy Column objects for ds["name"])
        names = ["input_ids", "prompt_length", "length", "label_index", "row"]
        columns = tokenized.select_columns(names + [c for c in ("assistant_mask",)
                                                    if c in tokenized.column_names]).to_dict()
        self.input_ids: list[list[int]] = columns["input_ids"]
        self.prompt_length: list[int] = columns["prompt_length"]
        self.lengths: list[int] = columns["length"]
        self.label_index: list[int] = columns["label_index"]
        self.rows: list[int] = columns["row"]
        self.assistant_mask: list[list[int]] | None = columns.get("assistant_mask")

    def __len__(self) -> int:
        return len(self.input_ids)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` examples (quick runs)."""
        for name in ("input_ids", "prompt_length", "lengths", "label_index", "rows", "assistant_mask"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[:n])

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = {"input_ids": self.input_ids[i], "prompt_length": self.prompt_length[i]}
        if self.assistant_mask is not None:
            example["assistant_mask"] = self.assistant_mask[i]
        return example


def check_something_to_learn(examples: TokenizedExamples, objective: str, max_length: int) -> None:
    """Refuse training examples with no next-token target at all (every loss would be 0 over 0
    tokens): ``data.max_length`` too short for any example, or for any label under ``completion``."""
    if objective == "completion":
        targets = sum(max(0, n - max(p, 1)) for n, p in zip(examples.lengths, examples.prompt_length))
    else:
        targets = sum(max(0, n - 1) for n in examples.lengths)
    if targets == 0:
        what = "label" if objective == "completion" else "second token"
        raise DataError(f"no training example keeps a {what} to predict within data.max_length = "
                        f"{max_length} (data.objective = {objective!r}) — raise data.max_length")


def missing_split(split: str, found: list[str]) -> str:
    """The error for a split the data does not have, naming the settings that pick or make one."""
    return (f"no {split!r} split (found {found}) — data.train_split and data.eval_split name the splits to "
            f"use, and data.validation_fraction (e.g. 0.1) holds out part of the train split for evaluation")


def prepare_split(dsd: datasets.DatasetDict, split: str, tokenizer, template: str = DEFAULT_TEMPLATE,
                  labels: tuple[str, ...] = DEFAULT_LABELS, max_length: int = DEFAULT_MAX_LENGTH,
                  text_column: str = _DEFAULTS.text_column, label_column: str = _DEFAULTS.label_column,
                  append_eos: bool | None = None) -> tuple[TokenizedExamples, SplitReport]:
    """Clean + tokenize one split. ``append_eos`` None means: when the tokenizer has an EOS."""
    if split not in dsd:
        raise DataError(missing_split(split, sorted(dsd)))
    if append_eos is None:
        append_eos = tokenizer.eos_id is not None
    cleaned, report = clean_split(dsd[split], split, text_column, label_column, labels)
    tokenized = tokenize_split(cleaned, tokenizer, template, labels, max_length, text_column, label_column,
                               append_eos=append_eos, report=report)
    return TokenizedExamples(tokenized), report


def example_preparer(data: DataSection, splits: datasets.DatasetDict, tokenizer):
    """``(prepare, label_ids)`` for ``data.format``: ``prepare(split)`` gives a split's examples and
    report; ``label_ids`` are the tokens each label adds after a prompt (for accuracy; empty when
    the rows have no labels). "text": ``data.template`` strings; "chat": ``minift.chat_data``."""
    labels = tuple(data.labels)
    if data.format == "chat":
        from .chat_data import chat_example_preparer

        return chat_example_preparer(data, splits, tokenizer)
    append_eos = {"auto": None, "yes": True, "no": False}[data.append_eos]

    def prepare(split: str) -> tuple[TokenizedExamples, SplitReport]:
        return prepare_split(splits, split, tokenizer=tokenizer, template=data.template, labels=labels,
                             max_length=data.max_length, text_column=data.text_column,
                             label_column=data.label_column, append_eos=append_eos)

    return prepare, label_token_ids(tokenizer, data.template, labels)
