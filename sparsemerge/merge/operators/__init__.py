"""Registry of merge operators.

Adding an operator: write one small module defining an :class:`Operator` subclass (name,
summary, reference, params, ``_merge``) and add it to ``_ALL`` below.
"""

from __future__ import annotations

from sparsemerge.declare import Param
from sparsemerge.errors import SparseMergeError

from .base import Operator
from .dare import Dare
from .kernels import SparseVector
from .linear import Sum, Weighted
from .sign_consensus import SignConsensus
from .ties import Ties

_ALL: tuple[type[Operator], ...] = (Sum, Weighted, Ties, SignConsensus, Dare)

OPERATORS: dict[str, type[Operator]] = {op.name: op for op in _ALL}


def get_operator(name: str) -> type[Operator]:
    """The operator class registered as ``name``; SparseMergeError listing the known ones."""
    try:
        return OPERATORS[name]
    except (KeyError, TypeError):
        raise SparseMergeError(
            f"unknown merge method {name!r}; available: {', '.join(OPERATORS)}"
        ) from None


def operator_params(name: str) -> tuple[Param, ...]:
    """The declared parameters of operator ``name``."""
    return get_operator(name).params


__all__ = [
    "OPERATORS",
    "Dare",
    "Operator",
    "Param",
    "SignConsensus",
    "SparseVector",
    "Sum",
    "Ties",
    "Weighted",
    "get_operator",
    "operator_params",
]
