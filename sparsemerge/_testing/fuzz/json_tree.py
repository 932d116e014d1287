"""JSON helpers: random values of any type (the lies a corrupted config could hold) and
paths into a JSON tree or an adapter config."""

from __future__ import annotations

import random
from typing import Any


def huge_ints() -> list[int]:
    return [2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
            10**30, -1, -(2**31), -(2**63), -(10**30)]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of a random type: the lies a hand-edited or corrupted config could hold."""
    kind = rng.randrange(12 if depth < 2 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, 2, 3, 7, 40, 100, 1000] + huge_ints())
    if kind == 3:
        return rng.choice([0.0, -0.0, 0.5, 1.5, 1e-300, 1e308, -1e308, 2.0**64,
                           float("nan"), float("inf"), float("-inf")])
    if kind == 4:
        return rng.choice(["", "x", "fp32", "bf16", "int4", "seed", "raw", "elias-fano",
                           "dense", "zip", "sparsemerge-adapter", "\ud800", "a" * 1000,
                           "layers.0.q.weight", "1", "NaN", "\x00"])
    if kind == 5:
        return []
    if kind == 6:
        return {}
    if kind == 7:
        return [rng.choice([1, 2, 48, 32, -1, 0, 2**40]) for _ in range(rng.randrange(1, 4))]
    if kind == 8:
        return rng.randrange(-5, 100)
    if kind == 9:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(1, 4))]
    if kind == 10:
        return {rng.choice(["shape", "nnz", "codec", "a", "seed", "x"]): random_json(rng, depth + 1)
                for _ in range(rng.randrange(1, 4))}
    return {"nested": random_json(rng, depth + 1)}


def config_nodes(obj: Any, path: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) into a JSON tree, the root excluded."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((*path, k))
            out += config_nodes(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((*path, i))
            out += config_nodes(v, (*path, i))
    return out


def get_at(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def sparse_specs(cfg: Any) -> list[tuple[tuple, str]]:
    """(config path of a sparse spec, tensor key prefix) for every sparse tensor."""
    out = []
    targets = cfg.get("targets", {}) if isinstance(cfg, dict) else {}
    if not isinstance(targets, dict):
        return out
    for name, spec in targets.items():
        if not isinstance(spec, dict):
            continue
        if isinstance(spec.get("sparse"), dict):
            out.append((("targets", name, "sparse"), f"targets.{name}"))
        lr = spec.get("lowrank")
        if isinstance(lr, dict):
            for f in ("a", "b"):
                if isinstance(lr.get(f), dict):
                    out.append((("targets", name, "lowrank", f), f"targets.{name}.{f}"))
    return out
