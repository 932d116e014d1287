"""``sparsemerge data ...``: prepare and check labelled data (a thin layer over the API)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from sparsemerge.errors import SparseMergeError

app = typer.Typer(
    help="Prepare and check labelled data: task presets, table checks, Textual MNIST.",
    no_args_is_help=True,
    add_completion=False,
)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except SparseMergeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


class MnistSplit(str, Enum):
    train = "train"
    eval = "eval"
    all = "all"


class MnistFormat(str, Enum):
    text = "text"
    prompt_response = "prompt-response"
    chat = "chat"


@app.command("textual-mnist")
def textual_mnist(
    images: Annotated[Path, typer.Option("--images", help="MNIST idx3 image file (.gz ok).")],
    labels: Annotated[Path, typer.Option("--labels", help="MNIST idx1 label file (.gz ok).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON Lines file to write.")],
    size: Annotated[int, typer.Option("--size", help="Side of the downsampled image.")] = 14,
    start: Annotated[int | None, typer.Option("--start", help="First image (0-based).")] = None,
    stop: Annotated[int | None, typer.Option("--stop", help="End of the range (exclusive).")
                    ] = None,
    split: Annotated[MnistSplit | None, typer.Option(
        "--split", help="Convention for the 10k t10k file: train = images 0-7999, "
                        "eval = 8000-9999. Not together with --start/--stop.")] = None,
    use_prompt: Annotated[bool, typer.Option(
        "--prompt/--no-prompt", help="Wrap each image in an instruction for chat models "
                                     "(the text format; the others always are).")
    ] = False,
    row_format: Annotated[MnistFormat, typer.Option(
        "--format", help="text: {text, label} rows for classification; prompt-response: "
                         "{prompt, response} rows, or chat: {messages} rows, for the causal-LM "
                         "objective (the answer is the digit).")] = MnistFormat.text,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Write MNIST images as text (one digit 0-9 per pixel), one JSON object per line."""
    from sparsemerge.data.textual_mnist import SPLITS, write_jsonl

    with _user_errors():
        if split is not None:
            if start is not None or stop is not None:
                raise SparseMergeError("give either --split or --start/--stop, not both")
            start, stop = SPLITS[split.value]
        start = 0 if start is None else start
        n = write_jsonl(images, labels, output, size=size, start=start, stop=stop,
                        prompt=use_prompt, row_format=row_format.value)
    stop = start + n
    if json_out:
        _json({"rows": n, "output": str(output), "size": size, "start": start, "stop": stop,
               "prompt": use_prompt, "format": row_format.value})
    else:
        typer.echo(f"wrote {n} rows (images {start}..{stop - 1}, {size}x{size}) to {output}")


@app.command("tasks")
def tasks(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the task presets: files, labels, metric and whether a subset ships built in."""
    from sparsemerge.data.tasks import TASKS

    rows = [{"task": t.name, "description": t.description, "folder": t.folder,
             "splits": {s: list(f) for s, f in t.files.items()}, "labels": list(t.labels),
             "metric": t.metric, "shipped": sorted(t.shipped)} for t in TASKS.values()]
    if json_out:
        _json(rows)
        return
    for r in rows:
        shipped = ", ".join(r["shipped"]) if r["shipped"] else "no (needs --data-dir)"
        typer.echo(f"{r['task']}: {r['description']}\n"
                   f"  labels {', '.join(r['labels'])}; metric {r['metric']}; "
                   f"files {r['folder']}/; shipped: {shipped}")


@app.command("check")
def check(
    path: Annotated[Path | None, typer.Argument(
        help="CSV / TSV / JSONL file (.gz ok), or a dataset: save_to_disk folder, .parquet, "
             ".arrow. Omit when using --task.")] = None,
    task: Annotated[str | None, typer.Option("--task", help="A preset instead of a file.")
                    ] = None,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="With --task: folder holding the original files (default: the "
                           "subset shipped with sparsemerge).")] = None,
    split: Annotated[str, typer.Option("--split", help="With --task: train or dev.")
                     ] = "train",
    text_column: Annotated[str, typer.Option("--text-column", help="Name or 0-based index.")
                           ] = "text",
    text_pair_column: Annotated[str | None, typer.Option("--text-pair-column")] = None,
    label_column: Annotated[str, typer.Option("--label-column")] = "label",
    labels: Annotated[str | None, typer.Option(
        "--labels", help="Comma-separated class names in id order (default: inferred).")
    ] = None,
    no_header: Annotated[bool, typer.Option("--no-header", help="The file has no header.")
                         ] = False,
    skip_bad_rows: Annotated[bool, typer.Option(
        "--skip-bad-rows", help="Skip and count malformed rows instead of failing.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Read a labelled table the way training will, and report rows, labels and problems."""
    from sparsemerge.data.readers import read_table
    from sparsemerge.data.tasks import load_task

    def col(c: str | None) -> str | int | None:
        return int(c) if c is not None and c.isdigit() else c

    with _user_errors():
        if (path is None) == (task is None):
            raise SparseMergeError("give either a file PATH or --task NAME")
        if task is not None:
            data = load_task(task, data_dir, split, skip_bad_rows=skip_bad_rows)
        else:
            data = read_table(
                path, text_column=col(text_column), text_pair_column=col(text_pair_column),
                label_column=col(label_column),
                labels=[x.strip() for x in labels.split(",")] if labels else None,
                skip_bad_rows=skip_bad_rows, has_header=not no_header)
    info = {"source": data.source, "rows": len(data), "skipped": data.skipped,
            "labels": data.labels, "label_counts": data.label_counts(),
            "pairs": data.is_pair}
    if json_out:
        _json(info)
        return
    counts = ", ".join(f"{k}: {v}" for k, v in info["label_counts"].items())
    typer.echo(f"{data.source}: {len(data)} rows ({counts})"
               + (f"; skipped {data.skipped} bad rows" if data.skipped else ""))
