"""The quickstart: sparsemerge's main job end to end on the embedded default.

For each task (default SST-2 and CoLA, the subsets shipped in ``sparsemerge/datasets``) a
SpaRTA adapter is trained on MiniLM-L6 with :data:`QUICKSTART_DEFAULTS`, each task with its
own mask seed so the adapters share few entries; their overlap is measured
(:func:`sparsemerge.merge.engine.overlap_report`); they are merged with :data:`MERGE`
into one two-headed model (``merge --heads``); and every task is scored on its dev set by
its own adapter and by the merged model. ``sparsemerge quickstart`` prints the result;
:func:`run_quickstart` returns it.

Layout of ``output``: ``<task>/`` (one adapter per task) and ``merged/`` (the multi-head
model directory).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sparsemerge.errors import SparseMergeError
from sparsemerge.train.config import TrainConfig

# Measured on the shipped subset (4,000 train / 872 dev, MiniLM-L6, 3 epochs, batch 32):
# density 0.5% lr 2e-3 -> 81.0% dev accuracy; 0.5% lr 5e-3 -> 82.8%; 2% lr 5e-3 -> 84.8%;
# 5% lr 2e-3 -> 86.6%. With so few examples more trainable entries help; a step at 5% costs
# ~15% more than at 0.5% on the fast path. ``lr`` is train's default, ``auto``: 3.14e-3 at 5%
# (85.78%; 2e-3 under the previous rule, 85.67%), the head at 5e-3 (1e-2 before ``auto``).
QUICKSTART_DEFAULTS: dict[str, Any] = {
    "task": "sst2",
    "base": None,
    "density": 0.05,
    "epochs": 3,
    "batch_size": 32,
    "max_length": 64,
}

# The tasks with a subset shipped inside the package, in the order they are trained. A task's
# position is its SpaRTA mask seed: sst2 keeps seed 0 (the run measured above), and two
# independent 5% masks share ~5% of their entries instead of all of them.
SHIPPED_TASKS: tuple[str, ...] = ("sst2", "cola")

# TIES without trimming (density 1.0 of each adapter's own non-zeros): SpaRTA adapters are
# already sparse, so only the shared entries need TIES's sign election and disjoint mean.
MERGE: dict[str, Any] = {"method": "ties", "parameters": {"density": 1.0}}

Log = Callable[[str], None]


def parse_tasks(text: str) -> list[str]:
    """``"sst2,cola"`` -> ``["sst2", "cola"]``, each a shipped task, none twice."""
    tasks = [t.strip() for t in text.split(",")]
    bad = [t for t in tasks if t not in SHIPPED_TASKS]
    if bad or not tasks:
        raise SparseMergeError(f"--tasks {text!r}: choose among {', '.join(SHIPPED_TASKS)} "
                               "(the tasks whose data ships with sparsemerge), comma-separated")
    if len(set(tasks)) != len(tasks):
        raise SparseMergeError(f"--tasks {text!r} names a task twice")
    return tasks


def task_config(task: str, output: Path, *, base: str | None = None,
                max_steps: int | None = None, quiet: bool = False) -> TrainConfig:
    """The quickstart's training run for ``task`` (its own mask seed) writing ``output``."""
    return TrainConfig(**{**QUICKSTART_DEFAULTS, "task": task, "base": base},
                       method_params={"mask_seed": SHIPPED_TASKS.index(task)},
                       max_steps=max_steps, output=str(output), quiet=quiet)


def run_quickstart(output: str | Path, tasks: Sequence[str] = SHIPPED_TASKS, *,
                   base: str | None = None, max_steps: int | None = None, quiet: bool = False,
                   log: Log | None = None) -> dict[str, Any]:
    """Train one adapter per task, measure their overlap, merge them with TIES into a
    multi-head model and score every task alone and merged; returns a JSON-able summary.

    ``base`` and ``max_steps`` exist for tests (a tiny model, a few steps); ``log`` receives
    one line per phase.
    """
    from sparsemerge.data.tasks import TASKS, load_task
    from sparsemerge.merge.engine import overlap_report
    from sparsemerge.merge.recipe import build_recipe, run_recipe
    from sparsemerge.multihead import MultiHeadModel
    from sparsemerge.train.loop import train

    if len(tasks) < 2:
        raise SparseMergeError("the merging quickstart needs at least two tasks")
    say = log or (lambda _: None)
    out = Path(output)
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    adapters = {}
    for i, task in enumerate(tasks):
        say(f"[{i + 1}/{len(tasks) + 2}] training the {task} adapter ({TASKS[task].description})")
        r = train(task_config(task, out / task, base=base, max_steps=max_steps, quiet=quiet))
        results[task] = {"adapter": str(r.output), "metric": TASKS[task].metrics[0],
                         "labels": r.adapter.heads[task].labels, "trainable": r.trainable,
                         "steps": r.steps, "train_time_s": round(r.wall_time, 2),
                         "alone": r.metrics}
        adapters[task] = r.adapter

    say(f"[{len(tasks) + 1}/{len(tasks) + 2}] overlap, then merging with {MERGE['method']}")
    overlap = overlap_report(adapters)
    merged_dir = out / "merged"
    recipe = build_recipe([results[t]["adapter"] for t in tasks], method=MERGE["method"],
                          params=MERGE["parameters"], heads=True, output=str(merged_dir))
    merge_report = run_recipe(recipe)

    say(f"[{len(tasks) + 2}/{len(tasks) + 2}] scoring the merged model on every dev set")
    t1 = time.perf_counter()
    model = MultiHeadModel.from_pretrained(merged_dir)
    merged = model.evaluate({t: load_task(t, None, "dev") for t in tasks})
    for task in tasks:
        r = results[task]
        r["merged"] = merged[task]
        r["change_points"] = round(100 * (merged[task][r["metric"]] - r["alone"][r["metric"]]), 2)
    return {
        "output": str(out), "tasks": results,
        "overlap": [{"a": p["a"], "b": p["b"], **p["overall"]} for p in overlap["pairs"]],
        "merge": {"output": str(merged_dir), "method": MERGE["method"],
                  "parameters": merge_report["parameters"], "nnz": merge_report["nnz"],
                  "seconds": merge_report["seconds"]["total"]},
        "merged_eval_s": round(time.perf_counter() - t1, 2),
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }


__all__ = ["MERGE", "QUICKSTART_DEFAULTS", "SHIPPED_TASKS", "parse_tasks", "run_quickstart",
           "task_config"]
