"""Full SST-2 (67,349 train sentences, 1 epoch), MiniLM-L6: SpaRTA vs PEFT LoRA r=8.

SpaRTA runs at the density that gives it exactly LoRA r=8 (query, value)'s trainable count,
so the comparison is at equal trainable parameters (the SpaRTA paper's claim: SpaRTA ~ LoRA).
Both go through the same loop (``sparsemerge.train.loop``): same data order, head init,
schedule (linear warmup 6% + decay), batch 32, max 64 tokens (longer sentences dropped), and
are scored on the 872 GLUE dev sentences.

Usage:
  python bench/sst2_accuracy.py --data-dir ../shared/data            # ~1 h on 2 cores
  python bench/sst2_accuracy.py --data-dir ../shared/data --estimate # time 30 steps, project
  python bench/sst2_accuracy.py --max-train-examples 8000            # a shorter run

Prints one line per method and, last, JSON with method, trainable, dev accuracy, wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Learning rates: SpaRTA's deltas take a larger lr than LoRA's factors (both AdamW); the
# heads use 5x the backbone lr in both cases (the loop's default head_lr).
METHODS = {
    "sparta": {"method": "sparta", "lr": 2e-3},
    "lora": {"method": "lora", "lr": 1e-3},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared"
                                              / "data"))
    ap.add_argument("--methods", default="sparta,lora")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-train-examples", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--estimate", action="store_true",
                    help="time 30 steps per method and project the full run's wall time")
    ap.add_argument("--out", default=None, help="write each adapter to OUT/<method>")
    args = ap.parse_args()

    from _baselines import lora_matched_density, method_for

    from sparsemerge.train.config import TrainConfig
    from sparsemerge.train.loop import setup, train, train_step

    density, lora_count, _ = lora_matched_density()
    rows = []
    for name in args.methods.split(","):
        spec = METHODS[name]
        config = TrainConfig(
            method=spec["method"], task="sst2", data_dir=args.data_dir, density=density,
            lr=spec["lr"], epochs=args.epochs, batch_size=args.batch_size,
            max_length=args.max_length, seed=args.seed, quiet=args.estimate,
            max_train_examples=args.max_train_examples, save_dtype="fp32",
            output=f"{args.out}/{name}" if args.out and spec["method"] == "sparta" else None)
        t0 = time.perf_counter()
        run = setup(config, method=method_for(spec["method"], config.sparse()))
        if args.estimate:
            from sparsemerge.data.batching import batches

            it = batches(run.train_data, config.batch_size, True, config.seed, 0)
            for _ in range(5):
                train_step(run, next(it))
            t1 = time.perf_counter()
            for _ in range(30):
                train_step(run, next(it))
            per_step = (time.perf_counter() - t1) / 30
            total = run.total_steps * per_step
            rows.append({"method": name, "trainable": run.method.num_trainable(),
                         "steps": run.total_steps, "s_per_step": round(per_step, 3),
                         "projected_train_min": round(total / 60, 1)})
            print(f"{name}: {per_step * 1000:.0f} ms/step x {run.total_steps} steps = "
                  f"{total / 60:.1f} min of training (+ setup and evaluation)", flush=True)
            continue
        result = train(config, run=run)
        wall = time.perf_counter() - t0
        rows.append({"method": name, "trainable": result.trainable,
                     "dev_accuracy": result.metrics["accuracy"], "wall_s": round(wall, 1),
                     "steps": result.steps, "lr": spec["lr"], "density": density
                     if spec["method"] == "sparta" else None})
        print(f"{name}: trainable {result.trainable:,}  dev accuracy "
              f"{result.metrics['accuracy']:.4f}  wall {wall / 60:.1f} min", flush=True)
    print(json.dumps({"lora_count": lora_count, "density": density, "results": rows}))


if __name__ == "__main__":
    main()
