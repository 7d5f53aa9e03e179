"""Chat templates rendered by minift (jinja2, transformers' environment) byte for byte as transformers'
``apply_chat_template`` renders them, on the templates of SmolLM2, Qwen2.5, Qwen3, Llama 3.2 and Mistral
(tests/data/chat_templates, sources in tests/data/README.md); the tokens too; the assistant spans;
tokenizer files (special tokens, chat_template.jinja) read and written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

import minift
from minift.chat_template import (
    CHATML,
    ChatTemplateError,
    assistant_spans,
    has_generation_markers,
    load_template,
    render,
)
from minift.tokenizer import Tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
FAMILIES = {  # template file -> its special tokens (as the checkpoints' tokenizer_config.json name them)
    "smollm2": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "qwen2_5": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "qwen3": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "llama3_2": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
}
SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
    "<unk>",
]
CHATS = {
    "one-turn": [
        {"role": "user", "content": "i love this weather lol"},
        {"role": "assistant", "content": "positive"},
    ],
    "system-two-turns": [
        {"role": "system", "content": "Label the sentiment of each tweet."},
        {"role": "user", "content": "  the concert was awful...  "},
        {"role": "assistant", "content": "negative"},
        {"role": "user", "content": 'Ünïcödé 🙂 and "quotes" <b>tags</b>\nnew line'},
        {"role": "assistant", "content": "neutral", "reasoning_content": None},
    ],
    "user-only": [{"role": "user", "content": "what is the sentiment?"}],
    "reasoning": [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "simple addition"},
    ],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a word up",
            "parameters": {
                "type": "object",
                "properties": {"word": {"type": "string"}},
                "required": ["word"],
            },
        },
    }
]


def _backend() -> BackendTokenizer:
    """A small byte-level BPE (every byte a token; a few merges) holding the families' special tokens."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import AddedToken, decoders

    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return backend


def _pair(family: str):
    """minift's tokenizer and transformers' fast tokenizer on the same backend and template."""
    from transformers import PreTrainedTokenizerFast

    template = (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")
    special = FAMILIES[family]
    mine = Tokenizer(_backend(), chat_template=template, source=family, **special)
    theirs = PreTrainedTokenizerFast(tokenizer_object=_backend(), chat_template=template, **special)
    return mine, theirs


def _cases(family):
    for name, chat in CHATS.items():
        if family == "mistral" and chat[0]["role"] == "system":
            continue  # the Mistral template refuses a system message (tested below)
        for generation_prompt in (False, True):
            yield name, chat, generation_prompt, {}
    if family in ("qwen2_5", "qwen3", "llama3_2"):
        yield "tools", CHATS["one-turn"], True, {"tools": TOOLS}
    if family == "qwen3":
        yield "no-thinking", CHATS["user-only"], True, {"enable_thinking": False}
    if family == "llama3_2":
        yield "dated", CHATS["system-two-turns"], True, {"date_string": "26 Jul 2024"}


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_rendering_is_byte_identical_to_transformers(family):
    mine, theirs = _pair(family)
    for name, chat, generation_prompt, variables in _cases(family):
        expected = theirs.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=generation_prompt, **variables
        )
        got = mine.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=generation_prompt, **variables
        )
        assert got.encode("utf-8") == expected.encode("utf-8"), (family, name, generation_prompt)
        ids = theirs.apply_chat_template(
            chat, add_generation_prompt=generation_prompt, return_dict=False, **variables
        )
        assert mine.apply_chat_template(chat, add_generation_prompt=generation_prompt, **variables) == ids


# A template written to lean on every part of the environment: trim_blocks / lstrip_blocks (block tags on
# their own indented lines), tojson (non-ASCII, HTML characters, indent, sort_keys), loop controls, namespace,
# strftime_now, and special tokens as variables.
ENVIRONMENT_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
<{{ message['role'] }} n={{ ns.n }}>
{{ message['content'] | trim }}
    {% if tools %}
{{ tools | tojson }}
{{ tools | tojson(indent=2, sort_keys=True) }}
    {% endif %}
{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<assistant> {{ strftime_now('%Y') }}{% endif %}"""


@pytest.mark.requires("transformers")
def test_the_environment_is_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    special = {"bos_token": "<s>", "eos_token": "</s>"}
    mine = Tokenizer(_backend(), chat_template=ENVIRONMENT_TEMPLATE, **special)
    theirs = PreTrainedTokenizerFast(
        tokenizer_object=_backend(), chat_template=ENVIRONMENT_TEMPLATE, **special
    )
    tools = [{"name": "größe", "description": "<b>size</b> & 'quotes'", "z": 1, "a": [1, 2]}]
    for chat in CHATS.values():
        for variables in ({}, {"tools": tools}):
            expected = theirs.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True, **variables
            )
            assert (
                mine.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **variables)
                == expected
            )


def _token_mask(offsets, spans) -> list[int]:
    """1 for every token overlapping a span (transformers' rule for its assistant mask)."""
    return [int(any(start < s_end and s_start < end for s_start, s_end in spans)) for start, end in offsets]


@pytest.mark.requires("transformers")
def test_assistant_masks_against_transformers_and_trl_training_template():
    """TRL's Qwen2.5 training template (the original plus {% generation %} markers) renders the same text;
    minift's mask from its markers equals transformers' ``return_assistant_tokens_mask``; the prefix
    spans found on the original template (no markers) cover the same turns, less the newline after
    the role header that TRL's markers start with."""
    from transformers import PreTrainedTokenizerFast

    original = (TEMPLATES / "qwen2_5.jinja").read_text(encoding="utf-8")
    training = (TEMPLATES / "qwen2_5_training.jinja").read_text(encoding="utf-8")
    chat = CHATS["system-two-turns"]
    mine = Tokenizer(_backend(), **FAMILIES["qwen2_5"])
    theirs = PreTrainedTokenizerFast(
        tokenizer_object=_backend(), chat_template=training, **FAMILIES["qwen2_5"]
    )
    expected = theirs.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True)
    marked_text, marked_spans = assistant_spans(training, chat, **mine.special_tokens_map)
    text, spans = assistant_spans(original, chat, **mine.special_tokens_map)
    assert marked_text == text
    ids, offsets = mine.encode_with_offsets(text)
    assert ids == expected["input_ids"]
    assert _token_mask(offsets, marked_spans) == expected["assistant_masks"]
    assert [text[s:e] for s, e in spans] == ["negative<|im_end|>\n", "neutral<|im_end|>\n"]
    assert [(s + 1, e) for s, e in marked_spans] == spans and all(text[s] == "\n" for s, _ in marked_spans)


def test_prefix_spans_cover_reply_and_end_of_turn():
    for family, expected in (
        ("smollm2", ["negative<|im_end|>\n", "neutral<|im_end|>\n"]),
        ("llama3_2", ["negative<|eot_id|>", "neutral<|eot_id|>"]),
    ):
        template = (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")
        text, spans = assistant_spans(
            template, CHATS["system-two-turns"], date_string="1 Jan 2025", **FAMILIES[family]
        )
        assert [text[s:e] for s, e in spans] == expected
    qwen3 = (TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")
    text, spans = assistant_spans(qwen3, CHATS["one-turn"])
    assert [text[s:e] for s, e in spans] == ["<think>\n\n</think>\n\npositive<|im_end|>\n"]
    with pytest.raises(ChatTemplateError, match="message 2 .assistant.: the chat template renders"):
        assistant_spans(qwen3, CHATS["system-two-turns"])  # earlier turns lose their think block


def test_a_failing_template_names_the_message():
    mistral = (TEMPLATES / "mistral.jinja").read_text(encoding="utf-8")
    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    with pytest.raises(
        ChatTemplateError,
        match=r"fails at message 2 \(role 'assistant'\): TemplateError: "
        r"Conversation roles must alternate",
    ):
        render(mistral, chat, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ChatTemplateError, match=r"fails at message 0 \(role 'system'\)"):
        render(mistral, CHATS["system-two-turns"], bos_token="<s>", eos_token="</s>")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render("{% for m in messages %}", CHATS["one-turn"])
    with pytest.raises(ChatTemplateError, match="fails at message 1"):
        render(
            "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}",
            [{"role": "user", "content": 1}, {"role": "user", "content": "x"}],
        )


def test_generation_markers_give_the_marked_spans():
    template = (
        "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}</s>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    assert has_generation_markers(template) and not has_generation_markers(CHATML)
    text, spans = assistant_spans(template, CHATS["system-two-turns"])
    assert [text[s:e] for s, e in spans] == ["negative</s>", "neutral</s>"]


def test_template_settings():
    own = "{{ messages[0]['content'] }}"
    assert load_template("", own) == own and load_template("chatml", own) == CHATML
    assert load_template("{{ 'inline' }}", None) == "{{ 'inline' }}"
    with pytest.raises(ChatTemplateError, match="the tokenizer has none"):
        load_template("", None)
    with pytest.raises(ChatTemplateError, match="no such file"):
        load_template("templates/missing.jinja", own)
    assert load_template(str(TEMPLATES / "smollm2.jinja"), None).startswith("{% for message in messages %}")


def test_tokenizer_files_carry_special_tokens_and_the_template(tmp_path):
    backend = _backend()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<|begin_of_text|>", "special": True},
                "eos_token": "<|eot_id|>",
                "chat_template": [
                    {"name": "tool_use", "template": "x"},
                    {"name": "default", "template": "{{ bos_token }}"},
                ],
            }
        )
    )
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>", "eos_token": "</s>"}))
    tok = minift.load_tokenizer(tmp_path)
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<unk>",
        None,
    )
    assert tok.chat_template == "{{ bos_token }}" and tok.bos_id == backend.token_to_id("<|begin_of_text|>")
    assert tok.apply_chat_template(CHATS["one-turn"], tokenize=False) == "<|begin_of_text|>"
    (tmp_path / "chat_template.jinja").write_text(CHATML)  # transformers 5's file wins
    assert minift.load_tokenizer(tmp_path).chat_template == CHATML
    tok.chat_template = CHATML
    tok.save_pretrained(tmp_path / "saved")
    again = minift.load_tokenizer(tmp_path / "saved")
    assert (again.chat_template, again.bos_token, again.unk_token) == (CHATML, "<|begin_of_text|>", "<unk>")
