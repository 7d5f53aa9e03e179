"""Chat-format SFT data (``data.format = "chat"``): every row becomes a conversation, rendered by the
chat template into token ids, with the tokens that get loss marked.

Which rows, by the columns the split has:

``messages``             TRL's conversational format: a list of ``{"role", "content"}`` turns. Loss
                         (``data.objective = "assistant"``, TRL's ``assistant_only_loss``) on every
                         assistant turn, its end-of-turn marker included: the template's
                         ``{% generation %}`` blocks, else each turn located by prefix rendering
                         (``minift.chat_template.assistant_spans``).
``prompt``/``completion`` strings (a user turn and the assistant's reply) or lists of turns, TRL's
                         prompt-completion format: the prompt rendered with the generation prompt,
                         the completion after it; loss on the completion (``"completion"`` or
                         ``"assistant"``).
``text`` + ``label``     the tweets: the user turn is ``data.template``'s part before ``{label}``, the
                         reply is the label, after an optional ``data.system_prompt``; the label
                         words are scored for accuracy as in the text format.

The whole rendered text is encoded at once (the ids ``apply_chat_template(tokenize=True)`` gives);
a token is a loss token when its characters overlap an assistant span (transformers' rule for
``return_assistant_tokens_mask``). Every conversation is one example: packing places whole
conversations in rows and never splits a turn. No EOS is appended: the template writes the
end-of-turn tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets

from .chat_template import CHATML, CHATML_TOKENS, ChatTemplateError, assistant_spans, load_template, render
from .config import DataSection
from .data import (
    DataError,
    SplitReport,
    TokenizedExamples,
    clean_split,
    format_example,
    missing_split,
    split_template,
)

MESSAGE_ROLES = ("system", "user", "assistant", "tool")


def chat_tokenizer(tokenizer, data: DataSection):
    """The tokenizer with ``data.chat_template`` as its template (format "chat"). The built-in "chatml"
    adds ``<|im_start|>``/``<|im_end|>`` as special tokens when missing (TRL's ``setup_chat_format``
    does the same; the recipe then grows the model's embedding)."""
    if data.format != "chat":
        return tokenizer
    tokenizer.chat_template = load_template(data.chat_template, tokenizer.chat_template)
    if tokenizer.chat_template == CHATML:
        for token in CHATML_TOKENS:
            tokenizer.add_special_token(token)
    return tokenizer


def row_kind(columns: list[str], data: DataSection) -> str:
    if data.messages_column in columns:
        return "messages"
    if data.prompt_column in columns and data.completion_column in columns:
        return "prompt_completion"
    if data.text_column in columns and data.label_column in columns:
        return "labelled_text"
    raise DataError(
        f'data.format = "chat" needs a {data.messages_column!r} column, {data.prompt_column!r} and '
        f"{data.completion_column!r} columns, or {data.text_column!r} and {data.label_column!r} "
        f"columns; the split has {columns}"
    )


def as_turns(value: Any, role: str, where: str) -> list[dict[str, Any]]:
    """A prompt or completion as turns: a string is one turn of ``role``; a list is checked."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return checked_messages(value, where)


def checked_messages(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise DataError(
            f'{where}: expected a non-empty list of {{"role", "content"}} turns, got {value!r:.80}'
        )
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
            raise DataError(
                f'{where}: turn {i} must be an object with "role" and "content", got {turn!r:.80}'
            )
    return value


def labelled_conversation(text: str, label: str | None, data: DataSection) -> list[dict[str, str]]:
    """A tweet as a conversation: [system], user = the template's prompt part, assistant = the label."""
    prompt_template, completion_template = split_template(data.template)
    turns = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    turns.append({"role": "user", "content": prompt_template.format(text=text.strip()).strip()})
    if label is not None:
        reply = format_example("", label, "{text}" + completion_template).strip()
        turns.append({"role": "assistant", "content": reply})
    return turns


def prompt_tokens(prompt_ids: list[int], ids: list[int], where: str) -> int:
    """How many of the conversation's tokens are the prompt's: as many of the prompt's (rendered with
    the generation prompt) as the conversation's start with (TRL's ``common_prefix_length``: a token
    merged across the boundary belongs to the completion); more than one differing is refused."""
    common = next(
        (i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids))
    )
    if common < len(prompt_ids) - 1:
        raise DataError(
            f"{where}: the chat template renders the prompt with its generation prompt differently "
            f"from the start of the whole conversation ({len(prompt_ids) - common} prompt tokens "
            f"differ); the completion cannot be located"
        )
    return common


def encode_prompt_completion(
    tokenizer, prompt: list[dict], completion: list[dict], variables: dict, where: str
) -> tuple[list[int], int]:
    """Ids of prompt + completion and the number of prompt tokens (``prompt_tokens``)."""
    template = tokenizer.chat_template
    prompt_ids = tokenizer.encode(render(template, prompt, add_generation_prompt=True, **variables))
    ids = tokenizer.encode(render(template, prompt + completion, **variables))
    return ids, prompt_tokens(prompt_ids, ids, where)


@dataclass
class RenderedRow:
    """One row's conversation as text: the assistant spans (conversations) or the prompt's text
    (prompt/completion rows and tweets), to be encoded with the rest of the batch."""

    where: str
    text: str
    spans: list[tuple[int, int]] | None = None
    prompt_text: str | None = None


def render_row(
    tokenizer, kind: str, data: DataSection, batch: dict[str, list], i: int, where: str, variables: dict
) -> RenderedRow:
    template = tokenizer.chat_template
    try:
        if kind == "messages":
            text, spans = assistant_spans(
                template, checked_messages(batch[data.messages_column][i], where), **variables
            )
            if not spans:
                raise DataError(f"{where}: the conversation has no assistant turn, so nothing to train on")
            return RenderedRow(where, text, spans=spans)
        if kind == "prompt_completion":
            prompt = as_turns(batch[data.prompt_column][i], "user", f"{where} {data.prompt_column}")
            completion = as_turns(
                batch[data.completion_column][i], "assistant", f"{where} {data.completion_column}"
            )
        else:
            turns = labelled_conversation(batch[data.text_column][i], batch[data.label_column][i], data)
            prompt, completion = turns[:-1], turns[-1:]
        return RenderedRow(
            where,
            render(template, prompt + completion, **variables),
            prompt_text=render(template, prompt, add_generation_prompt=True, **variables),
        )
    except ChatTemplateError as err:
        raise DataError(f"{where}: {err}") from None


def encode_rows(tokenizer, rows: list[RenderedRow]) -> list[tuple[list[int], list[int]]]:
    """Each row's ids and loss mask, the texts encoded as one batch: 1 on tokens overlapping an assistant
    span (transformers' rule), or on every token after the prompt's."""
    encodings = tokenizer.backend.encode_batch([r.text for r in rows], add_special_tokens=False)
    prompts = iter(tokenizer.encode_batch([r.prompt_text for r in rows if r.prompt_text is not None]))
    out = []
    for row, encoding in zip(rows, encodings):
        ids = encoding.ids
        if row.spans is not None:
            mask = [
                int(any(start < span_end and span_start < end for span_start, span_end in row.spans))
                for start, end in encoding.offsets
            ]
        else:
            n_prompt = prompt_tokens(next(prompts), ids, row.where)
            mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
        out.append((ids, mask))
    return out


def tokenize_chat_split(
    ds: datasets.Dataset,
    tokenizer,
    data: DataSection,
    labels: tuple[str, ...],
    split: str,
    report: SplitReport,
) -> datasets.Dataset:
    """``datasets.map`` (cached) from rows to ``input_ids``, ``assistant_mask``, ``prompt_length``
    (tokens before the first loss token), ``length``, ``label_index`` (-1 without a label), ``row``."""
    kind = row_kind(ds.column_names, data)
    variables = tokenizer.special_tokens_map
    label_index = {label: i for i, label in enumerate(labels)}
    max_length = data.max_length

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {
            k: []
            for k in (
                "input_ids",
                "assistant_mask",
                "prompt_length",
                "length",
                "label_index",
                "n_untruncated",
                "lost",
            )
        }
        rendered = [
            render_row(tokenizer, kind, data, batch, i, f"split {split!r} row {row}", variables)
            for i, row in enumerate(batch["row"])
        ]
        for i, (ids, mask) in enumerate(encode_rows(tokenizer, rendered)):
            out["n_untruncated"].append(len(ids))
            ids, mask = ids[:max_length], mask[:max_length]
            out["input_ids"].append(ids)
            out["assistant_mask"].append(mask)
            out["prompt_length"].append(next((t for t, m in enumerate(mask) if m), len(ids)))
            out["length"].append(len(ids))
            label = batch[data.label_column][i] if kind == "labelled_text" else None
            out["label_index"].append(label_index.get(label, -1))
            out["lost"].append(int(not any(mask[1:])))  # no target left (the first token never is one)
        return out

    remove = [c for c in ds.column_names if c != "row"]
    tokenized = ds.map(encode, batched=True, batch_size=1000, remove_columns=remove, desc="rendering chats")
    counts = tokenized.select_columns(["n_untruncated", "length", "lost"]).to_dict()
    report.truncated = sum(n > max_length for n in counts["n_untruncated"])
    report.tokens = sum(counts["length"])
    report.completion_lost = sum(counts["lost"])
    return tokenized.remove_columns(["n_untruncated", "lost"])


def clean_chat_split(
    ds: datasets.Dataset, split: str, data: DataSection, labels: tuple[str, ...]
) -> tuple[datasets.Dataset, SplitReport]:
    """The tweets as ``clean_split`` cleans them; conversation rows: empty ones (None, [], "") skipped
    and counted, a ``row`` column added."""
    kind = row_kind(ds.column_names, data)
    if kind == "labelled_text":
        return clean_split(ds, split, data.text_column, data.label_column, labels)
    report = SplitReport(split, rows_read=len(ds))
    key = data.messages_column if kind == "messages" else data.completion_column
    values = ds.select_columns([key]).to_dict()[key]
    keep = []
    for row, value in enumerate(values):
        if value is None or (isinstance(value, (str, list)) and not value):
            report.skipped_empty.append(row)
        else:
            keep.append(row)
    if not keep:
        raise DataError(f"split {split!r} has no usable rows ({report.rows_read} read, all empty)")
    cleaned = ds.add_column("row", list(range(len(ds)))).select(keep)
    report.rows_kept = len(cleaned)
    return cleaned, report


def chat_label_token_ids(tokenizer, data: DataSection, labels: tuple[str, ...]) -> list[list[int]]:
    """The tokens each label adds after a sample prompt (user turn + generation prompt), the reply's
    end-of-turn included; checked to follow the prompt's tokens as they are."""
    variables = tokenizer.special_tokens_map
    prompt = labelled_conversation("example", None, data)
    out = []
    for label in labels:
        full = labelled_conversation("example", label, data)
        ids, n_prompt = encode_prompt_completion(tokenizer, prompt, full[-1:], variables, "label scoring")
        if ids[:n_prompt] != tokenizer.encode(
            render(tokenizer.chat_template, prompt, add_generation_prompt=True, **variables)
        ):
            raise DataError(
                f"label {label!r}: its tokens do not follow the prompt's tokens unchanged; the label "
                f"words cannot be scored (set eval.accuracy = false)"
            )
        out.append(ids[n_prompt:])
    return out


def prepare_chat_split(
    dsd: datasets.DatasetDict, split: str, tokenizer, data: DataSection, labels: tuple[str, ...]
) -> tuple[TokenizedExamples, SplitReport]:
    if split not in dsd:
        raise DataError(missing_split(split, sorted(dsd)))
    cleaned, report = clean_chat_split(dsd[split], split, data, labels)
    return TokenizedExamples(tokenize_chat_split(cleaned, tokenizer, data, labels, split, report)), report


def chat_example_preparer(
    data: DataSection, splits: datasets.DatasetDict, tokenizer
) -> tuple[Callable[[str], tuple[TokenizedExamples, SplitReport]], list[list[int]]]:
    """What ``data.example_preparer`` gives for the chat format: prepare(split) and the label tokens
    (none when the rows carry no labels: accuracy is then not scored)."""
    labels = tuple(data.labels)
    labelled = row_kind(next(iter(splits.values())).column_names, data) == "labelled_text"
    label_ids = chat_label_token_ids(tokenizer, data, labels) if labelled else []
    return (lambda split: prepare_chat_split(splits, split, tokenizer, data, labels)), label_ids
