"""Sparse-vector kernels every merge operator is built from.

A merge operator sees each adapter's delta for one tensor as a :class:`SparseVector` (sorted
unique flat indices plus values).  The kernels never build a tensor of the target's full
size: they concatenate the inputs (a :class:`Batch`), take the union of indices with a
stable argsort (which merges the already sorted runs) and reduce per entry with
``np.bincount`` (a segment sum).  Cost and memory are O(total nnz); TIES's trim is a partial
selection (``np.partition``), not a sort.  Values and weighted contributions are float32
whatever the stored dtype; per-entry sums are accumulated in float64 and rounded to float32.
They run in numpy on zero-copy views of the (CPU) tensors: on arrays of a few thousand
entries its per-call overhead is several times lower than torch's, and overhead is what
dominates here; inputs on another device are copied to the CPU, outputs are CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparsemerge.errors import SparseMergeError

__all__ = [
    "Batch",
    "SparseVector",
    "disjoint_mean",
    "finish",
    "trim_batch",
    "trim_count",
    "trim_top_magnitude",
    "union",
    "weighted_sum",
]

_F32 = torch.float32


# --------------------------------------------------------------------------------------------
# Sparse vectors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SparseVector:
    """Values at sorted, unique, flat indices of one (flattened) tensor.

    ``indices``: 1-D int64, strictly increasing.  ``values``: 1-D float of the same length.
    The tensor's size is not stored: operators never need it.  Use :meth:`from_sparse_tensor`
    / :meth:`to_sparse_tensor` to move to and from :class:`sparsemerge.adapter.SparseTensor`.
    """

    indices: torch.Tensor
    values: torch.Tensor

    @property
    def nnz(self) -> int:
        """Number of stored entries (explicit zeros included)."""
        return int(self.indices.numel())

    @classmethod
    def empty(cls) -> SparseVector:
        return cls(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=_F32))

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> SparseVector:
        """Keep the non-zero entries of a dense tensor (flattened row-major)."""
        flat = dense.reshape(-1)
        idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
        return cls(idx, flat[idx].clone())

    @classmethod
    def from_sparse_tensor(cls, st: Any) -> SparseVector:
        """View a :class:`sparsemerge.adapter.SparseTensor` (shape dropped, no copy)."""
        return cls(st.indices, st.values)

    def to_sparse_tensor(self, shape: Sequence[int]) -> Any:
        from sparsemerge.adapter import SparseTensor

        return SparseTensor(tuple(int(s) for s in shape), self.indices, self.values)

    def to_dense(self, numel: int, dtype: torch.dtype = _F32) -> torch.Tensor:
        """A dense 1-D tensor of ``numel`` entries (for tests and small tensors only)."""
        out = torch.zeros(numel, dtype=dtype)
        out[self.indices] = self.values.to(dtype)
        return out

    def validate(self, what: str = "sparse vector", numel: int | None = None) -> SparseVector:
        """Check the invariants; return the vector as (int64, float32).

        Raises :class:`SparseMergeError` naming ``what`` on: non-1-D or mismatched tensors,
        non-integer indices, unsorted / duplicate / negative (or >= ``numel``) indices,
        non-float values, NaN or Inf.  Cost O(nnz).
        """
        idx, val = self.indices, self.values
        if not isinstance(idx, torch.Tensor) or not isinstance(val, torch.Tensor):
            raise SparseMergeError(f"{what}: indices and values must be torch tensors")
        if idx.dim() != 1 or val.dim() != 1:
            raise SparseMergeError(
                f"{what}: indices and values must be 1-D, got shapes "
                f"{tuple(idx.shape)} and {tuple(val.shape)}"
            )
        if idx.numel() != val.numel():
            raise SparseMergeError(
                f"{what}: {idx.numel()} indices but {val.numel()} values"
            )
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise SparseMergeError(f"{what}: indices must be integers, got {idx.dtype}")
        if not val.dtype.is_floating_point:
            raise SparseMergeError(f"{what}: values must be floating point, got {val.dtype}")
        idx = idx.to(torch.int64)
        val = val.to(_F32)
        if idx.numel():
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise SparseMergeError(f"{what}: indices must be sorted and unique")
            if int(idx[0]) < 0:
                raise SparseMergeError(f"{what}: negative index {int(idx[0])}")
            if numel is not None and int(idx[-1]) >= numel:
                raise SparseMergeError(
                    f"{what}: index {int(idx[-1])} out of range for {numel} entries"
                )
            if not bool(torch.isfinite(val).all()):
                raise SparseMergeError(f"{what}: values contain NaN or Inf")
        return SparseVector(idx, val)


# --------------------------------------------------------------------------------------------
# Batches and kernels (all O(total nnz); numpy on zero-copy views of the CPU tensors, because
# its per-call overhead is a few times lower than torch's on these small arrays)
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """The inputs of one merge call, concatenated into segments.

    Segment ``j`` is one adapter's delta for one tensor: ``lengths[j]`` entries (after those
    of segments ``0..j-1``) of sorted unique ``indices`` (int64) and ``values`` (float32, no
    zeros), with weight ``weights[j]`` and adapter position ``positions[j]``.  For a
    multi-tensor call (:meth:`Operator.merge_many`) segments are tensor-major and tensor
    ``t``'s indices are shifted by ``offsets[t]`` so tensors never share an index.
    """

    indices: np.ndarray  # int64
    values: np.ndarray  # float32
    lengths: list[int]
    weights: list[float]
    positions: list[int]
    offsets: list[int] = field(default_factory=lambda: [0])

    @classmethod
    def from_groups(
        cls,
        groups: Sequence[Sequence[SparseVector]],
        weights: Sequence[float] | None,
        name: str = "merge",
        numels: Sequence[int] | None = None,
    ) -> Batch:
        """Validate (see :meth:`SparseVector.validate`) and concatenate; drop stored zeros.

        One group = one tensor (``merge`` passes a single group).
        """
        where = f"merge method '{name}'"
        n = len(groups[0])
        if n == 0:
            raise SparseMergeError(f"{where}: nothing to merge (no input vectors)")
        ws: list[float] = []
        if weights is None:
            ws = [1.0] * n
        elif len(weights) != n:
            raise SparseMergeError(f"{where}: {n} inputs but {len(weights)} weights")
        for i, w in enumerate(weights if weights is not None else ()):
            if isinstance(w, (torch.Tensor, np.generic)):
                w = w.item()
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise SparseMergeError(f"{where}: weight {i} must be a finite number, got {w!r}")
            ws.append(float(w))
        multi = len(groups) > 1
        if numels is not None and len(numels) != len(groups):
            raise SparseMergeError(f"{where}: {len(groups)} tensors but {len(numels)} numels")
        idx_parts, val_parts, lengths, offsets = [], [], [], []
        offset = 0
        for t, vectors in enumerate(groups):
            label = f"{where}: tensor {t} input" if multi else f"{where}: input"
            if len(vectors) != n:
                raise SparseMergeError(
                    f"{where}: tensor {t} has {len(vectors)} inputs, tensor 0 has {n}"
                )
            offsets.append(offset)
            top = 0
            for i, v in enumerate(vectors):
                # fast path: zero-copy numpy views of CPU int64 / float32 tensors (few torch
                # calls: each costs microseconds when the caches are cold)
                try:
                    a, b = v.indices.numpy(), v.values.numpy()
                    fast = (
                        a.dtype == np.int64 and b.dtype == np.float32
                        and a.ndim == 1 and b.ndim == 1 and a.size == b.size
                    )
                except (AttributeError, TypeError, RuntimeError):
                    fast = False
                if not fast:
                    v = v.validate(f"{label} {i}")  # raises, or normalises the dtypes
                    a, b = _as_numpy(v.indices), _as_numpy(v.values)
                if multi:
                    if a.size:
                        if int(a[0]) < 0:
                            v.validate(f"{label} {i}")  # raises: negative index
                        top = max(top, int(a[-1]) + 1)
                    if offset:
                        a = a + offset
                idx_parts.append(a)
                val_parts.append(b)
                lengths.append(a.size)
            if multi:
                size = top if numels is None else int(numels[t])
                if size < top:
                    raise SparseMergeError(
                        f"{where}: tensor {t} has index {top - 1} >= numel {size}"
                    )
                offset += size
        if len(idx_parts) == 1:
            idx, val = idx_parts[0], val_parts[0]
        else:
            idx, val = np.concatenate(idx_parts), np.concatenate(val_parts)
        batch = cls(idx, val, lengths, ws * len(groups), list(range(n)) * len(groups), offsets)
        if idx.size:
            # one float64 sum is finite iff every value is (float32 sums cannot overflow it)
            ok = math.isfinite(val.sum(dtype=np.float64)) and int(idx.min()) >= 0
            if ok and idx.size > 1:
                steps = np.diff(idx)
                ends, e = [], -1
                for m in lengths[:-1]:
                    e += m
                    if 0 <= e < steps.size:
                        ends.append(e)
                if ends:
                    steps[ends] = 1  # the step from one segment to the next may go down
                ok = int(steps.min()) > 0
            if not ok:  # find and name the culprit
                for t, vectors in enumerate(groups):
                    label = f"{where}: tensor {t} input" if multi else f"{where}: input"
                    for i, v in enumerate(vectors):
                        v.validate(f"{label} {i}")
                raise SparseMergeError(f"{where}: invalid input vectors")
            if np.count_nonzero(val) != val.size:
                return batch.select(val != 0)
        return batch

    @classmethod
    def from_vectors(
        cls, vectors: Sequence[SparseVector], weights: Sequence[float] | None, name: str = "merge"
    ) -> Batch:
        """One tensor's inputs (see :meth:`from_groups`)."""
        if len(vectors) == 0:
            raise SparseMergeError(f"merge method '{name}': nothing to merge (no input vectors)")
        return cls.from_groups([vectors], weights, name)

    def _like(self, indices, values, lengths) -> Batch:
        return Batch(indices, values, lengths, self.weights, self.positions, self.offsets)

    def split(self) -> list[SparseVector]:
        """One vector per segment (copies: a batch may view the caller's tensors)."""
        out, s = [], 0
        for n in self.lengths:
            out.append(_vector(self.indices[s : s + n].copy(), self.values[s : s + n].copy()))
            s += n
        return out

    def split_groups(self, merged: SparseVector) -> list[SparseVector]:
        """Cut a merged multi-tensor result back into one vector per tensor."""
        if len(self.offsets) == 1:
            return [merged]
        idx, val = merged.indices.numpy(), merged.values.numpy()
        bounds = np.searchsorted(idx, self.offsets).tolist() + [idx.size]
        return [
            _vector(idx[a:b] - off, val[a:b].copy())
            for a, b, off in zip(bounds[:-1], bounds[1:], self.offsets, strict=True)
        ]

    def contributions(self) -> np.ndarray:
        """``w_i * v_i`` per entry (float32)."""
        ws = self.weights
        if all(w == ws[0] for w in ws):
            return self.values if ws[0] == 1.0 else self.values * np.float32(ws[0])
        return self.values * np.repeat(np.asarray(ws, dtype=np.float32), self.lengths)

    def abs_weights(self) -> np.ndarray | float:
        """``|w_i|`` per entry, or one float when all weights have the same magnitude."""
        aw = [abs(w) for w in self.weights]
        if all(a == aw[0] for a in aw):
            return aw[0]
        return np.repeat(np.asarray(aw, dtype=np.float64), self.lengths)

    def select(self, keep: np.ndarray, lengths: list[int] | None = None) -> Batch:
        """The entries where ``keep`` is True (``lengths``: the new lengths, if known)."""
        if lengths is None:
            ends = np.cumsum(np.asarray(self.lengths, dtype=np.int64))
            counts = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])[ends]
            lengths = np.diff(counts, prepend=0).tolist()
        pos = np.flatnonzero(keep)
        return self._like(self.indices.take(pos), self.values.take(pos), lengths)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.requires_grad or t.device.type != "cpu":
        t = t.detach().cpu()
    return t.numpy()


def _vector(indices: np.ndarray, values: np.ndarray) -> SparseVector:
    return SparseVector(
        torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)),
    )


def trim_count(density: float, n: int) -> int:
    """How many entries TIES keeps out of ``n`` non-zeros: ``ceil(density * n)``.

    A product within a relative 1e-12 of an integer counts as that integer, so binary
    rounding cannot add one (0.7 * 10 keeps 7, not 8).  k >= 1 whenever density > 0, n >= 1.
    """
    if density >= 1.0:
        return n
    x = density * n
    r = round(x)
    k = r if abs(x - r) <= 1e-12 * max(1.0, x) else math.ceil(x)
    return min(n, max(1, k)) if n > 0 and density > 0 else 0


def trim_batch(batch: Batch, density: float) -> Batch:
    """TIES's trim: segment ``j`` (one adapter's delta of one tensor) keeps its
    ``trim_count(density, lengths[j])`` entries of largest |value| (ties at the cut broken
    towards the lower index); order is preserved.

    O(nnz): ``np.partition`` finds each segment's cut (one 2-D call per run of equal-sized
    segments - adapters of one tensor usually have equal nnz), one comparison over the batch
    keeps the entries at or above their segment's cut; only a segment with several entries
    tied at its cut is redone with the tie-break.
    """
    if density >= 1.0:
        return batch
    lengths = batch.lengths
    ks = [trim_count(density, n) for n in lengths]
    if ks == lengths:
        return batch
    mag = np.abs(batch.values)
    cuts = np.zeros(len(lengths), dtype=mag.dtype)  # cut 0 keeps a segment whole
    s = j = 0
    while j < len(lengths):  # runs of equal-sized segments share one 2-D partition
        n, k = lengths[j], ks[j]
        r = j + 1
        while r < len(lengths) and lengths[r] == n:
            r += 1
        if k < n:
            if k == 0:
                cuts[j:r] = np.inf
            else:
                block = mag[s : s + n * (r - j)].reshape(r - j, n)
                cuts[j:r] = np.partition(block, n - k, axis=1)[:, n - k]
        s += n * (r - j)
        j = r
    keep = mag >= np.repeat(cuts, lengths)
    if np.count_nonzero(keep) == sum(ks):  # no adapter keeps more than k (none has fewer)
        return batch.select(keep, ks)
    s = 0
    for n, k, cut in zip(lengths, ks, cuts, strict=True):
        if 0 < k < n and np.count_nonzero(keep[s : s + n]) != k:  # ties at the cut
            m = mag[s : s + n]
            above = m > cut
            at_cut = m == cut
            room = k - np.count_nonzero(above)
            keep[s : s + n] = above | (at_cut & (np.cumsum(at_cut) <= room))
        s += n
    return batch.select(keep, ks)


def trim_top_magnitude(v: SparseVector, density: float) -> SparseVector:
    """TIES's trim of one vector (see :func:`trim_batch`); zeros are dropped first."""
    return trim_batch(Batch.from_vectors([v], None, "trim"), density).split()[0]


def union(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Sorted union of the indices, and each entry's slot in it.

    A stable argsort of the concatenated sorted runs (timsort merges them in
    O(N log #inputs)); within a slot, entries stay in input order.
    """
    idx = batch.indices
    if len(batch.lengths) == 1:  # copy: the batch may view the caller's tensors
        return idx.copy(), np.arange(idx.size)
    order = np.argsort(idx, kind="stable")
    s = idx[order]
    new = np.empty(s.size, dtype=bool)
    new[:1] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    inv = np.empty(s.size, dtype=np.intp)
    inv[order] = np.cumsum(new) - 1
    return s[new], inv


def finish(indices: np.ndarray, values: np.ndarray, lam: float) -> SparseVector:
    """Apply ``lam``, round to float32, drop exact zeros, wrap as a SparseVector."""
    values = values * lam if lam != 1.0 else values
    values = values.astype(np.float32, copy=False)
    keep = values != 0
    if not bool(keep.all()):
        indices, values = indices[keep], values[keep]
    return _vector(indices, values)


def weighted_sum(batch: Batch, lam: float) -> SparseVector:
    """``lam * sum_i w_i v_i`` over the union of indices (sums accumulated in float64)."""
    if batch.indices.size == 0:
        return SparseVector.empty()
    uniq, inv = union(batch)
    contrib = batch.contributions()
    if uniq.size == contrib.size:  # no overlap
        total = np.empty(uniq.size, dtype=np.float32)
        total[inv] = contrib
    else:
        total = np.bincount(inv, weights=contrib, minlength=uniq.size)
    return finish(uniq, total, lam)


def disjoint_mean(batch: Batch, lam: float, reduce: str = "mean") -> SparseVector:
    """Sign election by total weighted mass, then combine the agreeing contributions.

    ``reduce='mean'``: ``sum_agree w_i v_i / sum_agree |w_i|`` (TIES's disjoint mean);
    ``reduce='sum'``: ``sum_agree w_i v_i``.  One segment sum over ``2 * slot + (c < 0)``
    gives each entry's positive and negative mass separately (float64); the elected sign is
    ``+`` iff ``positive_mass >= -negative_mass`` (i.e. total >= 0, decided without
    cancellation error) and the agreeing sum is the elected side's mass.
    """
    if batch.indices.size == 0:
        return SparseVector.empty()
    uniq, inv = union(batch)
    m = uniq.size
    contrib = batch.contributions()
    is_neg = contrib < 0
    bins = inv * 2 + is_neg
    mass = np.bincount(bins, weights=contrib, minlength=2 * m)
    pos_mass, neg_mass = mass[0::2], mass[1::2]
    elected_pos = pos_mass >= -neg_mass
    num = np.where(elected_pos, pos_mass, neg_mass)
    if reduce == "sum":
        return finish(uniq, num, lam)
    absw = batch.abs_weights()
    if isinstance(absw, float):  # all |w| equal: count the agreeing (non-zero) contributions
        agree_w = np.bincount(bins, weights=contrib != 0, minlength=2 * m) * absw
    else:
        agree_w = np.bincount(bins, weights=np.where(contrib != 0, absw, 0.0), minlength=2 * m)
    den = np.where(elected_pos, agree_w[0::2], agree_w[1::2])
    out = np.divide(num, den, out=np.zeros(m), where=den > 0)
    return finish(uniq, out, lam)
