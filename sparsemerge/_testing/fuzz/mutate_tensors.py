"""Mutators of tensor contents: indices out of range / duplicate / unsorted / wrong count or
dtype, elias-fano blobs, non-finite values, value bit flips, tensors re-encoded in another
dtype or shape."""

from __future__ import annotations

import math

import numpy as np
import torch

from sparsemerge import masks
from sparsemerge.formats import codecs

from .json_tree import get_at, sparse_specs
from .mutation import Ctx, mutator
from .safetensors_doc import NONFINITE, ST_DTYPES, UINT, st_bytes, st_decode, st_name


def _to_raw(c: Ctx) -> None:
    """Re-store one elias-fano or seed-coded tensor of the doc with the ``raw`` codec (a
    valid file still), so the index mutators apply to every corpus file."""
    options = []
    for path, key in sparse_specs(c.doc.config):
        spec = get_at(c.doc.config, path)
        if spec.get("codec") in ("elias-fano", "seed") and spec.get("nnz", 0) > 1:
            options.append((path, key, spec))
    if not options:
        return
    path, key, spec = c.rng.choice(options)
    numel, nnz = math.prod(spec["shape"]), spec["nnz"]
    name = key[len("targets."):]
    if spec["codec"] == "seed":
        idx = masks.seeded_indices(spec.pop("seed"), name, numel, nnz)
    else:
        blob = np.frombuffer(c.doc.tensors.pop(f"{key}.indices")[2], dtype=np.uint8)
        idx = codecs.elias_fano_decode(blob, numel, nnz)
    raw = codecs.raw_encode(idx, numel)
    dt = "I32" if raw.dtype == np.int32 else "I64"
    c.doc.tensors[f"{key}.indices"] = [dt, [int(raw.size)], raw.astype(f"<{raw.dtype.str[1:]}")
                                       .tobytes()]
    spec["codec"] = "raw"


def _index_tensor(c: Ctx) -> tuple[str, np.ndarray, str] | None:
    def raw_names():
        return sorted(n for n, (dt, _, _) in c.doc.tensors.items()
                      if n.endswith(".indices") and dt in ("I32", "I64"))

    names = raw_names()
    if not names or c.rng.random() < 0.3:
        _to_raw(c)
        names = raw_names()
    if not names:
        return None
    name = c.rng.choice(names)
    dt, shape, data = c.doc.tensors[name]
    arr = np.frombuffer(data, dtype="<i4" if dt == "I32" else "<i8").copy()
    return name, arr, dt


def _put_index(c: Ctx, name: str, arr: np.ndarray, dt: str) -> None:
    arr = arr.astype("<i4" if dt == "I32" else "<i8")
    c.doc.tensors[name] = [dt, [int(arr.size)], arr.tobytes()]


def _numel_of(c: Ctx, tensor_prefix: str) -> int:
    for path, key in sparse_specs(c.doc.config):
        if key == tensor_prefix:
            spec = get_at(c.doc.config, path)
            if isinstance(spec.get("shape"), list):
                return math.prod(spec["shape"])
    return 1


@mutator("tensors", 2.0)
def idx_out_of_range(c: Ctx) -> None:
    got = _index_tensor(c)
    if got is None or not got[1].size:
        return False
    name, arr, dt = got
    numel = _numel_of(c, name[: -len(".indices")])
    i = c.rng.choice([0, arr.size - 1, c.rng.randrange(arr.size)])
    top = 2**31 - 1 if dt == "I32" else 2**63 - 1
    low = -(2**31) if dt == "I32" else -(2**63)
    value = c.rng.choice([numel, numel + 1, -1, top, low, min(numel + 2**20, top)])
    arr = arr.astype(np.int64)
    arr[i] = value
    if c.rng.random() < 0.5:  # keep it sorted so only the range check can catch it
        arr.sort()
    _put_index(c, name, arr, dt)
    c.note(f"{name}[{i}] = {value} (numel {numel})")


@mutator("tensors", 1.5)
def idx_order(c: Ctx) -> None:
    got = _index_tensor(c)
    if got is None or got[1].size < 2:
        return False
    name, arr, dt = got
    kind = c.rng.randrange(4)
    i = c.rng.randrange(arr.size - 1)
    if kind == 0:
        arr[i + 1] = arr[i]
    elif kind == 1:
        arr[i], arr[i + 1] = arr[i + 1], arr[i]
    elif kind == 2:
        arr = arr[::-1].copy()
    else:
        arr[:] = arr[0]
    _put_index(c, name, arr, dt)
    c.note(f"{name}: order edit {kind} at {i}")


@mutator("tensors", 1.5)
def idx_count_or_type(c: Ctx) -> None:
    got = _index_tensor(c)
    if got is None:
        return False
    name, arr, dt = got
    kind = c.rng.randrange(6)
    if kind == 0 and arr.size:
        _put_index(c, name, arr[:-1], dt)
    elif kind == 1:
        _put_index(c, name, np.append(arr, (arr[-1] + 1) if arr.size else 0), dt)
    elif kind == 2:  # the other accepted width: still valid
        _put_index(c, name, arr, "I64" if dt == "I32" else "I32")
    elif kind == 3:
        c.doc.tensors[name][1] = [int(arr.size), 1] if arr.size else [0, 1]
    elif kind == 4:
        new = c.rng.choice(["U8", "I16", "F32", "U32", "U64", "F64"])
        t = torch.from_numpy(arr.astype(np.int64)).to(ST_DTYPES[new][1])
        c.doc.tensors[name] = [new, [int(arr.size)], st_bytes(t)]
    else:
        _put_index(c, name, np.array([], dtype=np.int64), dt)
    c.note(f"{name}: count/type edit {kind}")


@mutator("tensors", 2.0)
def ef_blob(c: Ctx) -> None:
    names = []
    for path, key in sparse_specs(c.doc.config):
        if get_at(c.doc.config, path).get("codec") == "elias-fano" and \
                f"{key}.indices" in c.doc.tensors:
            names.append(f"{key}.indices")
    if not names:
        return False
    name = c.rng.choice(sorted(names))
    dt, shape, data = c.doc.tensors[name]
    blob = bytearray(data)
    kind = c.rng.choice(["flip", "flip", "flip", "last", "grow", "shrink", "zero", "ones"])
    if kind == "flip" and blob:
        for _ in range(c.rng.choice([1, 1, 2, 3])):
            bit = c.rng.randrange(len(blob) * 8)
            blob[bit // 8] ^= 1 << (bit % 8)
    elif kind == "last" and blob:  # the padding bits of the high section
        blob[-1] ^= 1 << c.rng.randrange(8)
    elif kind == "grow":
        blob += b"\x00"
    elif kind == "shrink":
        blob = blob[:-1]
    elif kind == "zero":
        blob = bytearray(len(blob))
    elif kind == "ones":
        blob = bytearray(b"\xff" * len(blob))
    c.doc.tensors[name] = [dt, [len(blob)], bytes(blob)]
    c.note(f"{name}: elias-fano {kind}")


@mutator("tensors", 2.0)
def nonfinite(c: Ctx) -> None:
    names = sorted(n for n, (dt, _, b) in c.doc.tensors.items() if dt in NONFINITE and b)
    if not names:
        return False
    name = c.rng.choice(names)
    dt, shape, data = c.doc.tensors[name]
    size = ST_DTYPES[dt][0]
    arr = np.frombuffer(data, dtype=UINT[size]).copy()
    i = c.rng.randrange(arr.size)
    arr[i] = c.rng.choice(NONFINITE[dt])
    c.doc.tensors[name] = [dt, shape, arr.tobytes()]
    c.note(f"{name}[{i}] non-finite")


@mutator("tensors")
def value_bitflip(c: Ctx) -> None:
    names = sorted(n for n, (dt, _, b) in c.doc.tensors.items() if dt in NONFINITE and b)
    if not names:
        return False
    name = c.rng.choice(names)
    blob = bytearray(c.doc.tensors[name][2])
    bit = c.rng.randrange(len(blob) * 8)
    blob[bit // 8] ^= 1 << (bit % 8)
    c.doc.tensors[name][2] = bytes(blob)
    c.note(f"{name}: value bit {bit}")


@mutator("tensors", 1.5)
def retype_tensor(c: Ctx) -> None:
    names = sorted(n for n in c.doc.tensors if not n.endswith(".indices"))
    if not names:
        return False
    name = c.rng.choice(names)
    dt, shape, data = c.doc.tensors[name]
    t = st_decode(dt, shape, data)
    kind = c.rng.randrange(5)
    if kind == 0:
        new = c.rng.choice(["F64", "F32", "F16", "BF16", "I32", "I8", "U8", "BOOL", "F8_E4M3"])
        t = t.to(ST_DTYPES[new][1])
    elif kind == 1:
        t = t.reshape(-1)[:-1] if t.numel() else torch.zeros(1, dtype=t.dtype)
    elif kind == 2:
        t = torch.cat([t.reshape(-1), t.reshape(-1)[:1] if t.numel() else
                       torch.zeros(1, dtype=t.dtype)])
    elif kind == 3:
        t = t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1)
    else:
        t = t.reshape(*reversed(t.shape)) if t.dim() > 1 else t.reshape(-1, 1)
    c.doc.tensors[name] = [st_name(t.dtype), list(t.shape), st_bytes(t)]
    c.note(f"{name}: retype/reshape {kind} -> {st_name(t.dtype)}{list(t.shape)}")
