"""CLI start-up: wall time of ``sparsemerge --help``, ``sparsemerge inspect ADAPTER --json`` and
``hf --help`` (the huggingface_hub CLI, for scale), each in a fresh process; ``python -c pass``
is timed alongside as the floor (interpreter and site start-up).

The three commands run interleaved (one of each per round, after one warm-up round that is not
counted, so all see the same page cache and the same background load); the figure is the
median over ``--runs`` rounds. The adapter inspected is written first into a temporary folder:
a SpaRTA adapter shaped like MiniLM-L6's linear layers (36 tensors, seeded masks at
``--density``, bf16 values, a 2-label head), or pass ``--adapter DIR`` to time your own.
Progress lines first; the last line is one JSON object, also written to ``--out`` with the
exact command line that produced it.

    python bench/cli_startup.py                 # 7 rounds, ~30 s
    python bench/cli_startup.py --runs 15 --adapter sparsemerge-quickstart/sst2

Targets (issue 15): ``sparsemerge --help`` <= 1.5 x ``hf --help``; ``inspect`` <= 0.8 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELP_RATIO_TARGET = 1.5
INSPECT_TARGET_S = 0.8


def script(name: str) -> list[str]:
    """The console script ``name`` installed beside this interpreter (no shell shims such as
    pyenv's in between), else the one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        sys.exit(f"{name}: not installed (pip install -e . ; huggingface_hub provides hf)")
    return [found]


def minilm_like_adapter(out: Path, density: float) -> Path:
    """A SpaRTA adapter with MiniLM-L6's linear-layer shapes, written with the real format."""
    import torch

    from sparsemerge import masks
    from sparsemerge.adapter import BaseInfo, Head, SparseAdapter, SparseTensor, TargetDelta
    from sparsemerge.formats.adapter_file import save_adapter

    hidden, inner = 384, 1536
    shapes = {"attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
              "attention.self.value": (hidden, hidden),
              "attention.output.dense": (hidden, hidden),
              "intermediate.dense": (inner, hidden), "output.dense": (hidden, inner)}
    g = torch.Generator().manual_seed(0)
    targets = {}
    for layer in range(6):
        for module, shape in shapes.items():
            name = f"encoder.layer.{layer}.{module}.weight"
            numel = shape[0] * shape[1]
            nnz = masks.nnz_for_density(numel, density)
            idx = torch.from_numpy(masks.seeded_indices(0, name, numel, nnz))
            values = (torch.randn(nnz, generator=g) * 1e-3).to(torch.bfloat16)
            targets[name] = TargetDelta(shape, SparseTensor(shape, idx, values, mask_seed=0))
    head = Head("classifier", {"weight": torch.randn(2, hidden, generator=g) * 0.02,
                               "bias": torch.zeros(2)}, ["negative", "positive"])
    adapter = SparseAdapter(targets, BaseInfo("sentence-transformers/all-MiniLM-L6-v2"),
                            {"sst2": head}, "sparta", {"density": density})
    return save_adapter(adapter, out, value_dtype="bf16")


def run_once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="counted rounds (default 7)")
    ap.add_argument("--adapter", type=Path, help="adapter to inspect (default: one written "
                                                 "to a temporary folder)")
    ap.add_argument("--density", type=float, default=0.005,
                    help="density of the generated adapter (default 0.005)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cli-startup.json")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")

    def log(msg: str) -> None:
        print(msg, flush=True)

    with tempfile.TemporaryDirectory(prefix="cli-startup-") as tmp:
        adapter = args.adapter
        if adapter is None:
            log(f"writing a MiniLM-L6-shaped SpaRTA adapter (density {args.density}) ...")
            adapter = minilm_like_adapter(Path(tmp) / "adapter", args.density)
        sm, hf = script("sparsemerge"), script("hf")
        commands = {"help": [*sm, "--help"],
                    "inspect": [*sm, "inspect", str(adapter), "--json"],
                    "hf_help": [*hf, "--help"],
                    "python": [sys.executable, "-c", "pass"]}  # the floor, for context
        env_note = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HOME") if k in os.environ}
        info = json.loads(subprocess.run(commands["inspect"], capture_output=True, text=True,
                                         check=True).stdout)
        times: dict[str, list[float]] = {k: [] for k in commands}
        log("warm-up round (not counted)")
        for argv in commands.values():
            run_once(argv)
        for i in range(args.runs):
            for key, argv in commands.items():
                times[key].append(run_once(argv))
            log(f"round {i + 1}/{args.runs}: " + ", ".join(
                f"{k} {times[k][-1]:.3f} s" for k in commands))

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["help"] / med["hf_help"]
    for key, label in (("help", "sparsemerge --help"), ("inspect", "sparsemerge inspect --json"),
                       ("hf_help", "hf --help"), ("python", "python -c pass")):
        log(f"{label:<28} median {med[key]:.3f} s  (min {min(times[key]):.3f}, "
            f"max {max(times[key]):.3f})")
    log(f"sparsemerge --help / hf --help = {ratio:.2f} (target <= {HELP_RATIO_TARGET}); "
        f"inspect {med['inspect']:.3f} s (target <= {INSPECT_TARGET_S} s)")
    result = {
        "help_s": round(med["help"], 4),
        "inspect_s": round(med["inspect"], 4),
        "hf_help_s": round(med["hf_help"], 4),
        "python_s": round(med["python"], 4),
        "help_vs_hf": round(ratio, 3),
        "targets": {"help_vs_hf_max": HELP_RATIO_TARGET, "inspect_s_max": INSPECT_TARGET_S,
                    "met": ratio <= HELP_RATIO_TARGET and med["inspect"] <= INSPECT_TARGET_S},
        "runs": args.runs,
        "samples_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "commands": {k: " ".join(v) for k, v in commands.items()},
        "adapter": {"path": str(args.adapter) if args.adapter else "generated (MiniLM-L6 "
                    f"shapes, density {args.density})", "targets": info["targets"],
                    "nnz": info["nnz"], "file_bytes": info["file_bytes"],
                    "codecs": info["codecs"]},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "env": env_note,
        "command_line": [sys.executable, *sys.argv],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
