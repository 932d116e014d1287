"""End-to-end ``merge --heads`` benchmark: time, and peak memory of the streaming writer.

1. MiniLM-L6 (the demo base): N random SpaRTA-like adapters (0.5 % of every linear weight,
   N(0, 0.02) deltas, a 2-label head each) merged with TIES into a multi-head model directory;
   reported: load / merge / write seconds, then one ``MultiHeadModel`` forward over a batch
   vs N single-task models (one forward each), logits checked equal.
2. Streaming memory: a synthetic Llama-style checkpoint (random fp32 weights, sharded at
   500 MB, ``--synthetic-layers`` layers of hidden 1024) and 2 / 8 adapters at 0.5 %; each
   merge runs in a fresh process that writes the merged directory twice (the first write also
   imports transformers' model code) and reports its resident-set peaks (Linux ``VmHWM``,
   reset through ``/proc/self/clear_refs`` before the second write): the extra peak *while
   writing the backbone* is what the streaming design bounds (about one tensor), against the
   same write with the whole-model fallback forced.

    python bench/merge_heads.py --quick     # MiniLM, 2 adapters; 8-layer synthetic (~0.5 GB)
    python bench/merge_heads.py             # 2 and 4 adapters; 40-layer synthetic (~1.9 GB)

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MB = 2**20


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


_INFO: dict = {}


def random_adapter(ckpt, names, task: str, seed: int, density: float):
    from sparsemerge.adapter import Head, SparseAdapter, SparseTensor, TargetDelta

    g = torch.Generator().manual_seed(seed)
    targets = {}
    for n in names:
        shape = ckpt.shapes[n]
        numel = 1
        for s in shape:
            numel *= s
        k = max(1, int(numel * density))
        idx = torch.unique(torch.randint(0, numel, (k,), generator=g))
        targets[n] = TargetDelta(shape, SparseTensor(shape, idx,
                                                     torch.randn(idx.numel(), generator=g) * 0.02))
    head = Head("classifier" if ckpt.prefix == "bert" else "score",
                {"weight": torch.randn(2, ckpt.hidden_size, generator=g) * 0.05}, ["no", "yes"])
    if ckpt.prefix == "bert":
        head.params["bias"] = torch.zeros(2)
    key = (str(ckpt.path), tuple(names))
    if key not in _INFO:  # the fingerprint reads every target once: do it once per base
        _INFO[key] = ckpt.base_info(names)
    return SparseAdapter(targets, _INFO[key], {task: head})


# ------------------------------------------------------------------------------ MiniLM e2e


def minilm(counts: list[int], tmp: Path) -> dict:
    from transformers import AutoModelForSequenceClassification

    from sparsemerge.checkpoint import BaseCheckpoint
    from sparsemerge.formats.adapter_file import save_adapter
    from sparsemerge.merge.recipe import build_recipe, run_recipe
    from sparsemerge.multihead import MultiHeadModel

    ckpt = BaseCheckpoint(None)
    names = ckpt.linear_weights
    texts = ["a gripping, beautifully shot film", "the plot makes no sense at all",
             "I would not watch it again", "one of the best performances this year"] * 8
    out = {}
    for n in counts:
        paths = []
        for i in range(n):
            p = tmp / f"minilm-{n}-{i}"
            save_adapter(random_adapter(ckpt, names, f"task{i}", i, 0.005), p)
            paths.append(str(p))
        recipe = build_recipe(paths, method="ties", density=0.5, heads=True,
                              output=str(tmp / f"minilm-merged-{n}"))
        rep = run_recipe(recipe)
        mh = MultiHeadModel.from_pretrained(recipe.output)
        enc = dict(mh.tokenizer(texts, padding=True, return_tensors="pt"))
        with torch.no_grad():
            mh(**enc)
            t0 = time.perf_counter()
            logits = mh(**enc)
            t_multi = time.perf_counter() - t0
        refs = []
        for task in mh.tasks:
            ref = AutoModelForSequenceClassification.from_pretrained(recipe.output, num_labels=2)
            ref.eval()
            ref.classifier.load_state_dict(mh.heads[task].classifier.state_dict())
            refs.append((task, ref))
        with torch.no_grad():
            t0 = time.perf_counter()
            ref_logits = {task: ref(**enc).logits for task, ref in refs}
            t_single = time.perf_counter() - t0
        equal = all(torch.equal(logits[t], ref_logits[t]) for t in mh.tasks)
        out[n] = {"seconds": rep["seconds"], "merged_nnz": rep["nnz"],
                  "backbone_bytes": rep["backbone"]["bytes"],
                  "multihead_forward_s": round(t_multi, 4),
                  "single_task_forwards_s": round(t_single, 4),
                  "inference_speedup": round(t_single / t_multi, 2), "logits_equal": equal}
        print(f"MiniLM, {n} adapters: load {rep['seconds']['load']:.2f} s, merge "
              f"{rep['seconds']['merge']:.2f} s, write {rep['seconds']['write']:.2f} s; "
              f"{len(texts)} texts: one multi-head forward {t_multi * 1e3:.0f} ms vs {n} "
              f"single-task forwards {t_single * 1e3:.0f} ms; logits equal: {equal}",
              flush=True)
    return out


# ------------------------------------------------------------------------------ streaming


def make_synthetic(path: Path, layers: int, *, hidden: int = 1024, intermediate: int = 2816,
                   vocab: int = 30522, heads: int = 16, shard_bytes: int = 500 * 10**6) -> Path:
    """A Llama-style checkpoint with random fp32 weights, written tensor by tensor into
    ``shard_bytes`` shards (the generator holds one tensor at a time, not the model)."""
    from transformers import LlamaConfig

    from sparsemerge.checkpoint import meta_backbone
    from sparsemerge.formats.merged import ShardPlan, TensorSpec, write_shards
    from sparsemerge.models import demo_base_path

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 4), pad_token_id=0,
                      max_position_embeddings=512)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    sd = meta_backbone(cfg).state_dict()
    specs = [TensorSpec(n, "F32", tuple(t.shape)) for n, t in sd.items()]
    gen = torch.Generator().manual_seed(0)

    def produce(spec):
        return torch.randn(spec.shape, generator=gen) * 0.02

    write_shards(path, ShardPlan.plan(specs, shard_bytes), produce)
    src = demo_base_path()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / f).exists():
            (path / f).write_bytes((src / f).read_bytes())
    return path


_CHILD = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
from merge_heads import _status_kb, _reset_peak
rss0 = _status_kb("VmRSS")
from sparsemerge.merge import stream
from sparsemerge.merge.recipe import build_recipe, load_inputs
from sparsemerge.merge.engine import merge_adapters
if {fallback!r}:
    stream.BaseCheckpoint.streamable = property(lambda self: False)
recipe = build_recipe({paths!r}, method="ties", density=0.5, heads=True, output={out!r},
                      max_shard_size="500MB")
adapters, base, gguf = load_inputs(recipe)
merged = merge_adapters(adapters, recipe.method, recipe.parameters, recipe.weights)
del adapters
import gc; gc.collect()
peak_before = _status_kb("VmHWM")
t0 = time.perf_counter()
stream.save_merged_model(merged, recipe.output, max_shard_size=recipe.max_shard_size)
cold = time.perf_counter() - t0  # includes importing transformers' model code
gc.collect()
rss_before = _status_kb("VmRSS")
_reset_peak()
t0 = time.perf_counter()
rep = stream.save_merged_model(merged, recipe.output, max_shard_size=recipe.max_shard_size)
dt = time.perf_counter() - t0
print(json.dumps({{"rss_start_kb": rss0, "peak_until_write_kb": peak_before,
                  "rss_before_write_kb": rss_before, "peak_during_write_kb": _status_kb("VmHWM"),
                  "write_s": dt, "cold_write_s": cold, "streamed": rep["streamed"],
                  "shards": rep["shards"]}}))
"""


def stream_memory(layers: int, counts: list[int], tmp: Path) -> dict:
    from sparsemerge.checkpoint import BaseCheckpoint
    from sparsemerge.formats.adapter_file import save_adapter

    t0 = time.perf_counter()
    base = make_synthetic(tmp / "synthetic", layers)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    ckpt = BaseCheckpoint(str(base))
    largest = max(st.nbytes for st in ckpt.entries.values())
    print(f"synthetic checkpoint: {size / MB:.0f} MiB in "
          f"{len(list(base.glob('*.safetensors')))} shards, largest tensor {largest / MB:.1f} "
          f"MiB ({time.perf_counter() - t0:.1f} s to make)", flush=True)
    names = ckpt.linear_weights
    paths = []
    for i in range(max(counts)):
        p = tmp / f"syn-{i}"
        save_adapter(random_adapter(ckpt, names, f"task{i}", 100 + i, 0.005), p)
        paths.append(str(p))
    ckpt.close()
    results = {"checkpoint_mib": round(size / MB, 1), "largest_tensor_mib": round(largest / MB, 1)}
    bench_dir = str(Path(__file__).resolve().parent)
    for n in counts:
        for fallback in (False, True):
            out = str(tmp / f"syn-merged-{n}-{int(fallback)}")
            code = _CHILD.format(bench=bench_dir, fallback=fallback, paths=paths[:n], out=out)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            extra = (r["peak_during_write_kb"] - r["rss_before_write_kb"]) / 1024
            key = f"{n}_adapters_{'fallback' if fallback else 'streamed'}"
            results[key] = {"extra_peak_during_write_mib": round(extra, 1),
                            "peak_rss_mib": round(max(r["peak_until_write_kb"],
                                                      r["peak_during_write_kb"]) / 1024, 1),
                            "rss_before_write_mib": round(r["rss_before_write_kb"] / 1024, 1),
                            "write_s": round(r["write_s"], 2),
                            "first_write_s": round(r["cold_write_s"], 2), "shards": r["shards"]}
            print(f"{n} adapters, {'fallback (load whole model)' if fallback else 'streaming'}: "
                  f"write {r['write_s']:.1f} s, extra peak while writing {extra:.0f} MiB "
                  f"(resident before the write {r['rss_before_write_kb'] / 1024:.0f} MiB, "
                  f"process peak {results[key]['peak_rss_mib']:.0f} MiB)", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--synthetic-layers", type=int, default=None)
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    layers = args.synthetic_layers or (8 if args.quick else 40)
    counts = [2] if args.quick else [2, 4]
    result: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.skip_minilm:
            result["minilm"] = minilm(counts, tmp)
        if sys.platform.startswith("linux"):
            result["stream"] = stream_memory(layers, [2, 8] if not args.quick else [2, 8], tmp)
    s = result.get("stream", {})
    summary = {
        "minilm_merge_heads_s": {n: r["seconds"]["total"] for n, r in
                                 result.get("minilm", {}).items()},
        "minilm_inference_speedup": {n: r["inference_speedup"] for n, r in
                                     result.get("minilm", {}).items()},
        "stream_checkpoint_mib": s.get("checkpoint_mib"),
        "stream_largest_tensor_mib": s.get("largest_tensor_mib"),
        "stream_extra_peak_mib": {k: v["extra_peak_during_write_mib"] for k, v in s.items()
                                  if isinstance(v, dict)},
    }
    print(json.dumps({"summary": summary, **result}))


if __name__ == "__main__":
    main()
