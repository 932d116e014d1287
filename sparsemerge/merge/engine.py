"""Merging whole adapters: per target tensor, every adapter's delta -> one operator -> one delta.

:func:`merge_adapters` walks the union of the adapters' target tensors. For each tensor it
takes every adapter's effective delta (``TargetDelta.sparse_delta``: gate folded in, low-rank
factors and seeded inits materialised — for plain sparse deltas this is O(nnz)), passes them
to the operator (an adapter without that tensor contributes an empty delta, so operator
positions — weights, DARE's per-adapter seeds — stay aligned), and stores the result as a
plain sparse delta. Memory: the inputs plus the merged deltas, O(total nnz); no tensor of the
model's size is built unless an input is itself dense (low-rank).

Heads are never merged: each task's head is carried over unchanged. Refused, with
:class:`~sparsemerge.errors.SparseMergeError` naming the inputs involved:

- adapters on different bases: a target tensor both adapters touch has different base
  hashes, the architectures differ, or both fingerprint the same tensor set and the
  fingerprints differ (adapters fingerprint only the tensors they target, so two adapters on
  the same base with different targets legitimately have different overall fingerprints; the
  full check against the real base happens when the merge is applied or written);
- the same tensor with different shapes;
- two heads for the same task name; heads for different head modules or hidden sizes.

The merged adapter (format v1, mergeable and applicable again) records in its metadata the
method, the validated parameters, the weights, every input (path, kind, SHA-256 of its weight
file, tasks, weight, and ``renamed_from`` for a head renamed by ``NAME=PATH``) and the
sparsemerge version: ``hyperparameters`` holds
``merge_method`` / ``parameters`` / ``weights``, ``extra["merge"]`` the full record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sparsemerge.adapter import BaseInfo, Head, SparseAdapter, SparseTensor, TargetDelta
from sparsemerge.errors import SparseMergeError
from sparsemerge.merge.operators import get_operator
from sparsemerge.merge.operators.kernels import SparseVector

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def adapter_sha256(adapter: SparseAdapter) -> str:
    """SHA-256 of the ``adapter.safetensors`` bytes this adapter serialises to (for inputs
    that exist only in memory; a loaded file's own hash is in ``extra['source']``)."""
    import json

    import safetensors.torch

    from sparsemerge.formats.adapter_file import METADATA_KEY, adapter_config

    tensors: dict[str, torch.Tensor] = {}
    config = adapter_config(adapter, tensors)
    config.pop("sparsemerge_version", None)
    blob = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(config,
                                                                              sort_keys=True)})
    return hashlib.sha256(blob).hexdigest()


def input_label(adapter: SparseAdapter, i: int) -> str:
    src = adapter.extra.get("source") if isinstance(adapter.extra, dict) else None
    if isinstance(src, dict) and src.get("path"):
        return str(src["path"])
    if adapter.heads:
        return f"input {i} ({', '.join(adapter.heads)})"
    return f"input {i}"


def input_record(adapter: SparseAdapter, i: int, weight: float) -> dict[str, Any]:
    src = adapter.extra.get("source") if isinstance(adapter.extra, dict) else None
    rec: dict[str, Any] = {}
    if isinstance(src, dict):
        rec.update({k: v for k, v in src.items()
                    if k in ("path", "kind", "sha256", "file", "renamed_from")})
    if "sha256" not in rec:
        rec["sha256"] = adapter_sha256(adapter)
        rec.setdefault("kind", "in-memory")
    rec.setdefault("path", None)
    rec["tasks"] = list(adapter.heads)
    rec["weight"] = weight
    rec["method"] = adapter.method
    rec["nnz"] = sum(t.trainable for t in adapter.targets.values())
    if adapter.metrics:
        rec["metrics"] = adapter.metrics
    return rec


# --------------------------------------------------------------------------------- checks


def check_bases(adapters: Sequence[SparseAdapter]) -> BaseInfo:
    """Refuse adapters made on different bases; return the merged base description.

    Every adapter is compared with all earlier ones: per-tensor base hashes on the tensors
    they share, architectures, and the overall fingerprints when they cover the same tensors.
    """
    labels = [input_label(a, i) for i, a in enumerate(adapters)]
    seen: dict[str, tuple[str, int]] = {}  # tensor -> (base hash, first adapter with it)
    for i, a in enumerate(adapters):
        b = a.base
        for n, h in sorted(b.tensor_hashes.items()):
            if n in seen and seen[n][0] != h:
                j = seen[n][1]
                o = adapters[j].base
                raise SparseMergeError(
                    f"cannot merge adapters made on different base models: {labels[j]} was "
                    f"made on {o.model_id} (fingerprint {o.fingerprint or 'unknown'}), "
                    f"{labels[i]} on {b.model_id} (fingerprint {b.fingerprint or 'unknown'}); "
                    f"base tensor {n} differs")
            seen.setdefault(n, (h, i))
        for j in range(i):
            o = adapters[j].base

            def refuse(why: str, j: int = j, o: BaseInfo = o, b: BaseInfo = b, i: int = i
                       ) -> SparseMergeError:
                return SparseMergeError(
                    f"cannot merge adapters made on different base models: {labels[j]} was "
                    f"made on {o.model_id} (fingerprint {o.fingerprint or 'unknown'}), "
                    f"{labels[i]} on {b.model_id} (fingerprint {b.fingerprint or 'unknown'}); "
                    f"{why}")

            if o.architecture and b.architecture and o.architecture != b.architecture:
                raise refuse(f"architectures {o.architecture} and {b.architecture} differ")
            same_set = (set(o.tensor_hashes) == set(b.tensor_hashes)) if (
                o.tensor_hashes or b.tensor_hashes) else set(adapters[j].targets) == set(a.targets)
            if same_set and o.fingerprint and b.fingerprint and o.fingerprint != b.fingerprint:
                raise refuse("the fingerprints of the same base tensors differ")
    from sparsemerge.checkpoint import fingerprint_of

    first = adapters[0].base
    hashes = {n: h for n, (h, _) in seen.items()}
    arch = next((a.base.architecture for a in adapters if a.base.architecture), "")
    fp = fingerprint_of(hashes) if hashes else first.fingerprint
    return BaseInfo(model_id=first.model_id, revision=first.revision, fingerprint=fp,
                    tensor_hashes=dict(sorted(hashes.items())), architecture=arch)


def collect_heads(adapters: Sequence[SparseAdapter]) -> dict[str, Head]:
    """Every input's heads, by task; duplicate tasks and incompatible heads are refused."""
    labels = [input_label(a, i) for i, a in enumerate(adapters)]
    heads: dict[str, Head] = {}
    owner: dict[str, int] = {}
    for i, a in enumerate(adapters):
        for task, h in a.heads.items():
            if task in heads:
                raise SparseMergeError(
                    f"two inputs have a head for task {task!r}: {labels[owner[task]]} and "
                    f"{labels[i]}; heads are never merged, so task names must be unique: "
                    "rename them at merge time with NAME=PATH inputs (merge --heads "
                    "news=PATH_A topics=PATH_B ...; in a recipe, 'task:' under the input), "
                    "train with --task-name NAME, or merge without one of them")
            heads[task] = h
            owner[task] = i
    tasks = list(heads)
    for task in tasks[1:]:
        h, h0, t0 = heads[task], heads[tasks[0]], tasks[0]
        if h.module != h0.module:
            raise SparseMergeError(
                f"incompatible heads: task {t0} ({labels[owner[t0]]}) has a {h0.module!r} head, "
                f"task {task} ({labels[owner[task]]}) a {h.module!r} head; they were made for "
                "different architectures")
        for pname in set(h.params) & set(h0.params):
            if tuple(h.params[pname].shape[1:]) != tuple(h0.params[pname].shape[1:]):
                raise SparseMergeError(
                    f"incompatible heads: {h0.module}.{pname} of task {t0} has shape "
                    f"{tuple(h0.params[pname].shape)}, of task {task} "
                    f"{tuple(h.params[pname].shape)} (different hidden sizes)")
    return heads


# --------------------------------------------------------------------------------- merging


def merge_adapters(adapters: Sequence[SparseAdapter], method: str,
                   params: Mapping[str, Any] | None = None,
                   weights: Sequence[float] | None = None, *,
                   progress: Progress | None = None) -> SparseAdapter:
    """Merge ``adapters`` with operator ``method`` into one sparse adapter (see module doc).

    ``params`` are validated against the operator's declaration (defaults filled in);
    ``weights`` (one per adapter, default 1.0 each) scale the inputs. Heads are carried over
    per task. Returns a plain-sparse adapter whose metadata records the merge.
    """
    from sparsemerge._version import __version__

    adapters = list(adapters)
    if not adapters:
        raise SparseMergeError("nothing to merge: give at least one adapter")
    if not all(isinstance(a, SparseAdapter) for a in adapters):
        raise SparseMergeError("merge_adapters takes SparseAdapter objects (load_adapter(path))")
    op = get_operator(method)
    p = op.validate_params(params)
    if weights is None:
        ws = [1.0] * len(adapters)
    else:
        ws = [float(w) for w in weights]
        if len(ws) != len(adapters):
            raise SparseMergeError(f"{len(adapters)} adapters but {len(ws)} weights; give one "
                                   "weight per adapter")
    base = check_bases(adapters)
    heads = collect_heads(adapters)
    labels = [input_label(a, i) for i, a in enumerate(adapters)]

    names: dict[str, tuple[int, ...]] = {}
    where: dict[str, int] = {}
    for i, a in enumerate(adapters):
        for n, t in a.targets.items():
            shape = tuple(t.shape)
            if n in names and names[n] != shape:
                raise SparseMergeError(
                    f"tensor {n} has shape {names[n]} in {labels[where[n]]} but {shape} in "
                    f"{labels[i]}; these adapters do not fit the same model")
            names.setdefault(n, shape)
            where.setdefault(n, i)

    empty = SparseVector.empty()
    targets: dict[str, TargetDelta] = {}
    total = len(names)
    for k, (name, shape) in enumerate(names.items()):
        vectors = []
        for a in adapters:
            t = a.targets.get(name)
            if t is None:
                vectors.append(empty)
            else:
                st = t.sparse_delta(name)
                vectors.append(SparseVector(st.indices, st.values))
        try:
            merged = op.merge(vectors, ws, **p)
        except SparseMergeError as exc:
            raise SparseMergeError(f"tensor {name}: {exc}") from None
        if merged.nnz:
            targets[name] = TargetDelta(shape=shape, sparse=SparseTensor(
                shape, merged.indices, merged.values))
        if progress is not None:
            progress("merge", k + 1, total)

    inputs = [input_record(a, i, ws[i]) for i, a in enumerate(adapters)]
    datasets: list[str] = []
    for a in adapters:
        for d in a.hyperparameters.get("datasets", []) or []:
            if d not in datasets:
                datasets.append(d)
    hyper: dict[str, Any] = {"merge_method": op.name, "parameters": p, "weights": ws}
    if datasets:
        hyper["datasets"] = datasets
    gguf = {a.hyperparameters.get("gguf_file") for a in adapters} - {None}
    if len(gguf) == 1:
        hyper["gguf_file"] = gguf.pop()
    extra = {"merge": {"method": op.name, "reference": op.reference, "parameters": p,
                       "weights": ws, "inputs": inputs, "sparsemerge_version": __version__}}
    return SparseAdapter(targets=targets, base=base, heads=heads, method="merge",
                         hyperparameters=hyper, metrics={}, extra=extra)


# --------------------------------------------------------------------------------- overlap


def adapter_vectors(adapter: SparseAdapter) -> dict[str, SparseVector]:
    """Each target's effective delta (gate folded) as a SparseVector."""
    out = {}
    for name, t in adapter.targets.items():
        st = t.sparse_delta(name)
        out[name] = SparseVector(st.indices, st.values)
    return out


def overlap_report(adapters: Mapping[str, SparseAdapter], *, per_layer: bool = False,
                   per_tensor: bool = False) -> dict[str, Any]:
    """Overlap statistics of every pair of adapters (``sparsemerge overlap``).

    Returns ``{"adapters": [...], "pairs": [{"a", "b", "overall": {...}, "layers": [...]}],
    "matrix": {"names", "jaccard", "sign_agreement", "cosine"}}``; figures as defined in
    :mod:`sparsemerge.merge.stats` (pooled exactly over tensors and layers).
    """
    from sparsemerge.merge.stats import aggregate_stats, pairwise_stats

    names = list(adapters)
    if len(names) < 2:
        raise SparseMergeError("overlap needs at least two adapters")
    if len(set(names)) != len(names):
        raise SparseMergeError(f"adapter names must be unique: {names}")
    check_bases(list(adapters.values()))
    vectors = {n: adapter_vectors(a) for n, a in adapters.items()}
    stats = pairwise_stats(vectors)
    pairs = []
    matrix: dict[str, list[list[float | None]]] = {
        k: [[1.0 if i == j else None for j in range(len(names))] for i in range(len(names))]
        for k in ("jaccard", "sign_agreement", "cosine")}
    for (a, b), per in stats.items():
        groups, overall = aggregate_stats(per)
        s = overall.summary()
        rec: dict[str, Any] = {"a": a, "b": b, "overall": s}
        if per_layer:
            rec["layers"] = [{"layer": g, **st.summary()} for g, st in groups.items()]
        if per_tensor:
            rec["tensors"] = [{"tensor": t, **st.summary()} for t, st in per.items()]
        pairs.append(rec)
        i, j = names.index(a), names.index(b)
        for k in matrix:
            matrix[k][i][j] = matrix[k][j][i] = s[k]
    info = []
    for n, a in adapters.items():
        nnz = sum(v.nnz for v in vectors[n].values())
        src = a.extra.get("source", {}) if isinstance(a.extra, dict) else {}
        info.append({"name": n, "path": src.get("path"), "tasks": list(a.heads),
                     "method": a.method, "targets": len(a.targets), "nnz": nnz})
    return {"adapters": info, "pairs": pairs, "matrix": {"names": names, **matrix}}


__all__ = ["adapter_sha256", "adapter_vectors", "check_bases", "collect_heads", "file_sha256",
           "merge_adapters", "overlap_report"]
