"""Task presets (GLUE SST-2 / CoLA / MRPC, SMS spam) and the real subsets shipped with the package.

A preset says where a task's files are and how to read them, so ``load_task("sst2",
data_dir)`` returns its train or dev split. Without a ``data_dir`` the small real subsets in
``sparsemerge/datasets/`` are used (see that folder's README for sources and licences).
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sparsemerge.data.examples import Column, LabeledData, concat
from sparsemerge.data.readers import read_data_bytes, read_table
from sparsemerge.errors import DataError
from sparsemerge.formats.atomic import atomic_write_bytes

__all__ = ["TASKS", "TaskSpec", "load_task", "make_subset", "plain_text_sample", "shipped_dir"]


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
