"""Mutations of merged-model directories (:mod:`sparsemerge.formats.merged`): JSON files
(recipe, config, heads/<task>/head_config.json, the shard index), safetensors files
(backbone shards, heads/<task>/head.safetensors) and the directory layout itself. A case
mutates one to three of them; safetensors files go through the adapter mutators.

A case is a dict of relative path -> bytes, ``"dir"`` (a directory) or ``("link", target)``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from .json_tree import config_nodes, get_at, random_json
from .mutation import Ctx, apply_mutators, draw_applicable
from .safetensors_doc import Doc

MERGED_OPS: dict[str, tuple[float, Callable]] = {}


def merged_op(weight: float = 1.0):
    def register(fn):
        MERGED_OPS[fn.__name__] = (weight, fn)
        return fn
    return register


def _json_files(files: dict) -> list[str]:
    return sorted(f for f, b in files.items() if isinstance(b, bytes) and f.endswith(".json"))


@merged_op(3.0)
def json_node(c: Ctx, files: dict) -> bool:
    names = _json_files(files)
    if not names:
        return False
    f = c.rng.choice(names)
    try:
        obj = json.loads(files[f])
    except ValueError:
        return False
    nodes = config_nodes(obj)
    if not nodes:
        return False
    path = c.rng.choice(nodes)
    parent, key = get_at(obj, path[:-1]), path[-1]
    op = c.rng.choice(["delete", "replace", "replace", "extra"])
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = random_json(c.rng)
    else:
        (parent if isinstance(parent, dict) else obj)["zz_extra"] = random_json(c.rng)
    files[f] = json.dumps(obj, allow_nan=True).encode()
    c.note(f"{f}: {op} at {'/'.join(map(str, path))}")
    return True


@merged_op(2.0)
def json_text(c: Ctx, files: dict) -> bool:
    names = _json_files(files)
    if not names:
        return False
    f = c.rng.choice(names)
    b = files[f]
    kind = c.rng.randrange(9)
    if kind == 0:
        b = b[: c.rng.randrange(len(b) + 1)]
    elif kind == 1:
        b = b"[" * 100_000 + b"]" * 100_000
    elif kind == 2:
        b = b.replace(b": ", b": " + b"9" * 5000 + b", \"x\": ", 1)
    elif kind == 3:
        b = b.replace(b'"', b'"\xff\xfe', 1)
    elif kind == 4:
        b = b"\xef\xbb\xbf" + b
    elif kind == 5:
        b = b.replace(b'": "', b'": "\\ud800', 1)
    elif kind == 6:
        b = c.rng.choice([b"", b"null", b"[]", b"5", b'"x"', b"NaN"])
    elif kind == 7:
        b = b[:-2] + b', "deep": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}"
    else:
        i = c.rng.randrange(max(len(b), 1))
        b = b[:i] + bytes([c.rng.randrange(256)]) + b[i + 1 :]
    files[f] = b
    c.note(f"{f}: text edit {kind}")
    return True


@merged_op(3.0)
def safetensors_file(c: Ctx, files: dict) -> bool:
    names = sorted(f for f, b in files.items() if isinstance(b, bytes) and
                   f.endswith(".safetensors"))
    if not names:
        return False
    f = c.rng.choice(names)
    try:
        doc = Doc(files[f])
    except ValueError:
        return False
    inner = Ctx(c.rng, doc, {f: files[f]})
    chosen = apply_mutators(inner, c.rng.choice([1, 1, 2]))
    files[f] = doc.to_bytes()
    c.note(f"{f}: {', '.join(chosen)} ({'; '.join(inner.notes)})")
    return True


@merged_op()
def layout(c: Ctx, files: dict) -> bool:
    names = sorted(files)
    heads = sorted({f.split("/")[1] for f in names if f.startswith("heads/")})
    kind = c.rng.randrange(9)
    if kind == 0:
        f = c.rng.choice(names)
        del files[f]
        c.note(f"deleted {f}")
    elif kind == 1 and heads:  # an extra head directory not in the recipe
        h = c.rng.choice(heads)
        new = c.rng.choice(["extra", "a b", "..x", "-x", "x" * 200])
        for f in [f for f in names if f.startswith(f"heads/{h}/")]:
            files[f.replace(f"heads/{h}/", f"heads/{new}/")] = files[f]
        c.note(f"copied head {h} to {new}")
    elif kind == 2 and heads:
        h = c.rng.choice(heads)
        for f in [f for f in names if f.startswith(f"heads/{h}/")]:
            files[f.replace(f"heads/{h}/", f"heads/{h}x/")] = files.pop(f)
        c.note(f"renamed head {h}")
    elif kind == 3:  # a file replaced by a directory
        f = c.rng.choice(names)
        files[f] = "dir"
        c.note(f"{f} is a directory")
    elif kind == 4:
        f = c.rng.choice(names)
        files[f] = ("link", c.rng.choice(names))
        c.note(f"{f} is a symlink")
    elif kind == 5:  # an index pointing outside, at a missing shard, or at itself
        target = c.rng.choice(["../outside.safetensors", "missing.safetensors",
                               "model.safetensors.index.json", "/etc/hostname", ".hidden",
                               "config.json"])
        files["model.safetensors.index.json"] = json.dumps(
            {"metadata": {"total_size": 1}, "weight_map": {"pooler.dense.weight": target}}
        ).encode()
        c.note(f"index -> {target}")
    elif kind == 6:  # both a single file and an index
        files.setdefault("model.safetensors", next(
            (b for f, b in files.items() if f.endswith(".safetensors")), b""))
        if "model.safetensors.index.json" not in files:
            files["model.safetensors.index.json"] = b'{"weight_map": {}}'
        c.note("single file and index")
    elif kind == 7:  # a head file holding another task's tensors
        if len(heads) < 2:
            return False
        a, b = heads[:2]
        files[f"heads/{a}/head.safetensors"] = files[f"heads/{b}/head.safetensors"]
        c.note(f"head {a} holds {b}'s tensors")
    else:
        return False
    return True


def mutate_merged(corpus: dict[str, dict[str, bytes]], seed: int, case: int
                  ) -> tuple[str, list[str], dict, str]:
    """(corpus directory, op names, mutated files, notes) of case ``case`` (deterministic)."""
    rng = random.Random(f"sparsemerge-fuzz-merged:{seed}:{case}")
    source = rng.choice(sorted(corpus))
    files: dict[str, Any] = dict(corpus[source])
    ctx = Ctx(rng, Doc.__new__(Doc), {})
    k = rng.choices([1, 2, 3], [0.6, 0.25, 0.15])[0]
    chosen = draw_applicable(ctx, k, {n: w for n, (w, _) in MERGED_OPS.items()},
                             lambda name: bool(MERGED_OPS[name][1](ctx, files)))
    return source, chosen, files, "; ".join(ctx.notes)
