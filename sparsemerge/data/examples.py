"""What every reader returns: labelled examples and their ordered class names."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sparsemerge.errors import DataError

__all__ = ["Column", "Example", "LabeledData", "concat"]

#: A column is named (header files, JSON keys) or numbered (headerless files).
Column = str | int


@dataclass(frozen=True)
class Example:
    """One labelled example: a text (and, for pair tasks, a second text) and a class id."""

    text: str
    text_pair: str | None
    label: int


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
