"""``predict`` and ``evaluate`` on a merged multi-head model directory (``merge --heads``).

The commands in :mod:`sparsemerge.cli.train` hand over here when their path holds a merged
model (:func:`sparsemerge.formats.merged.is_merged_dir`); this module is a thin layer over
:class:`sparsemerge.multihead.MultiHeadModel` and :func:`~sparsemerge.multihead.
task_data`, which decides what ``--task NAME=SOURCE`` means.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from sparsemerge.cli.common import console, err_console, print_json, user_errors
from sparsemerge.errors import SparseMergeError

if TYPE_CHECKING:
    import torch

TASK_HELP = ("Adapter: one preset name. Merged model: HEAD=FILE, HEAD=PRESET or HEAD, "
             "repeatable (see above).")


def refuse_adapter_options(path: str, **given: Any) -> None:
    """Options that only make sense for an adapter applied to a base are errors here."""
    bad = [f"--{k.replace('_', '-')}" for k, v in given.items() if v]
    if bad:
        raise SparseMergeError(f"{path} is a merged multi-head model directory (it carries its "
                               f"own backbone and heads): {', '.join(bad)} apply to adapters "
                               "only")


def parse_task_specs(items: Sequence[str] | None, heads: Sequence[str] = ()
                     ) -> dict[str, str | None]:
    """``["sst2=dev.tsv", "cola"]`` -> ``{"sst2": "dev.tsv", "cola": None}``. Split at the
    first ``=``, unless a longer prefix (or the whole item) is one of ``heads``: a head
    may be named ``a=b`` (``--task a=b=dev.tsv``)."""
    out: dict[str, str | None] = {}
    for item in items or []:
        name, sep, source = (s.strip() for s in item.partition("="))
        if name not in heads:
            if item.strip() in heads:
                name, sep, source = item.strip(), "", ""
            else:
                for i in range(len(item) - 1, 0, -1):  # the longest head name first
                    if item[i] == "=" and item[:i].strip() in heads:
                        name, sep, source = item[:i].strip(), "=", item[i + 1:].strip()
                        break
        if not name or (sep and not source):
            raise SparseMergeError(f"--task {item!r}: write HEAD=FILE, HEAD=PRESET or HEAD")
        if name in out:
            raise SparseMergeError(f"--task names head {name!r} twice")
        out[name] = source if sep else None
    return out


def _check_heads(model: Any, names: Sequence[str], path: str) -> None:
    unknown = [n for n in names if n not in model.tasks]
    if unknown:
        raise SparseMergeError(f"{path} has no head {', '.join(map(repr, unknown))}; its heads "
                               f"are {', '.join(model.tasks)}")


def predict_command(path: Path, shown: str, texts: list[str], pairs: list[str] | None,
                    head: str | None, json_out: bool, device: torch.device | None = None
                    ) -> None:
    """Every head's label and probability for each text (``--head`` keeps one), computed on
    ``device`` (default CPU); heads trained with different prompts take one backbone pass
    each (said on stderr, and as ``backbone_passes`` in JSON)."""
    from sparsemerge.multihead import MultiHeadModel

    with user_errors():
        if pairs and len(pairs) != len(texts):
            raise SparseMergeError(f"{len(texts)} texts but {len(pairs)} --pair values; give "
                                   "one --pair per text")
        model = MultiHeadModel.from_pretrained(path, device=device)
        if head is not None:
            _check_heads(model, [head], shown)
        chosen = [head] if head else None
        passes = len(model.prompt_groups(chosen))
        preds = model.predict(texts, pairs or None, tasks=chosen)
    rows = [{"text": t, **({"pair": pairs[i]} if pairs else {}),
             "tasks": {task: {"label": p[i][0], "probability": p[i][1]}
                       for task, p in preds.items()}}
            for i, t in enumerate(texts)]
    if json_out:
        print_json({"model": shown, "tasks": list(preds), "backbone_passes": passes,
                    "predictions": rows})
        return
    if passes > 1:
        err_console.print(f"its heads need {passes} different prompts: one backbone pass per "
                          "prompt", markup=False, highlight=False)
    table = Table(title=f"predictions of {escape(shown)}", title_justify="left")
    table.add_column("text")
    for task in preds:
        table.add_column(f"{escape(task)} (label, p)")
    for r in rows:
        text = r["text"] + (f"  ||  {r['pair']}" if "pair" in r else "")
        table.add_row(escape(text), *[f"{escape(v['label'])} {v['probability']:.3f}"
                                      for v in r["tasks"].values()])
    console.print(table)


def evaluate_command(path: Path, shown: str, *, tasks: Sequence[str] | None,
                     head: str | None, batch_size: int, max_length: int, json_out: bool,
                     device: torch.device | None = None, **data_options: Any) -> None:
    """Each head's metrics on its data (``data_options``: as ``task_data`` takes them),
    computed on ``device`` (default CPU)."""
    from sparsemerge.data.tasks import TASKS
    from sparsemerge.multihead import MultiHeadModel, task_data

    with user_errors():
        model = MultiHeadModel.from_pretrained(path, device=device)
        specs = parse_task_specs(tasks, model.tasks)
        if not specs:
            if head is not None:
                _check_heads(model, [head], shown)
            specs = {t: None for t in ([head] if head else model.tasks) if t in TASKS}
            if not specs:
                raise SparseMergeError(f"no head of {shown} ({', '.join(model.tasks)}) is named "
                                       f"after a preset task: pass --task HEAD=FILE")
        _check_heads(model, list(specs), shown)
        results: dict[str, Any] = {}
        t0 = time.perf_counter()
        for task, source in specs.items():
            data = task_data(task, source, model.labels(task), **data_options)
            metrics = model.evaluate({task: data}, batch_size=batch_size,
                                     max_length=max_length)[task]
            spec = TASKS.get(task) or TASKS.get(source or "")
            results[task] = {"data": data.source, "skipped_bad_rows": data.skipped,
                             "metric": spec.metrics[0] if spec else None, "metrics": metrics}
        wall = time.perf_counter() - t0
    left = [t for t in model.tasks if t not in results]
    info = {"model": shown, "tasks": results, "not_evaluated": left,
            "wall_time_s": round(wall, 2)}
    if json_out:
        print_json(info)
        return
    console.print(metrics_table(f"evaluation of {shown}",
                                {t: (r["data"], r["metric"], r["metrics"])
                                 for t, r in results.items()}))
    if left:
        console.print(f"not evaluated: {escape(', '.join(left))} (pass --task HEAD=FILE)",
                      highlight=False)


def metrics_table(title: str, rows: dict[str, tuple[str, str | None, dict[str, Any]]]) -> Table:
    """One row per ``name: (data, headline metric, metrics)``; the headline in bold."""
    keys: list[str] = []
    for _, _, m in rows.values():
        keys += [k for k in m if k not in keys and k != "examples"]
    t = Table(title=escape(title), title_justify="left")
    for col in ("", "data", "examples", *keys):
        t.add_column(col, justify="right" if col not in ("", "data") else "left")
    for name, (data, headline, m) in rows.items():
        cells = [f"[bold]{m[k]:.4f}[/]" if k == headline else f"{m[k]:.4f}" if k in m else "-"
                 for k in keys]
        t.add_row(escape(name), escape(str(data)), str(m.get("examples", "-")), *cells)
    return t
