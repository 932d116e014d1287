"""Mutators of the sparsemerge config (the JSON in ``__metadata__``): any node deleted or
replaced, targeted lies about nnz, shapes, codecs, dtypes, seeds, gates, heads, format and
base, renamed / dropped targets, invalid JSON text."""

from __future__ import annotations

import copy
import json
import math

from sparsemerge.formats import adapter_file

from .json_tree import config_nodes, get_at, huge_ints, random_json, sparse_specs
from .mutation import Ctx, mutator


@mutator("config", 4.0)
def cfg_random_node(c: Ctx) -> None:
    nodes = config_nodes(c.doc.config)
    if not nodes:
        return False
    path = c.rng.choice(nodes)
    parent = get_at(c.doc.config, path[:-1])
    key = path[-1]
    op = c.rng.choice(["delete", "replace", "replace", "bump", "extra"])
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = random_json(c.rng)
    elif op == "bump":
        v = parent[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            parent[key] = random_json(c.rng)
        else:
            parent[key] = v + c.rng.choice([-1, 1, 2**32, -(2**32)]) if isinstance(v, int) \
                else v * c.rng.choice([-1.0, 2.0, 1e300])
    else:
        target = parent if isinstance(parent, dict) else c.doc.config
        target[c.rng.choice(["zz_extra", "nnz", "seed", "indices"])] = random_json(c.rng)
    c.note(f"config {op} at {'/'.join(map(str, path))}")


@mutator("config", 2.0)
def cfg_nnz(c: Ctx) -> None:
    specs = sparse_specs(c.doc.config)
    if not specs:
        return False
    path, _ = c.rng.choice(specs)
    spec = get_at(c.doc.config, path)
    nnz = spec.get("nnz", 0)
    numel = math.prod(spec["shape"]) if isinstance(spec.get("shape"), list) else 1
    new = c.rng.choice([nnz + 1, nnz - 1, 0, numel, numel + 1, 2 * nnz, *huge_ints(),
                        float(nnz), str(nnz), None, True])
    spec["nnz"] = new
    c.note(f"{'/'.join(path)} nnz {nnz} -> {new!r}")


def _shape_lies(shape: list) -> list:
    numel = math.prod(shape) if shape and all(isinstance(s, int) for s in shape) else 1
    lies = [list(reversed(shape)), [numel], [1, *shape], shape + [1], [s + 1 for s in shape],
            [max(s - 1, 1) for s in shape], [0, numel], [-1, numel], [2**40, 1],
            [2**40 - 1, 2**40 - 1], [2**39] * 3, [2**31] * 8, [1] * 9, [True, numel],
            [float(numel)], [str(numel)], [], None, numel]
    if numel % 2 == 0:
        lies.append([numel // 2, 2])
    return lies


@mutator("config", 2.0)
def cfg_shape(c: Ctx) -> None:
    cfg = c.doc.config
    paths = [p for p in config_nodes(cfg) if p and p[-1] == "shape"]
    if not paths:
        return False
    path = c.rng.choice(paths)
    parent = get_at(cfg, path[:-1])
    old = parent["shape"]
    new = c.rng.choice(_shape_lies(old if isinstance(old, list) else [1]))
    parent["shape"] = new
    if c.rng.random() < 0.4 and path[-2] == "sparse":  # lie consistently at both levels
        get_at(cfg, path[:-2])["shape"] = new
    elif c.rng.random() < 0.4 and len(path) > 2 and isinstance(get_at(cfg, path[:-1]).get(
            "sparse"), dict):
        get_at(cfg, path[:-1])["sparse"]["shape"] = new
    c.note(f"{'/'.join(map(str, path))} {old} -> {new!r}")


@mutator("config", 1.5)
def cfg_codec(c: Ctx) -> None:
    specs = sparse_specs(c.doc.config)
    if not specs:
        return False
    path, _ = c.rng.choice(specs)
    spec = get_at(c.doc.config, path)
    new = c.rng.choice([*adapter_file.CODECS, "zip", "", None, 3, ["raw"]])
    c.note(f"{'/'.join(path)} codec {spec.get('codec')} -> {new!r}")
    spec["codec"] = new
    if new == "seed" and "seed" not in spec:
        spec["seed"] = c.rng.choice([0, 1, 11, 2**64 - 1])


@mutator("config", 1.5)
def cfg_dtype(c: Ctx) -> None:
    cfg = c.doc.config
    paths = [p for p in config_nodes(cfg) if p and p[-1] in ("value_dtype", "dtype")]
    if not paths:
        return False
    path = c.rng.choice(paths)
    new = c.rng.choice(["bf16", "fp16", "fp32", "fp64", "int8", "", None, 16])
    c.note(f"{'/'.join(map(str, path))} -> {new!r}")
    get_at(cfg, path[:-1])[path[-1]] = new


@mutator("config", 1.5)
def cfg_seed(c: Ctx) -> None:
    cfg = c.doc.config
    paths = [p for p in config_nodes(cfg) if p and p[-1] == "seed"]
    if not paths:
        return False
    path = c.rng.choice(paths)
    old = get_at(cfg, path)
    new = c.rng.choice([old + 1 if isinstance(old, int) else 1, 0, 2**64 - 1, 2**64, -1,
                        1.5, "7", None, 10**40])
    get_at(cfg, path[:-1])["seed"] = new
    c.note(f"{'/'.join(map(str, path))} {old} -> {new!r}")


@mutator("config")
def cfg_scalars(c: Ctx) -> None:
    cfg = c.doc.config
    paths = [p for p in config_nodes(cfg) if p and p[-1] in ("gate", "scale")]
    if not paths:
        return False
    path = c.rng.choice(paths)
    new = c.rng.choice([float("nan"), float("inf"), -float("inf"), 1e308, True, "1.0", None,
                        0, -0.0, 2**70])
    get_at(cfg, path[:-1])[path[-1]] = new
    c.note(f"{'/'.join(map(str, path))} -> {new!r}")


@mutator("config", 1.5)
def cfg_heads(c: Ctx) -> None:
    heads = c.doc.config.get("heads")
    if not isinstance(heads, dict) or not heads:
        c.doc.config["heads"] = random_json(c.rng)
        return False
    task = c.rng.choice(sorted(heads))
    h = heads[task]
    kind = c.rng.randrange(9)
    if kind == 0:
        h["labels"] = c.rng.choice([[], [1, 2], "ab", None, ["a"] * 50, [["x"]], ["\ud800"]])
    elif kind == 1:
        h["params"] = c.rng.choice([{}, [], None, {"weight": 5}])
    elif kind == 2:
        p = c.rng.choice(sorted(h["params"]))
        h["params"][p]["shape"] = c.rng.choice([[], [1], [2, 2, 2], None, "2", [-2, 16]])
    elif kind == 3:
        h["module"] = c.rng.choice([None, 5, ""])
    elif kind == 4:
        h["problem_type"] = c.rng.choice([None, 5, "regression"])
    elif kind == 5:
        heads[task + "2"] = copy.deepcopy(h)
    elif kind == 6:
        del heads[task]
    elif kind == 7:
        p = c.rng.choice(sorted(h["params"]))
        h["params"][p + "_x"] = h["params"].pop(p)
    else:
        heads[task] = random_json(c.rng)
    c.note(f"head {task} edit {kind}")


@mutator("config")
def cfg_format(c: Ctx) -> None:
    key = c.rng.choice(["format", "format_version", "base", "method", "hyperparameters",
                        "metrics", "targets", "heads", "extra"])
    new = c.rng.choice([None, 0, 1, 2, 1.0, True, "1", "sparsemerge-adapter", [], {}, "x"])
    if c.rng.random() < 0.3:
        c.doc.config.pop(key, None)
        c.note(f"removed {key}")
    else:
        c.doc.config[key] = new
        c.note(f"{key} -> {new!r}")


@mutator("config")
def cfg_base(c: Ctx) -> None:
    base = c.doc.config.get("base")
    if not isinstance(base, dict):
        return False
    key = c.rng.choice(["model_id", "revision", "fingerprint", "tensor_hashes", "architecture"])
    base[key] = random_json(c.rng)
    c.note(f"base.{key} -> {base[key]!r}")


@mutator("config", 1.5)
def cfg_targets(c: Ctx) -> None:
    targets = c.doc.config.get("targets")
    if not isinstance(targets, dict) or not targets:
        return False
    name = c.rng.choice(sorted(targets))
    kind = c.rng.randrange(6)
    if kind == 0:  # a renamed target: for the seed codec the mask changes (still valid)
        targets[name + ".x"] = targets.pop(name)
    elif kind == 1:
        del targets[name]
    elif kind == 2:
        targets[name + "_copy"] = copy.deepcopy(targets[name])
    elif kind == 3:
        targets[name] = {k: v for k, v in targets[name].items() if k in ("shape", "gate")}
    elif kind == 4:
        targets.clear()
    else:
        c.doc.config["targets"] = [targets]
    c.note(f"target {name} edit {kind}")


@mutator("config", 1.5)
def cfg_text(c: Ctx) -> None:
    text = json.dumps(c.doc.config)
    kind = c.rng.randrange(10)
    if kind == 0:
        new = text[: c.rng.randrange(len(text))]
    elif kind == 1:
        new = "[" * 100_000 + "]" * 100_000
    elif kind == 2:
        new = text.replace('"nnz": ', '"nnz": ' + "1" * 5000 + "0", 1)
    elif kind == 3:
        new = c.rng.choice(["", "null", "[]", "5", '"x"', "{}", "NaN"])
    elif kind == 4:
        i = c.rng.randrange(len(text))
        new = text[:i] + chr(c.rng.randrange(32, 127)) + text[i + 1 :]
    elif kind == 5:
        new = text.replace('"targets": {"', '"targets": {"\\ud800', 1)
    elif kind == 6:
        new = text[:-1] + ', "targets": {}}'
    elif kind == 7:
        new = text.replace('"labels": [', '"labels": ["\\udfff", ', 1)
    elif kind == 8:
        new = text[:-1] + ', "deep": ' + "{\"a\": " * 3000 + "1" + "}" * 3000 + "}"
    else:
        new = text.replace('"gate": ', '"gate": 1e999 * 0 + ', 1)
    c.doc.config_text = new
    c.note(f"config text edit {kind}")
