"""The mutator registry and one adapter case: :func:`mutate` picks a corpus file and applies
one to three registered mutators (the ``mutate_*`` modules register them).

A mutator is a function of a :class:`Ctx` that edits ``ctx.doc`` (directly, or by queueing
header / text / byte edits) and returns ``False`` where it does not apply.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .safetensors_doc import Doc

MUTATORS: dict[str, tuple[str, float, Callable]] = {}


def mutator(family: str, weight: float = 1.0):
    def register(fn):
        MUTATORS[fn.__name__] = (family, weight, fn)
        return fn
    return register


@dataclass
class Ctx:
    rng: random.Random
    doc: Doc
    corpus: dict[str, bytes]
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)


def pick_tensor(c: Ctx, suffix: str | None = None, prefix: str | None = None) -> str | None:
    names = sorted(n for n in c.doc.tensors if (suffix is None or n.endswith(suffix))
                   and (prefix is None or n.startswith(prefix)))
    return c.rng.choice(names) if names else None


def mutate(corpus: dict[str, bytes], seed: int, case: int) -> tuple[str, list[str], bytes, str]:
    """(corpus file, mutator names, mutated bytes, notes) of case ``case`` (deterministic)."""
    rng = random.Random(f"sparsemerge-fuzz:{seed}:{case}")
    source = rng.choice(sorted(corpus))
    doc = Doc(corpus[source])
    k = rng.choices([1, 2, 3], [0.6, 0.25, 0.15])[0]
    ctx = Ctx(rng, doc, corpus)
    chosen = apply_mutators(ctx, k)
    return source, chosen, doc.to_bytes(), "; ".join(ctx.notes)


def apply_mutators(ctx: Ctx, k: int) -> list[str]:
    """Apply ``k`` applicable mutators to ``ctx.doc``; return their names."""
    def apply(name: str) -> bool:
        family, _, fn = MUTATORS[name]
        if family == "config" and not isinstance(ctx.doc.config, dict):
            return False
        return fn(ctx) is not False  # a mutator returns False where it does not apply

    return draw_applicable(ctx, k, {n: w for n, (_, w, _) in MUTATORS.items()}, apply)


def draw_applicable(ctx: Ctx, k: int, weights: dict[str, float],
                    apply: Callable[[str], bool]) -> list[str]:
    """Draw names by weight and ``apply`` them until ``k`` applied (at most ``20 * k``
    draws); return the applied names in order. A draw that does not apply (``apply`` returns
    False, or raises: an earlier mutation made it inapplicable) is drawn again."""
    names = sorted(weights)
    w = [weights[n] for n in names]
    chosen: list[str] = []
    for _ in range(20 * k):
        if len(chosen) == k:
            break
        name = ctx.rng.choices(names, w)[0]
        try:
            if apply(name):
                chosen.append(name)
        except Exception as exc:
            ctx.note(f"{name} skipped ({type(exc).__name__})")
    return chosen
