"""Reading and validating an adapter file (format v1) without torch.

:func:`read_stored` checks everything an adapter file must satisfy (the safetensors container,
the config, every tensor's dtype, shape and finiteness, every index codec) and returns what
the file stores: numpy indices, the value and head tensors' bytes, the config. Every error is
a ``FormatError`` naming the file and tensor. :func:`sparsemerge.formats.adapter_file.
read_adapter` turns the result into a :class:`~sparsemerge.adapter.SparseAdapter` of torch
tensors; ``sparsemerge inspect`` (:mod:`sparsemerge.formats.describe`) uses it as it is, so
inspecting an adapter never imports torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import deserialize

from sparsemerge import masks
from sparsemerge.adapter import FORMAT_VERSION, BaseInfo, SeededInit, is_prompt
from sparsemerge.errors import FormatError, SparseMergeError
from sparsemerge.formats import codecs, strict_json

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
METADATA_KEY = "sparsemerge"
FORMAT_NAME = "sparsemerge-adapter"
CODECS = ("seed", "elias-fano", "raw", "dense")
VALUE_DTYPES = ("bf16", "fp16", "fp32")  # of stored values and head parameters
MAX_HEADER_BYTES = 64 * 1024 * 1024

# safetensors' dtype names <-> ours, and each float dtype's exponent bits (all ones: Inf/NaN)
_SAFETENSORS_DTYPE = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_OUR_DTYPE = {v: k for k, v in _SAFETENSORS_DTYPE.items()}
_BITS_AND_EXPONENT = {"bf16": ("<u2", 0x7F80), "fp16": ("<u2", 0x7C00),
                      "fp32": ("<u4", 0x7F800000)}
_INDEX_DTYPES = {"U8": "<u1", "I32": "<i4", "I64": "<i8"}


@dataclass
class StoredTensor:
    """One tensor of the file as stored: safetensors dtype name, shape, little-endian bytes."""

    dtype: str  # e.g. "BF16", "F32", "I64"
    shape: tuple[int, ...]
    data: bytearray

    @property
    def value_dtype(self) -> str | None:
        """Our name of the dtype ("bf16", "fp16", "fp32"), None for any other dtype."""
        return _OUR_DTYPE.get(self.dtype)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def describe(self) -> str:
        return f"{self.shape} {self.value_dtype or self.dtype}"

    def is_finite(self) -> bool:
        """No NaN or Inf: no exponent with all bits set (for one of VALUE_DTYPES only)."""
        bits, exponent = _BITS_AND_EXPONENT[self.value_dtype]  # type: ignore[index]
        raw = np.frombuffer(self.data, dtype=bits)
        return not bool(np.any((raw & exponent) == exponent))


@dataclass
class TensorStorage:
    """How one sparse tensor is stored: for ``inspect``."""

    codec: str
    nnz: int
    numel: int
    index_bytes: int
    value_bytes: int
    value_dtype: str


@dataclass
class StoredSparse:
    """A sparse tensor as read: validated int64 flat indices and the values' stored bytes."""

    shape: tuple[int, ...]
    indices: np.ndarray  # int64, sorted, unique, in [0, numel)
    values: StoredTensor  # 1-D, one of VALUE_DTYPES, finite
    seed: int | None = None  # the mask seed when the codec is "seed"


@dataclass
class StoredTarget:
    """One target tensor's change as read (see :class:`~sparsemerge.adapter.TargetDelta`)."""

    shape: tuple[int, ...]
    gate: float
    sparse: StoredSparse | None = None
    init: SeededInit | None = None
    lowrank: tuple[StoredSparse, StoredSparse, float] | None = None  # (a, b, scale)


@dataclass
class StoredHead:
    """One task's head as read (see :class:`~sparsemerge.adapter.Head`)."""

    module: str
    params: dict[str, StoredTensor]
    labels: list[str]
    problem_type: str
    prompt: dict[str, Any] | None = None


@dataclass
class StoredAdapter:
    """Everything an adapter file holds, validated; arrays as numpy or stored bytes."""

    file: Path
    config: dict[str, Any]
    base: BaseInfo
    method: str
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    extra: dict[str, Any]
    targets: dict[str, StoredTarget]
    heads: dict[str, StoredHead]
    storage: dict[str, TensorStorage] = field(default_factory=dict)

    @property
    def target_numel(self) -> int:
        return sum(math.prod(t.shape) for t in self.targets.values())


def _index_array(blob: StoredTensor, dtypes: tuple[str, ...], expect: str) -> np.ndarray:
    if len(blob.shape) != 1 or blob.dtype not in dtypes:
        raise FormatError(expect)
    return np.frombuffer(blob.data, dtype=_INDEX_DTYPES[blob.dtype])


class _Reader:
    """Validates a config against the tensors of one file; every error names file + tensor."""

    def __init__(self, file: Path, tensors: dict[str, StoredTensor]):
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

    def tensor(self, key: str, what: str) -> StoredTensor:
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

    def sparse(self, spec: Any, key: str, name: str, what: str) -> StoredSparse:
        shape = self.shape(spec, what)
        numel = math.prod(shape)
        nnz = self.field(spec, "nnz", int, what)
        codec = self.field(spec, "codec", str, what)
        vd = self.field(spec, "value_dtype", str, what)
        if codec not in CODECS:
            raise self.fail(what, f"unknown index codec {codec!r} (known: {', '.join(CODECS)})")
        if vd not in VALUE_DTYPES:
            raise self.fail(what, f"unknown value dtype {vd!r} (known: "
                                  f"{', '.join(VALUE_DTYPES)})")
        if not 0 <= nnz <= numel:
            raise self.fail(what, f"nnz {nnz} is outside [0, {numel}]")
        values = self.tensor(f"{key}.values", what)
        if values.value_dtype != vd or values.shape != (nnz,):
            raise self.fail(what, f"values must be 1-D {vd} of length {nnz}, found "
                                  f"{values.describe()}")
        if not values.is_finite():
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
            index_bytes = blob.nbytes
            try:
                if codec == "elias-fano":
                    indices = codecs.elias_fano_decode(_index_array(
                        blob, ("U8",), "elias-fano indices must be a 1-D uint8 tensor"),
                        numel, nnz)
                else:
                    indices = codecs.raw_decode(_index_array(
                        blob, ("I32", "I64"), "raw indices must be a 1-D int32 or int64 tensor"),
                        numel, nnz)
            except FormatError as exc:
                raise self.fail(what, str(exc)) from None
        self.storage[name] = TensorStorage(codec, nnz, numel, index_bytes, values.nbytes, vd)
        return StoredSparse(shape, np.ascontiguousarray(indices, np.int64), values, seed)

    def target(self, name: str, spec: Any) -> StoredTarget:
        what = f"target {name}"
        if not isinstance(spec, dict):
            raise self.fail(what, "spec is not an object")
        shape = self.shape(spec, what)
        t = StoredTarget(shape=shape, gate=self.field(spec, "gate", float, what))
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
            t.lowrank = (a, b, self.field(lr, "scale", float, what))
        if t.sparse is None and t.lowrank is None and t.init is None:
            raise self.fail(what, "has neither sparse values, a seeded init nor low-rank factors")
        return t

    def head(self, task: str, spec: Any) -> StoredHead:
        what = f"head {task}"
        labels = self.field(spec, "labels", list, what)
        if not labels or not all(isinstance(x, str) for x in labels):
            raise self.fail(what, "labels must be a non-empty list of strings")
        params = {}
        for pname, pspec in self.field(spec, "params", dict, what).items():
            shape = tuple(self.field(pspec, "shape", list, f"{what}.{pname}"))
            dtype = self.field(pspec, "dtype", str, f"{what}.{pname}")
            p = self.tensor(f"heads.{task}.{pname}", what)
            if p.shape != shape:
                raise self.fail(what, f"param {pname} has shape {p.shape}, config says {shape}")
            if dtype not in VALUE_DTYPES or p.value_dtype != dtype:
                raise self.fail(what, f"param {pname} is stored as {p.value_dtype or p.dtype}, "
                                      f"config says {dtype!r} (known: "
                                      f"{', '.join(VALUE_DTYPES)})")
            if not p.is_finite():
                raise self.fail(what, f"param {pname} contains NaN or Inf")
            params[pname] = p
        if not params:
            raise self.fail(what, "has no parameters")
        prompt = spec.get("prompt")
        if prompt is not None and not is_prompt(prompt):
            raise self.fail(what, "prompt must be an object {template: string, chat: boolean}")
        return StoredHead(self.field(spec, "module", str, what), params, labels,
                          self.field(spec, "problem_type", str, what), prompt)


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, StoredTensor], Path]:
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
        views = deserialize(data)  # validates offsets, dtypes and sizes
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except Exception as exc:  # the parser reports corruption with several exception types
        raise FormatError(f"{file}: corrupt safetensors file: {exc}") from None
    tensors = {name: StoredTensor(v["dtype"], tuple(v["shape"]), v["data"]) for name, v in views}
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    if not isinstance(meta.get(METADATA_KEY), str):
        raise FormatError(f"{file}: no sparsemerge metadata; not a sparsemerge adapter file")
    config = strict_json.loads(meta[METADATA_KEY], f"{file}: metadata")
    return config, tensors, file


def read_stored(path: str | Path) -> StoredAdapter:
    """Read and fully validate an adapter directory (or its ``adapter.safetensors``)."""
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
    return StoredAdapter(
        file=file,
        config=config,
        base=info,
        method=r.field(config, "method", str, "metadata"),
        hyperparameters=r.field(config, "hyperparameters", dict, "metadata"),
        metrics=r.field(config, "metrics", dict, "metadata"),
        extra=config.get("extra") if isinstance(config.get("extra"), dict) else {},
        targets=targets,
        heads=heads,
        storage=r.storage,
    )
