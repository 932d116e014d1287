"""Reading CSV / TSV / JSON-Lines files (optionally gzipped) and Hugging Face datasets (a
``save_to_disk`` folder, a parquet or arrow file; the ``datasets`` extra) into
:class:`LabeledData` (for classification) or :class:`LMData` (for the causal-LM objective).

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

A dataset's rows are read like JSON-Lines objects (columns by name, or by 0-based index into
its columns) and errors name the 0-based row index. A ``ClassLabel`` column reads as its class
names, and, without ``labels``, its names in id order are the labels.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sparsemerge.data.examples import Column, Example, LabeledData, LMData, LMExample, Message
from sparsemerge.errors import DataError, import_extra

__all__ = ["read_data_bytes", "read_lm", "read_table"]

_SKIP_HINT = "fix the row, or use --skip-bad-rows (skip_bad_rows=True) to skip and count such rows"
_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "dataset",
    ".arrow": "dataset",
}
_TEXT_FORMATS = ("csv", "tsv")  # split into cells by sparsemerge; the others hold values
_SURROGATE = re.compile("[\udc80-\udcff]")
_INT = re.compile(r"[+-]?\d+")
_Row = TypeVar("_Row")


def _detect_format(path: Path, file_format: str | None) -> str:
    if file_format is not None:
        fmt = file_format.lower()
        if fmt not in ("csv", "tsv", "jsonl", "dataset"):
            raise DataError(f"unknown file format {file_format!r}: use 'csv', 'tsv', 'jsonl' "
                            f"or 'dataset'")
        return fmt
    if path.is_dir():
        return "dataset"  # a datasets.save_to_disk folder
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext not in _FORMATS:
        raise DataError(
            f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; name the "
            f"file .csv, .tsv/.txt or .jsonl/.json (optionally + .gz), .parquet or .arrow, or "
            f"pass file_format="
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


def _read_dataset(path: Path) -> tuple[list[dict[str, Any]], list[str], dict[str, list[str]]]:
    """(rows, column names, {ClassLabel column: class names}) of a ``save_to_disk`` folder,
    a parquet file or an arrow file (the stream format ``datasets`` writes, or an IPC file).
    """
    datasets = import_extra("datasets", "datasets", f"reading {path}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                raise DataError(f"{path}: a DatasetDict with splits {', '.join(ds)}; give one "
                                f"split's folder, e.g. {path / next(iter(ds))}")
            table, features = ds.data.table, ds.features
        elif path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
            features = datasets.Features.from_arrow_schema(table.schema)
        else:
            ds = datasets.Dataset.from_file(str(path))
            table, features = ds.data.table, ds.features
    except (OSError, ValueError, pa.ArrowException) as e:  # missing, corrupt, not a dataset
        raise DataError(f"{path}: cannot read it as a dataset ({e})") from None
    classes = {name: list(f.names) for name, f in features.items()
               if isinstance(f, datasets.ClassLabel)}
    rows = table.to_pylist()
    for row in rows:
        for name, names in classes.items():
            v = row[name]
            if isinstance(v, int) and 0 <= v < len(names):
                row[name] = names[v]
    return rows, list(table.column_names), classes


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


@dataclass
class _Table:
    """An opened table: its record stream and where each wanted role's column is."""

    source: str
    fmt: str
    records: Iterator[tuple[int, Any]]  # (line, row or _BadRow)
    getters: dict[str, Column]  # role -> column index (CSV/TSV) or JSON key / index
    shown: dict[str, str]  # role -> the column as error messages name it
    names: list[str] | None  # CSV/TSV column names
    ncols: int | None  # CSV/TSV width
    classes: dict[str, list[str]] = field(default_factory=dict)  # a dataset's ClassLabels

    def where(self, line: int) -> str:
        """A record as errors name it: ``file:line``, or a dataset's 0-based row index."""
        return f"{self.source}: row {line}" if self.fmt == "dataset" else f"{self.source}:{line}"


def _open_table(
    path: Path,
    want: Sequence[tuple[str, Column]],
    *,
    has_header: bool,
    columns: Sequence[str] | None,
    file_format: str | None,
) -> _Table:
    """Open a table and resolve each ``(role, column)`` of ``want``; a column that does not
    exist raises :class:`DataError` naming the columns the file has."""
    source = str(path)
    fmt = _detect_format(path, file_format)
    if fmt == "dataset":
        return _open_dataset(path, want)
    text = _read_text(path)
    records: Iterator[tuple[int, Any]]
    getters: dict[str, Column] = {}
    shown: dict[str, str] = {}
    names: list[str] | None = None
    ncols: int | None = None

    if fmt in ("csv", "tsv"):
        records = _records_tsv(text) if fmt == "tsv" else _records_csv(text)
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
            if isinstance(col, str) and names is None and col.isdigit():
                col = int(col)  # no header and no names: a column can only be an index
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
    return _Table(source, fmt, records, getters, shown, names, ncols)


def _open_dataset(path: Path, want: Sequence[tuple[str, Column]]) -> _Table:
    """A dataset as a table of dict records; a missing column raises :class:`DataError`
    naming the columns it has."""
    rows, columns, classes = _read_dataset(path)
    getters: dict[str, Column] = {}
    for role, col in want:
        if isinstance(col, bool) or not isinstance(col, (str, int)):
            raise DataError(f"{role}_column must be a column name or 0-based index")
        name = columns[col] if isinstance(col, int) and 0 <= col < len(columns) else col
        if name not in columns:
            raise DataError(f"{path}: no column {col!r} ({role}); the dataset has columns "
                            + ", ".join(f"{i}:{n!r}" for i, n in enumerate(columns)))
        getters[role] = name
    shown = {role: repr(name) for role, name in getters.items()}
    return _Table(str(path), "dataset", iter(enumerate(rows)), getters, shown, None, None,
                  classes)


def _values(t: _Table, lineno: int, rec: Any) -> dict[str, Any]:
    """Each role's raw value in one record (a string for CSV/TSV, any JSON value for JSON
    Lines); raises :class:`_BadRow` for a malformed record or a missing column."""
    if isinstance(rec, _BadRow):
        raise rec
    if t.fmt in _TEXT_FORMATS:
        if len(rec) != t.ncols:
            cols = f" ({', '.join(t.names)})" if t.names else ""
            raise _BadRow(lineno, None, f"expected {t.ncols} fields{cols}, found {len(rec)}")
        return {role: rec[idx] for role, idx in t.getters.items()}
    values: dict[str, Any] = {}
    for role, col in t.getters.items():
        if isinstance(rec, dict) and isinstance(col, str):
            if col not in rec:
                raise _BadRow(lineno, t.shown[role], "key missing from this row")
            values[role] = rec[col]
        elif isinstance(rec, list) and isinstance(col, int):
            if not 0 <= col < len(rec):
                raise _BadRow(lineno, t.shown[role],
                              f"index out of range (row has {len(rec)} items)")
            values[role] = rec[col]
        else:
            raise _BadRow(lineno, None, f"expected a JSON object, found {type(rec).__name__}")
    return values


def _string(t: _Table, lineno: int, role: str, value: Any, *, label: bool = False) -> str:
    """A cell as text: a JSON value must be a string (``null`` reads as empty; a label may
    also be an integer or boolean), and invalid UTF-8 is a bad row."""
    s = value
    if t.fmt not in _TEXT_FORMATS:
        s = _json_scalar(value) if label else ("" if value is None else value)
        if not isinstance(s, str):
            kind = "a string or integer" if label else "a string"
            raise _BadRow(lineno, t.shown[role], f"expected {kind}, found {json.dumps(value)[:40]}")
    if _SURROGATE.search(s):
        raise _BadRow(lineno, t.shown[role], "invalid UTF-8 bytes")
    return s


def _text(t: _Table, lineno: int, role: str, value: Any) -> str:
    """A text cell: a string with something other than whitespace in it."""
    s = _string(t, lineno, role, value)
    if not s.strip():
        raise _BadRow(lineno, t.shown[role], "empty or whitespace-only text")
    return s


def _fields(t: _Table, rec: Any, skip: Column) -> dict[str, str]:
    """A record's cells by column name, without column ``skip`` (the label): what a prompt
    template may fill in. JSON values that are not strings or integers are left out."""
    if t.fmt in _TEXT_FORMATS:
        names = t.names or [str(i) for i in range(len(rec))]
        return {n: c for i, (n, c) in enumerate(zip(names, rec, strict=True)) if i != skip}
    items = rec.items() if isinstance(rec, dict) else enumerate(rec)
    return {str(k): s for k, v in items if k != skip and (s := _json_scalar(v)) is not None}


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
    """Read labelled examples from a CSV, TSV or JSON-Lines file, or a Hugging Face dataset.

    The format follows the extension (``.csv``; ``.tsv``/``.txt``; ``.jsonl``/``.json``/
    ``.ndjson``), optionally followed by ``.gz`` (gzip is also recognised by its magic bytes);
    a folder (``datasets.save_to_disk``), ``.parquet`` or ``.arrow`` file is a dataset (rows
    as in JSON Lines; see the module docstring). ``file_format`` ("csv", "tsv", "jsonl",
    "dataset") overrides it. A UTF-8 BOM is ignored.

    Columns are given by name, or by 0-based index (for files without a header). For CSV/TSV
    with ``has_header=True`` the first row names the columns; ``columns`` gives names for a
    header-less file (or replaces the header's names). JSON-Lines rows are objects keyed by
    column name (or arrays, addressed by index); ``has_header`` does not apply to them.

    Every bad row -- wrong number of fields, invalid JSON, a missing key, invalid UTF-8 in a
    used column, empty or whitespace-only text, an empty or unknown label -- raises
    :class:`DataError` naming ``file:line`` and the column, unless ``skip_bad_rows`` is set,
    in which case the row is dropped and counted in ``LabeledData.skipped``. A column that
    does not exist at all, or a file with no usable rows, always raises. Blank lines are
    ignored. See the module docstring for how labels are mapped to ids. Each example keeps
    the row's other cells in ``Example.fields`` for prompt templates.
    """
    path = Path(path)
    label_list = [str(x) for x in labels] if labels is not None else None
    if label_list is not None:
        if not label_list:
            raise DataError("labels=[] given: pass at least one class name, or None to infer")
        if len(set(label_list)) != len(label_list):
            raise DataError(f"labels {label_list} contain duplicates")
    want = [("text", text_column), ("text_pair", text_pair_column), ("label", label_column)]
    t = _open_table(path, [(role, c) for role, c in want if c is not None],
                    has_header=has_header, columns=columns, file_format=file_format)
    if label_list is None and t.getters["label"] in t.classes:
        label_list = t.classes[str(t.getters["label"])]

    def row(lineno: int, rec: Any) -> tuple[int, str, str | None, str, dict[str, str]]:
        values = _values(t, lineno, rec)
        text = _text(t, lineno, "text", values["text"])
        pair = (_text(t, lineno, "text_pair", values["text_pair"])
                if "text_pair" in values else None)
        lab = _string(t, lineno, "label", values["label"], label=True).strip()
        if not lab:
            raise _BadRow(lineno, t.shown["label"], "empty label")
        return lineno, text, pair, lab, _fields(t, rec, t.getters["label"])

    raw_rows, skipped = _parse_rows(t, row, skip_bad_rows)

    # ---- labels -----------------------------------------------------------------------------
    examples: list[Example] = []
    if label_list is None:
        uniq = sorted(set(r[3] for r in raw_rows))
        label_list = sorted(uniq, key=_numeric_key(uniq))
        lookup = {n: i for i, n in enumerate(label_list)}
        examples = [Example(text, pair, lookup[lab], fields)
                    for _, text, pair, lab, fields in raw_rows]
    else:
        lookup = {n: i for i, n in enumerate(label_list)}
        ids_ok = not any(_INT.fullmatch(n) for n in label_list)
        for lineno, text, pair, lab, fields in raw_rows:
            i = lookup.get(lab)
            if i is None and ids_ok and _INT.fullmatch(lab) and 0 <= int(lab) < len(label_list):
                i = int(lab)
            if i is None:
                if not skip_bad_rows:
                    raise _bad_row(t, lineno, t.shown["label"],
                              f"unknown label {lab!r} (expected one of {label_list}"
                              + (f" or an id 0..{len(label_list) - 1})" if ids_ok else ")"))
                skipped += 1
                continue
            examples.append(Example(text, pair, i, fields))

    _check_not_empty(t.source, len(examples), skipped)
    return LabeledData(examples, label_list, t.source, skipped)


def read_lm(
    path: str | Path,
    *,
    prompt_column: Column = "prompt",
    response_column: Column = "response",
    messages_column: Column | None = None,
    skip_bad_rows: bool = False,
    has_header: bool = True,
    columns: Sequence[str] | None = None,
    file_format: str | None = None,
) -> LMData:
    """Read conversations for the causal-LM objective.

    Two layouts: prompt/response rows (two text columns of a CSV, TSV or JSON-Lines file,
    read as in :func:`read_table`), or, with ``messages_column``, chat rows of a JSON-Lines
    file: a list of ``{"role": ..., "content": ...}`` objects that ends with the assistant's
    answer (the turns the loss is on). Bad rows raise :class:`DataError` naming ``file:line``
    and the column, or with ``skip_bad_rows`` are skipped and counted in ``LMData.skipped``.
    """
    path = Path(path)
    want = ([("messages", messages_column)] if messages_column is not None
            else [("prompt", prompt_column), ("response", response_column)])
    t = _open_table(path, want, has_header=has_header, columns=columns, file_format=file_format)
    if messages_column is not None and t.fmt in _TEXT_FORMATS:
        raise DataError(f"{t.source}: chat messages are read from JSON Lines files or datasets "
                        f"(a list of {{\"role\", \"content\"}} objects per row), not "
                        f"{t.fmt.upper()}")

    def row(lineno: int, rec: Any) -> LMExample:
        values = _values(t, lineno, rec)
        if messages_column is not None:
            return LMExample(_messages(t, lineno, values["messages"]))
        return LMExample((Message("user", _text(t, lineno, "prompt", values["prompt"])),
                          Message("assistant", _text(t, lineno, "response", values["response"]))))

    examples, skipped = _parse_rows(t, row, skip_bad_rows)
    _check_not_empty(t.source, len(examples), skipped)
    return LMData(examples, t.source, skipped)


def _messages(t: _Table, lineno: int, value: Any) -> tuple[Message, ...]:
    """A chat row's turns; the last must be a non-empty assistant answer."""
    column = t.shown["messages"]
    if not isinstance(value, list) or not value:
        raise _BadRow(lineno, column, f"expected a non-empty list of {{\"role\", \"content\"}} "
                                      f"objects, found {json.dumps(value)[:40]}")
    out = []
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"]
                and isinstance(m.get("content"), str)):
            raise _BadRow(lineno, column, f"message {j}: expected {{\"role\": \"...\", "
                                          f"\"content\": \"...\"}}, found {json.dumps(m)[:60]}")
        if _SURROGATE.search(m["role"] + m["content"]):
            raise _BadRow(lineno, column, f"message {j}: invalid UTF-8 bytes")
        out.append(Message(m["role"], m["content"]))
    if out[-1].role != "assistant" or not out[-1].content.strip():
        raise _BadRow(lineno, column, "the last message must be the assistant's non-empty answer "
                                      "(the loss is on the assistant's turns)")
    return tuple(out)


def _parse_rows(t: _Table, parse: Callable[[int, Any], _Row],
                skip_bad_rows: bool) -> tuple[list[_Row], int]:
    """``parse`` every record; a bad one raises, or with ``skip_bad_rows`` is counted."""
    rows: list[_Row] = []
    skipped = 0
    for lineno, rec in t.records:
        try:
            rows.append(parse(lineno, rec))
        except _BadRow as b:
            if not skip_bad_rows:
                raise _bad_row(t, b.line, b.column, b.problem) from None
            skipped += 1
    return rows, skipped


def _check_not_empty(source: str, n: int, skipped: int) -> None:
    if not n:
        if skipped:
            raise DataError(f"{source}: all {skipped} rows were bad and skipped; check the "
                            f"column and label options")
        raise DataError(f"{source}: no data rows")


def _bad_row(t: _Table, line: int, column: str | None, problem: str) -> DataError:
    """The error for one bad row: where it is, the column, the problem and how to skip."""
    where = t.where(line) + (f": column {column}" if column else "")
    return DataError(f"{where}: {problem}; {_SKIP_HINT}")
