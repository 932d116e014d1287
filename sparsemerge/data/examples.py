"""What every reader returns: labelled examples and their ordered class names, or prompt /
response conversations for a causal-LM objective."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from sparsemerge.errors import DataError

__all__ = ["Column", "Example", "LMData", "LMExample", "LabeledData", "Message", "concat"]

#: A column is named (header files, JSON keys) or numbered (headerless files).
Column = str | int


@dataclass(frozen=True)
class Example:
    """One labelled example: a text (and, for pair tasks, a second text) and a class id.

    ``fields`` holds the row's cells by column name (``"0"``, ``"1"``, ... in a headerless
    file without names), the label column left out: a prompt template
    (:mod:`~sparsemerge.data.templates`) may use any column of the file, and must never see
    the answer. ``None`` for examples built in code.
    """

    text: str
    text_pair: str | None
    label: int
    fields: Mapping[str, str] | None = field(default=None, hash=False, repr=False)


@dataclass
class LabeledData:
    """Examples plus the ordered class names their ``label`` ids index into.

    ``source`` names where the rows came from (a path, or several joined by ``" + "``);
    ``skipped`` counts bad rows dropped by ``skip_bad_rows=True``.
    """

    examples: list[Example]
    labels: list[str]
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    @property
    def text_pairs(self) -> list[str | None]:
        return [e.text_pair for e in self.examples]

    @property
    def label_ids(self) -> list[int]:
        return [e.label for e in self.examples]

    @property
    def is_pair(self) -> bool:
        return any(e.text_pair is not None for e in self.examples)

    @property
    def columns(self) -> list[str]:
        """The columns a prompt template may use: the first example's ``fields``."""
        fields = self.examples[0].fields if self.examples else None
        return list(fields or ())

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    def label_counts(self) -> dict[str, int]:
        counts = [0] * len(self.labels)
        for e in self.examples:
            counts[e.label] += 1
        return dict(zip(self.labels, counts, strict=True))

    def select(self, indices: Sequence[int]) -> LabeledData:
        """The examples at ``indices`` (in that order), same labels and source."""
        return LabeledData([self.examples[i] for i in indices], list(self.labels),
                           self.source, self.skipped)


def concat(parts: Sequence[LabeledData]) -> LabeledData:
    """Concatenate data sets that share the same class names (e.g. CoLA's two train parts)."""
    if not parts:
        raise DataError("concat: nothing to concatenate")
    labels = list(parts[0].labels)
    for p in parts[1:]:
        if list(p.labels) != labels:
            raise DataError(
                f"cannot concatenate {p.source} (labels {p.labels}) with {parts[0].source} "
                f"(labels {labels}); pass the same labels=[...] to read_table for every part"
            )
    return LabeledData(
        [e for p in parts for e in p.examples],
        labels,
        " + ".join(p.source for p in parts),
        sum(p.skipped for p in parts),
    )


class Message(NamedTuple):
    """One chat turn: ``role`` ("system", "user", "assistant", ...) and its text."""

    role: str
    content: str


@dataclass(frozen=True)
class LMExample:
    """A conversation for the causal-LM objective; the loss is on the assistant turns only.

    A prompt/response row is the two turns ``user: prompt``, ``assistant: response``; the
    last turn is always the assistant's (readers check it), so truncation that keeps the end
    keeps the answer.
    """

    messages: tuple[Message, ...]


@dataclass
class LMData:
    """Conversations for the causal-LM objective, with where they came from.

    ``source`` and ``skipped`` mean what they do in :class:`LabeledData`.
    """

    examples: list[LMExample]
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[LMExample]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> LMExample:
        return self.examples[i]
