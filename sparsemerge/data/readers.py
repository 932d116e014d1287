"""Reading CSV / TSV / JSON-Lines files (optionally gzipped) into :class:`LabeledData`.

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
import json
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sparsemerge.data.examples import Column, Example, LabeledData
from sparsemerge.errors import DataError

__all__ = ["read_data_bytes", "read_table"]

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
