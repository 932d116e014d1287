"""Storage benchmark: bits per trainable entry, index decode speed, load + apply time.

Bits per entry are reported as payload (index + value bytes / nnz, the per-entry cost) and,
in brackets, for the whole file (the safetensors + JSON header adds a fixed ~400 bytes per
target tensor, ~2.2 bits/entry for MiniLM at 0.5%, vanishing as adapters grow).

On MiniLM-L6's linear layers with bf16 values, at densities 5%, 0.5% and 0.05%, compares
sparsemerge's codecs (`seed`, `elias-fano` on an arbitrary magnitude mask, `raw`) with the
layout of IBM's SpaRTA code / PEFT's SHiRA (int32 coordinates + fp32 values), a PEFT LoRA
adapter file with about the same trainable count, and the entropy bound. All sizes are
measured from files actually written. The last line is one JSON object.

    python bench/format.py            # full run (~2 min)
    python bench/format.py --quick    # < 60 s
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from sparsemerge import masks
from sparsemerge.adapter import BaseInfo, SparseAdapter, SparseTensor, TargetDelta
from sparsemerge.apply import apply_to_tensors
from sparsemerge.formats import codecs
from sparsemerge.formats.adapter_file import WEIGHTS_NAME, load_adapter, save_adapter
from sparsemerge.formats.describe import describe_adapter
from sparsemerge.models import demo_base_path, fingerprint

VALUE_BITS = 16  # bf16


def linear_weights(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()
            if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k}


def build(shapes, base_tensors, density: float, arbitrary: bool) -> SparseAdapter:
    g = torch.Generator().manual_seed(0)
    targets = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        nnz = masks.nnz_for_density(numel, density)
        if arbitrary:  # a magnitude mask: top-|w| entries of a random "trained" delta
            idx = masks.magnitude_indices(torch.randn(numel, generator=g), nnz)
            st = SparseTensor(shape, torch.from_numpy(idx), torch.randn(nnz, generator=g)
                              .to(torch.bfloat16))
        else:
            idx = masks.seeded_indices(0, name, numel, nnz)
            st = SparseTensor(shape, torch.from_numpy(idx),
                              torch.randn(nnz, generator=g).to(torch.bfloat16), mask_seed=0)
        targets[name] = TargetDelta(shape, st)
    fp, hashes = fingerprint(base_tensors, list(shapes))
    return SparseAdapter(targets, BaseInfo("minilm", fingerprint=fp, tensor_hashes=hashes))


def ibm_layout_bytes(adapter: SparseAdapter, tmp: Path) -> int:
    """int32 [nnz, 2] (row, col) + fp32 values per tensor, as IBM's SpaRTA code and SHiRA save."""
    tensors = {}
    for name, t in adapter.targets.items():
        idx = t.sparse.indices
        cols = t.shape[1]
        tensors[f"{name}.idx"] = torch.stack([idx // cols, idx % cols], 1).to(torch.int32)
        tensors[f"{name}.val"] = t.sparse.values.float()
    path = tmp / "ibm.safetensors"
    safetensors.torch.save_file(tensors, path)
    return path.stat().st_size


def lora_bytes(base: Path, trainable: int, tmp: Path) -> tuple[int, int, int]:
    """A PEFT LoRA adapter (all linear layers) with the rank closest to ``trainable`` params."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base)
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "pooler" not in n)
    rank = max(1, round(trainable / per_rank))
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank,
                     target_modules=["query", "key", "value", "attention.output.dense",
                                     "intermediate.dense", "output.dense"])
    peft_model = get_peft_model(model, cfg)
    count = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    for p in peft_model.parameters():
        p.data = p.data.to(torch.bfloat16)
    peft_model.save_pretrained(tmp / "lora")
    return (tmp / "lora" / "adapter_model.safetensors").stat().st_size, count, rank


def decode_rate(adapter_dir: Path, repeats: int) -> float:
    """Million index entries per second decoded (codec only, all tensors)."""
    from sparsemerge.formats.adapter_file import read_adapter

    adapter, storage, _ = read_adapter(adapter_dir)
    blobs = safetensors.torch.load_file(adapter_dir / WEIGHTS_NAME)
    jobs = []
    for name, s in storage.items():
        key = f"targets.{name}.indices"
        jobs.append((s.codec, name, s.numel, s.nnz, blobs[key].numpy() if key in blobs else None,
                     adapter.targets[name].sparse.mask_seed))
    nnz = sum(j[3] for j in jobs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for codec, name, numel, count, blob, seed in jobs:
            if codec == "seed":
                masks.seeded_indices(seed, name, numel, count)
            elif codec == "elias-fano":
                codecs.elias_fano_decode(blob, numel, count)
            else:
                codecs.raw_decode(blob, numel, count)
        times.append(time.perf_counter() - t0)
    return nnz / statistics.median(times) / 1e6


def load_times(base: Path, adapter_dir: Path, repeats: int) -> dict[str, float]:
    """Median seconds, the variants interleaved within each repeat so drift hits all alike.

    ``raw``: safetensors ``load_file``; ``hf``: ``AutoModel.from_pretrained``; ``ready``:
    from_pretrained + one 16-token forward. Both loaders map the file lazily, so ``raw`` and
    ``hf`` have not read the weights yet: applying pays that page-in, a forward pays it too.
    Each with ``_apply``: the same plus ``load_adapter`` + ``apply``.
    """
    from transformers import AutoModel

    from sparsemerge.apply import apply

    file = base / "model.safetensors"
    ids = torch.arange(16).unsqueeze(0)

    def ready(with_adapter: bool) -> None:
        model = AutoModel.from_pretrained(base)
        if with_adapter:
            apply(model, load_adapter(adapter_dir))
        with torch.no_grad():
            model(ids)

    variants = {
        "raw": lambda: safetensors.torch.load_file(file),
        "raw_apply": lambda: apply_to_tensors(safetensors.torch.load_file(file),
                                              load_adapter(adapter_dir)),
        "hf": lambda: AutoModel.from_pretrained(base),
        "hf_apply": lambda: apply(AutoModel.from_pretrained(base), load_adapter(adapter_dir)),
        "ready": lambda: ready(False),
        "ready_apply": lambda: ready(True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for key, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, < 60 s")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    repeats = 3 if args.quick else 7
    base = demo_base_path()
    base_tensors = safetensors.torch.load_file(base / "model.safetensors")
    shapes = linear_weights(base_tensors)
    numel = sum(math.prod(s) for s in shapes.values())
    print(f"MiniLM-L6: {len(shapes)} linear weights, {numel:,} entries; values bf16; "
          f"median of {repeats}")
    rows, results = [], {}
    densities = [0.005] if args.quick else [0.05, 0.005, 0.0005]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for density in densities:
            seeded = build(shapes, base_tensors, density, arbitrary=False)
            arbitrary = build(shapes, base_tensors, density, arbitrary=True)
            nnz = seeded.trainable
            sizes, payload = {}, {}
            for label, adapter, codec in (("seed", seeded, "seed"),
                                          ("elias-fano", arbitrary, "elias-fano"),
                                          ("raw", arbitrary, "raw")):
                out = tmp / f"{label}-{density}"
                save_adapter(adapter, out, codec=codec)
                sizes[label] = (out, (out / WEIGHTS_NAME).stat().st_size)
                info = describe_adapter(out)
                payload[label] = info["index_bits_per_entry"] + info["value_bits_per_entry"]
            ibm = ibm_layout_bytes(arbitrary, tmp)
            lora, lora_count, rank = lora_bytes(base, nnz, tmp)
            k = nnz / numel
            entropy = -(k * math.log2(k) + (1 - k) * math.log2(1 - k)) / k
            r = {
                "density": density, "nnz": nnz,
                "seed_bits_per_entry": payload["seed"],
                "entropy_codec_bits_per_entry": payload["elias-fano"],
                "raw_bits_per_entry": payload["raw"],
                "file_bits_per_entry": {c: 8 * sizes[c][1] / nnz for c in sizes},
                "ibm_layout_bits_per_entry": 8 * ibm / nnz,
                "lora_bits_per_param": 8 * lora / lora_count, "lora_rank": rank,
                "lora_params": lora_count,
                "entropy_bound_bits_per_entry": VALUE_BITS + entropy,
                "decode_mentries_per_s": {c: decode_rate(sizes[c][0], repeats) for c in sizes},
            }
            if density == 0.005:
                t = {c: load_times(base, sizes[c][0], 2 * repeats + 1) for c in sizes}
                for key, num, den in (("load_apply_vs_load", "hf_apply", "hf"),
                                      ("raw_load_apply_vs_raw_load", "raw_apply", "raw"),
                                      ("ready_apply_vs_ready", "ready_apply", "ready")):
                    r[key] = {c: t[c][num] / t[c][den] for c in sizes}
                r["load_s"] = statistics.median(t[c]["hf"] for c in sizes)
                r["ready_s"] = statistics.median(t[c]["ready"] for c in sizes)
                r["raw_load_s"] = statistics.median(t[c]["raw"] for c in sizes)
            results[density] = r
            rows.append(r)
    print("\nbits per trainable entry: index + value payload (whole file incl. header);"
          " IBM/SHiRA and LoRA: whole file")
    print(f"{'density':>8} {'nnz':>9} {'seed':>14} {'elias-fano':>14} {'raw':>14} {'IBM':>6} "
          f"{'LoRA':>6} {'bound':>6}   decode M/s (seed / EF / raw)")
    for r in rows:
        d, f = r["decode_mentries_per_s"], r["file_bits_per_entry"]
        cells = [f"{r[k]:.2f} ({f[c]:.2f})" for k, c in (
            ("seed_bits_per_entry", "seed"), ("entropy_codec_bits_per_entry", "elias-fano"),
            ("raw_bits_per_entry", "raw"))]
        print(f"{r['density']:>8.2%} {r['nnz']:>9,} {cells[0]:>14} {cells[1]:>14} "
              f"{cells[2]:>14} {r['ibm_layout_bits_per_entry']:>6.2f} "
              f"{r['lora_bits_per_param']:>6.2f} {r['entropy_bound_bits_per_entry']:>6.2f}   "
              f"{d['seed']:.0f} / {d['elias-fano']:.0f} / {d['raw']:.0f}")
    half = results[0.005]
    print(f"\nload + apply at 0.5%, relative to the load alone (from_pretrained "
          f"{half['load_s'] * 1e3:.0f} ms, lazy: weights not yet read; ready = "
          f"from_pretrained + first forward {half['ready_s'] * 1e3:.0f} ms; raw safetensors "
          f"load_file {half['raw_load_s'] * 1e3:.1f} ms):")
    print(f"  {'codec':>10} {'from_pretrained':>16} {'ready':>8} {'load_file':>10}")
    for c in half["load_apply_vs_load"]:
        print(f"  {c:>10} {half['load_apply_vs_load'][c]:>15.3f}x "
              f"{half['ready_apply_vs_ready'][c]:>7.3f}x "
              f"{half['raw_load_apply_vs_raw_load'][c]:>9.2f}x")
    summary = {
        "nnz": half["nnz"],
        "seed_bits_per_entry": half["seed_bits_per_entry"],
        "seed_file_bits_per_entry": half["file_bits_per_entry"]["seed"],
        "entropy_codec_file_bits_per_entry": half["file_bits_per_entry"]["elias-fano"],
        "entropy_codec_bits_per_entry": half["entropy_codec_bits_per_entry"],
        "raw_bits_per_entry": half["raw_bits_per_entry"],
        "entropy_bound_bits_per_entry": half["entropy_bound_bits_per_entry"],
        "ibm_layout_bits_per_entry": half["ibm_layout_bits_per_entry"],
        "lora_bits_per_param": half["lora_bits_per_param"],
        "decode_mentries_per_s": min(half["decode_mentries_per_s"].values()),
        "load_apply_vs_load": max(half["load_apply_vs_load"].values()),
        "raw_load_apply_vs_raw_load": max(half["raw_load_apply_vs_raw_load"].values()),
        "ready_apply_vs_ready": max(half["ready_apply_vs_ready"].values()),
        "by_density": {str(d): r for d, r in results.items()},
    }
    sys.stdout.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
