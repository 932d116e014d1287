"""Training step time and peak memory: SpaRTA vs PEFT LoRA vs full fine-tuning, MiniLM-L6.

Each configuration runs in a fresh subprocess (so peak RSS is its own) through the real
training loop: ``sparsemerge.train.loop.setup`` builds the run (task model, head, method,
AdamW) and ``loop.train_step`` -- the very function ``sparsemerge train`` calls -- is timed
on identical batches (32 sentences of the shipped SST-2 subset, padded / truncated to exactly
64 tokens, dropout on, gradient clipping on).

Configurations:
  sparta_0.5%       SpaRTA fast path (SDDMM), density 0.5% of every linear layer
  sparta_lora_eq    SpaRTA fast path on every linear layer, at the density giving LoRA r=8
                    (query, value)'s trainable count
  sparta_qv_lora_eq SpaRTA fast path on query and value only (LoRA's modules), same count
  sparta_autograd   SpaRTA at 0.5% through plain autograd (dense weight gradients)
  lora_r8_qv        PEFT LoRA r=8, alpha 16, on query and value
  full              full fine-tuning (every backbone parameter)

Each configuration's process runs ``--rounds`` times, the rounds interleaved (A B C .. A B
C ..), and the reported step time is the median over all rounds' steps: drift in machine load
hits every configuration alike.

Usage:
  python bench/train.py --quick          # < 60 s: 1 round of 3 timed steps per configuration
  python bench/train.py                  # 3 rounds of 20 steps (~10 min on 2 cores)
  python bench/train.py --threads 1 --clock cpu   # on a busy machine: CPU time, 1 thread

The last line is JSON: per-configuration median step time (ms) and peak RSS (MB), and
  sparta_vs_lora_speed  = LoRA step time / SpaRTA step time (same modules, same count; >1 faster)
  sparta_vs_lora_mem    = SpaRTA peak RSS / LoRA peak RSS                       (<1 less)
  sparta_vs_full_speed  = full FT step time / SpaRTA step time
  plus the same three for SpaRTA on every linear layer at LoRA's count (``*_all``) and at
  0.5% (``*_05``).
Targets (issue 3): speed >= 1.0, mem <= 1.1, vs full >= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

QV_TARGETS = r".*\.(query|value)\.weight$"
CONFIGS = {
    "sparta_0.5%": {"method": "sparta", "density": 0.005, "impl": "fast"},
    "sparta_lora_eq": {"method": "sparta", "density": None, "impl": "fast"},
    "sparta_qv_lora_eq": {"method": "sparta", "density": None, "impl": "fast",
                          "targets": QV_TARGETS},
    "sparta_autograd": {"method": "sparta", "density": 0.005, "impl": "autograd"},
    "lora_r8_qv": {"method": "lora"},
    "full": {"method": "full"},
}
BATCH, TOKENS = 32, 64


def worker(name: str, steps: int, warmup: int, threads: int, clock: str,
           density: float) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _baselines import method_for

    from sparsemerge.data.tasks import shipped_dir
    from sparsemerge.train.config import TrainConfig
    from sparsemerge.train.loop import setup, train_step

    torch.set_num_threads(threads)
    spec = dict(CONFIGS[name])
    method = spec.pop("method")
    if spec.get("density", 0) is None:  # LoRA's trainable count over these targets
        spec["density"] = density[spec.get("targets") or "all"]
    n = BATCH * (steps + warmup)
    config = TrainConfig(method=method, train_file=str(shipped_dir() / "sst2_train.tsv"),
                         text_column="sentence", label_column="label",
                         max_train_examples=n, batch_size=BATCH, max_length=TOKENS, quiet=True,
                         seed=0, **spec)
    run = setup(config, method=method_for(method, config.sparse()))
    rows = [run.tokenizer.decode(ids, skip_special_tokens=True)
            for ids in run.train_data["input_ids"]]
    labels = run.train_data["labels"]
    batches = []
    for i in range(steps + warmup):
        chunk = [rows[(i * BATCH + j) % len(rows)] for j in range(BATCH)]
        enc = run.tokenizer(chunk, padding="max_length", truncation=True, max_length=TOKENS,
                            return_tensors="pt")
        batch = dict(enc)
        batch["labels"] = torch.tensor([labels[(i * BATCH + j) % len(rows)]
                                        for j in range(BATCH)])
        batches.append(batch)
    tick = time.process_time if clock == "cpu" else time.perf_counter
    times = []
    torch.manual_seed(0)
    for i, b in enumerate(batches):
        t0 = tick()
        train_step(run, b)
        if i >= warmup:
            times.append((tick() - t0) * 1000)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": name, "median_ms": statistics.median(times), "min_ms": min(times),
            "steps": len(times), "times_ms": times, "peak_rss_mb": round(rss, 1),
            "trainable": run.method.num_trainable(), "density": spec.get("density")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 timed steps, 1 warmup (< 60 s)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--density", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved runs of every configuration (default 3, --quick 1)")
    args = ap.parse_args()
    steps = args.steps or (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.worker:
        import torch

        threads = args.threads or torch.get_num_threads()
        print(json.dumps(worker(args.worker, steps, warmup, threads, args.clock,
                                json.loads(args.density))))
        return

    t_start = time.perf_counter()
    sys.path.insert(0, str(Path(__file__).parent))
    from _baselines import lora_matched_density

    density, lora_count, numel = lora_matched_density()
    density_qv, _, numel_qv = lora_matched_density(targets=QV_TARGETS)
    print(f"MiniLM-L6: LoRA r=8 on query/value trains {lora_count:,} entries = "
          f"{density:.5%} of the {numel:,} linear-layer weights, {density_qv:.4%} of the "
          f"{numel_qv:,} query/value weights", flush=True)
    densities = json.dumps({"all": density, QV_TARGETS: density_qv})
    rounds = args.rounds or (1 if args.quick else 3)
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(rounds):
        for name in names:
            cmd = [sys.executable, __file__, "--worker", name, "--steps", str(steps),
                   "--warmup", str(warmup), "--clock", args.clock, "--density", densities]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"configuration {name} failed")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name].append(r)
            print(f"round {rnd + 1}/{rounds} {name:18s} {r['median_ms']:8.1f} ms/step "
                  f"(min {r['min_ms']:.1f})  peak RSS {r['peak_rss_mb']:7.1f} MB  "
                  f"trainable {r['trainable']:,}", flush=True)
    results = {}
    for name, rs in runs.items():
        times = [t for r in rs for t in r.pop("times_ms")]
        results[name] = {**rs[0], "median_ms": statistics.median(times), "min_ms": min(times),
                         "steps": len(times), "rounds": len(rs),
                         "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)}
    print(f"\n{'config':18s} {'ms/step':>9} {'peak RSS MB':>12} {'trainable':>12}")
    for name, r in results.items():
        print(f"{name:18s} {r['median_ms']:9.1f} {r['peak_rss_mb']:12.1f} {r['trainable']:12,}")

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in results and b in results:
            return round(results[a][key] / results[b][key], 3)
        return None

    summary = {
        "model": "MiniLM-L6", "batch": BATCH, "tokens": TOKENS, "steps": steps,
        "clock": args.clock, "threads": args.threads, "lora_matched_density": density,
        "lora_matched_density_qv": density_qv, "rounds": rounds, "configs": results,
        "sparta_vs_lora_speed": ratio("lora_r8_qv", "sparta_qv_lora_eq", "median_ms"),
        "sparta_vs_lora_mem": ratio("sparta_qv_lora_eq", "lora_r8_qv", "peak_rss_mb"),
        "sparta_vs_full_speed": ratio("full", "sparta_qv_lora_eq", "median_ms"),
        "sparta_vs_lora_speed_all": ratio("lora_r8_qv", "sparta_lora_eq", "median_ms"),
        "sparta_vs_lora_mem_all": ratio("sparta_lora_eq", "lora_r8_qv", "peak_rss_mb"),
        "sparta_vs_full_speed_all": ratio("full", "sparta_lora_eq", "median_ms"),
        "sparta_vs_lora_speed_05": ratio("lora_r8_qv", "sparta_0.5%", "median_ms"),
        "sparta_vs_lora_mem_05": ratio("sparta_0.5%", "lora_r8_qv", "peak_rss_mb"),
        "sparta_vs_full_speed_05": ratio("full", "sparta_0.5%", "median_ms"),
        "autograd_vs_fast_speed": ratio("sparta_autograd", "sparta_0.5%", "median_ms"),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
