"""Overlap statistics between sparse deltas (what merging two adapters will run into).

For two deltas ``a`` and ``b`` of the same tensor (:class:`SparseVector`), with *shared*
entries = indices stored in both (explicit zeros included - this is about the masks):

- ``nnz_a``, ``nnz_b``: stored entries; ``intersection``, ``union``; ``jaccard`` = inter/union;
- ``sign_agreement``: fraction of shared entries with ``sign(a) == sign(b)`` (0 == 0 counts);
- ``ties_sign_conflicts``: shared entries with ``a * b < 0`` - where TIES's sign election
  drops one side (whichever has less weighted mass);
- ``cosine``: cosine similarity of ``a`` and ``b`` restricted to the shared entries;
- ``magnitude_correlation``: Pearson correlation of ``|a|`` and ``|b|`` on the shared entries.

A ratio with an empty denominator (no shared entries, zero norm, fewer than two shared entries
or zero variance) is ``None``.

Per-layer and whole-model figures must not average per-tensor ratios.  :class:`PairStats`
keeps additive accumulators (counts, dot product and squared norms, and the centred moments of
the magnitudes, combined with Chan et al.'s parallel update) so that ``sum`` of per-tensor
stats gives exactly the stats of the concatenated tensors; :func:`aggregate_stats` groups by
layer.  Cost: O(nnz_a + nnz_b log nnz_b) per pair, no dense tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import combinations
from typing import Any

import torch

from .operators.kernels import SparseVector

__all__ = [
    "PairStats",
    "aggregate_stats",
    "layer_of",
    "pair_stats",
    "pairwise_stats",
]

_F64 = torch.float64


@dataclass
class PairStats:
    """Additive accumulators for the overlap of two sparse deltas (see module doc)."""

    nnz_a: int = 0
    nnz_b: int = 0
    intersection: int = 0
    sign_equal: int = 0
    sign_conflicts: int = 0
    dot: float = 0.0  # sum over shared entries of a*b
    sq_a: float = 0.0  # sum over shared entries of a^2
    sq_b: float = 0.0
    # centred moments of x = |a|, y = |b| over the shared entries (n = intersection)
    mean_x: float = 0.0
    mean_y: float = 0.0
    m2_x: float = 0.0
    m2_y: float = 0.0
    c_xy: float = 0.0

    @classmethod
    def from_vectors(cls, a: SparseVector, b: SparseVector) -> PairStats:
        a = a.validate("overlap statistics: first vector")
        b = b.validate("overlap statistics: second vector")
        ia, va = a.indices, a.values.to(_F64)
        ib, vb = b.indices, b.values.to(_F64)
        st = cls(nnz_a=int(ia.numel()), nnz_b=int(ib.numel()))
        if ia.numel() == 0 or ib.numel() == 0:
            return st
        pos = torch.searchsorted(ib, ia).clamp_(max=ib.numel() - 1)
        shared = ib[pos] == ia
        n = int(shared.sum())
        if n == 0:
            return st
        xa, xb = va[shared], vb[pos[shared]]
        st.intersection = n
        st.sign_equal = int((torch.sign(xa) == torch.sign(xb)).sum())
        st.sign_conflicts = int(((xa * xb) < 0).sum())
        st.dot = float((xa * xb).sum())
        st.sq_a = float((xa * xa).sum())
        st.sq_b = float((xb * xb).sum())
        x, y = xa.abs(), xb.abs()
        mx, my = x.mean(), y.mean()
        dx, dy = x - mx, y - my
        st.mean_x, st.mean_y = float(mx), float(my)
        st.m2_x, st.m2_y = float((dx * dx).sum()), float((dy * dy).sum())
        st.c_xy = float((dx * dy).sum())
        return st

    # -- combining ------------------------------------------------------------------------

    def __add__(self, other: PairStats) -> PairStats:
        if not isinstance(other, PairStats):
            return NotImplemented
        na, nb = self.intersection, other.intersection
        n = na + nb
        out = PairStats(
            nnz_a=self.nnz_a + other.nnz_a,
            nnz_b=self.nnz_b + other.nnz_b,
            intersection=n,
            sign_equal=self.sign_equal + other.sign_equal,
            sign_conflicts=self.sign_conflicts + other.sign_conflicts,
            dot=self.dot + other.dot,
            sq_a=self.sq_a + other.sq_a,
            sq_b=self.sq_b + other.sq_b,
        )
        if n == 0:
            return out
        if na == 0 or nb == 0:
            src = self if nb == 0 else other
            out.mean_x, out.mean_y = src.mean_x, src.mean_y
            out.m2_x, out.m2_y, out.c_xy = src.m2_x, src.m2_y, src.c_xy
            return out
        # Chan, Golub & LeVeque's pairwise update of means and co-moments
        ddx = other.mean_x - self.mean_x
        ddy = other.mean_y - self.mean_y
        f = na * nb / n
        out.mean_x = self.mean_x + ddx * nb / n
        out.mean_y = self.mean_y + ddy * nb / n
        out.m2_x = self.m2_x + other.m2_x + ddx * ddx * f
        out.m2_y = self.m2_y + other.m2_y + ddy * ddy * f
        out.c_xy = self.c_xy + other.c_xy + ddx * ddy * f
        return out

    def __radd__(self, other: Any) -> PairStats:
        if other == 0:  # lets builtin sum() start from 0
            return self
        return NotImplemented

    # -- derived figures ------------------------------------------------------------------

    @property
    def union(self) -> int:
        return self.nnz_a + self.nnz_b - self.intersection

    def summary(self) -> dict[str, Any]:
        """The figures listed in the module doc (JSON-able; ``None`` where undefined)."""
        n, union = self.intersection, self.union
        norm = math.sqrt(self.sq_a) * math.sqrt(self.sq_b)
        var = math.sqrt(self.m2_x) * math.sqrt(self.m2_y)
        return {
            "nnz_a": self.nnz_a,
            "nnz_b": self.nnz_b,
            "intersection": n,
            "union": union,
            "jaccard": n / union if union else None,
            "sign_agreement": self.sign_equal / n if n else None,
            "ties_sign_conflicts": self.sign_conflicts,
            "cosine": _clip(self.dot / norm) if norm > 0 else None,
            "magnitude_correlation": _clip(self.c_xy / var) if n >= 2 and var > 0 else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """The raw accumulators (JSON-able; round-trips through :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PairStats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _clip(x: float) -> float:
    return max(-1.0, min(1.0, x))


def pair_stats(a: SparseVector, b: SparseVector) -> dict[str, Any]:
    """Overlap figures of two deltas of one tensor (see the module doc for definitions)."""
    return PairStats.from_vectors(a, b).summary()


_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(name: str) -> str:
    """Group key of a tensor name: the prefix up to its first numeric component.

    ``encoder.layer.3.attention.self.query.weight`` -> ``encoder.layer.3``;
    ``model.layers.12.mlp.up_proj.weight`` -> ``model.layers.12``; names without a numeric
    component (embeddings, poolers, final norms) -> ``other``.
    """
    m = _LAYER.match(name)
    return m.group(1) if m else "other"


def aggregate_stats(
    per_tensor: Mapping[str, PairStats],
    group: Callable[[str], str] = layer_of,
) -> tuple[dict[str, PairStats], PairStats]:
    """Sum per-tensor accumulators into per-group (default: per-layer) and overall totals.

    Returns ``(groups, overall)``; groups keep first-seen order.  Ratios computed from the
    sums (``.summary()``) are exact pooled figures - e.g. jaccard = sum(inter) / sum(union),
    cosine from the summed dot products and norms - never averages of per-tensor ratios.
    """
    groups: dict[str, PairStats] = {}
    overall = PairStats()
    for name, st in per_tensor.items():
        key = group(name)
        groups[key] = groups[key] + st if key in groups else st
        overall = overall + st
    return groups, overall


def pairwise_stats(
    adapters: Mapping[str, Mapping[str, SparseVector]],
    tensors: Iterable[str] | None = None,
) -> dict[tuple[str, str], dict[str, PairStats]]:
    """Per-tensor :class:`PairStats` for every pair of adapters.

    ``adapters`` maps adapter name -> {tensor name -> delta}.  Tensors missing from one side
    count as empty there.  ``tensors`` restricts (and orders) the tensor names.
    """
    names: Sequence[str] = list(adapters)
    if tensors is None:
        seen: dict[str, None] = {}
        for a in names:
            seen.update(dict.fromkeys(adapters[a]))
        tensors = list(seen)
    tensors = list(tensors)
    empty = SparseVector.empty()
    out: dict[tuple[str, str], dict[str, PairStats]] = {}
    for a, b in combinations(names, 2):
        out[(a, b)] = {
            t: PairStats.from_vectors(adapters[a].get(t, empty), adapters[b].get(t, empty))
            for t in tensors
        }
    return out
