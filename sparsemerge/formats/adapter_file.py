"""Adapter directory format v1: ``adapter.safetensors`` + ``adapter_config.json`` + ``README.md``.

The safetensors file is self-contained: its ``__metadata__["sparsemerge"]`` holds the whole
config as a JSON string; ``adapter_config.json`` is the same JSON, pretty-printed for people.
The exact layout is specified in docs/FORMAT.md. Every read validates everything and raises
``FormatError`` naming the file and tensor; the validation itself needs no torch and lives in
:mod:`sparsemerge.formats.adapter_reader` (which ``sparsemerge inspect`` uses directly).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from sparsemerge import masks
from sparsemerge.adapter import (
    FORMAT_VERSION,
    Head,
    LowRank,
    SparseAdapter,
    SparseTensor,
    TargetDelta,
)
from sparsemerge.errors import FormatError
from sparsemerge.formats import codecs
from sparsemerge.formats.adapter_reader import (
    CARD_NAME,
    CODECS,
    CONFIG_NAME,
    FORMAT_NAME,
    METADATA_KEY,
    WEIGHTS_NAME,
    StoredSparse,
    StoredTensor,
    TensorStorage,
    read_stored,
)
from sparsemerge.formats.atomic import atomic_directory

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# --------------------------------------------------------------------------------- writing


def _value_dtype(values: torch.Tensor, requested: str | None) -> str:
    if requested is not None:
        if requested not in DTYPES:
            raise FormatError(f"value dtype {requested!r} is not one of {sorted(DTYPES)}")
        return requested
    return DTYPE_NAMES.get(values.dtype, "fp32")


def _codec_sizes(st: SparseTensor, name: str) -> dict[str, int]:
    """Index bytes each applicable codec would need for this tensor."""
    numel, nnz = st.numel, st.nnz
    sizes = {"raw": nnz * codecs.raw_dtype(numel).itemsize,
             "elias-fano": codecs.elias_fano_nbytes(numel, nnz)}
    if nnz == numel:
        sizes["dense"] = 0
    if st.mask_seed is not None:
        regen = masks.seeded_indices(st.mask_seed, name, numel, nnz)
        if np.array_equal(regen, st.indices.numpy()):
            sizes["seed"] = 0
    return sizes


def choose_codec(st: SparseTensor, name: str, codec: str | None = None) -> str:
    """The smallest codec that can store ``st`` (or ``codec`` if it can)."""
    sizes = _codec_sizes(st, name)
    if codec is not None:
        if codec not in sizes:
            why = "its indices are not the seeded mask" if codec == "seed" else "not applicable"
            raise FormatError(f"tensor {name}: codec {codec!r} cannot store it ({why})")
        return codec
    order = {c: i for i, c in enumerate(CODECS)}  # deterministic tie-break
    return min(sizes, key=lambda c: (sizes[c], order[c]))


def _encode_sparse(st: SparseTensor, key: str, name: str, codec: str | None,
                   value_dtype: str | None, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    chosen = choose_codec(st, name, codec)
    vd = _value_dtype(st.values, value_dtype)
    tensors[f"{key}.values"] = st.values.detach().to(DTYPES[vd]).contiguous()
    spec: dict[str, Any] = {"shape": list(st.shape), "nnz": st.nnz, "codec": chosen,
                            "value_dtype": vd}
    idx = st.indices.numpy()
    if chosen == "seed":
        spec["seed"] = int(st.mask_seed)
    elif chosen == "elias-fano":
        tensors[f"{key}.indices"] = torch.from_numpy(codecs.elias_fano_encode(idx, st.numel))
    elif chosen == "raw":
        tensors[f"{key}.indices"] = torch.from_numpy(codecs.raw_encode(idx, st.numel))
    return spec


def adapter_config(adapter: SparseAdapter, tensors: dict[str, torch.Tensor] | None = None,
                   codec: str | None = None, value_dtype: str | None = None) -> dict[str, Any]:
    """The JSON config of ``adapter``; fills ``tensors`` with what the file stores."""
    from sparsemerge._version import __version__

    tensors = {} if tensors is None else tensors
    targets: dict[str, Any] = {}
    for name, t in adapter.targets.items():
        spec: dict[str, Any] = {"shape": list(t.shape), "gate": float(t.gate)}
        if t.sparse is not None:
            spec["sparse"] = _encode_sparse(t.sparse, f"targets.{name}", name, codec,
                                            value_dtype, tensors)
        if t.init is not None:
            spec["init"] = {"seed": int(t.init.seed), "scale": float(t.init.scale)}
        if t.lowrank is not None:
            lr = t.lowrank
            spec["lowrank"] = {
                "scale": float(lr.scale),
                "a": _encode_sparse(lr.a, f"targets.{name}.a", f"{name}.a", codec, value_dtype,
                                    tensors),
                "b": _encode_sparse(lr.b, f"targets.{name}.b", f"{name}.b", codec, value_dtype,
                                    tensors),
            }
        targets[name] = spec
    heads: dict[str, Any] = {}
    for task, h in adapter.heads.items():
        params = {}
        for pname, p in h.params.items():
            dtype = DTYPE_NAMES.get(p.dtype, "fp32")  # e.g. fp64 is stored as fp32, as declared
            key = f"heads.{task}.{pname}"  # any task name: the config maps task -> params
            if key in tensors:  # only dotted names can meet: task "a.b" + "c", task "a" + "b.c"
                raise FormatError(f"heads {list(adapter.heads)} would store two tensors as "
                                  f"{key!r}; rename one of the tasks")
            tensors[key] = p.detach().to(DTYPES[dtype]).contiguous()
            params[pname] = {"shape": list(p.shape), "dtype": dtype}
        heads[task] = {"module": h.module, "labels": list(h.labels),
                       "problem_type": h.problem_type, "params": params}
        if h.prompt is not None:
            heads[task]["prompt"] = dict(h.prompt)
    b = adapter.base
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sparsemerge_version": __version__,
        "method": adapter.method,
        "hyperparameters": adapter.hyperparameters,
        "base": {"model_id": b.model_id, "revision": b.revision, "fingerprint": b.fingerprint,
                 "tensor_hashes": b.tensor_hashes, "architecture": b.architecture},
        "metrics": adapter.metrics,
        "extra": adapter.extra,
        "targets": targets,
        "heads": heads,
    }


def save_adapter(adapter: SparseAdapter, path: str | Path, *, codec: str | None = None,
                 value_dtype: str | None = None, card: str | None = None) -> Path:
    """Write ``adapter`` as a v1 directory at ``path``, atomically (old version kept on crash).

    ``codec`` forces one index codec for every tensor (default: the smallest per tensor);
    ``value_dtype`` ("bf16", "fp16", "fp32") casts the stored values (default: as they are).
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    config = adapter_config(adapter, tensors, codec, value_dtype)
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise FormatError(f"refusing to save {path}: tensor {name} has NaN or Inf values")
    text = json.dumps(config, sort_keys=True, allow_nan=False)
    blob = safetensors.torch.save(tensors, metadata={METADATA_KEY: text})
    if card is None:
        from sparsemerge.card import adapter_card

        card = adapter_card(card_info(adapter, len(blob)))
    with atomic_directory(path) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(blob)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / CARD_NAME).write_text(card)
    return path


def card_info(adapter: SparseAdapter, nbytes: int) -> dict[str, Any]:
    """The plain dict the model-card writer takes."""
    numel = adapter.target_numel
    return {
        "base_model": adapter.base.model_id,
        "method": adapter.method,
        "tasks": adapter.tasks,
        "labels": {t: h.labels for t, h in adapter.heads.items()},
        "density": adapter.trainable / numel if numel else 0.0,
        "trainable": adapter.trainable,
        "nbytes": nbytes,
        "metrics": adapter.metrics,
        "datasets": adapter.hyperparameters.get("datasets", []),
        "hyperparameters": adapter.hyperparameters,
    }


# --------------------------------------------------------------------------------- reading


def _tensor(t: StoredTensor) -> torch.Tensor:
    """A stored (validated) float tensor as a torch tensor sharing the read buffer."""
    if not t.data:  # torch.frombuffer refuses empty buffers
        return torch.empty(t.shape, dtype=DTYPES[t.value_dtype])
    return torch.frombuffer(t.data, dtype=DTYPES[t.value_dtype]).reshape(t.shape)


def _sparse(s: StoredSparse | None) -> SparseTensor | None:
    if s is None:
        return None
    return SparseTensor(s.shape, torch.from_numpy(s.indices), _tensor(s.values), s.seed)


def read_adapter(path: str | Path) -> tuple[SparseAdapter, dict[str, TensorStorage], dict]:
    """Load and validate an adapter; also return per-tensor storage info and the raw config."""
    stored = read_stored(path)
    targets = {}
    for name, t in stored.targets.items():
        lowrank = None
        if t.lowrank is not None:
            a, b, scale = t.lowrank
            lowrank = LowRank(_sparse(a), _sparse(b), scale)
        targets[name] = TargetDelta(shape=t.shape, sparse=_sparse(t.sparse), init=t.init,
                                    lowrank=lowrank, gate=t.gate)
    heads = {task: Head(h.module, {k: _tensor(v) for k, v in h.params.items()}, h.labels,
                        h.problem_type, h.prompt) for task, h in stored.heads.items()}
    adapter = SparseAdapter(targets=targets, base=stored.base, heads=heads, method=stored.method,
                            hyperparameters=stored.hyperparameters, metrics=stored.metrics,
                            extra=stored.extra)
    return adapter, stored.storage, stored.config


def load_adapter(path: str | Path) -> SparseAdapter:
    """Load and fully validate an adapter directory (or its ``adapter.safetensors``)."""
    return read_adapter(path)[0]
