"""``sum`` and ``weighted`` (task arithmetic): ``lam * sum_i w_i * v_i`` over the union."""

from __future__ import annotations

from typing import Any

from .base import LAM, Operator
from .kernels import Batch, SparseVector, weighted_sum


class Sum(Operator):
    name = "sum"
    summary = "add the (weighted) deltas: lam * sum_i w_i * delta_i"
    reference = (
        "Sum of sparse deltas as in SpaRTA adapter merging; equals task arithmetic "
        "(Ilharco et al., 'Editing Models with Task Arithmetic', ICLR 2023)"
    )
    params = (LAM,)

    @classmethod
    def _merge(cls, batch: Batch, **params: Any) -> SparseVector:
        return weighted_sum(batch, params["lam"])


class Weighted(Sum):
    """Task arithmetic: the same arithmetic as ``sum``, named after its paper."""

    name = "weighted"
    summary = "task arithmetic: lam * sum_i w_i * delta_i (weights default to 1.0)"
    reference = (
        "Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi: "
        "'Editing Models with Task Arithmetic', ICLR 2023, arXiv:2212.04089"
    )
