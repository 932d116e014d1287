"""Prompt templates: how a labelled row becomes the prompt an instruction model answers.

A :class:`PromptTemplate` is a format string over the data's columns (``{sentence}``,
``{#1 String}``; field names are taken literally, as the file names its columns; ``{{`` and
``}}`` are literal braces), optionally wrapped as a user turn in the tokenizer's chat
template with the assistant's generation prompt. The filled prompt then ends where the model
would answer, so a head reading the last position (label-token heads start from the
vocabulary rows of the answers) reads the answer position. The template is small and
serialisable (:meth:`PromptTemplate.to_dict`) so that it travels with an adapter.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sparsemerge.data.examples import Example, LabeledData, Message
from sparsemerge.errors import DataError

__all__ = ["PromptTemplate", "apply_template", "chat_segments", "render_chat", "stored_template",
           "texts_data"]


@dataclass(frozen=True)
class PromptTemplate:
    """A format string over the data's columns; ``chat``: wrap it as a chat user turn."""

    template: str
    chat: bool = False
    _parts: tuple[tuple[str, str | None], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as e:
            raise DataError(f"template {self.template!r}: {e} (write {{{{ and }}}} for literal "
                            f"braces)") from None
        for _, name, spec, conversion in parsed:
            if name == "" or spec or conversion:
                raise DataError(
                    f"template {self.template!r}: fields are plain column names such as "
                    f"{{sentence}}, without positions, !conversions or :formats"
                )
        parts = tuple((literal, name) for literal, name, _, _ in parsed)
        if not any(name is not None for _, name in parts):
            raise DataError(f"template {self.template!r} uses no column: name one such as "
                            f"{{sentence}}")
        object.__setattr__(self, "_parts", parts)

    @property
    def fields(self) -> tuple[str, ...]:
        """The columns the template uses, in order of first use."""
        return tuple(dict.fromkeys(name for _, name in self._parts if name is not None))

    def fill(self, row: Mapping[str, str]) -> str:
        """The template with each field replaced by the row's cell (no chat wrapping)."""
        missing = [f for f in self.fields if f not in row]
        if missing:
            raise DataError(self._unknown(missing, row))
        return "".join(literal + (row[name] if name is not None else "")
                       for literal, name in self._parts)

    def check_columns(self, columns: Sequence[str], source: str) -> None:
        """Fail early, before any row is filled, if the data lacks a field's column."""
        missing = [f for f in self.fields if f not in columns]
        if missing:
            raise DataError(f"{source}: {self._unknown(missing, columns)}")

    def _unknown(self, missing: Sequence[str], columns: Sequence[str]) -> str:
        have = ", ".join(repr(c) for c in columns) or "none"
        return (f"template {self.template!r} uses {', '.join(repr(m) for m in missing)}, "
                f"which the data does not have; its columns are {have} (the label column "
                f"is never offered)")

    def to_dict(self) -> dict[str, Any]:
        """What adapter metadata stores: ``{"template": str, "chat": bool}``."""
        return {"template": self.template, "chat": self.chat}

    @classmethod
    def from_dict(cls, d: Any) -> PromptTemplate:
        """The inverse of :meth:`to_dict`; anything else is a :class:`DataError`."""
        if (not isinstance(d, dict) or not set(d) <= {"template", "chat"}
                or not isinstance(d.get("template"), str)
                or not isinstance(d.get("chat", False), bool)):
            raise DataError(f"not a prompt template: {d!r}; expected "
                            f"{{'template': str, 'chat': bool}}")
        return cls(d["template"], d.get("chat", False))


def stored_template(prompt: Mapping[str, Any] | None) -> PromptTemplate | None:
    """The template a head stores (``Head.prompt``, a merged head's config ``prompt``), or
    None for a head that reads the raw text."""
    return None if prompt is None else PromptTemplate.from_dict(dict(prompt))


def texts_data(texts: Sequence[str], pairs: Sequence[str] | None = None,
               template: PromptTemplate | None = None) -> LabeledData:
    """Raw texts (and their pairs) as unlabelled data for ``batching.encode``. A
    ``template``'s fields are filled, in order of first use, from the text and its pair:
    ``{sentence}`` from the text; ``{#1 String}`` and ``{#2 String}`` from text and pair."""
    if pairs is not None and len(pairs) != len(texts):
        raise DataError(f"{len(texts)} texts but {len(pairs)} text pairs")
    fields = template.fields if template is not None else ()
    given = 1 if pairs is None else 2
    if template is not None and len(fields) != given:
        raise DataError(f"the head's template {template.template!r} uses {len(fields)} "
                        f"column(s) ({', '.join(fields)}), filled in that order from each "
                        f"text{' and its pair' if len(fields) > 1 else ''}; {given} given")
    examples = [Example(t, None if pairs is None else pairs[i], 0,
                        dict(zip(fields, (t,) if pairs is None else (t, pairs[i]),
                                 strict=False)) if template is not None else None)
                for i, t in enumerate(texts)]
    return LabeledData(examples, ["?"], "texts")


def render_chat(messages: Sequence[Message], tokenizer: Any, *,
                add_generation_prompt: bool) -> str:
    """``messages`` as text in the tokenizer's chat template (its special tokens included,
    so tokenise the result with ``add_special_tokens=False``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{type(tokenizer).__name__} has no chat template; use a tokenizer "
                        f"that has one (an instruction model's), or drop the chat wrapping")
    return tokenizer.apply_chat_template([m._asdict() for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def apply_template(data: LabeledData, template: PromptTemplate, tokenizer: Any) -> list[str]:
    """Each example's prompt: the template filled from its row, and with ``template.chat``
    wrapped as a user turn followed by the assistant's generation prompt, so that the text
    ends at the answer position."""
    if any(e.fields is None for e in data.examples):
        raise DataError(f"{data.source}: examples built without columns cannot fill template "
                        f"{template.template!r}; read the data with read_table, or give each "
                        f"Example fields={{column: text}}")
    template.check_columns(data.columns, data.source)
    prompts = [template.fill(e.fields) for e in data.examples]
    if template.chat:
        prompts = [render_chat([Message("user", p)], tokenizer, add_generation_prompt=True)
                   for p in prompts]
    return prompts


def chat_segments(messages: Sequence[Message], tokenizer: Any) -> list[tuple[str, bool]]:
    """A conversation in the chat template, cut into ``(text, is_answer)`` pieces.

    Each assistant turn's piece is what the template writes after the generation prompt (its
    content and end-of-turn tokens): the tokens the model must learn to produce. Found by
    rendering growing prefixes of the conversation, which needs a template whose rendering of
    a prefix is a prefix of the whole (true of the usual ones; checked).
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        prompt = render_chat(messages[:i], tokenizer, add_generation_prompt=True)
        full = render_chat(messages[: i + 1], tokenizer, add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError("the tokenizer's chat template does not render a conversation's "
                            "start as a prefix of the whole, so its answers cannot be located")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces
