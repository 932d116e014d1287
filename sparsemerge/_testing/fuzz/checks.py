"""The independent checker: invariants of a loaded adapter or merged model that the readers
must guarantee, and digests of everything they hold (to tell an unchanged load from a
changed one, and to check that save + load round-trips)."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import safetensors.torch
import torch

from sparsemerge import masks
from sparsemerge.adapter import BaseInfo, SparseAdapter, SparseTensor
from sparsemerge.formats import merged as mf

from .safetensors_doc import st_bytes

# --------------------------------------------------------------------------- adapters


def adapter_digest(a: SparseAdapter) -> str:
    """A hash of everything an adapter holds (bit-exact values, indices, metadata)."""
    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        for p in parts:
            h.update(repr(p).encode("utf-8", "backslashreplace"))

    def add_sparse(s: SparseTensor | None) -> None:
        if s is None:
            add(None)
            return
        add(s.shape, str(s.values.dtype), s.mask_seed)
        h.update(s.indices.numpy().tobytes())
        h.update(st_bytes(s.values))

    for name in sorted(a.targets):
        t = a.targets[name]
        add(name, t.shape, t.gate, t.init)
        add_sparse(t.sparse)
        if t.lowrank is not None:
            add(t.lowrank.scale)
            add_sparse(t.lowrank.a)
            add_sparse(t.lowrank.b)
    for task in sorted(a.heads):
        hd = a.heads[task]
        add(task, hd.module, hd.labels, hd.problem_type, json.dumps(hd.prompt, sort_keys=True))
        for p in sorted(hd.params):
            add(p, tuple(hd.params[p].shape), str(hd.params[p].dtype))
            h.update(st_bytes(hd.params[p]))
    b = a.base
    add(b.model_id, b.revision, b.fingerprint, sorted(b.tensor_hashes.items()), b.architecture,
        a.method, json.dumps([a.hyperparameters, a.metrics, a.extra], sort_keys=True,
                             default=repr))
    return h.hexdigest()


VALUE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _prompt_ok(prompt: Any) -> bool:
    """No prompt, or {template: str, chat: bool} whose template is valid UTF-8."""
    if prompt is None:
        return True
    if not (isinstance(prompt, dict) and set(prompt) <= {"template", "chat"}
            and isinstance(prompt.get("template"), str)
            and isinstance(prompt.get("chat", False), bool)):
        return False
    prompt["template"].encode("utf-8")  # no lone surrogates
    return True


def _check_sparse(s: SparseTensor, what: str) -> None:
    shape = s.shape
    assert isinstance(shape, tuple) and shape and all(
        type(x) is int and x > 0 for x in shape), f"{what}: shape {shape!r}"
    numel = math.prod(shape)
    assert numel <= 2**63, f"{what}: numel {numel}"
    idx, val = s.indices, s.values
    assert idx.dtype == torch.int64 and idx.dim() == 1, f"{what}: indices {idx.dtype}"
    assert val.dim() == 1 and val.numel() == idx.numel(), f"{what}: values {tuple(val.shape)}"
    assert val.dtype in VALUE_DTYPES, f"{what}: value dtype {val.dtype}"
    assert bool(torch.isfinite(val).all()), f"{what}: non-finite values"
    if idx.numel():
        assert int(idx[0]) >= 0 and int(idx[-1]) < numel, f"{what}: index range"
        assert bool((idx[1:] > idx[:-1]).all()), f"{what}: indices not strictly increasing"
    if s.mask_seed is not None:
        regen = masks.seeded_indices(s.mask_seed, what, numel, idx.numel())
        assert np.array_equal(regen, idx.numpy()), f"{what}: not the seeded mask"


def check_adapter(a: SparseAdapter) -> None:
    """Independent invariants of a loaded adapter (AssertionError names the broken one)."""
    assert isinstance(a.base, BaseInfo) and isinstance(a.base.model_id, str)
    assert isinstance(a.method, str)
    assert isinstance(a.hyperparameters, dict) and isinstance(a.metrics, dict)
    for name, t in a.targets.items():
        assert isinstance(name, str)
        name.encode("utf-8")  # no lone surrogates
        assert isinstance(t.gate, float) and math.isfinite(t.gate), f"{name}: gate {t.gate!r}"
        assert t.sparse is not None or t.lowrank is not None or t.init is not None
        if t.sparse is not None:
            _check_sparse(t.sparse, name)
            assert t.sparse.shape == t.shape, f"{name}: sparse shape"
        if t.init is not None:
            assert type(t.init.seed) is int and 0 <= t.init.seed < 2**64
            assert isinstance(t.init.scale, float) and math.isfinite(t.init.scale)
        if t.lowrank is not None:
            lr = t.lowrank
            _check_sparse(lr.a, f"{name}.a")
            _check_sparse(lr.b, f"{name}.b")
            assert len(t.shape) == 2 and lr.b.shape[0] == t.shape[0] and \
                lr.a.shape[1] == t.shape[1] and lr.a.shape[0] == lr.b.shape[1], f"{name}: rank"
            assert isinstance(lr.scale, float) and math.isfinite(lr.scale)
    for task, h in a.heads.items():
        assert isinstance(h.module, str) and isinstance(h.problem_type, str)
        assert h.labels and all(isinstance(x, str) for x in h.labels), f"head {task}: labels"
        for x in [task, *h.labels]:
            x.encode("utf-8")
        assert h.params, f"head {task}: no params"
        assert _prompt_ok(h.prompt), f"head {task}: prompt {h.prompt!r}"
        for p, v in h.params.items():
            assert v.dtype in VALUE_DTYPES, f"head {task}.{p}: dtype {v.dtype}"
            assert bool(torch.isfinite(v).all()), f"head {task}.{p}: non-finite"


# --------------------------------------------------------------------------- merged models


def check_merged(m: Any) -> None:
    assert isinstance(m.recipe, dict) and isinstance(m.config, dict)
    assert m.weight_files and all(isinstance(f, str) for f in m.weight_files)
    for f in m.weight_files:
        p = (m.path / f).resolve()
        assert p.is_file() and m.path.resolve() in p.parents, f"weight file {f} outside"
        try:  # what transformers will do with it: the shard must parse completely
            safetensors.torch.load(p.read_bytes())
        except Exception as exc:
            raise AssertionError(f"an accepted shard does not parse: {f}: {exc}") from None
    tasks = m.recipe["tasks"]
    assert list(m.heads) == tasks and len(set(tasks)) == len(tasks)
    for task, h in m.heads.items():
        assert mf.task_name_problem(task) is None, repr(task)
        labels = h.labels
        assert labels and all(isinstance(x, str) for x in labels)
        for x in labels:
            x.encode("utf-8")
        assert h.params, f"head {task}: no params"
        assert _prompt_ok(h.config.get("prompt")), f"head {task}: prompt"
        for name, t in h.params.items():
            assert t.is_floating_point() and bool(torch.isfinite(t.float()).all()), name
    json.dumps([m.recipe, m.config, [h.config for h in m.heads.values()]],
               ensure_ascii=False).encode("utf-8")  # no lone surrogates anywhere


def merged_digest(m: Any) -> str:
    h = hashlib.sha256(json.dumps([m.recipe, m.config, m.weight_files], sort_keys=True,
                                  default=repr).encode("utf-8", "backslashreplace"))
    for task, hd in m.heads.items():
        h.update(json.dumps([task, hd.config], sort_keys=True, default=repr).encode(
            "utf-8", "backslashreplace"))
        for name in sorted(hd.params):
            h.update(name.encode() + st_bytes(hd.params[name]))
    return h.hexdigest()
