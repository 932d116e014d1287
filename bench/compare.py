"""Compare training methods on one task: trainable parameters, dev metric, wall time, bytes.

Every method is trained by the one training loop (``sparsemerge.train.loop.train``) with the
same data, seed, batch size, schedule and evaluation; only the method (and its learning rate,
see ``PRESETS``) changes. Each run writes its adapter (format v1, bf16 values) into
``--workdir`` and the table reports the size of its ``adapter.safetensors`` (head included).

    python bench/compare.py --task sst2 --data-dir ../shared/data --max-train-examples 8000 \\
        --epochs 2 --out bench/results/compare-sst2.json
    python bench/compare.py --task mrpc --data-dir ../shared/data --epochs 3 --seeds 0,1,2 \\
        --methods lora:rank=8,sparta:density=lora-r8 --out bench/results/compare-mrpc.json
    python bench/compare.py --table bench/results/compare-sst2*.json   # print saved results

``--methods`` is a comma-separated list of ``name[:key=value[:key=value...]]``; a key that is
a training option (``lr``, ``density``, ``epochs``...) sets it, any other key is a method
parameter (``rank``, ``budget``...). ``density=lora-rN`` is the density at which SpaRTA
trains as many entries as LoRA of rank N on every linear layer (r=8 on MiniLM-L6: 0.0313927,
337,917 entries vs LoRA's 337,920). The default list is the issue's table: head, full, LoRA
r=8, SpaRTA at two densities (0.5%, and 1.25% = Partial-LoRA's trainable count), and
Partial-LoRA. Each spec runs once per ``--seeds`` seed; a run's label is its spec with
``:seed=N`` appended for N != 0 (so every label is a spec that reproduces it), and ``--table``
aggregates the seeds of a spec into mean ± std. Results are appended to ``--out`` after every
run; a rerun skips the labels already there (``--force`` retrains them), so an interrupted
benchmark continues. Parallel runs (one process per task, seed and spec, e.g. on one GPU)
each write their own ``--out``; ``--table FILES...`` merges them. Every row records the exact
command line that produced it (``command``; ``setup.command`` is the latest invocation's).

Timings cover the whole ``train`` call (model load, calibration, every step, the per-epoch
evaluations and the save): wall-clock seconds, which depend on the machine's load, and the
process's CPU seconds (``time.process_time``), which do much less -- with ``--threads 1``
they approximate the wall time on an idle core.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsemerge.data.tasks import TASKS
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.methods import get_method

DEFAULT_METHODS = ("head,full,lora:rank=8,sparta:density=0.005,sparta:density=0.0125,"
                   "partial-lora:rank=8")
#: Per-method learning rates where a family's common choice differs from ``sparsemerge
#: train``'s default (``--lr auto``: SpaRTA's density rule, 2e-3 for the others; the head's
#: is 5x unless set). Rows of SpaRTA before issue 19 ran at a fixed 2e-3: their ``lr`` says so.
PRESETS: dict[str, dict] = {
    "full": {"lr": 5e-5},
    "lora": {"lr": 1e-3},
    "partial-lora": {"lr": 1e-3},
}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
LORA_COUNT = re.compile(r"lora-r(\d+)")  # density=lora-r8: LoRA r=8's trainable count
SEED_PAIR = re.compile(r":seed=\d+")


@functools.cache
def lora_count_density(rank: int, base: str | None = None) -> float:
    """The density at which SpaRTA trains as many entries as LoRA of rank ``rank`` (r x (in +
    out) per layer) on every linear layer of ``base`` (None: MiniLM-L6)."""
    from sparsemerge.models import default_targets, load_backbone

    backbone = load_backbone(base)
    shapes = [backbone.get_parameter(n).shape for n in default_targets(backbone)]
    return rank * sum(o + i for o, i in shapes) / sum(o * i for o, i in shapes)


def parse_spec(spec: str, base: str | None = None) -> tuple[str, dict, dict]:
    """``name:key=value:...`` -> (method, config overrides, method params); ``base`` is the
    model that ``density=lora-rN`` counts on."""
    name, *pairs = [p.strip() for p in spec.split(":")]
    get_method(name)  # fail early on a typo
    config: dict = dict(PRESETS.get(name, {}))
    params: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--methods: {pair!r} in {spec!r} is not key=value")
        count = LORA_COUNT.fullmatch(value) if key == "density" else None
        if count:
            config[key] = lora_count_density(int(count.group(1)), base)
        elif key in CONFIG_FIELDS:
            field_type = type(getattr(TrainConfig(task="sst2"), key))
            config[key] = value if field_type is str else json.loads(value)
        else:
            params[key] = value
    return name, config, params


def run_one(label: str, method: str, overrides: dict, params: dict, args) -> dict:
    from sparsemerge.train.loop import train

    cfg = dict(task=args.task, data_dir=args.data_dir, base=args.base, epochs=args.epochs,
               batch_size=args.batch_size, max_train_examples=args.max_train_examples,
               max_length=args.max_length, quiet=not args.verbose, device=args.device,
               output=str(Path(args.workdir) / args.task
                          / label.replace(":", "_").replace("=", "")))
    cfg.update(overrides)
    config = TrainConfig(method=method, method_params=params, **cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(config)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    nbytes = (Path(result.output) / "adapter.safetensors").stat().st_size
    info = result.adapter.extra.get("training", {})
    row = {
        "label": label, "method": method, "lr": config.learning_rate,
        "lr_rule": "auto" if config.lr == "auto" else "explicit",
        "head_lr": config.head_learning_rate, "weight_decay": config.decay_rate,
        "warmup_ratio": config.warmup_ratio, "seed": config.seed,
        "method_params": params, "trainable": result.trainable,
        "head_params": result.head_params, "metrics": result.metrics, "steps": result.steps,
        "history": result.history, "wall_time_s": round(wall, 1), "cpu_time_s": round(cpu, 1),
        "threads": torch.get_num_threads(), "device": args.device, "adapter_bytes": nbytes,
        "train_examples": result.data_info["train"]["examples"], "command": command_line(),
    }
    if "layers" in info:  # Partial-LoRA: the per-layer allocation
        row["allocation"] = {k: info[k] for k in ("share_of_dense_lora", "dense_lora_params",
                                                  "global_scale") if k in info}
        row["allocation"]["density_by_layer"] = {n: v["density"] for n, v in
                                                 info["layers"].items()}
    return row


def command_line() -> str:
    """This process's command line, quoted so that a shell runs it again."""
    return shlex.join(["python", *sys.argv])


def shown_metrics(task: str) -> list[str]:
    metrics = TASKS[task].metrics
    return [m for m in ("accuracy", "f1") if m in metrics] or [metrics[0]]


def summary(results: dict) -> dict[str, dict]:
    """Per spec (label without ``:seed=N``): its runs' labels and each shown metric's
    per-seed values (x100), mean and std (0 for one seed)."""
    groups: dict[str, list[dict]] = {}
    for row in results["runs"].values():
        groups.setdefault(SEED_PAIR.sub("", row["label"]), []).append(row)
    out = {}
    for spec, rows in groups.items():
        entry: dict = {"runs": [r["label"] for r in rows]}
        for m in shown_metrics(results["task"]):
            vals = [100 * r["metrics"].get(m, float("nan")) for r in rows]
            entry[m] = {"values": [round(v, 2) for v in vals],
                        "mean": round(statistics.fmean(vals), 2),
                        "std": round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0}
        out[spec] = entry
    return out


def table(results: dict) -> str:
    """Markdown table of the runs in ``results``, one line per spec (seeds: mean ± std)."""
    shown = shown_metrics(results["task"])
    head = ["method", "seeds", "trainable (backbone)", "head", "lr", "head lr",
            *[f"dev {m}" for m in shown], "steps", "wall time (s)", "CPU time (s)",
            "adapter bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = {r["label"]: r for r in results["runs"].values()}
    for spec, agg in summary(results).items():
        first = rows[agg["runs"][0]]
        n = len(agg["runs"])
        wall, cpu = (statistics.fmean(rows[r].get(key, float("nan")) for r in agg["runs"])
                     for key in ("wall_time_s", "cpu_time_s"))
        vals = [spec, str(n), f"{first['trainable']:,}", f"{first['head_params']:,}",
                f"{first['lr']:.3g}", f"{first['head_lr']:.3g}" if "head_lr" in first else "?",
                *[f"{agg[m]['mean']:.2f}" + (f" ± {agg[m]['std']:.2f}" if n > 1 else "")
                  for m in shown],
                str(first["steps"]), f"{wall:.0f}", f"{cpu:.0f}",
                f"{first['adapter_bytes']:,}"]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def report(results: dict) -> None:
    """The table, then the JSON summary as the last stdout line."""
    print(table(results))
    print(json.dumps({"task": results["task"], "specs": summary(results)}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="sst2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--base", default=None, help="model dir or HF id (default: MiniLM-L6)")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--max-train-examples", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seeds", default="0",
                    help="comma-separated seeds; every spec runs once per seed")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (TrainConfig.device)")
    ap.add_argument("--workdir", default="/tmp/sparsemerge-compare")
    ap.add_argument("--out", default=None, help="JSON results file (appended run by run; with "
                    "--table: the union of the files, each row with its command)")
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
            for row in res["runs"].values():  # each row keeps the command that ran it
                row.setdefault("command", res["setup"]["command"])
            merged = {**res, "runs": {**merged.get("runs", {}), **res["runs"]}}
        report(merged)
        if args.out:  # the union as one results file, with this command as its own
            merged["setup"] = {**merged["setup"], "command": command_line()}
            Path(args.out).write_text(json.dumps(merged, indent=2, default=str) + "\n")
        return
    out = Path(args.out) if args.out else None
    setup = {"task": args.task, "data_dir": args.data_dir, "base": args.base,
             "epochs": args.epochs, "batch_size": args.batch_size,
             "max_train_examples": args.max_train_examples, "max_length": args.max_length,
             "seeds": args.seeds, "device": args.device, "threads": torch.get_num_threads(),
             "command": command_line()}
    results = {"task": args.task, "setup": setup, "runs": {}}
    if out is not None and out.exists():
        results = json.loads(out.read_text())
        results["setup"] = setup
    seeds = [int(s) for s in args.seeds.split(",")]
    for spec in [s.strip() for s in args.methods.split(",") if s.strip()]:
        for seed in seeds:
            label = spec if seed == 0 else f"{spec}:seed={seed}"
            if label in results["runs"] and not args.force:
                print(f"{label}: already in {out}, skipped", file=sys.stderr, flush=True)
                continue
            method, overrides, params = parse_spec(label, args.base)
            print(f"{label}: training ...", file=sys.stderr, flush=True)
            row = run_one(label, method, overrides, params, args)
            row["command"] = setup["command"]
            results["runs"][label] = row
            print(f"{label}: trainable {row['trainable']:,}, dev {row['metrics']}, "
                  f"{row['wall_time_s']} s, {row['adapter_bytes']:,} bytes", file=sys.stderr,
                  flush=True)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    report(results)


if __name__ == "__main__":
    main()
