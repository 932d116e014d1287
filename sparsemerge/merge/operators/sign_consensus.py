"""``sign_consensus``: TIES without the trim.

Elect each entry's sign from the total weighted mass, keep only the contributions that agree,
and combine them by ``reduce``: ``sum`` (drop the minority sign, add the rest - a conflict-free
variant of plain summation, the default) or ``mean`` (TIES's disjoint mean, i.e. ``ties`` with
``density=1``).
"""

from __future__ import annotations

from typing import Any

from sparsemerge.declare import Param

from .base import LAM, Operator
from .kernels import Batch, SparseVector, disjoint_mean


class SignConsensus(Operator):
    name = "sign_consensus"
    summary = (
        "elect the sign of the total mass per entry, drop disagreeing deltas, then sum or "
        "average the rest"
    )
    reference = (
        "Sign election and disjoint merge of TIES-Merging (Yadav et al., NeurIPS 2023, "
        "arXiv:2306.01708), without trimming"
    )
    params = (
        Param(
            "reduce", str, "sum",
            "how agreeing deltas combine: 'sum' adds them, 'mean' is TIES's disjoint mean",
            choices=("sum", "mean"),
        ),
        LAM,
    )

    @classmethod
    def _merge(cls, batch: Batch, **params: Any) -> SparseVector:
        return disjoint_mean(batch, params["lam"], reduce=params["reduce"])
