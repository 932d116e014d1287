"""Run a merge recipe (``merge_recipe.yaml``) from Python, then score the merged model.

The same as ``sparsemerge merge --config examples/merge_recipe.yaml``, plus scoring each head
of the result on its task's dev set, so you can compare recipes. Options given here override
the file, as the CLI's flags do. Run ``train_and_merge.py`` first: the recipe merges the
adapters it writes.

    python examples/run_recipe.py
    python examples/run_recipe.py --recipe my.yaml runs/sst2 runs/cola --out runs/merged --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import sparsemerge
from sparsemerge.merge.recipe import build_recipe, run_recipe

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", nargs="*", help="adapters to merge (default: the recipe's inputs)")
    p.add_argument("--recipe", type=Path, default=HERE / "merge_recipe.yaml")
    p.add_argument("--base", default=None,
                   help="base model (default: the recipe's, else the adapters' own base)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding GLUE's SST-2/ and CoLA/ files for scoring (default: the "
                        "subsets shipped inside sparsemerge)")
    p.add_argument("--out", default=None, help="output folder (default: the recipe's output)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # The file is validated against the operator's declared parameters; None = "not given".
    recipe = build_recipe(args.adapters or None, config=args.recipe, base=args.base,
                          output=args.out)
    report = run_recipe(recipe)
    if report["kind"] != "merged-model":  # `heads: false` wrote a merged adapter: no heads to run
        print(json.dumps(report) if args.json else f"merged adapter written to {recipe.output}")
        return report
    model = sparsemerge.MultiHeadModel.from_pretrained(recipe.output)
    scores = model.evaluate({task: None for task in model.tasks}, data_dir=args.data_dir)
    summary = {"recipe": str(args.recipe), "method": report["method"],
               "parameters": report["parameters"], "weights": report["weights"],
               "output": report["output"], "nnz": report["nnz"], "tasks": model.tasks,
               "scores": scores}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{report['method']} {report['parameters']} -> {report['output']} "
              f"({report['nnz']:,} entries, {report['seconds']['total']} s)")
        for task, metrics in scores.items():
            shown = {k: v for k, v in metrics.items()
                     if k in ("accuracy", "matthews", "f1") and v is not None}
            print(f"  {task}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
    return summary


if __name__ == "__main__":
    main()
