"""Declarations shared by merge operators and training methods.

A merge operator (``merge/operators``) and a training method (``train/methods``) each say, in
one class body, what they are: ``name``, ``summary``, ``reference`` (the paper) and ``params``
(a tuple of :class:`Param`). Help screens, recipe and option validation and model cards are
derived from that declaration, never restated. This module sits at the bottom of the layering
so that both ``train`` and ``merge`` can use it without importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from sparsemerge.errors import SparseMergeError

__all__ = ["Declared", "Param"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One declared operator parameter.

    ``type`` is ``float``, ``int``, ``str`` or ``bool``.  Optional constraints: ``choices``
    (allowed values), ``low``/``high`` bounds with ``low_open``/``high_open`` marking a bound
    as exclusive.  :meth:`check` converts and validates a value; strings are parsed for
    numeric / bool parameters so command-line ``key=value`` pairs can be passed as they are.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def domain(self) -> str:
        """Human-readable domain, e.g. ``float in (0, 1]`` or ``one of sum|ties``."""
        if self.choices is not None:
            return "one of " + "|".join(str(c) for c in self.choices)
        text = self.type.__name__
        if self.low is not None or self.high is not None:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            left = "(" if self.low_open or self.low is None else "["
            right = ")" if self.high_open or self.high is None else "]"
            text += f" in {left}{lo}, {hi}{right}"
        return text

    def describe(self) -> str:
        return f"{self.name} ({self.domain()}, default {self.default!r}): {self.help}"

    def check(self, value: Any, where: str = "") -> Any:
        """Return ``value`` converted to ``self.type``; raise SparseMergeError if invalid."""
        label = f"{where}parameter '{self.name}'"
        value = self._convert(value, label)
        if self.choices is not None and value not in self.choices:
            raise SparseMergeError(
                f"{label} must be one of {', '.join(map(repr, self.choices))}; got {value!r}"
            )
        if self.type in (int, float):
            if isinstance(value, float) and not math.isfinite(value):
                raise SparseMergeError(f"{label} must be finite; got {value!r}")
            too_low = self.low is not None and (
                value <= self.low if self.low_open else value < self.low
            )
            too_high = self.high is not None and (
                value >= self.high if self.high_open else value > self.high
            )
            if too_low or too_high:
                raise SparseMergeError(f"{label} must be a {self.domain()}; got {value!r}")
        return value

    def _convert(self, value: Any, label: str) -> Any:
        t = self.type
        bad = SparseMergeError(
            f"{label} must be of type {t.__name__}; got {value!r} ({type(value).__name__})"
        )
        if isinstance(value, str) and t is not str:
            s = value.strip()
            try:
                if t is bool:
                    if s.lower() in _TRUE:
                        return True
                    if s.lower() in _FALSE:
                        return False
                    raise bad
                return t(s)
            except ValueError:
                raise bad from None
        if t is bool:
            if isinstance(value, bool):
                return value
            raise bad
        if isinstance(value, bool):  # bool is an int subclass: never accept it as a number
            raise bad
        if t is float:
            if isinstance(value, (int, float)):
                return float(value)
            raise bad
        if t is int:
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        if not isinstance(value, t):
            raise bad
        return value


class Declared:
    """Base of every registry entry (merge operator, training method).

    Subclasses set ``name``, ``summary``, ``reference`` and ``params``; ``kind`` names the
    family in error messages ("merge method", "method"). A subclass that is itself a base
    class sets ``_abstract = True`` in its own body and is not checked.
    """

    kind: ClassVar[str] = "declaration"
    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    _abstract: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_abstract", False):
            return
        for attr in ("name", "summary", "reference"):
            if not isinstance(getattr(cls, attr, None), str):
                raise TypeError(f"{cls.kind} {cls.__name__} must declare '{attr}'")
        names = [p.name for p in cls.params]
        if len(set(names)) != len(names):
            raise TypeError(f"{cls.kind} {cls.name}: duplicate parameter names {names}")

    @classmethod
    def param(cls, name: str) -> Param:
        for p in cls.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {p.name: p.default for p in cls.params}

    @classmethod
    def reject_unknown(cls, params: Mapping[str, Any]) -> None:
        """SparseMergeError naming the unknown keys of ``params`` and the declared ones."""
        known = [p.name for p in cls.params]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise SparseMergeError(
                f"{cls.kind} '{cls.name}' has no parameter(s) {', '.join(unknown)}; "
                f"known: {', '.join(known) or 'none'}"
            )

    @classmethod
    def describe(cls) -> str:
        """Multi-line help text: summary, reference, then one line per parameter."""
        lines = [f"{cls.name}: {cls.summary}", f"  reference: {cls.reference}"]
        lines += [f"  {p.describe()}" for p in cls.params]
        return "\n".join(lines)
