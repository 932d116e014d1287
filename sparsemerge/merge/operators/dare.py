"""``dare``: Drop And REscale, then combine.

For adapter ``i`` (its position in the input list), each non-zero entry is dropped
independently with probability ``p`` and the survivors are divided by ``1 - p`` (so the
expected delta is unchanged).  The drop decisions come from ``torch.rand`` on a fresh
``torch.Generator`` seeded with :func:`adapter_seed` ``(seed, i)`` for every tensor, one
draw per non-zero entry in index order: the same (seed, inputs) give the same merge, also
through ``merge_many`` (with the same torch version; torch does not promise its CPU random
stream across releases).  Note that adapter i's mask for a tensor depends only on (seed, i,
its nnz there), so two tensors with equal nnz get the same drop pattern (positions in their
own index lists) - harmless for independent tensors, but worth knowing.  The dropped deltas
are then combined by ``then``: ``sum`` (DARE + task arithmetic; ``density`` must stay 1) or
``ties`` (TIES with trim ``density``, relative to each adapter's surviving non-zeros; the
default ``density=1`` skips the trim, which is mergekit's ``dare_ties``).

``p`` is a drop rate as in the paper (PEFT and mergekit take the keep rate ``density = 1-p``).
Default ``p = 0.5``: the paper drops up to 90-99 % of a full fine-tune's delta, but a sparse
adapter has far fewer entries to spare.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sparsemerge.declare import Param
from sparsemerge.errors import SparseMergeError

from .base import LAM, Operator
from .kernels import Batch, SparseVector, weighted_sum
from .ties import ties_merge

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def adapter_seed(seed: int, position: int) -> int:
    """63-bit generator seed for the adapter at ``position``: splitmix64 of both."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) >> 1


def dare_keep_mask(seed: int, position: int, n: int, p: float) -> torch.Tensor:
    """Bool mask over an adapter's ``n`` non-zeros (in index order): True = kept."""
    if p <= 0.0:
        return torch.ones(n, dtype=torch.bool)
    gen = torch.Generator().manual_seed(adapter_seed(seed, position))
    return torch.rand(n, generator=gen) >= p


def drop_and_rescale(batch: Batch, seed: int, p: float) -> Batch:
    """Drop each adapter's non-zeros with probability ``p``; divide survivors by ``1 - p``."""
    if p <= 0.0:
        return batch
    keep = np.concatenate(
        [
            dare_keep_mask(seed, i, n, p).numpy()
            for i, n in zip(batch.positions, batch.lengths, strict=True)
        ]
    )
    out = batch.select(keep)
    out.values = out.values / np.float32(1.0 - p)
    return out


class Dare(Operator):
    name = "dare"
    summary = (
        "DARE: drop each non-zero delta with probability p, rescale survivors by 1/(1-p), "
        "then combine by sum or ties"
    )
    reference = (
        "Yu, Yu, Yu, Huang, Li: 'Language Models are Super Mario: Absorbing Abilities from "
        "Homologous Models as a Free Lunch', ICML 2024, arXiv:2311.03099"
    )
    params = (
        Param("p", float, 0.5, "drop probability per non-zero entry", low=0.0, high=1.0,
              high_open=True),
        Param("seed", int, 0, "seed of the drop masks (one stream per adapter position)",
              low=0),
        Param("then", str, "sum", "how the dropped deltas are combined",
              choices=("sum", "ties")),
        Param("density", float, 1.0,
              "with then=ties: fraction of each adapter's surviving non-zeros kept by "
              "magnitude (1.0 = no trim)",
              low=0.0, high=1.0, low_open=True),
        LAM,
    )

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        if params["then"] != "ties" and params["density"] != 1.0:
            raise SparseMergeError(
                f"merge method 'dare': parameter 'density' applies only with then=ties "
                f"(got then={params['then']!r}, density={params['density']!r})"
            )

    @classmethod
    def _merge(cls, batch: Batch, **params: Any) -> SparseVector:
        dropped = drop_and_rescale(batch, params["seed"], params["p"])
        if params["then"] == "ties":
            return ties_merge(dropped, params["density"], params["lam"])
        return weighted_sum(dropped, params["lam"])
