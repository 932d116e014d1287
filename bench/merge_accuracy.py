"""Accuracy of merged multi-head models vs their single adapters (SST-2 + CoLA on MiniLM).

For each task an adapter is taken (``--sst2 DIR --cola DIR``) or trained with
``sparsemerge train --task T --data-dir D`` (extra options via ``--train-args``). Each task is
scored on its GLUE dev set with its own adapter, then the adapters are merged into one
two-headed model per merge spec (``--merges``, e.g. ``sum,ties:density=1.0``) with
``merge --heads`` and every task is scored again through ``MultiHeadModel`` (one backbone,
one head per task). Metric: SST-2 accuracy, CoLA Matthews correlation, both ×100; the issue's
target is each merged task within 1 point of its single adapter.

    python bench/merge_accuracy.py --data-dir ../shared/data --workdir runs/merge-acc
    python bench/merge_accuracy.py --sst2 runs/sst2 --cola runs/cola --data-dir ../shared/data
    python bench/merge_accuracy.py --data-dir ../shared/data --sst2 runs/sst2 --seeds 1,2,3

With several ``--seeds`` one CoLA adapter is trained per seed (``WORKDIR/cola-s<seed>``, kept
and reused) and merged with the same SST-2 adapter; the table has a row per seed and their
mean, because a 1-point margin is about one standard error on these dev sets (SST-2: 872
sentences) and a single seed can land on either side of it.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

HEADLINE = {"sst2": "accuracy", "cola": "matthews"}


def parse_merges(text: str) -> list[tuple[str, str, dict[str, str]]]:
    """``"sum,ties:density=0.5"`` -> [(label, method, params)]."""
    out = []
    for spec in [s for s in text.split(",") if s]:
        method, _, rest = spec.partition(":")
        params = dict(kv.split("=", 1) for kv in rest.split(";") if kv)
        out.append((spec, method, params))
    return out


def train(task: str, data_dir: str, out: Path, extra: str) -> None:
    cmd = [sys.executable, "-m", "sparsemerge.cli", "train", "--task", task, "--data-dir",
           data_dir, "-o", str(out), *shlex.split(extra)]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def dev_data(task: str, data_dir: str, limit: int | None):
    from sparsemerge.data.examples import LabeledData
    from sparsemerge.data.tasks import load_task

    data = load_task(task, data_dir, "dev")
    if limit:
        data = LabeledData(data.examples[:limit], data.labels, data.source, data.skipped)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--sst2", help="trained SST-2 adapter (default: train one)")
    ap.add_argument("--cola", help="trained CoLA adapter (default: train one per --seeds)")
    ap.add_argument("--seeds", default="1", help="comma-separated seeds (mask, init, order) of "
                    "the CoLA adapters trained and merged one at a time (the SST-2 adapter "
                    "is trained once, with the first)")
    ap.add_argument("--train-args", default="", help="extra options for sparsemerge train "
                    "(not --seed)")
    ap.add_argument("--merges", default="sum,ties:density=1.0,ties:density=0.5")
    ap.add_argument("--workdir", default="runs/merge-accuracy")
    ap.add_argument("--max-dev", type=int, default=None, help="score only the first N dev rows")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.cola and len(seeds) > 1:
        ap.error("--cola names one adapter: pass one seed (or none)")

    from sparsemerge.evaluate import load_adapted
    from sparsemerge.merge.recipe import build_recipe, run_recipe
    from sparsemerge.multihead import MultiHeadModel
    from sparsemerge.scoring import evaluate_data

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    def adapter(task: str, given: str | None, seed: int) -> Path:
        path = Path(given) if given else work / f"{task}-s{seed}"
        if not given and not (path / "adapter.safetensors").exists():
            train(task, args.data_dir, path, f"{args.train_args} --seed {seed}")
        return path

    data = {t: dev_data(t, args.data_dir, args.max_dev) for t in HEADLINE}

    def score(path: Path, task: str) -> float:
        model, tok, _, _ = load_adapted(str(path))
        return 100 * evaluate_data(model, tok, data[task])[HEADLINE[task]]

    sst2 = adapter("sst2", args.sst2, seeds[0])
    sst2_single = score(sst2, "sst2")
    print(f"single sst2: {HEADLINE['sst2']} {sst2_single:.2f}", flush=True)
    runs: dict[int, dict] = {}
    for seed in seeds:
        cola = adapter("cola", args.cola, seed)
        single = {"sst2": sst2_single, "cola": score(cola, "cola")}
        print(f"seed {seed} single cola: {HEADLINE['cola']} {single['cola']:.2f}", flush=True)
        merged: dict[str, dict[str, float]] = {}
        for label, method, params in parse_merges(args.merges):
            tag = label.replace(":", "-").replace("=", "").replace(";", "-")
            out = work / f"merged-s{seed}-{tag}"
            recipe = build_recipe([str(sst2), str(cola)], method=method, params=params,
                                  heads=True, output=str(out))
            run_recipe(recipe)
            metrics = MultiHeadModel.from_pretrained(out).evaluate(data)
            merged[label] = {t: 100 * metrics[t][HEADLINE[t]] for t in HEADLINE}
            print(f"seed {seed} merged {label}: " + ", ".join(
                f"{t} {v:.2f}" for t, v in merged[label].items()), flush=True)
        runs[seed] = {"single": single, "merged": merged, "cola_adapter": str(cola)}

    labels = [label for label, _, _ in parse_merges(args.merges)]
    rows: dict[str, dict] = {str(s): r for s, r in runs.items()}
    if len(runs) > 1:
        n = len(runs)
        rows["mean"] = {
            "single": {t: sum(r["single"][t] for r in runs.values()) / n for t in HEADLINE},
            "merged": {lab: {t: sum(r["merged"][lab][t] for r in runs.values()) / n
                             for t in HEADLINE} for lab in labels}}
    overall = rows.get("mean") or next(iter(rows.values()))
    mean = {lab: {t: round(overall["merged"][lab][t] - overall["single"][t], 2)
                  for t in HEADLINE} for lab in labels}
    print("\n| task | CoLA seed | single adapter | " + " | ".join(
        f"merged {lab}" for lab in labels) + " |\n|" + "---|" * (3 + len(labels)))
    for task in HEADLINE:
        for key, r in rows.items():
            s = r["single"][task]
            cells = [f"{v:.2f} ({v - s:+.2f})" for v in (r["merged"][lab][task] for lab in labels)]
            print(f"| {task} {HEADLINE[task]} | {key} | {s:.2f} | " + " | ".join(cells) + " |")
    result = {
        "seeds": {s: {"single": {t: round(v, 2) for t, v in r["single"].items()},
                      "merged": {lab: {t: round(v, 2) for t, v in m.items()}
                                 for lab, m in r["merged"].items()}}
                  for s, r in runs.items()},
        "mean_change": mean,
        "within_1_point_mean": {lab: {t: bool(d >= -1.0) for t, d in m.items()}
                                for lab, m in mean.items()},
        "dev_examples": {t: len(d) for t, d in data.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
