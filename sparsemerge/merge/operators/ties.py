"""``ties``: TIES-Merging (trim, elect sign, disjoint mean) on sparse deltas.

1. Trim: each adapter keeps its ``ceil(density * nnz_i)`` largest-magnitude entries, where
   ``nnz_i`` is that adapter's OWN number of non-zeros (not the tensor's size: computing it
   over numel, as mergekit and PEFT do, keeps almost nothing of an already sparse adapter,
   cf. mergekit issue #258).  Magnitude ties go to the lower index.
2. Elect: per entry, the sign of the total weighted mass ``sum_i w_i * v_i`` of the trimmed
   deltas (0 elects +).
3. Disjoint mean: ``sum_agree w_i v_i / sum_agree |w_i|`` over the adapters whose trimmed
   contribution is non-zero and has the elected sign; then scale by ``lam``.

With all weights 1 and a trim that keeps the same entries this equals
``peft.utils.merge_utils.ties`` (PEFT elects on unweighted values and divides by the count of
agreeing adapters; mergekit divides by the agreeing weights' sum - equal for positive weights).

Default density 0.2 is the paper's top-20 %.  Adapters that are already sparse (SpaRTA keeps
~0.5 % of the weights) may prefer a milder trim (0.5-1.0); ``density=1`` disables trimming.
"""

from __future__ import annotations

from typing import Any

from sparsemerge.declare import Param

from .base import LAM, Operator
from .kernels import Batch, SparseVector, disjoint_mean, trim_batch

DENSITY = Param(
    "density", float, 0.2,
    "fraction of each adapter's own non-zeros kept by magnitude before the sign election "
    "(1.0 = no trim)",
    low=0.0, high=1.0, low_open=True,
)


def ties_merge(batch: Batch, density: float, lam: float) -> SparseVector:
    """TIES on a validated batch (shared with ``dare``)."""
    return disjoint_mean(trim_batch(batch, density), lam, reduce="mean")


class Ties(Operator):
    name = "ties"
    summary = (
        "TIES: trim each adapter to its top density-fraction by magnitude, elect the sign "
        "of the total mass, average the agreeing deltas"
    )
    reference = (
        "Yadav, Tam, Choshen, Raffel, Bansal: 'TIES-Merging: Resolving Interference When "
        "Merging Models', NeurIPS 2023, arXiv:2306.01708"
    )
    params = (DENSITY, LAM)

    @classmethod
    def _merge(cls, batch: Batch, **params: Any) -> SparseVector:
        return ties_merge(batch, params["density"], params["lam"])
