"""Tokenizers, built with the ``tokenizers`` library: any ``tokenizer.json`` (Llama 3, SmolLM2,
Qwen, Mistral, GPT-2, ...), or the openai-gpt and GPT-2 BPEs from their vocabulary files.

Special tokens (BOS, EOS, pad, unk) come from ``tokenizer_config.json`` / ``special_tokens_map.json``
(a string, or a serialized ``AddedToken`` with its ``content``); the chat template from
``chat_template.jinja`` (transformers 5's file) or ``tokenizer_config.json``'s ``chat_template``
(a string, or a list of named templates whose ``default`` is taken), rendered by
``minift.chat_template`` as transformers' ``apply_chat_template`` renders it.

Without ``tokenizer.json``, from ``vocab.json`` + ``merges.txt`` with the same pipeline
transformers' fast tokenizers use:

* openai-gpt: BertNormalizer(lowercase, strip accents) → BertPreTokenizer →
  BPE(unk ``<unk>``, end-of-word suffix ``</w>``) → BPEDecoder(``</w>``);
* gpt2: ByteLevel pre-tokenizer (no prefix space) → byte-level BPE → ByteLevel decoder,
  with ``<|endoftext|>`` as a special token.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from .errors import InputError
from .hub import TOKENIZER_FILES, resolve

PAD_TOKEN = "[PAD]"
GPT2_EOS = "<|endoftext|>"


class TokenizerError(InputError):
    pass


class Tokenizer:
    """A thin, explicit wrapper: ``encode`` adds no special tokens and never truncates."""

    def __init__(self, backend: BackendTokenizer, pad_token: str | None = None, eos_token: str | None = None,
                 source: str = "tokenizer", bos_token: str | None = None, unk_token: str | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        self.source = source
        self.backend.no_padding()
        self.backend.no_truncation()
        def known(token: str | None) -> str | None:  # a named token the vocabulary does not hold is dropped
            return token if token is not None and backend.token_to_id(token) is not None else None

        self.pad_token, self.eos_token = known(pad_token), known(eos_token)
        self.bos_token, self.unk_token = known(bos_token), known(unk_token)
        self.chat_template = chat_template

    # -- ids --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) characters in ``text``."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    # -- chat -------------------------------------------------------------------------------------
    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens a chat template sees (``bos_token``, ``eos_token``, ...)."""
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                 "pad_token": self.pad_token}
        return {k: v for k, v in named.items() if v is not None}

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True,
                            chat_template: str | None = None, **variables) -> str | list[int]:
        """The conversation rendered by the chat template (this tokenizer's, or ``chat_template``)
        as transformers renders it, then encoded without added special tokens (the template writes
        them); ``tokenize=False`` returns the text. ``variables`` reach the template
        (``enable_thinking=False``, ``date_string=...``)."""
        from .chat_template import ChatTemplateError, render

        template = chat_template or self.chat_template
        if not template:
            raise ChatTemplateError(f"tokenizer {self.source} has no chat template: pass chat_template= "
                                    f"(minift.chat_template.CHATML is ChatML)")
        text = render(template, messages, add_generation_prompt, **{**self.special_tokens_map, **variables})
        return self.encode(text) if tokenize else text

    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None) -> dict:
        """Encode as a transformers tokenizer does: ``{"input_ids", "attention_mask"}``.

        ``padding``: True or "longest" pads right with the pad token to the longest row,
        "max_length" to ``max_length``; ``truncation`` cuts rows to ``max_length``;
        ``return_tensors="pt"`` gives int64 tensors [rows, time] (a single string is one row),
        otherwise lists (a single string gives flat lists). No special tokens are added.
        """
        single = isinstance(text, str)
        rows = self.encode_batch([text] if single else list(text))
        if (truncation or padding == "max_length") and max_length is None:
            raise TokenizerError("truncation and padding='max_length' need max_length")
        if truncation:
            rows = [row[:max_length] for row in rows]
        masks = [[1] * len(row) for row in rows]
        if padding not in (False, "do_not_pad"):
            if padding not in (True, "longest", "max_length"):
                raise TokenizerError(f"padding={padding!r}: use True / 'longest', 'max_length' or False")
            if self.pad_id is None:
                raise TokenizerError(f"tokenizer {self.source} has no pad token: call add_pad_token() (then "
                                     "resize the model's embeddings) or ensure_pad_token(tokenizer, 'eos')")
            width = max_length if padding == "max_length" else max(map(len, rows), default=0)
            masks = [mask + [0] * (width - len(mask)) for mask in masks]
            rows = [row + [self.pad_id] * (width - len(row)) for row in rows]
        if return_tensors == "pt":
            if len({len(row) for row in rows}) > 1:
                raise TokenizerError("return_tensors='pt' needs rows of one length: pass padding=True")
            return {"input_ids": torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1),
                    "attention_mask": torch.tensor(masks, dtype=torch.long).reshape(len(rows), -1)}
        if return_tensors is not None:
            raise TokenizerError(f"return_tensors={return_tensors!r}: only 'pt' (PyTorch) is supported")
        if single:
            return {"input_ids": rows[0], "attention_mask": masks[0]}
        return {"input_ids": rows, "attention_mask": masks}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (what the model's embedding must hold)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.backend.token_to_id(self.pad_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    pad_token_id, eos_token_id, bos_token_id = pad_id, eos_id, bos_id  # the names transformers users know

    # -- special tokens --------------------------------------------------------------------------
    def add_pad_token(self, token: str = PAD_TOKEN) -> int:
        """Add ``token`` as a special padding token (id = current vocab size) and return its id.
        Call ``resize_model_embeddings`` afterwards so the model has a row for it."""
        self.pad_token = token
        return self.add_special_token(token)

    def add_special_token(self, token: str) -> int:
        """``token`` as one special token (added at the end of the vocabulary when missing); its id."""
        if self.backend.token_to_id(token) is None:
            self.backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        return self.backend.token_to_id(token)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (pad, EOS, BOS, unk tokens) and the
        chat template (``chat_template.jinja``, transformers 5's file) into ``directory``;
        ``load_tokenizer(directory)`` reads them back. Written beside ``model.save_pretrained(directory)``,
        the folder holds the whole model."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"pad_token": self.pad_token, "eos_token": self.eos_token}
        config.update({k: v for k, v in (("bos_token", self.bos_token), ("unk_token", self.unk_token)) if v})
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self.chat_template:
            (directory / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
        return directory

    save = save_pretrained


def ensure_pad_token(tokenizer: Tokenizer, policy: str = "auto") -> Tokenizer:
    """Give ``tokenizer`` a pad token. ``"auto"``: keep the one it has, else pad with EOS when it has
    one (GPT-2), else add ``[PAD]`` (GPT-1; resize the model after). ``"eos"``: pad with EOS.
    Any other string: add that token. Pads never get loss: labels come from the lengths."""
    if policy == "eos" or (policy == "auto" and tokenizer.pad_id is None and tokenizer.eos_id is not None):
        if tokenizer.eos_id is None:
            raise TokenizerError(f"pad with EOS asked for, but tokenizer {tokenizer.source} has no EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    elif policy == "auto" and tokenizer.pad_id is None:
        tokenizer.add_pad_token(PAD_TOKEN)
    elif policy not in ("auto", "eos"):
        tokenizer.add_pad_token(policy)
    return tokenizer


def resize_model_embeddings(model, tokenizer: Tokenizer) -> None:
    """Make the model's vocabulary match the tokenizer (new rows = mean of the old rows, head tied)."""
    model.resize_token_embeddings(tokenizer.vocab_size)


def check_vocab_matches(model, tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer that emits ids the model has no row for."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{model.config.vocab_size}: ids >= {model.config.vocab_size} would index past the embedding")


# A sample of what a tokenizer may meet: two tokenizers with one vocabulary that split it alike are the same.
_PROBE = ("Hello World! héllo CAFÉ 123 4.5 :) @user #tag https://t.co/x sentiment: positive negative "
          "neutral 😀 don't   tabs\tand\nlines <|endoftext|> [PAD] <unk>")


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether ``a`` and ``b`` give every token the same id (same vocabulary, added tokens included,
    and the same split of a probe text)."""
    if a.vocab_size != b.vocab_size or a.backend.get_vocab(True) != b.backend.get_vocab(True):
        return False
    return a.encode(_PROBE) == b.encode(_PROBE)


def has_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer.json").exists() or ((directory / "vocab.json").exists()
                                                       and (directory / "merges.txt").exists())


# -- building from files ------------------------------------------------------------------------
def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{line_no}: a merge needs two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{path}: expected a JSON object of token -> id")
    return vocab


def build_openai_gpt_tokenizer(vocab_file: Path, merges_file: Path) -> BackendTokenizer:
    vocab, merges = _read_vocab(vocab_file), _read_merges(merges_file)
    tok = BackendTokenizer(models.BPE(vocab, merges, unk_token="<unk>", end_of_word_suffix="</w>",
                                      continuing_subword_prefix="", fuse_unk=False))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    if "<unk>" in vocab:
        tok.add_special_tokens([AddedToken("<unk>", special=True, normalized=False)])
    return tok


def build_gpt2_tokenizer(vocab_file: Path, merges_file: Path) -> BackendTokenizer:
    vocab, merges = _read_vocab(vocab_file), _read_merges(merges_file)
    tok = BackendTokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="",
                                      fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if GPT2_EOS in vocab:
        tok.add_special_tokens([AddedToken(GPT2_EOS, special=True, normalized=False)])
    return tok


SPECIAL_TOKEN_KEYS = ("pad_token", "eos_token", "bos_token", "unk_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _special_tokens(directory: Path) -> dict:
    """The named special tokens and the chat template a tokenizer directory declares
    (``tokenizer_config.json`` over ``special_tokens_map.json``, ``chat_template.jinja`` over both)."""
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = directory / name
        if file.exists():
            try:
                raw = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise TokenizerError(f"{file}: not valid JSON ({err})") from None
            if not isinstance(raw, dict):
                raise TokenizerError(f"{file}: expected a JSON object")
            for key in SPECIAL_TOKEN_KEYS:
                value = raw.get(key)
                if isinstance(value, dict):  # serialized AddedToken
                    value = value.get("content")
                if value is not None:
                    out[key] = value
            template = raw.get("chat_template")
            if isinstance(template, list):  # named templates: transformers uses "default"
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if isinstance(template, str):
                out["chat_template"] = template
    if (directory / CHAT_TEMPLATE_FILE).exists():
        out["chat_template"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return out


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a local directory (or ``tokenizer.json`` file) or a hub name.

    GPT-2 tokenizers get ``<|endoftext|>`` as their EOS; openai-gpt has none. The pad token
    is whatever ``tokenizer_config.json`` names (``[PAD]`` for a fine-tuned openai-gpt), else
    none: call ``add_pad_token``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        directory, tokenizer_json = path.parent, path
    else:
        directory = resolve(name_or_path, want=TOKENIZER_FILES)
        tokenizer_json = directory / "tokenizer.json"
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    if tokenizer_json.exists():
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_json))
        except Exception as err:
            raise TokenizerError(f"cannot read {tokenizer_json}: {err}") from None
    elif vocab_file.exists() and merges_file.exists():
        vocab = _read_vocab(vocab_file)
        byte_level = GPT2_EOS in vocab or "\u0120the" in vocab
        build = build_gpt2_tokenizer if byte_level else build_openai_gpt_tokenizer
        backend = build(vocab_file, merges_file)
    else:
        raise TokenizerError(f"{directory}: no tokenizer.json and no vocab.json + merges.txt")
    special = _special_tokens(directory)
    eos = special.get("eos_token")
    if eos is None and backend.token_to_id(GPT2_EOS) is not None:
        eos = GPT2_EOS
    return Tokenizer(backend, pad_token=special.get("pad_token"), eos_token=eos, source=str(directory),
                     bos_token=special.get("bos_token"), unk_token=special.get("unk_token"),
                     chat_template=special.get("chat_template"))
