"""Adapter directory format v1: ``adapter.safetensors`` + ``adapter_config.json`` + ``README.md``.

The safetensors file is self-contained: its ``__metadata__["sparsemerge"]`` holds the whole
config as a JSON string; ``adapter_config.json`` is the same JSON, pretty-printed for people.
The exact layout is specified in docs/FORMAT.md. Every read validates everything and raises
``FormatError`` naming the file and tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from sparsemerge import masks
from sparsemerge.adapter import (
    FORMAT_VERSION,
    BaseInfo,
    Head,
    LowRank,
    SeededInit,
    SparseAdapter,
    SparseTensor,
    TargetDelta,
)
from sparsemerge.errors import FormatError, SparseMergeError
from sparsemerge.formats import codecs, strict_json
from sparsemerge.formats.atomic import atomic_directory

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
METADATA_KEY = "sparsemerge"
FORMAT_NAME = "sparsemerge-adapter"
CODECS = ("seed", "elias-fano", "raw", "dense")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DTYPE_BITS = {"bf16": 16, "fp16": 16, "fp32": 32}
MAX_HEADER_BYTES = 64 * 1024 * 1024


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
            tensors[f"heads.{task}.{pname}"] = p.detach().to(DTYPES[dtype]).contiguous()
            params[pname] = {"shape": list(p.shape), "dtype": dtype}
        heads[task] = {"module": h.module, "labels": list(h.labels),
                       "problem_type": h.problem_type, "params": params}
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


@dataclass
class TensorStorage:
    """How one sparse tensor is stored: for ``inspect``."""

    codec: str
    nnz: int
    numel: int
    index_bytes: int
    value_bytes: int
    value_dtype: str


class _Reader:
    """Validates a config against the tensors of one file; every error names file + tensor."""

    def __init__(self, file: Path, tensors: dict[str, torch.Tensor]):
        self.file = file
        self.tensors = tensors
        self.used: set[str] = set()
        self.storage: dict[str, TensorStorage] = {}

    def fail(self, what: str, msg: str) -> FormatError:
        return FormatError(f"{self.file}: {what}: {msg}")

    def field(self, obj: Any, key: str, kind: type | tuple, what: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise self.fail(what, f"missing field {key!r}")
        value = obj[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(what, f"field {key!r} has the wrong type ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(what, f"field {key!r} is not finite")
        return value

    def tensor(self, key: str, what: str) -> torch.Tensor:
        if key not in self.tensors:
            raise self.fail(what, f"tensor {key!r} is missing from the file")
        self.used.add(key)
        return self.tensors[key]

    def shape(self, spec: dict, what: str) -> tuple[int, ...]:
        shape = self.field(spec, "shape", list, what)
        if not shape or len(shape) > 8 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s < 2**40 for s in shape
        ):
            raise self.fail(what, f"invalid shape {shape!r}")
        if math.prod(shape) >= 2**62:
            raise self.fail(what, f"shape {shape!r} has more than 2^62 elements")
        return tuple(shape)

    def sparse(self, spec: Any, key: str, name: str, what: str) -> SparseTensor:
        shape = self.shape(spec, what)
        numel = math.prod(shape)
        nnz = self.field(spec, "nnz", int, what)
        codec = self.field(spec, "codec", str, what)
        vd = self.field(spec, "value_dtype", str, what)
        if codec not in CODECS:
            raise self.fail(what, f"unknown index codec {codec!r} (known: {', '.join(CODECS)})")
        if vd not in DTYPES:
            raise self.fail(what, f"unknown value dtype {vd!r} (known: {', '.join(DTYPES)})")
        if not 0 <= nnz <= numel:
            raise self.fail(what, f"nnz {nnz} is outside [0, {numel}]")
        values = self.tensor(f"{key}.values", what)
        if values.dtype != DTYPES[vd] or values.dim() != 1 or values.numel() != nnz:
            raise self.fail(what, f"values must be 1-D {vd} of length {nnz}, found "
                                  f"{tuple(values.shape)} {values.dtype}")
        if not torch.isfinite(values).all():
            raise self.fail(what, "values contain NaN or Inf")
        seed = None
        index_bytes = 0
        if codec == "dense":
            if nnz != numel:
                raise self.fail(what, f"codec 'dense' needs nnz == numel ({numel}), got {nnz}")
            indices = np.arange(numel, dtype=np.int64)
        elif codec == "seed":
            seed = self.field(spec, "seed", int, what)
            if not 0 <= seed < 2**64:
                raise self.fail(what, f"seed {seed} is not a 64-bit unsigned integer")
            try:
                indices = masks.seeded_indices(seed, name, numel, nnz)
            except SparseMergeError as exc:
                raise self.fail(what, str(exc)) from None
        else:
            blob = self.tensor(f"{key}.indices", what)
            index_bytes = blob.numel() * blob.element_size()
            try:
                if codec == "elias-fano":
                    if blob.dtype != torch.uint8 or blob.dim() != 1:
                        raise FormatError("elias-fano indices must be a 1-D uint8 tensor")
                    indices = codecs.elias_fano_decode(blob.numpy(), numel, nnz)
                else:
                    if blob.dim() != 1 or blob.dtype not in (torch.int32, torch.int64):
                        raise FormatError("raw indices must be a 1-D int32 or int64 tensor")
                    indices = codecs.raw_decode(blob.numpy(), numel, nnz)
            except FormatError as exc:
                raise self.fail(what, str(exc)) from None
        self.storage[name] = TensorStorage(codec, nnz, numel, index_bytes,
                                           values.numel() * values.element_size(), vd)
        # values are fresh tensors parsed from the file's bytes: no copy needed
        return SparseTensor(shape, torch.from_numpy(np.ascontiguousarray(indices, np.int64)),
                            values, seed)

    def target(self, name: str, spec: Any) -> TargetDelta:
        what = f"target {name}"
        if not isinstance(spec, dict):
            raise self.fail(what, "spec is not an object")
        shape = self.shape(spec, what)
        gate = self.field(spec, "gate", float, what)
        t = TargetDelta(shape=shape, gate=gate)
        if "sparse" in spec:
            t.sparse = self.sparse(spec["sparse"], f"targets.{name}", name, what)
            if t.sparse.shape != shape:
                raise self.fail(what, f"sparse shape {t.sparse.shape} != target shape {shape}")
        if "init" in spec:
            init = spec["init"]
            t.init = SeededInit(self.field(init, "seed", int, what),
                                self.field(init, "scale", float, what))
            if not 0 <= t.init.seed < 2**64:
                raise self.fail(what, "init seed is not a 64-bit unsigned integer")
        if "lowrank" in spec:
            lr = spec["lowrank"]
            a = self.sparse(self.field(lr, "a", dict, what), f"targets.{name}.a", f"{name}.a", what)
            b = self.sparse(self.field(lr, "b", dict, what), f"targets.{name}.b", f"{name}.b", what)
            if len(shape) != 2 or len(a.shape) != 2 or len(b.shape) != 2 or \
                    a.shape[1] != shape[1] or b.shape[0] != shape[0] or a.shape[0] != b.shape[1]:
                raise self.fail(what, f"low-rank factors {b.shape} @ {a.shape} do not make {shape}")
            t.lowrank = LowRank(a, b, self.field(lr, "scale", float, what))
        if t.sparse is None and t.lowrank is None and t.init is None:
            raise self.fail(what, "has neither sparse values, a seeded init nor low-rank factors")
        return t

    def head(self, task: str, spec: Any) -> Head:
        what = f"head {task}"
        labels = self.field(spec, "labels", list, what)
        if not labels or not all(isinstance(x, str) for x in labels):
            raise self.fail(what, "labels must be a non-empty list of strings")
        params = {}
        for pname, pspec in self.field(spec, "params", dict, what).items():
            shape = tuple(self.field(pspec, "shape", list, f"{what}.{pname}"))
            dtype = self.field(pspec, "dtype", str, f"{what}.{pname}")
            p = self.tensor(f"heads.{task}.{pname}", what)
            if tuple(p.shape) != shape:
                raise self.fail(what, f"param {pname} has shape {tuple(p.shape)}, config says "
                                      f"{shape}")
            if p.dtype != DTYPES.get(dtype):
                raise self.fail(what, f"param {pname} is stored as {p.dtype}, config says "
                                      f"{dtype!r} (known: {', '.join(DTYPES)})")
            if not torch.isfinite(p).all():
                raise self.fail(what, f"param {pname} contains NaN or Inf")
            params[pname] = p
        if not params:
            raise self.fail(what, "has no parameters")
        return Head(self.field(spec, "module", str, what), params, labels,
                    self.field(spec, "problem_type", str, what))


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.exists():
        hint = " (is this an adapter directory?)" if path.is_dir() else ""
        raise FormatError(f"{file}: no such file{hint}")
    try:
        data = file.read_bytes()
    except OSError as exc:  # a directory, no permission, an I/O error
        raise FormatError(f"{file}: cannot read: {exc.strerror or exc}") from None
    if len(data) < 8 or int.from_bytes(data[:8], "little") > min(len(data) - 8, MAX_HEADER_BYTES):
        raise FormatError(f"{file}: not a safetensors file (bad or truncated header)")
    try:
        tensors = safetensors.torch.load(data)  # validates offsets, dtypes and sizes
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except Exception as exc:  # the parser reports corruption with several exception types
        raise FormatError(f"{file}: corrupt safetensors file: {exc}") from None
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    if not isinstance(meta.get(METADATA_KEY), str):
        raise FormatError(f"{file}: no sparsemerge metadata; not a sparsemerge adapter file")
    config = strict_json.loads(meta[METADATA_KEY], f"{file}: metadata")
    return config, tensors, file


def read_adapter(path: str | Path) -> tuple[SparseAdapter, dict[str, TensorStorage], dict]:
    """Load and validate an adapter; also return per-tensor storage info and the raw config."""
    config, tensors, file = _read_file(Path(path))
    r = _Reader(file, tensors)
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise r.fail("metadata", f"format is not {FORMAT_NAME!r}")
    version = config.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise r.fail("metadata", f"format_version {version!r} is not supported by this "
                                 f"sparsemerge (reads {FORMAT_VERSION}); upgrade sparsemerge")
    base = r.field(config, "base", dict, "metadata")
    hashes = base.get("tensor_hashes") or {}
    if not isinstance(hashes, dict):
        raise r.fail("metadata", "base.tensor_hashes is not an object")
    info = BaseInfo(
        model_id=r.field(base, "model_id", str, "base"),
        revision=base.get("revision") if isinstance(base.get("revision"), str) else None,
        fingerprint=str(base.get("fingerprint") or ""),
        tensor_hashes={str(k): str(v) for k, v in hashes.items()},
        architecture=str(base.get("architecture") or ""),
    )
    targets = {n: r.target(n, s) for n, s in r.field(config, "targets", dict, "metadata").items()}
    heads = {t: r.head(t, s) for t, s in r.field(config, "heads", dict, "metadata").items()}
    extra_tensors = sorted(set(tensors) - r.used)
    if extra_tensors:
        raise r.fail("tensors", f"unexpected tensors not described by the config: "
                                f"{extra_tensors[:5]}")
    adapter = SparseAdapter(
        targets=targets,
        base=info,
        heads=heads,
        method=r.field(config, "method", str, "metadata"),
        hyperparameters=r.field(config, "hyperparameters", dict, "metadata"),
        metrics=r.field(config, "metrics", dict, "metadata"),
        extra=config.get("extra") if isinstance(config.get("extra"), dict) else {},
    )
    return adapter, r.storage, config


def load_adapter(path: str | Path) -> SparseAdapter:
    """Load and fully validate an adapter directory (or its ``adapter.safetensors``)."""
    return read_adapter(path)[0]
