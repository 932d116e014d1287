"""What a merge operator is, and the conventions every operator follows.

A merge operator combines, for ONE target tensor, the deltas of several adapters.  It sees
each delta as a :class:`~.kernels.SparseVector` - sorted unique flat indices plus values -
and returns one.  The O(nnz) kernels (``kernels.py``) never build a tensor of the target's
full size.  A per-tensor call costs
~0.1 ms warm, several times that right after a shard load has flushed the caches, so
:meth:`Operator.merge_many` merges many tensors (e.g. a shard's) in one pass with
identical results.

Conventions common to all operators
-----------------------------------
- ``weights[i]`` scales adapter ``i`` (default 1.0 each); every operator also takes ``lam``
  (lambda), a global factor applied to the merged result.
- Stored entries whose value is exactly 0 are ignored (they carry no mass and no sign), so an
  adapter's "own nnz" counts its non-zero values only.
- Entries whose merged value is exactly 0 are dropped from the output, so the output holds
  only non-zeros (an empty vector if nothing survives).
- Sign election (``ties``, ``sign_consensus``, ``dare`` with ``then=ties``): the elected sign
  of an entry is the sign of its total weighted mass ``sum_i w_i * v_i``, with a total of
  exactly 0 electing ``+`` (as PEFT and mergekit do).  Adapter ``i`` *agrees* at an entry
  when its contribution ``w_i * v_i`` is non-zero and has the elected sign.
- Disjoint mean: ``sum_{agreeing} w_i v_i / sum_{agreeing} |w_i|``.  With positive weights
  this is mergekit's normalised TIES; with all weights 1 it is PEFT's (mean over agreeing
  adapters).  Using ``|w_i|`` keeps a negative weight (task negation) a well-defined
  weighted average instead of a division by a possibly vanishing signed sum.

Each operator declares its ``name``, ``reference``, ``summary`` and ``params`` (a tuple of
:class:`Param`) in one place; CLI help, recipe validation and model cards are derived from
those declarations via :meth:`Operator.validate_params` and :meth:`Operator.describe`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sparsemerge.declare import Declared, Param

from .kernels import Batch, SparseVector

__all__ = ["LAM", "Operator"]

LAM = Param(
    "lam", float, 1.0, "global scale (lambda) applied to the merged delta"
)


# --------------------------------------------------------------------------------------------
# Operator base class
# --------------------------------------------------------------------------------------------


class Operator(Declared):
    """Base class of merge operators.  Subclasses declare, in one place:

    - ``name``: registry key (used in recipes and on the command line);
    - ``summary``: one line for help screens;
    - ``reference``: the paper, as a citation string;
    - ``params``: tuple of :class:`Param` (``lam`` must be among them);

    and implement ``_merge(batch, **params)``, which receives the validated inputs as one
    :class:`Batch` (zeros removed; one segment per adapter and tensor) and a complete,
    validated parameter dict, and returns a :class:`SparseVector`; per-entry work must only
    combine entries of the same index and per-adapter work must go segment by segment, so
    that :meth:`merge_many` equals per-tensor :meth:`merge`.  Optionally override
    :meth:`check_params` for constraints between parameters.  Call :meth:`merge` /
    :meth:`merge_many`, never ``_merge`` directly.
    """

    kind = "merge method"
    _abstract = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "lam" not in [p.name for p in cls.params]:
            raise TypeError(f"operator {cls.name}: every operator takes 'lam'")

    @classmethod
    def validate_params(cls, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Fill defaults, convert and check every parameter.

        Raises :class:`SparseMergeError` on an unknown name (listing the known ones) or an
        invalid value.  Returns a new dict holding every declared parameter.
        """
        params = dict(params or {})
        cls.reject_unknown(params)
        where = f"merge method '{cls.name}': "
        out = {p.name: p.check(params[p.name], where) if p.name in params else p.default
               for p in cls.params}
        cls.check_params(out)
        return out

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Constraints between parameters (override; raise SparseMergeError)."""

    # -- merging --------------------------------------------------------------------------

    @classmethod
    def merge(
        cls,
        vectors: Sequence[SparseVector],
        weights: Sequence[float] | None = None,
        **params: Any,
    ) -> SparseVector:
        """Merge one tensor's deltas. ``weights`` defaults to 1.0 per vector.

        Returns a float32 :class:`SparseVector` (CPU) with sorted unique indices and no zeros.
        """
        p = cls.validate_params(params)
        return cls._merge(Batch.from_groups([vectors], weights, cls.name), **p)

    @classmethod
    def merge_many(
        cls,
        groups: Sequence[Sequence[SparseVector]],
        weights: Sequence[float] | None = None,
        numels: Sequence[int] | None = None,
        **params: Any,
    ) -> list[SparseVector]:
        """Merge several tensors in one pass: ``groups[t]`` holds tensor ``t``'s deltas, one
        per adapter (the same adapters, in the same order, for every tensor).

        The result equals ``[merge(g, weights, **params) for g in groups]`` exactly, but the
        per-call overhead (validation, ~70 numpy calls; ~0.1 ms warm, several times that when
        the caches have just been flushed by loading a shard) is paid once: an engine should
        merge a shard's or a layer's tensors together.  Internally tensor ``t``'s indices are
        shifted by ``sum(numels[:t])`` (``numels`` defaults to each group's largest index
        + 1), so segment reductions over the whole batch never mix tensors.
        """
        p = cls.validate_params(params)
        if len(groups) == 0:
            return []
        batch = Batch.from_groups(groups, weights, cls.name, numels)
        out = cls._merge(batch, **p)
        return batch.split_groups(out)

    @classmethod
    def _merge(cls, batch: Batch, **params: Any) -> SparseVector:
        raise NotImplementedError


