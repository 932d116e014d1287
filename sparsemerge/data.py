"""Loading and tokenising labelled text data.

Three layers, each usable alone:

* :func:`read_table` reads a CSV / TSV / JSON-Lines file (optionally gzipped) into a
  :class:`LabeledData`, validating every row. Bad rows raise :class:`DataError` naming
  ``file:line`` and the column, or are skipped and counted with ``skip_bad_rows=True``.
* :data:`TASKS` / :func:`load_task` are presets for the GLUE layouts (SST-2, CoLA, MRPC) and
  the UCI SMS Spam Collection. Without a ``data_dir`` the small real subsets shipped in
  ``sparsemerge/datasets/`` are used (see that folder's README for sources and licences).
* :func:`encode` tokenises (dropping over-long examples, as the SpaRTA paper does) and
  :func:`batches` yields dynamically padded, rank-sharded, seeded batches for (DDP) training.

Label rules (``read_table``)
----------------------------
* With ``labels`` (ordered class names) a cell maps to the class whose name equals the
  stripped cell; otherwise, if the cell is an integer literal ``i`` with
  ``0 <= i < len(labels)``, to class ``i`` (so GLUE's ``0``/``1`` map to
  ``["negative", "positive"]``) -- unless some class name is itself an integer literal, in
  which case only names match. Anything else is an *unknown label* (a bad row).
* Without ``labels`` the class names are the sorted unique stripped cells. If every name is
  an integer literal they sort numerically (``"2" < "10"``), else if every name is a
  number they sort by value, else lexicographically.

TSV files are split on tabs with no quote processing (``csv.QUOTE_NONE`` semantics): GLUE
sentences contain unbalanced ``"`` characters that a quoting reader would misparse. CSV files
use the ``csv`` module's standard (RFC-4180-style) quoting, so a quoted field may span lines;
errors then name the line the record starts on.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import math
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsemerge.errors import DataError
from sparsemerge.formats.atomic import atomic_write_bytes

__all__ = [
    "TASKS",
    "Encoded",
    "Example",
    "LabeledData",
    "TaskSpec",
    "batches",
    "concat",
    "encode",
    "load_task",
    "make_subset",
    "num_batches",
    "plain_text_sample",
    "read_data_bytes",
    "read_table",
    "resolve_pad_token_id",
    "shipped_dir",
]

_SKIP_HINT = "fix the row, or use --skip-bad-rows (skip_bad_rows=True) to skip and count such rows"
_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}
_SURROGATE = re.compile("[\udc80-\udcff]")
_INT = re.compile(r"[+-]?\d+")

Column = str | int


# ---------------------------------------------------------------------------------------------
# Data classes


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


# ---------------------------------------------------------------------------------------------
# Reading tables


def _detect_format(path: Path, file_format: str | None) -> str:
    if file_format is not None:
        fmt = file_format.lower()
        if fmt not in ("csv", "tsv", "jsonl"):
            raise DataError(f"unknown file format {file_format!r}: use 'csv', 'tsv' or 'jsonl'")
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext not in _FORMATS:
        raise DataError(
            f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; name the "
            f"file .csv, .tsv/.txt or .jsonl/.json (optionally + .gz), or pass file_format="
        )
    return _FORMATS[ext]


def read_data_bytes(path: str | Path) -> bytes:
    """A data file's bytes, gunzipped when gzip (told by its magic bytes, not its name).

    The one reader of every data file (tables here, MNIST idx files in ``textual_mnist``),
    so that a missing, unreadable or corrupt file is always a :class:`DataError` naming it.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if path.suffix.lower() == ".gz":
        raise DataError(f"{path}: name ends in .gz but the file is not gzip-compressed")
    return raw


def _read_text(path: Path) -> str:
    """Whole file as text: gunzipped if gzip, BOM dropped, invalid UTF-8 kept as surrogates."""
    text = read_data_bytes(path).decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def _split_lines(text: str) -> list[str]:
    # Only \n, \r\n and \r end lines (str.splitlines would also split on \x0b, \u2028, ...).
    return re.split(r"\r\n|\r|\n", text[:-1] if text.endswith("\n") else text) if text else []


class _BadRow(Exception):
    def __init__(self, line: int, column: str | None, problem: str):
        super().__init__(problem)
        self.line, self.column, self.problem = line, column, problem


def _records_tsv(text: str) -> Iterator[tuple[int, list[str]]]:
    for lineno, line in enumerate(_split_lines(text), start=1):
        if line == "":
            continue
        yield lineno, line.split("\t")


def _records_csv(text: str) -> Iterator[tuple[int, list[str] | _BadRow]]:
    import csv

    lines = _split_lines(text)
    reader = csv.reader((ln + "\n" for ln in lines), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, _BadRow(start, None, f"malformed CSV ({e})")
            continue
        if not row:
            continue
        yield start, row


def _records_jsonl(text: str, source: str) -> Iterator[tuple[int, Any]]:
    for lineno, line in enumerate(_split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except (json.JSONDecodeError, UnicodeEncodeError) as e:
            if _SURROGATE.search(line):
                yield lineno, _BadRow(lineno, None, "invalid UTF-8 bytes in the line")
            elif lineno == 1 and line.lstrip().startswith("["):
                raise DataError(
                    f"{source}:1: the file starts a JSON array; sparsemerge reads JSON Lines "
                    f"(one object per line): convert it, e.g. `jq -c '.[]' in.json > out.jsonl`"
                ) from None
            else:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                yield lineno, _BadRow(lineno, None, f"invalid JSON ({msg})")


def _numeric_key(names: list[str]):
    if all(_INT.fullmatch(n) for n in names):
        return lambda n: (int(n), n)
    try:
        for n in names:
            f = float(n)
            if math.isnan(f):
                raise ValueError
        return lambda n: (float(n), n)
    except ValueError:
        return lambda n: n


def _json_scalar(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # before int: bool is an int subclass
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def read_table(
    path: str | Path,
    *,
    text_column: Column,
    text_pair_column: Column | None = None,
    label_column: Column,
    labels: Sequence[str] | None = None,
    skip_bad_rows: bool = False,
    has_header: bool = True,
    columns: Sequence[str] | None = None,
    file_format: str | None = None,
) -> LabeledData:
    """Read labelled examples from a CSV, TSV or JSON-Lines file.

    The format follows the extension (``.csv``; ``.tsv``/``.txt``; ``.jsonl``/``.json``/
    ``.ndjson``), optionally followed by ``.gz`` (gzip is also recognised by its magic bytes);
    ``file_format`` ("csv", "tsv", "jsonl") overrides it. A UTF-8 BOM is ignored.

    Columns are given by name, or by 0-based index (for files without a header). For CSV/TSV
    with ``has_header=True`` the first row names the columns; ``columns`` gives names for a
    header-less file (or replaces the header's names). JSON-Lines rows are objects keyed by
    column name (or arrays, addressed by index); ``has_header`` does not apply to them.

    Every bad row -- wrong number of fields, invalid JSON, a missing key, invalid UTF-8 in a
    used column, empty or whitespace-only text, an empty or unknown label -- raises
    :class:`DataError` naming ``file:line`` and the column, unless ``skip_bad_rows`` is set,
    in which case the row is dropped and counted in ``LabeledData.skipped``. A column that
    does not exist at all, or a file with no usable rows, always raises. Blank lines are
    ignored. See the module docstring for how labels are mapped to ids.
    """
    path = Path(path)
    source = str(path)
    fmt = _detect_format(path, file_format)
    text = _read_text(path)
    label_list = [str(x) for x in labels] if labels is not None else None
    if label_list is not None:
        if not label_list:
            raise DataError("labels=[] given: pass at least one class name, or None to infer")
        if len(set(label_list)) != len(label_list):
            raise DataError(f"labels {label_list} contain duplicates")

    def bad(line: int, column: str | None, problem: str) -> DataError:
        where = f"{source}:{line}" + (f": column {column}" if column else "")
        return DataError(f"{where}: {problem}; {_SKIP_HINT}")

    # ---- per-format record stream + column resolution -------------------------------------
    want = [("text", text_column), ("text_pair", text_pair_column), ("label", label_column)]
    want = [(role, c) for role, c in want if c is not None]
    records: Iterator[tuple[int, Any]]
    getters: dict[str, Any] = {}
    shown: dict[str, str] = {}
    ncols: int | None = None

    if fmt in ("csv", "tsv"):
        records = _records_tsv(text) if fmt == "tsv" else _records_csv(text)
        names: list[str] | None = None
        first_peeked: tuple[int, Any] | None = None
        if has_header:
            try:
                hline, header = next(records)
            except StopIteration:
                raise DataError(f"{source}: the file is empty (expected a header row)") from None
            if isinstance(header, _BadRow):
                raise DataError(f"{source}:{hline}: the header row is {header.problem}")
            if any(_SURROGATE.search(h) for h in header):
                raise DataError(f"{source}:{hline}: the header row contains invalid UTF-8")
            names = [h.strip() for h in header]
            ncols = len(header)
        else:
            for item in records:
                first_peeked = item
                break
            if first_peeked is not None and not isinstance(first_peeked[1], _BadRow):
                ncols = len(first_peeked[1])
        if columns is not None:
            # a header is authoritative; without one the names define the width (a malformed
            # first row is then an ordinary bad row)
            if has_header and len(columns) != ncols:
                raise DataError(
                    f"{source}: columns={list(columns)} names {len(columns)} columns but the "
                    f"file has {ncols}"
                )
            names = [str(c) for c in columns]
            ncols = len(names)

        def describe() -> str:
            if names is not None:
                return "the file has columns " + ", ".join(
                    f"{i}:{n!r}" for i, n in enumerate(names))
            if ncols is not None:
                return (f"the file has no header and {ncols} columns (0..{ncols - 1}); give an "
                        f"index or columns=[...] names")
            return "the file has no rows"

        for role, col in want:
            if isinstance(col, bool) or not isinstance(col, (str, int)):
                raise DataError(f"{role}_column must be a column name or 0-based index")
            if isinstance(col, int):
                if ncols is None or not 0 <= col < ncols:
                    raise DataError(f"{source}: no column index {col} ({role}); {describe()}")
                idx = col
                shown[role] = (f"{names[idx]!r} (index {idx})" if names else f"index {idx}")
            else:
                if names is None or col not in names:
                    raise DataError(f"{source}: no column {col!r} ({role}); {describe()}")
                idx = names.index(col)
                shown[role] = repr(col)
            getters[role] = idx

        if first_peeked is not None:
            rest = records

            def chain():
                yield first_peeked
                yield from rest

            records = chain()
    else:  # jsonl
        records = _records_jsonl(text, source)
        peeked: list[tuple[int, Any]] = []
        first_obj = None
        for item in records:
            peeked.append(item)
            if not isinstance(item[1], _BadRow):
                first_obj = item[1]
                break
        if isinstance(first_obj, list) and first_obj and all(
                isinstance(x, dict) for x in first_obj):
            raise DataError(
                f"{source}:{peeked[-1][0]}: the line is a JSON array of objects; sparsemerge "
                f"reads JSON Lines (one object per line): convert it, e.g. jq -c '.[]'"
            )
        for role, col in want:
            if isinstance(col, bool) or not isinstance(col, (str, int)):
                raise DataError(f"{role}_column must be a column name or 0-based index")
            if first_obj is not None:
                if isinstance(first_obj, dict):
                    ok = isinstance(col, str) and col in first_obj
                    have = "keys " + ", ".join(repr(k) for k in first_obj)
                elif isinstance(first_obj, list):
                    ok = isinstance(col, int) and 0 <= col < len(first_obj)
                    have = f"{len(first_obj)} array items (indexes 0..{len(first_obj) - 1})"
                else:
                    ok, have = True, ""  # reported per row below
                if not ok:
                    raise DataError(
                        f"{source}:{peeked[-1][0]}: no column {col!r} ({role}); the first row "
                        f"has {have}"
                    )
            getters[role] = col
            shown[role] = repr(col)
        rest_j = records

        def chain_j():
            yield from peeked
            yield from rest_j

        records = chain_j()

    # ---- rows -------------------------------------------------------------------------------
    raw_rows: list[tuple[int, str, str | None, str]] = []
    skipped = 0
    for lineno, rec in records:
        try:
            if isinstance(rec, _BadRow):
                raise rec
            cells: dict[str, str] = {}
            if fmt in ("csv", "tsv"):
                if len(rec) != ncols:
                    cols = f" ({', '.join(names)})" if names else ""
                    raise _BadRow(lineno, None,
                                  f"expected {ncols} fields{cols}, found {len(rec)}")
                for role, idx in getters.items():
                    cells[role] = rec[idx]
            else:
                for role, col in getters.items():
                    if isinstance(rec, dict) and isinstance(col, str):
                        if col not in rec:
                            raise _BadRow(lineno, shown[role], "key missing from this row")
                        value = rec[col]
                    elif isinstance(rec, list) and isinstance(col, int):
                        if not 0 <= col < len(rec):
                            raise _BadRow(lineno, shown[role],
                                          f"index out of range (row has {len(rec)} items)")
                        value = rec[col]
                    else:
                        raise _BadRow(lineno, None,
                                      f"expected a JSON object, found {type(rec).__name__}")
                    s = _json_scalar(value) if role == "label" else value
                    if role != "label" and value is None:
                        s = ""
                    if not isinstance(s, str):
                        kind = "a string or integer" if role == "label" else "a string"
                        raise _BadRow(lineno, shown[role],
                                      f"expected {kind}, found {json.dumps(value)[:40]}")
                    cells[role] = s
            for role in getters:
                if _SURROGATE.search(cells[role]):
                    raise _BadRow(lineno, shown[role], "invalid UTF-8 bytes")
            for role in ("text", "text_pair"):
                if role in cells and not cells[role].strip():
                    raise _BadRow(lineno, shown[role], "empty or whitespace-only text")
            lab = cells["label"].strip()
            if not lab:
                raise _BadRow(lineno, shown["label"], "empty label")
            raw_rows.append((lineno, cells["text"], cells.get("text_pair"), lab))
        except _BadRow as b:
            if not skip_bad_rows:
                raise bad(b.line, b.column, b.problem) from None
            skipped += 1

    # ---- labels -----------------------------------------------------------------------------
    examples: list[Example] = []
    if label_list is None:
        uniq = sorted(set(r[3] for r in raw_rows))
        label_list = sorted(uniq, key=_numeric_key(uniq))
        lookup = {n: i for i, n in enumerate(label_list)}
        examples = [Example(t, p, lookup[lab]) for _, t, p, lab in raw_rows]
    else:
        lookup = {n: i for i, n in enumerate(label_list)}
        ids_ok = not any(_INT.fullmatch(n) for n in label_list)
        for lineno, t, p, lab in raw_rows:
            i = lookup.get(lab)
            if i is None and ids_ok and _INT.fullmatch(lab) and 0 <= int(lab) < len(label_list):
                i = int(lab)
            if i is None:
                if not skip_bad_rows:
                    raise bad(lineno, shown["label"],
                              f"unknown label {lab!r} (expected one of {label_list}"
                              + (f" or an id 0..{len(label_list) - 1})" if ids_ok else ")"))
                skipped += 1
                continue
            examples.append(Example(t, p, i))

    if not examples:
        if skipped:
            raise DataError(f"{source}: all {skipped} rows were bad and skipped; check the "
                            f"column and label options")
        raise DataError(f"{source}: no data rows")
    return LabeledData(examples, label_list, source, skipped)


# ---------------------------------------------------------------------------------------------
# Task presets


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's files are and how to read them.

    ``files`` maps a split ("train", "dev") to file names inside ``folder`` (relative to the
    data directory; several files are concatenated). ``rows`` optionally slices a split out of
    a single file (``(start, stop)`` over data rows), for corpora without an official split.
    ``shipped`` maps splits to the files in ``sparsemerge/datasets/`` used without a
    ``data_dir``. ``metrics`` are names understood by :func:`sparsemerge.metrics.compute_metrics`,
    the first one being the task's headline metric.
    """

    name: str
    description: str
    folder: str
    files: Mapping[str, tuple[str, ...]]
    text_column: Column
    label_column: Column
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    text_pair_column: Column | None = None
    has_header: bool = True
    columns: tuple[str, ...] | None = None
    file_format: str | None = None
    rows: Mapping[str, tuple[int, int | None]] = field(default_factory=dict)
    shipped: Mapping[str, str] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """Metric names joined by '+', e.g. 'accuracy', 'matthews', 'f1+accuracy'."""
        return "+".join(self.metrics)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)

    @property
    def num_labels(self) -> int:
        return len(self.labels)


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2",
        description="GLUE SST-2: binary sentiment of movie-review sentences",
        folder="glue/SST-2",
        files={"train": ("train.tsv",), "dev": ("dev.tsv",)},
        text_column="sentence",
        label_column="label",
        labels=("negative", "positive"),
        metrics=("accuracy",),
        shipped={"train": "sst2_train.tsv", "dev": "sst2_dev.tsv"},
    ),
    "cola": TaskSpec(
        name="cola",
        description="GLUE CoLA: grammatical acceptability of English sentences",
        folder="glue/CoLA",
        files={"train": ("train_part1.tsv", "train_part2.tsv"), "dev": ("dev.tsv",)},
        text_column="sentence",
        label_column="label",
        labels=("unacceptable", "acceptable"),
        metrics=("matthews",),
        has_header=False,
        columns=("source", "label", "original_label", "sentence"),
        shipped={"train": "cola_train.tsv", "dev": "cola_dev.tsv"},
    ),
    "mrpc": TaskSpec(
        name="mrpc",
        description="GLUE MRPC: is sentence 2 a paraphrase of sentence 1",
        folder="glue/MRPC",
        files={"train": ("train.tsv",), "dev": ("dev.tsv",)},
        text_column="#1 String",
        text_pair_column="#2 String",
        label_column="Quality",
        labels=("not_equivalent", "equivalent"),
        metrics=("f1", "accuracy"),
    ),
    "sms_spam": TaskSpec(
        name="sms_spam",
        description="UCI SMS Spam Collection: ham or spam (no official split: the first "
                    "4,574 rows are train, the last 1,000 dev)",
        folder="sms_spam",
        files={"train": ("SMSSpamCollection",), "dev": ("SMSSpamCollection",)},
        text_column="sms_message",
        label_column="label",
        labels=("ham", "spam"),
        metrics=("f1", "accuracy"),
        file_format="tsv",
        rows={"train": (0, 4574), "dev": (4574, None)},
    ),
}


def shipped_dir() -> Path:
    """The folder of data shipped inside the package (``sparsemerge/datasets``)."""
    return Path(str(importlib.resources.files("sparsemerge") / "datasets"))


def _find(data_dir: Path, spec: TaskSpec, name: str) -> Path:
    tried = [data_dir / spec.folder / name, data_dir / name,
             data_dir / Path(spec.folder).name / name]
    for p in tried:
        if p.is_file():
            return p
    raise DataError(
        f"task {spec.name!r}: file {name!r} not found; tried " + ", ".join(map(str, tried))
        + f". Point data_dir (--data-dir) at the folder holding {spec.folder}/ or at "
        f"{spec.folder}/ itself"
    )


def load_task(
    task: str | TaskSpec,
    data_dir: str | Path | None = None,
    split: str = "train",
    *,
    skip_bad_rows: bool = False,
) -> LabeledData:
    """Load a preset task's split ("train" or "dev").

    ``data_dir`` is the folder holding the task's files in their original GLUE / UCI layout
    (e.g. ``../shared/data`` holding ``glue/SST-2/train.tsv``; the task folder itself also
    works). With ``data_dir=None`` the subset shipped in ``sparsemerge/datasets/`` is loaded
    (SST-2 and CoLA only: 4,000 / 3,000 sampled train rows and the full dev sets).
    """
    spec = TASKS.get(task) if isinstance(task, str) else task
    if spec is None:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if split not in spec.files:
        raise DataError(f"task {spec.name!r} has no split {split!r}; "
                        f"use one of {', '.join(spec.files)}")
    opts = dict(
        text_column=spec.text_column,
        text_pair_column=spec.text_pair_column,
        label_column=spec.label_column,
        labels=list(spec.labels),
        skip_bad_rows=skip_bad_rows,
        has_header=spec.has_header,
        columns=spec.columns,
        file_format=spec.file_format,
    )
    if data_dir is None:
        if split not in spec.shipped:
            raise DataError(
                f"task {spec.name!r} ({split}) is not shipped with sparsemerge (only "
                + ", ".join(f"{t.name}" for t in TASKS.values() if t.shipped)
                + f" are); pass data_dir (--data-dir) pointing at the {spec.folder} files"
            )
        ref = importlib.resources.files("sparsemerge") / "datasets" / spec.shipped[split]
        with importlib.resources.as_file(ref) as p:
            return read_table(p, **opts)
    data_dir = Path(data_dir)
    parts = [read_table(_find(data_dir, spec, name), **opts) for name in spec.files[split]]
    data = parts[0] if len(parts) == 1 else concat(parts)
    if split in spec.rows:
        start, stop = spec.rows[split]
        data = LabeledData(data.examples[start:stop], data.labels,
                           f"{data.source}[{start}:{'' if stop is None else stop}]",
                           data.skipped)
    return data


# ---------------------------------------------------------------------------------------------
# Shipped subsets


def make_subset(
    src: str | Path | Sequence[str | Path],
    dst: str | Path,
    n: int | None,
    *,
    seed: int = 0,
    has_header: bool = True,
) -> int:
    """Write ``n`` data rows sampled from ``src`` to ``dst``, byte-for-byte, in file order.

    ``src`` may list several files of the same layout (e.g. CoLA's two train parts); their
    data rows are numbered 0.. across the concatenation. With ``has_header`` the header of
    the first file is copied (with its BOM, if any) and the other files' headers dropped.
    ``n=None`` copies every row. Row ``i`` is chosen when it is among the ``n`` smallest
    ``blake2b(f"{seed}:{i}", digest_size=8)`` digests -- a selection that depends on nothing
    but the seed and the row count, so it is reproducible on every platform and Python
    version. ``dst`` is written atomically. Returns the number of rows written.
    """
    srcs = [src] if isinstance(src, (str, Path)) else list(src)
    header: bytes | None = None
    rows: list[bytes] = []
    for k, s in enumerate(srcs):
        data = read_data_bytes(s)
        lines = data.splitlines(keepends=True)
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        if has_header and lines:
            if k == 0:
                header = lines[0]
            lines = lines[1:]
        rows.extend(ln for ln in lines if ln.strip(b"\r\n"))
    if n is None or n >= len(rows):
        keep = list(range(len(rows)))
    else:
        def key(i: int) -> bytes:
            return hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()

        keep = sorted(sorted(range(len(rows)), key=key)[:n])
    atomic_write_bytes(dst, (header or b"") + b"".join(rows[i] for i in keep))
    return len(keep)


def plain_text_sample() -> list[str]:
    """~300 held-out English news sentences (MRPC dev "#1 String") for measuring forgetting."""
    ref = importlib.resources.files("sparsemerge") / "datasets" / "plain_text.txt"
    text = ref.read_text(encoding="utf-8")
    return [ln for ln in text.splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------
# Tokenising and batching


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (the usual choice for decoder models).

    Decoder tokenizers (Llama, SmolLM, GPT-2) often have no pad token. Right padding with EOS
    is harmless for training because the attention mask hides padding, but the model must be
    told: set ``model.config.pad_token_id`` to this value so sequence-classification heads
    find the last real token.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise DataError(
            "the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token "
            "(and model.config.pad_token_id) before encoding"
        )
    return int(pad)


class Encoded(dict):
    """``encode``'s result: a plain dict of per-example lists, plus ``pad_token_id``."""

    pad_token_id: int = 0


def encode(
    data: LabeledData,
    tokenizer: Any,
    max_length: int,
    drop_long: bool = True,
) -> tuple[Encoded, int]:
    """Tokenise ``data``; return (columns, number of examples dropped for length).

    The columns are lists with one entry per kept example, in data order: ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (only if the tokenizer makes them), ``labels``
    and ``index`` (the example's position in ``data``, to map predictions back). Special
    tokens are added. An example longer than ``max_length`` tokens is dropped when
    ``drop_long`` (as in SpaRTA, for training), else truncated (longest-first for pairs; use
    this for evaluation so every example is scored). No padding here: :func:`batches` pads
    each batch to its own longest row. The result's ``pad_token_id`` attribute holds
    :func:`resolve_pad_token_id` (tokenizer) for :func:`batches`.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    if not len(data):
        raise DataError(f"{data.source}: nothing to encode (0 examples)")
    pad_id = resolve_pad_token_id(tokenizer)
    texts = data.texts
    pairs = data.text_pairs
    is_pair = any(p is not None for p in pairs)
    if is_pair and any(p is None for p in pairs):
        raise DataError(f"{data.source}: some examples have a text pair and some do not")
    kw: dict[str, Any] = {"add_special_tokens": True, "truncation": False}
    full = tokenizer(texts, pairs, **kw) if is_pair else tokenizer(texts, **kw)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in full]
    out = Encoded({k: [] for k in keys})
    out["labels"] = []
    out["index"] = []
    out.pad_token_id = pad_id
    long_idx = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    trunc = None
    if long_idx and not drop_long:
        kt: dict[str, Any] = {"add_special_tokens": True, "truncation": True,
                              "max_length": max_length}
        lt = [texts[i] for i in long_idx]
        trunc = (tokenizer(lt, [pairs[i] for i in long_idx], **kt) if is_pair
                 else tokenizer(lt, **kt))
        trunc_pos = {i: j for j, i in enumerate(long_idx)}
    long_set = set(long_idx)
    for i, ex in enumerate(data.examples):
        if i in long_set:
            if drop_long:
                continue
            src, j = trunc, trunc_pos[i]
        else:
            src, j = full, i
        for k in keys:
            out[k].append(list(src[k][j]))
        out["labels"].append(ex.label)
        out["index"].append(i)
    if "attention_mask" not in out:
        out["attention_mask"] = [[1] * len(ids) for ids in out["input_ids"]]
    n_dropped = len(long_idx) if drop_long else 0
    if not out["labels"]:
        raise DataError(f"{data.source}: every example is longer than max_length={max_length} "
                        f"tokens; raise max_length or pass drop_long=False to truncate")
    return out, n_dropped


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    """How many batches :func:`batches` yields per rank per epoch for ``n`` examples."""
    if n <= 0:
        return 0
    full = math.ceil(n / (batch_size * world_size))
    tail = n - (full - 1) * batch_size * world_size
    return full - 1 if (tail < world_size and full > 1) else full


def batches(
    encoded: Mapping[str, Sequence[Any]],
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    *,
    pad_token_id: int | None = None,
    with_index: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded ``torch.long`` batches of this rank's share of ``encoded``.

    Order: with ``shuffle`` a permutation seeded by ``(seed, epoch)`` (numpy PCG64, identical
    on every rank), else data order. The order is cut into *global* batches of
    ``batch_size * world_size`` examples and each global batch is dealt round-robin to the
    ranks (``global[rank::world_size]``). So every rank yields the same number of batches
    (:func:`num_batches`; DDP needs that), the ranks' examples are disjoint and together
    cover every example exactly once per epoch, and global step ``t`` sees the same examples
    whatever the ``world_size`` for a fixed ``batch_size * world_size``. If the last global
    batch has fewer than ``world_size`` examples it is merged into the previous one (so that
    no rank gets an empty batch; that batch can then hold up to ``batch_size + 1`` rows).

    Rows are right-padded to the batch's longest row: ``input_ids`` with ``pad_token_id``
    (default: ``encoded.pad_token_id`` as set by :func:`encode`, else 0), ``attention_mask``
    and ``token_type_ids`` with 0. ``labels`` is 1-D. With ``with_index`` the batch also holds
    ``index`` (1-D: each row's position in the original data, from :func:`encode`) -- off by
    default so that ``model(**batch)`` works. Other columns are ignored.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
    if "input_ids" not in encoded or "labels" not in encoded:
        raise DataError("batches() needs the dict from encode() (input_ids, labels, ...)")
    n = len(encoded["input_ids"])
    if n < world_size:
        raise DataError(f"{n} examples cannot be shared among {world_size} processes")
    if pad_token_id is None:
        pad_token_id = getattr(encoded, "pad_token_id", 0)
    order = (np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n) if shuffle
             else np.arange(n))
    g = batch_size * world_size
    starts = list(range(0, n, g))
    if len(starts) > 1 and n - starts[-1] < world_size:
        starts.pop()
    bounds = list(zip(starts, starts[1:] + [n], strict=True))
    seq_keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    vec_keys = ["labels"]
    if with_index:
        if "index" not in encoded:
            raise DataError("with_index=True needs the 'index' column that encode() makes")
        vec_keys.append("index")
    for lo, hi in bounds:
        idx = order[lo:hi][rank::world_size]
        longest = max(len(encoded["input_ids"][i]) for i in idx)
        batch: dict[str, torch.Tensor] = {}
        for k in seq_keys:
            fill = pad_token_id if k == "input_ids" else 0
            t = torch.full((len(idx), longest), fill, dtype=torch.long)
            for r, i in enumerate(idx):
                row = encoded[k][i]
                t[r, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            batch[k] = t
        if "attention_mask" not in batch:
            m = torch.zeros((len(idx), longest), dtype=torch.long)
            for r, i in enumerate(idx):
                m[r, : len(encoded["input_ids"][i])] = 1
            batch["attention_mask"] = m
        for k in vec_keys:
            batch[k] = torch.as_tensor([int(encoded[k][i]) for i in idx], dtype=torch.long)
        yield batch
