"""The valid files every case starts from: adapter files covering every storage feature, and
merged-model directories, each written with the format's own writers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsemerge import masks
from sparsemerge.adapter import (
    BaseInfo,
    Head,
    LowRank,
    SeededInit,
    SparseAdapter,
    SparseTensor,
    TargetDelta,
)
from sparsemerge.formats import adapter_file
from sparsemerge.formats import merged as mf
from sparsemerge.formats.adapter_file import save_adapter

# --------------------------------------------------------------------------- adapters


def _sparse(shape, nnz, seed, dtype, seeded_name=None) -> SparseTensor:
    numel = math.prod(shape)
    if seeded_name is not None:
        idx = masks.seeded_indices(seed, seeded_name, numel, nnz)
    else:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(numel, size=nnz, replace=False)) if numel < 2**31 else \
            np.unique(rng.integers(0, numel, size=nnz, dtype=np.int64))
    g = torch.Generator().manual_seed(seed)
    vals = (torch.randn(idx.size, generator=g) * 0.05).to(dtype)
    return SparseTensor(tuple(shape), torch.from_numpy(idx.astype(np.int64)), vals,
                        seed if seeded_name is not None else None)


def _head(hidden: int, labels: list[str], seed: int) -> Head:
    g = torch.Generator().manual_seed(seed)
    return Head("classifier", {"weight": torch.randn(len(labels), hidden, generator=g),
                               "bias": torch.randn(len(labels), generator=g)}, labels)


def _base() -> BaseInfo:
    return BaseInfo("org/tiny-base", "main", "0123456789abcdef0123456789abcdef",
                    {"layers.0.q.weight": "00112233aabbccdd"}, "BertModel")


def corpus_adapters() -> dict[str, tuple[SparseAdapter, dict[str, Any]]]:
    """Valid adapters covering every storage feature, with the save options for each."""
    bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    out: dict[str, tuple[SparseAdapter, dict[str, Any]]] = {}
    s = (48, 32)

    def seeded(name, nnz, seed, dtype, shape=s):
        return TargetDelta(shape, _sparse(shape, nnz, seed, dtype, name))

    names = [f"layers.{i}.{m}.weight" for i in range(2) for m in ("q", "v")]
    out["sparta-seed-bf16"] = (SparseAdapter(
        {n: seeded(n, 40 + 7 * i, 11, bf) for i, n in enumerate(names)}, _base(),
        {"sst2": _head(32, ["negative", "positive"], 1)}, "sparta",
        {"density": 0.03, "seed": 11}, {"accuracy": 0.91}), {})
    out["ef-fp16"] = (SparseAdapter(
        {n: TargetDelta(s, _sparse(s, 60 + i, 20 + i, fp16)) for i, n in enumerate(names)},
        _base(), {"cola": _head(32, ["unacceptable", "acceptable"], 2)}, "sparta"),
        {"codec": "elias-fano"})
    out["raw-fp32"] = (SparseAdapter(
        {n: TargetDelta(s, _sparse(s, 33 + i, 30 + i, fp32)) for i, n in enumerate(names)},
        _base(), {"sst2": _head(32, ["negative", "positive"], 3)}, "sparta"),
        {"codec": "raw"})
    out["rigsa-gates-init"] = (SparseAdapter({
        "layers.0.q.weight": TargetDelta(s, _sparse(s, 50, 40, fp32), gate=1e-6,
                                         init=SeededInit(5, 0.02)),
        "layers.0.v.weight": TargetDelta(s, init=SeededInit(6, 0.01), gate=0.5),
        "layers.1.q.weight": TargetDelta(s, _sparse(s, 0, 41, fp32), gate=-2.0,
                                         init=SeededInit(2**64 - 1, 1.0)),
    }, _base(), {"mnist": _head(32, [str(i) for i in range(10)], 4)}, "rigsa",
        {"rounds": 5, "keep": 0.8}), {})
    out["lora-sparse-factors"] = (SparseAdapter({
        "layers.0.q.weight": TargetDelta(s, lowrank=LowRank(
            _sparse((4, 32), 30, 50, fp16), _sparse((48, 4), 40, 51, fp16), 2.0)),
        "layers.0.v.weight": TargetDelta(s, _sparse(s, 12, 52, fp16, "layers.0.v.weight"),
                                         lowrank=LowRank(
            _sparse((2, 32), 64, 53, fp16), _sparse((48, 2), 96, 54, fp16), 0.5)),
    }, _base(), {"sst2": _head(32, ["negative", "positive"], 5)}, "partial_lora"), {})
    small = (6, 5)
    out["dense-and-odd-shapes"] = (SparseAdapter({
        "layers.0.q.weight": TargetDelta(small, SparseTensor(
            small, torch.arange(30), torch.linspace(-1, 1, 30).to(bf))),
        "layers.0.q.bias": TargetDelta((48,), _sparse((48,), 5, 60, bf)),
        "conv.weight": TargetDelta((4, 3, 5), _sparse((4, 3, 5), 7, 61, bf, "conv.weight")),
        "layers.1.empty.weight": TargetDelta(s, _sparse(s, 0, 62, bf)),
        "layers.1.one.weight": TargetDelta((1, 1), _sparse((1, 1), 1, 63, bf)),
    }, _base(), {"sst2": _head(32, ["negative", "positive"], 6),
                 "cola": _head(32, ["unacceptable", "acceptable"], 7)}, "merge",
        {"operator": "ties"}), {})
    big = (2**16, 2**16)  # numel 2**32: raw indices are int64; nothing numel-sized is made
    out["raw-int64-huge-numel"] = (SparseAdapter({
        "layers.0.huge.weight": TargetDelta(big, _sparse(big, 25, 70, fp32)),
        "layers.0.huge2.weight": TargetDelta(big, _sparse(big, 9, 71, fp32,
                                                          "layers.0.huge2.weight")),
    }, _base(), {}, "sparta"), {"codec": None})
    real = (384, 1536)  # a MiniLM-sized FFN matrix at 0.5%
    out["minilm-ffn-ef"] = (SparseAdapter({
        "encoder.layer.0.intermediate.dense.weight": TargetDelta(
            real, _sparse(real, 2949, 80, bf)),
        "encoder.layer.0.output.dense.weight": TargetDelta(
            real[::-1], _sparse(real[::-1], 2949, 81, bf,
                                "encoder.layer.0.output.dense.weight")),
    }, _base(), {"sst2": _head(384, ["negative", "positive"], 8)}, "sparta"), {})
    return out


def build_corpus(folder: Path) -> dict[str, bytes]:
    """Save the corpus under ``folder``; return name -> bytes of each adapter.safetensors."""
    files = {}
    for name, (adapter, opts) in corpus_adapters().items():
        d = save_adapter(adapter, folder / name, card="", **opts)
        files[name] = (d / adapter_file.WEIGHTS_NAME).read_bytes()
    return files


# --------------------------------------------------------------------------- merged models


def build_merged_corpus(folder: Path) -> dict[str, dict[str, bytes]]:
    """Valid merged-model directories written with the merged format's own writers."""
    out = {}
    layouts = {"one-shard-two-heads": (10**9, [("sst2", ["negative", "positive"], "F32"),
                                              ("cola", ["unacceptable", "acceptable"], "F32")]),
               "three-shards-index": (600, [("mnist", [str(i) for i in range(10)], "BF16")])}
    for name, (shard_size, heads) in layouts.items():
        d = folder / name
        d.mkdir(parents=True)
        specs = [mf.TensorSpec("embeddings.word_embeddings.weight", "F32", (20, 8)),
                 mf.TensorSpec("encoder.layer.0.attention.self.query.weight", "BF16", (8, 8)),
                 mf.TensorSpec("encoder.layer.0.attention.self.query.bias", "F16", (8,)),
                 mf.TensorSpec("pooler.dense.weight", "F32", (8, 8))]
        plan = mf.ShardPlan.plan(specs, shard_size)
        g = torch.Generator().manual_seed(0)
        files = mf.write_shards(d, plan, lambda spec, g=g: torch.randn(
            spec.shape, generator=g).to(mf.ST_DTYPES[spec.dtype]))
        (d / "config.json").write_text(json.dumps({
            "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
            "vocab_size": 20}, indent=2))
        for task, labels, dt in heads:
            params = {"weight": torch.randn(len(labels), 8, generator=g).to(
                mf.ST_DTYPES[dt]), "bias": torch.zeros(len(labels)).to(mf.ST_DTYPES[dt])}
            mf.write_head(d, task, params, mf.head_config(
                task, module="classifier", labels=labels,
                problem_type="single_label_classification", hidden_size=8,
                architecture="BertForSequenceClassification", pad_token_id=0))
        mf.write_recipe(d, {
            "method": "ties", "parameters": {"density": 0.2, "lambda": 1.0},
            "inputs": [{"path": f"adapters/{t}", "kind": "adapter", "sha256": "00" * 32,
                        "tasks": [t], "weight": 1.0} for t, _, _ in heads],
            "base": {"model_id": "org/tiny-base", "revision": None, "fingerprint": "ab" * 16},
            "tasks": [t for t, _, _ in heads], "files": files,
        })
        out[name] = {str(q.relative_to(d)): q.read_bytes() for q in sorted(d.rglob("*"))
                     if q.is_file()}
    return out
