"""Chat templates: the model's own Jinja template rendered as the model's authors wrote it (the
way llama-cpp-python renders GGUF templates), or one of llama.cpp's built-in formats by name.

Which template (`choose`):
- none asked: the GGUF's ``tokenizer.chat_template``; a model without one gets ``chatml``, the
  fallback llama.cpp's tools use, and a warning that says how to choose;
- a name llama.cpp knows (``chatml``, ``gemma``, ``llama3``, ... `builtin_names()`): its own C++
  formatter;
- a file: its text as a Jinja template.

Media go in as the model's marker inside the content string (as llama-server passes them to
templates); libmtmd later replaces each marker with the image's own start/end tokens.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._libs import llama_cpp as L
from .errors import InvalidArgumentError, PromptError

FALLBACK = "chatml"  # llama.cpp's choice for a model that carries no template


@dataclass(frozen=True)
class ChatTemplate:
    """A chosen template: Jinja source, or the name of one of llama.cpp's formatters."""

    label: str  # for messages: "the model's", "chatml", a file name
    jinja: str | None = None
    builtin: str | None = None


@functools.cache
def builtin_names() -> tuple[str, ...]:
    """The template names llama.cpp's llama_chat_apply_template formats itself."""
    n = int(L.llama_chat_builtin_templates(None, 0))
    arr = (ctypes.c_char_p * n)()
    L.llama_chat_builtin_templates(arr, n)
    return tuple(sorted(a.decode() for a in arr if a))


def names_a_template(spec: str) -> bool:
    """Whether ``spec`` is one of llama.cpp's names or a file (what ``choose`` accepts)."""
    return spec in builtin_names() or Path(spec).expanduser().is_file()


def choose(model_name: str, gguf_template: str | None, spec: str | None) -> ChatTemplate:
    """The template for ``spec`` (None or "": the model's own), checked before any generation."""
    if not spec:
        if gguf_template:
            return ChatTemplate("the model's", jinja=gguf_template)
        warnings.warn(
            f"{model_name} has no chat template: using {FALLBACK}, llama.cpp's fallback (choose one with "
            "--chat-template NAME or chat_template=NAME; or send the prompt raw: --raw, chat_template=False)",
            stacklevel=3,
        )
        return ChatTemplate(FALLBACK, builtin=FALLBACK)
    if spec in builtin_names():
        return ChatTemplate(spec, builtin=spec)
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return ChatTemplate(path.name, jinja=path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgumentError(f"chat template {spec}: cannot be read ({e})") from None
    raise InvalidArgumentError(
        f"unknown chat template {spec!r}: give a Jinja template file or one of llama.cpp's names: "
        + ", ".join(builtin_names())
    )


def render(tmpl: ChatTemplate, messages: list[dict[str, str]], bos: str, eos: str, adds_bos: bool) -> str:
    """``messages`` in the template, ending with the assistant's turn to speak. ``bos``/``eos`` are the
    vocabulary's texts of those tokens; when the tokenizer adds BOS itself (``adds_bos``) a BOS the
    template writes in front is dropped, or the model would read two."""
    if tmpl.builtin is not None:
        return _render_builtin(tmpl.builtin, messages)
    assert tmpl.jinja is not None
    try:
        compiled = _compiled(tmpl.jinja)
    except PromptError:
        # Jinja that jinja2 cannot parse (e.g. a template written for another engine's extensions):
        # llama.cpp's formatters recognise many formats from their source, as its tools do without --jinja
        try:
            return _render_builtin(tmpl.jinja, messages)
        except PromptError:
            pass
        raise
    text = _render_jinja(compiled, tmpl.label, messages, bos, eos)
    if adds_bos and bos and text.startswith(bos):
        text = text[len(bos) :]
    return text


class _TemplateRaised(Exception):
    """raise_exception() called by a template: its message is for the user."""


def _raise(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want JSON as Python writes it
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    from jinja2.exceptions import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # sandboxed: a template is data from a downloaded file and must not reach Python's internals
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise PromptError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def _render_jinja(compiled, label: str, messages: list[dict[str, str]], bos: str, eos: str) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return str(compiled.render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos))
    except _TemplateRaised as e:  # the template's own words, e.g. "roles must alternate user/assistant"
        raise PromptError(f"{label} chat template refused the messages: {e}") from None
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise PromptError(f"{label} chat template failed on these messages: {e}") from None


def _render_builtin(name: str, messages: list[dict[str, str]]) -> str:
    """llama.cpp's own formatter for ``name`` (a built-in name, or a template's source it recognises)."""
    enc = [(m["role"].encode(), m["content"].encode()) for m in messages]  # alive during the call
    arr = (L.llama_chat_message * max(1, len(enc)))(*[L.llama_chat_message(role=r, content=c) for r, c in enc])
    size = max(4096, 2 * sum(len(c) for _, c in enc) + 1024)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = L.llama_chat_apply_template(name.encode(), arr, len(enc), True, buf, size)
        if n < 0:
            raise PromptError(f"llama.cpp could not format these messages as {name[:40]!r}")
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n + 1
    raise PromptError("chat template output too long")
