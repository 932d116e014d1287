"""Compare training methods on one task: trainable parameters, dev metric, wall time, bytes.

Every method is trained by the one training loop (``sparsemerge.train.loop.train``) with the
same data, seed, batch size, schedule and evaluation; only the method (and its learning rate,
see ``PRESETS``) changes. Each run writes its adapter (format v1, bf16 values) into
``--workdir`` and the table reports the size of its ``adapter.safetensors`` (head included).

    python bench/compare.py --task sst2 --data-dir ../shared/data --max-train-examples 8000 \\
        --epochs 2 --out bench/results/compare-sst2.json
    python bench/compare.py --task mrpc --data-dir ../shared/data --epochs 3 \\
        --out bench/results/compare-mrpc.json
    python bench/compare.py --table bench/results/compare-sst2*.json   # print saved results

``--methods`` is a comma-separated list of ``name[:key=value[:key=value...]]``; a key that is
a training option (``lr``, ``density``, ``epochs``...) sets it, any other key is a method
parameter (``rank``, ``budget``...). The default list is the issue's table: head, full, LoRA
r=8, SpaRTA at two densities (0.5%, and 1.25% = Partial-LoRA's trainable count), and
Partial-LoRA. Results are appended to ``--out`` after every run; a rerun skips the labels
already there (``--force`` retrains them), so an interrupted benchmark continues.

Timings cover the whole ``train`` call (model load, calibration, every step, the per-epoch
evaluations and the save): wall-clock seconds, which depend on the machine's load, and the
process's CPU seconds (``time.process_time``), which do much less -- with ``--threads 1``
they approximate the wall time on an idle core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from sparsemerge.data.tasks import TASKS
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.methods import get_method

DEFAULT_METHODS = ("head,full,lora:rank=8,sparta:density=0.005,sparta:density=0.0125,"
                   "partial-lora:rank=8")
#: Per-method learning rates (the head's is 5x unless set): common choices for each family.
PRESETS: dict[str, dict] = {
    "head": {"lr": 2e-3},
    "full": {"lr": 5e-5},
    "lora": {"lr": 1e-3},
    "partial-lora": {"lr": 1e-3},
    "sparta": {"lr": 2e-3},
    "rigsa": {"lr": 2e-3},
}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def parse_spec(spec: str) -> tuple[str, dict, dict]:
    """``name:key=value:...`` -> (method, config overrides, method params)."""
    name, *pairs = [p.strip() for p in spec.split(":")]
    get_method(name)  # fail early on a typo
    config: dict = dict(PRESETS.get(name, {}))
    params: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--methods: {pair!r} in {spec!r} is not key=value")
        if key in CONFIG_FIELDS:
            field_type = type(getattr(TrainConfig(task="sst2"), key))
            config[key] = value if field_type is str else json.loads(value)
        else:
            params[key] = value
    return name, config, params


def run_one(label: str, method: str, overrides: dict, params: dict, args) -> dict:
    from sparsemerge.train.loop import train

    cfg = dict(task=args.task, data_dir=args.data_dir, epochs=args.epochs, seed=args.seed,
               batch_size=args.batch_size, max_train_examples=args.max_train_examples,
               max_length=args.max_length, quiet=not args.verbose,
               output=str(Path(args.workdir) / label.replace(":", "_").replace("=", "")))
    cfg.update(overrides)
    config = TrainConfig(method=method, method_params=params, **cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(config)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    nbytes = (Path(result.output) / "adapter.safetensors").stat().st_size
    info = result.adapter.extra.get("training", {})
    row = {
        "label": label, "method": method, "lr": config.lr, "method_params": params,
        "trainable": result.trainable, "head_params": result.head_params,
        "metrics": result.metrics, "steps": result.steps, "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1), "threads": torch.get_num_threads(),
        "adapter_bytes": nbytes, "train_examples": result.data_info["train"]["examples"],
    }
    if "layers" in info:  # Partial-LoRA: the per-layer allocation
        row["allocation"] = {k: info[k] for k in ("share_of_dense_lora", "dense_lora_params",
                                                  "global_scale") if k in info}
        row["allocation"]["density_by_layer"] = {n: v["density"] for n, v in
                                                 info["layers"].items()}
    return row


def table(results: dict) -> str:
    """Markdown table of the runs in ``results``."""
    task = results["task"]
    metrics = TASKS[task].metrics
    shown = [m for m in ("accuracy", "f1") if m in metrics] or [metrics[0]]
    head = ["method", "trainable (backbone)", "head", *[f"dev {m}" for m in shown],
            "steps", "wall time (s)", "CPU time (s)", "adapter bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["runs"].values():
        vals = [row["label"], f"{row['trainable']:,}", f"{row['head_params']:,}",
                *[f"{100 * row['metrics'].get(m, float('nan')):.2f}" for m in shown],
                str(row["steps"]), f"{row['wall_time_s']:.0f}",
                f"{row.get('cpu_time_s', float('nan')):.0f}", f"{row['adapter_bytes']:,}"]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="sst2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--max-train-examples", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/sparsemerge-compare")
    ap.add_argument("--out", default=None, help="JSON results file (appended run by run)")
    ap.add_argument("--force", action="store_true", help="retrain labels already in --out")
    ap.add_argument("--verbose", action="store_true", help="progress bars and log lines")
    ap.add_argument("--table", metavar="JSON", nargs="+",
                    help="only print the table of these results files (one task)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.table:
        merged: dict = {}
        for path in args.table:  # several files (e.g. parallel runs of one task): union
            res = json.loads(Path(path).read_text())
            if merged and res["task"] != merged["task"]:
                raise SystemExit(f"{path}: task {res['task']}, not {merged['task']}")
            merged = {**res, "runs": {**merged.get("runs", {}), **res["runs"]}}
        print(table(merged))
        return
    out = Path(args.out) if args.out else None
    setup = {"task": args.task, "data_dir": args.data_dir, "epochs": args.epochs,
             "batch_size": args.batch_size, "max_train_examples": args.max_train_examples,
             "max_length": args.max_length, "seed": args.seed, "threads": torch.get_num_threads(),
             "command": " ".join(sys.argv)}
    results = {"task": args.task, "setup": setup, "runs": {}}
    if out is not None and out.exists():
        results = json.loads(out.read_text())
        results["setup"] = setup
    for spec in [s.strip() for s in args.methods.split(",") if s.strip()]:
        label = spec
        if label in results["runs"] and not args.force:
            print(f"{label}: already in {out}, skipped", flush=True)
            continue
        method, overrides, params = parse_spec(spec)
        print(f"{label}: training ...", flush=True)
        row = run_one(label, method, overrides, params, args)
        results["runs"][label] = row
        print(f"{label}: trainable {row['trainable']:,}, dev {row['metrics']}, "
              f"{row['wall_time_s']} s, {row['adapter_bytes']:,} bytes", flush=True)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
