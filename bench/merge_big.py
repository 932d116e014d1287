"""``merge --heads`` of a backbone larger than the memory the merge is allowed.

1. Writes a synthetic Llama-style checkpoint with random fp32 weights (default: TinyLlama's
   shapes -- hidden 2048, MLP 5632, vocab 32000 -- with 18 layers: 3.4 GB in 1 GB shards),
   tensor by tensor, so the generator itself never holds more than one tensor.
2. Makes two random SpaRTA-like adapters on it (0.5 % of every linear weight, a head each).
3. Runs the real command, ``python -m sparsemerge.cli merge A B --heads --method ties``, in a
   child process whose address space is capped with ``RLIMIT_AS`` (default 2 GiB, below the
   checkpoint's size: the child could not hold the model if it tried; glibc is limited to
   2 malloc arenas so that reserved-but-unused address space does not eat the cap) and reports
   the child's peak RSS (``ru_maxrss`` from ``wait4``) against the largest shard, the largest
   tensor, the adapters' in-memory nnz bytes (int64 index + fp32 value per entry) and the
   resident set of an idle interpreter that imported the same modules.
4. Control: the same merge with the whole-model fallback forced, under the same cap; it must
   fail, which shows the cap binds.

Everything lives in one temporary directory, removed at the end. Children run one thread.

    python bench/merge_big.py                    # 3.4 GB checkpoint, 2 GiB cap
    python bench/merge_big.py --layers 4 --cap 1.5GiB   # quick (~1 GB checkpoint)

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_heads import make_synthetic, random_adapter  # noqa: E402

MiB = 2**20

_CHILD = r"""
import sys
from sparsemerge.merge import stream
if {fallback!r}:
    stream.BaseCheckpoint.streamable = property(lambda self: False)
from sparsemerge.cli import main
sys.argv = ["sparsemerge"] + {argv!r}
main()
"""

_IDLE = "import transformers, sparsemerge.cli, sparsemerge.merge.recipe, sparsemerge.merge.stream"


def run_capped(code: str, cap: int | None, log: Path) -> tuple[int, int, float]:
    """Run ``python -c code`` with its address space capped at ``cap`` bytes; returns
    (exit status, peak RSS in bytes, seconds). Output goes to ``log``."""

    def limit() -> None:
        if cap is not None:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
           "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=limit)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0


def parse_bytes(text: str) -> int:
    units = {"GIB": 2**30, "MIB": 2**20, "GB": 10**9, "MB": 10**6}
    t = text.strip().upper()
    for u, f in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * f)
    return int(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--shard-size", default="1GB", help="shard size of the synthetic base")
    ap.add_argument("--cap", default="2GiB", help="RLIMIT_AS of the merge process")
    ap.add_argument("--density", type=float, default=0.005)
    ap.add_argument("--no-control", action="store_true", help="skip the fallback control")
    args = ap.parse_args()
    cap = parse_bytes(args.cap)

    from sparsemerge.checkpoint import BaseCheckpoint
    from sparsemerge.formats.adapter_file import save_adapter

    with tempfile.TemporaryDirectory(prefix="sparsemerge-big-") as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        base = make_synthetic(tmp / "base", args.layers, hidden=2048, intermediate=5632,
                              vocab=32000, heads=32, shard_bytes=parse_bytes(args.shard_size))
        shards = sorted(base.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in shards)
        largest_shard = max(f.stat().st_size for f in shards)
        ckpt = BaseCheckpoint(str(base))
        largest_tensor = max(st.nbytes for st in ckpt.entries.values())
        print(f"synthetic base: {size / MiB:.0f} MiB in {len(shards)} shards (largest shard "
              f"{largest_shard / MiB:.0f} MiB, largest tensor {largest_tensor / MiB:.0f} MiB), "
              f"{time.perf_counter() - t0:.0f} s to write", flush=True)
        if cap >= size:
            print(f"warning: the cap ({cap / MiB:.0f} MiB) is not below the checkpoint's size",
                  flush=True)

        t0 = time.perf_counter()
        paths, nnz = [], 0
        for i in range(2):
            ad = random_adapter(ckpt, ckpt.linear_weights, f"task{i}", 100 + i, args.density)
            nnz += sum(t.sparse.nnz for t in ad.targets.values())
            paths.append(str(save_adapter(ad, tmp / f"adapter{i}")))
            del ad
        ckpt.close()
        nnz_bytes = nnz * (8 + 4)
        disk = sum(f.stat().st_size for p in paths for f in Path(p).iterdir())
        print(f"2 adapters: {nnz:,} entries ({nnz_bytes / MiB:.0f} MiB as int64 index + fp32 "
              f"value; {disk / MiB:.0f} MiB on disk), {time.perf_counter() - t0:.0f} s",
              flush=True)

        status, idle_rss, _ = run_capped(_IDLE, cap, tmp / "idle.log")
        if status != 0:
            raise SystemExit(f"importing sparsemerge under the cap failed:\n"
                             f"{(tmp / 'idle.log').read_text()[-2000:]}")

        result = {"checkpoint_mib": round(size / MiB, 1), "shards": len(shards),
                  "largest_shard_mib": round(largest_shard / MiB, 1),
                  "largest_tensor_mib": round(largest_tensor / MiB, 1),
                  "adapters_nnz": nnz, "adapters_nnz_mib": round(nnz_bytes / MiB, 1),
                  "cap_mib": round(cap / MiB, 1), "idle_interpreter_rss_mib":
                  round(idle_rss / MiB, 1)}
        runs = [("streamed", False)] + ([] if args.no_control else [("fallback", True)])
        for label, fallback in runs:
            out = tmp / f"merged-{label}"
            argv = ["merge", *paths, "--heads", "--method", "ties", "--density", "0.5",
                    "--base", str(base), "-o", str(out), "--max-shard-size", args.shard_size,
                    "--json"]
            log = tmp / f"{label}.log"
            status, peak, secs = run_capped(_CHILD.format(fallback=fallback, argv=argv), cap,
                                            log)
            written = sum(f.stat().st_size for f in out.glob("*.safetensors")) \
                if out.is_dir() else 0
            result[label] = {"exit": status, "peak_rss_mib": round(peak / MiB, 1),
                             "seconds": round(secs, 1), "written_mib": round(written / MiB, 1)}
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            print(f"merge --heads ({label}) under a {cap / MiB:.0f} MiB address-space cap: "
                  f"exit {status}, peak RSS {peak / MiB:.0f} MiB, {secs:.0f} s, "
                  f"{written / MiB:.0f} MiB written"
                  + ("" if status == 0 else f" ({tail[0][-160:]})"), flush=True)
            if not fallback and status != 0:
                raise SystemExit(f"the streamed merge failed:\n{log.read_text()[-3000:]}")
            if fallback and status == 0:
                raise SystemExit("the whole-model fallback fit under the cap: it does not bind")
        s = result["streamed"]
        result["peak_over_idle_mib"] = round(s["peak_rss_mib"] - result["idle_interpreter_rss_mib"],
                                             1)
        print(f"streamed peak {s['peak_rss_mib']:.0f} MiB = idle interpreter "
              f"{result['idle_interpreter_rss_mib']:.0f} MiB + {result['peak_over_idle_mib']:.0f}"
              f" MiB, vs checkpoint {result['checkpoint_mib']:.0f} MiB, largest shard "
              f"{result['largest_shard_mib']:.0f} MiB + adapters' nnz "
              f"{result['adapters_nnz_mib']:.0f} MiB", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
