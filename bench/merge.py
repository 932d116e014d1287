"""Merge benchmark: sparsemerge's sparse TIES vs PEFT's dense TIES, time and peak memory.

Random sparse adapters (0.5 % density, seeded random indices from ``masks.seeded_indices``,
N(0, 1) float32 values) on the linear-layer shapes of
- MiniLM-L6: 6 layers x (q, k, v, o 384x384, intermediate 1536x384, output 384x1536);
- a SmolLM2-135M-like decoder: 30 layers x (q, o 576x576, k, v 192x576, gate, up 1536x576,
  down 576x1536);
merged 2, 4 and 8 at a time, tensor by tensor (as the merge engine streams them):
- ours: ``get_operator("ties").merge(sparse vectors, density=D)``, D relative to each
  adapter's own nnz (default 0.2);
- dense: ``peft.utils.merge_utils.ties(dense task tensors, weights, density=(k + 0.5)/numel)``
  on the densified deltas, where k = ceil(D * nnz) is our per-adapter trim count: PEFT trims
  to int(density * numel) entries, so both keep exactly the same k entries per adapter (the
  values are continuous, so magnitudes have no ties).  Weights are all 1.0, where PEFT's
  election (unweighted sum) and mean (count of agreeing adapters) coincide with ours.
  Every merged tensor is checked against PEFT's (max |difference| reported).

Time, in process CPU time (on a shared machine wall-clock time is inflated by the scheduler:
long dense runs get preempted, which would exaggerate the speedups; wall-clock speedups of
the per-tensor path are reported too).  torch uses ``--threads`` intra-op threads (default
1, a per-core comparison: our kernels are single-threaded numpy; with more threads compare
the wall-clock column, as CPU time adds up PEFT's threads).  Per tensor, the median of
``--repeats`` runs, summed over the model's tensors:
- peft: PEFT's ties on prebuilt dense deltas (densifying is NOT timed - it favours PEFT);
- ours (the headline ``ties_speedup_vs_dense``): ``Ties.merge`` per tensor, back-to-back
  repeats (warm caches, the usual micro-benchmark);
- cold: ``Ties.merge`` per tensor, each call right after a PEFT run has evicted the caches
  (what a streaming engine sees after loading a tensor).  Our per-call cost is mostly fixed
  Python/numpy overhead (~70 numpy calls), which a cold cache multiplies several-fold;
- batched: one ``Ties.merge_many`` per layer (6-7 tensors; each call after a 64 MB cache
  flush) - identical results, overhead paid once per layer; what a streaming engine should
  use (batching a whole 135M model at once also works but its peak memory grows with the
  model's total nnz).

Memory: peak extra resident memory while merging one tensor (max over tensors) - glibc's
free pages are returned first (``malloc_trim``), the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``) and the peak (``VmHWM``) is read after the merge, relative to
the resident size before it.  For the dense path the densified inputs are built before the
reset, so they are NOT counted (``ties_mem_ratio_vs_dense``, conservative);
``..._incl_densify`` counts them too (the dense path really starts from the same sparse
adapters; not measured with ``--quick``).  ``..._batched``: our peak for one layer's
``merge_many`` call (max over layers) vs PEFT's per-tensor peak.  Linux only (memory
columns are blank elsewhere).

    python bench/merge.py            # all 30 decoder layers, 5 repeats
    python bench/merge.py --quick    # decoder on 2 layers, 3 repeats (< 60 s on an idle box)

The last line is one JSON object; ``ties_speedup_vs_dense`` / ``ties_mem_ratio_vs_dense`` are
for 4 MiniLM adapters, ``decoder_*`` the same for the decoder.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from peft.utils import merge_utils

from sparsemerge.merge import SparseVector, get_operator, layer_of
from sparsemerge.merge.operators.kernels import trim_count

try:
    from sparsemerge.masks import seeded_indices
except ImportError:  # pragma: no cover - masks.py is optional for this bench
    seeded_indices = None

MB = 2**20


def minilm_shapes() -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(6):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            out[p + f"attention.self.{m}.weight"] = (384, 384)
        out[p + "attention.output.dense.weight"] = (384, 384)
        out[p + "intermediate.dense.weight"] = (1536, 384)
        out[p + "output.dense.weight"] = (384, 1536)
    return out


def decoder_shapes(layers: int = 30) -> dict[str, tuple[int, int]]:
    hidden, inter, heads, kv_heads = 576, 1536, 9, 3
    kv = hidden // heads * kv_heads  # 192
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        out[p + "self_attn.k_proj.weight"] = (kv, hidden)
        out[p + "self_attn.v_proj.weight"] = (kv, hidden)
        out[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        out[p + "mlp.gate_proj.weight"] = (inter, hidden)
        out[p + "mlp.up_proj.weight"] = (inter, hidden)
        out[p + "mlp.down_proj.weight"] = (hidden, inter)
    return out


def adapter_tensor(seed: int, name: str, numel: int, nnz: int) -> SparseVector:
    if seeded_indices is not None:
        idx = torch.from_numpy(seeded_indices(seed, name, numel, nnz))
    else:
        g = torch.Generator().manual_seed(seed * 1_000_003 + hash(name) % 1_000_003)
        idx = torch.randperm(numel, generator=g)[:nnz].sort().values
    g = torch.Generator().manual_seed(seed * 7919 + numel + nnz)
    return SparseVector(idx, torch.randn(nnz, generator=g))


# -- memory --------------------------------------------------------------------------------

try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # pragma: no cover - not glibc
    _libc = None


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def memory_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], object]) -> tuple[int, object, tuple[float, float]]:
    """Peak resident memory above the current level while ``fn`` runs, its result and its
    (CPU, wall) time.

    (No ``gc.collect()`` here: tensors are freed by reference counting, and a full
    collection costs ~0.3 s with torch + peft loaded.)
    """
    if _libc is not None:
        _libc.malloc_trim(0)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out, t = run_timed(fn)
    peak = _status_kb("VmHWM")
    return max(0, peak - before) * 1024, out, t


# -- one configuration -----------------------------------------------------------------------


class Clock:
    """Accumulates (CPU, wall) seconds."""

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0

    def add(self, cpu: float, wall: float) -> None:
        self.cpu += cpu
        self.wall += wall


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    return run_timed(fn)[1]


def run_timed(fn: Callable[[], object]) -> tuple[object, tuple[float, float]]:
    """``fn()`` and its (CPU, wall) seconds."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, (time.process_time() - c0, time.perf_counter() - w0)


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return (statistics.median(c for c, _ in samples), statistics.median(w for _, w in samples))


_FLUSH = None


def flush_caches() -> None:
    """Read 64 MB, evicting the CPU caches (what loading a shard does to a merge engine)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(16 * MB)
    _FLUSH.sum()


def run_config(
    shapes: dict[str, tuple[int, int]], n: int, density: float, ties_density: float,
    repeats: int, measure_memory: bool, incl_densify: bool,
) -> dict:
    ties = get_operator("ties")
    gc.collect()
    # warm up both paths (lazy initialisation must not count as a merge's memory)
    tiny = [adapter_tensor(s, "warmup", 1000, 50) for s in range(n)]
    ties.merge(tiny, density=ties_density)
    ties.merge_many([tiny, tiny], density=ties_density)
    merge_utils.ties([v.to_dense(1000) for v in tiny], torch.ones(n), 0.01)
    warm, cold, dense_clock = Clock(), Clock(), Clock()
    mem_ours = mem_dense = mem_dense_incl = 0
    max_diff = 0.0
    mismatched = nnz_total = out_nnz = 0
    groups, numels = [], []
    for name, shape in shapes.items():
        numel = math.prod(shape)
        nnz = max(1, int(numel * density + 0.5))
        nnz_total += nnz * n
        vecs = [adapter_tensor(seed, name, numel, nnz) for seed in range(n)]
        groups.append(vecs)
        numels.append(numel)
        k = trim_count(ties_density, nnz)
        peft_density = (k + 0.5) / numel  # PEFT keeps int(peft_density * numel) == k
        weights = torch.ones(n)

        def densify(vecs=vecs, numel=numel, shape=shape):
            return [v.to_dense(numel).view(shape) for v in vecs]

        def ours(vecs=vecs):
            return ties.merge(vecs, density=ties_density)

        def dense_ties(dense, pd=peft_density, w=weights):
            return merge_utils.ties(dense, w, pd)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dense = densify()
            s_cold, s_dense = [], []  # the first run of each is also a timing sample
            if measure_memory:
                b, got, t_o = peak_extra_bytes(ours)
                mem_ours = max(mem_ours, b)
                b, ref, t_d = peak_extra_bytes(lambda d=dense: dense_ties(d))
                mem_dense = max(mem_dense, b)
            else:
                got, t_o = run_timed(ours)
                ref, t_d = run_timed(lambda d=dense: dense_ties(d))
            s_cold.append(t_o)
            s_dense.append(t_d)
            got_dense = got.to_dense(numel).view(shape)
            max_diff = max(max_diff, float((got_dense - ref).abs().max()))
            mismatched += int(((got_dense != 0) != (ref != 0)).sum())
            out_nnz += got.nnz
            del ref, got_dense, got
            # cold: ours right after a PEFT run, whose traffic has evicted the caches (as in
            # a streaming merge, where each tensor is seen once after loading)
            for _ in range(repeats - 1):
                s_cold.append(timed(ours))
                s_dense.append(timed(lambda d=dense: dense_ties(d)))
            # warm: back-to-back repeats (the usual micro-benchmark)
            ours()
            s_warm = [timed(ours) for _ in range(repeats)]
            cold.add(*medians(s_cold))
            warm.add(*medians(s_warm))
            dense_clock.add(*medians(s_dense))
            del dense
            if measure_memory and incl_densify:
                b = peak_extra_bytes(lambda: dense_ties(densify()))[0]
                mem_dense_incl = max(mem_dense_incl, b)

    # batched: one merge_many per layer (a cache flush before each, as after a load)
    layers: dict[str, list[int]] = {}
    for t, name in enumerate(shapes):
        layers.setdefault(layer_of(name), []).append(t)
    batch_cpu = 0.0
    mem_batch = 0
    for members in layers.values():
        g = [groups[t] for t in members]
        nm = [numels[t] for t in members]

        def batched(g=g, nm=nm):
            return ties.merge_many(g, numels=nm, density=ties_density)

        s_batch = []
        for _ in range(repeats):
            flush_caches()
            s_batch.append(timed(batched))
        batch_cpu += medians(s_batch)[0]
        if measure_memory:
            mem_batch = max(mem_batch, peak_extra_bytes(batched)[0])
    row = {
        "adapters": n,
        "tensors": len(shapes),
        "nnz_in": nnz_total,
        "nnz_out": out_nnz,
        "dense_ms": dense_clock.cpu * 1e3,
        "ours_ms": warm.cpu * 1e3,
        "speedup": dense_clock.cpu / warm.cpu,
        "speedup_wall": dense_clock.wall / warm.wall,
        "ours_cold_ms": cold.cpu * 1e3,
        "speedup_cold": dense_clock.cpu / cold.cpu,
        "ours_batched_ms": batch_cpu * 1e3,
        "speedup_batched": dense_clock.cpu / batch_cpu,
        "max_abs_diff": max_diff,
        "support_mismatches": mismatched,
    }
    if measure_memory:
        row.update(
            ours_peak_mb=mem_ours / MB,
            dense_peak_mb=mem_dense / MB,
            mem_ratio=mem_ours / mem_dense if mem_dense else None,
            batched_peak_mb=mem_batch / MB,
            mem_ratio_batched=mem_batch / mem_dense if mem_dense else None,
        )
    if measure_memory and incl_densify:
        row.update(
            dense_incl_densify_peak_mb=mem_dense_incl / MB,
            mem_ratio_incl_densify=mem_ours / mem_dense_incl if mem_dense_incl else None,
        )
    return row


def fmt(x, spec: str) -> str:
    if x is None:
        return "-".rjust(int(spec.split(".")[0]))
    return format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="decoder on 2 layers, 3 repeats, no incl-densify memory column")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per tensor (median)")
    ap.add_argument("--adapters", default="2,4,8", help="comma-separated adapter counts")
    ap.add_argument("--density", type=float, default=0.005, help="adapter density")
    ap.add_argument("--ties-density", type=float, default=0.2,
                    help="TIES trim, relative to each adapter's own nnz")
    ap.add_argument("--decoder-layers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: a per-core comparison - our "
                    "kernels are single-threaded; on a busy machine more threads only add "
                    "contention)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    dec_layers = args.decoder_layers or (2 if args.quick else 30)
    counts = [int(c) for c in args.adapters.split(",")]
    mem = memory_supported()
    models = {
        "minilm-l6": minilm_shapes(),
        f"smollm2-135m ({dec_layers}/30 layers)": decoder_shapes(dec_layers),
    }
    print(f"# sparse TIES (sparsemerge) vs dense TIES (peft {_peft_version()}), "
          f"adapter density {args.density}, TIES density {args.ties_density} of own nnz; "
          f"torch threads {args.threads}, repeats {repeats}; "
          f"masks: {'seeded_indices' if seeded_indices else 'randperm'}")
    if not mem:
        print("# memory: /proc/self/clear_refs unavailable, memory columns skipped")
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for model, shapes in models.items():
        for n in counts:
            r = run_config(shapes, n, args.density, args.ties_density, repeats, mem,
                           incl_densify=not args.quick)
            results.setdefault(model, []).append(r)
            print(f"# done: {model}, {n} adapters ({time.perf_counter() - t0:.0f} s)",
                  flush=True)

    print()
    print("TIME - CPU ms for all tensors of the model (sum of per-tensor medians)")
    head = (f"{'model':<28} {'n':>2} {'tensors':>7} {'nnz in':>8} {'peft':>8} {'ours':>7} "
            f"{'x':>6} {'x wall':>6} {'cold':>7} {'x':>6} {'batched':>8} {'x':>6}")
    print(head)
    print("-" * len(head))
    for model, rows in results.items():
        for r in rows:
            print(f"{model:<28} {r['adapters']:>2} {r['tensors']:>7} {r['nnz_in']:>8} "
                  f"{r['dense_ms']:>8.1f} {r['ours_ms']:>7.2f} {r['speedup']:>6.1f} "
                  f"{r['speedup_wall']:>6.1f} {r['ours_cold_ms']:>7.2f} "
                  f"{r['speedup_cold']:>6.1f} {r['ours_batched_ms']:>8.2f} "
                  f"{r['speedup_batched']:>6.1f}")
    print()
    print("MEMORY - peak extra RSS in MB; per tensor: max over tensors; batched: max over layers")
    head = (f"{'model':<28} {'n':>2} {'ours':>6} {'peft':>7} {'ratio':>7} {'+dens':>7} "
            f"{'ratio':>7} {'batched':>7} {'ratio':>6} {'max|diff|':>9} {'mism':>4}")
    print(head)
    print("-" * len(head))
    for model, rows in results.items():
        for r in rows:
            print(f"{model:<28} {r['adapters']:>2} {fmt(r.get('ours_peak_mb'), '6.2f')} "
                  f"{fmt(r.get('dense_peak_mb'), '7.1f')} {fmt(r.get('mem_ratio'), '7.4f')} "
                  f"{fmt(r.get('dense_incl_densify_peak_mb'), '7.1f')} "
                  f"{fmt(r.get('mem_ratio_incl_densify'), '7.4f')} "
                  f"{fmt(r.get('batched_peak_mb'), '7.2f')} "
                  f"{fmt(r.get('mem_ratio_batched'), '6.3f')} "
                  f"{r['max_abs_diff']:>9.1e} {r['support_mismatches']:>4}")
    print()
    print("# peft: peft.utils.merge_utils.ties per tensor on prebuilt dense deltas; ours: "
          "Ties.merge per tensor, warm (back-to-back repeats; 'x wall': same in wall-clock "
          "time); cold: each call right after a PEFT run; batched: one Ties.merge_many per "
          "layer, each after a 64 MB cache flush. x = peft / ours. +dens: PEFT peak incl. "
          "densifying the sparse inputs. max|diff|, mism: ours vs PEFT (values; entries "
          "non-zero in one result only).")
    print(f"# total bench time {time.perf_counter() - t0:.1f} s")

    def pick(model_prefix: str, n: int) -> dict:
        for model, rows in results.items():
            if model.startswith(model_prefix):
                for r in rows:
                    if r["adapters"] == n:
                        return r
        return {}

    mini, dec = pick("minilm", 4), pick("smollm2", 4)
    summary = {}
    for prefix, r in (("", mini), ("decoder_", dec)):
        summary.update({
            f"{prefix}ties_speedup_vs_dense": _round(r.get("speedup")),
            f"{prefix}ties_mem_ratio_vs_dense": _round(r.get("mem_ratio"), 5),
            f"{prefix}ties_speedup_vs_dense_wall": _round(r.get("speedup_wall")),
            f"{prefix}ties_speedup_vs_dense_cold": _round(r.get("speedup_cold")),
            f"{prefix}ties_speedup_vs_dense_batched": _round(r.get("speedup_batched")),
            f"{prefix}ties_mem_ratio_vs_dense_batched": _round(r.get("mem_ratio_batched"), 5),
            f"{prefix}ties_mem_ratio_vs_dense_incl_densify": _round(
                r.get("mem_ratio_incl_densify"), 5),
        })
    summary.update({
        "decoder_layers": dec_layers,
        "max_abs_diff": max(r["max_abs_diff"] for rows in results.values() for r in rows),
        "speedup_by_adapters": {
            m.split(" ")[0]: {str(r["adapters"]): _round(r["speedup"]) for r in rows}
            for m, rows in results.items()
        },
        "mem_ratio_by_adapters": {
            m.split(" ")[0]: {str(r["adapters"]): _round(r.get("mem_ratio"), 5) for r in rows}
            for m, rows in results.items()
        },
        "clock": "process CPU time",
        "density": args.density,
        "ties_density": args.ties_density,
        "repeats": repeats,
        "torch_threads": args.threads,
        "quick": args.quick,
    })
    sys.stdout.write(json.dumps(summary) + "\n")


def _round(x, nd: int = 2):
    return None if x is None else round(float(x), nd)


def _peft_version() -> str:
    import peft

    return peft.__version__


if __name__ == "__main__":
    main()
