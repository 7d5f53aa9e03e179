"""Chat templates: a conversation (``[{"role": ..., "content": ...}, ...]``) rendered to the text a
chat model was trained on, the way transformers' ``apply_chat_template`` renders it, and the
character spans of the assistant's turns (what assistant-only loss trains on).

The template is Jinja, rendered with ``jinja2`` in the environment transformers 5.24 builds
(``utils/chat_template_utils.py``, ``_cached_compile_jinja_template``): an immutable sandbox with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
is ``json.dumps`` (no HTML escaping; ``indent``, ``separators``, ``sort_keys``), the globals
``raise_exception`` (a ``TemplateError``) and ``strftime_now`` (today's date), and the template
variables ``messages``, ``tools``, ``documents``, ``add_generation_prompt`` plus the tokenizer's
special tokens (``bos_token``, ``eos_token``, ...) and any extra keyword. Message keys whose value
is None are dropped first and a message's reasoning is given under each of its names, as
transformers does. ``{% generation %}...{% endgeneration %}`` marks
assistant output (transformers' ``AssistantTracker``; TRL's training templates use it).

Assistant spans: with generation markers, the marked text (TRL's ``assistant_only_loss``). Without
them, each assistant turn is found by rendering the conversation up to it with the generation
prompt and up to and including it: the text between the two (the reply and its end-of-turn
marker) is the turn, provided the template renders every shorter conversation as a prefix of the
whole one (checked; a template that does not, such as Qwen3's on several turns, is refused with a
hint to use one with generation markers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from .errors import InputError

# The ChatML layout (SmolLM2, Qwen, many others) with no default system message.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Messages = Sequence[dict[str, Any]]


class ChatTemplateError(InputError):
    """A template that does not compile or render; the message names the message index."""


def has_generation_markers(template: str) -> bool:
    return _GENERATION_TAG.search(template) is not None


@lru_cache(maxsize=16)
def compile_template(template: str):
    """The compiled template, in transformers' environment (see the module docstring)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationSpans(Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body and, while ``spans`` is a list,
        appends the body's (start, end) in the output, the output so far being ``rendered``."""

        tags: ClassVar[set[str]] = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(generation_tracking=None)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_record", []), [], [], body).set_lineno(lineno)

        def _record(self, caller):
            text = caller()
            tracking = self.environment.generation_tracking
            if tracking is not None:
                rendered, spans = tracking
                start = sum(len(block) for block in rendered)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationSpans, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(
            f"the chat template does not compile: {err.message} (line {err.lineno})"
        ) from None


def _template_data(
    messages: Messages, add_generation_prompt: bool, variables: dict[str, Any]
) -> dict[str, Any]:
    if isinstance(messages, (str, bytes)) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError(
            f"a conversation is a list of {{'role': ..., 'content': ...}} objects, got {str(messages)[:80]!r}"
        )
    chat = [_with_reasoning_aliases({k: v for k, v in m.items() if v is not None}) for m in messages]
    return {
        "tools": None,
        "documents": None,
        **variables,
        "messages": chat,
        "add_generation_prompt": add_generation_prompt,
    }


def _with_reasoning_aliases(message: dict[str, Any]) -> dict[str, Any]:
    """A message's reasoning under every name templates read (``reasoning_content``, ``thinking``),
    as transformers fills them in."""
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    return (
        message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}
    )


def render(template: str, messages: Messages, add_generation_prompt: bool = False, **variables: Any) -> str:
    """The conversation as text; ``variables``: the special tokens and template options
    (``enable_thinking=False``, ``date_string=...``). A failure names the first message whose
    conversation prefix no longer renders."""
    return _render(template, messages, add_generation_prompt, variables, spans=None)


def render_with_generation_spans(
    template: str, messages: Messages, add_generation_prompt: bool = False, **variables: Any
) -> tuple[str, list[tuple[int, int]]]:
    """The text and the (start, end) character spans of every ``{% generation %}`` block."""
    spans: list[tuple[int, int]] = []
    return _render(template, messages, add_generation_prompt, variables, spans), spans


def _render(template, messages, add_generation_prompt, variables, spans):
    import jinja2

    compiled = compile_template(template)
    data = _template_data(messages, add_generation_prompt, variables)
    try:
        if spans is None:
            return compiled.render(**data)
        rendered: list[str] = []
        compiled.environment.generation_tracking = (rendered, spans)
        try:
            for block in compiled.generate(**data):
                rendered.append(block)  # noqa: PERF402 - one by one: _record reads it mid-render
        finally:
            compiled.environment.generation_tracking = None
        return "".join(rendered)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as err:
        raise ChatTemplateError(_failure(compiled, data, err)) from None


def _failure(compiled, data: dict[str, Any], err: Exception) -> str:
    """Which message breaks the template: the first k whose messages[:k] fails to render."""
    chat = data["messages"]
    for k in range(1, len(chat) + 1):
        try:
            compiled.render(**{**data, "messages": chat[:k], "add_generation_prompt": False})
        except Exception:  # noqa: BLE001 - any failure of the prefix is the answer
            role = chat[k - 1].get("role", "?")
            return f"the chat template fails at message {k - 1} (role {role!r}): {type(err).__name__}: {err}"
    where = "with the generation prompt" if data["add_generation_prompt"] else "on the whole conversation"
    return f"the chat template fails {where} ({len(chat)} messages): {type(err).__name__}: {err}"


def assistant_spans(template: str, messages: Messages, **variables: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (see the module
    docstring): the template's ``{% generation %}`` blocks, else each turn found by prefix rendering."""
    if has_generation_markers(template):
        return render_with_generation_spans(template, messages, **variables)
    full = render(template, messages, **variables)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(template, messages[:i], add_generation_prompt=True, **variables) if i else ""
        through = render(template, messages[: i + 1], **variables)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                f"message {i} (assistant): the chat template renders the conversation up to this turn "
                f"differently from the whole conversation, so its assistant turn cannot be located; use a "
                f"template with "
                f'{{% generation %}} markers (e.g. TRL\'s training templates) or data.objective = "all"'
            )
        spans.append((len(before), len(through)))
    return full, spans


def load_template(setting: str, own: str | None, source: str = "data.chat_template") -> str:
    """The template a setting names: "" = the tokenizer's own (``own``), a built-in name ("chatml"),
    a ``.jinja`` file, or the Jinja text itself."""
    if setting == "":
        if not own:
            raise ChatTemplateError(
                f'{source} = "" asks for the tokenizer\'s chat template, but the tokenizer has '
                f'none: set {source} to "chatml", a .jinja file or the template text'
            )
        return own
    if setting in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[setting]
    if "{{" in setting or "{%" in setting:
        return setting
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ChatTemplateError(
            f'{source} = {setting!r}: no such file (give "", {sorted(BUILTIN_TEMPLATES)}, '
            f"a .jinja file or the template text)"
        )
    return path.read_text(encoding="utf-8")
