"""Mutators of the safetensors header: dtype, shape and ``data_offsets`` lies, missing and
extra keys, dropped / extra / renamed tensors, broken ``__metadata__``, non-object headers
and header text edits."""

from __future__ import annotations

import math

from sparsemerge.formats import adapter_file

from .json_tree import get_at, random_json, sparse_specs
from .mutation import Ctx, mutator, pick_tensor
from .safetensors_doc import ST_DTYPES


@mutator("st_header", 2.0)
def st_dtype_lie(c: Ctx) -> None:
    name = pick_tensor(c)
    if name is None:
        return False
    dt = c.doc.tensors[name][0]
    same = [k for k, (s, _) in ST_DTYPES.items() if s == ST_DTYPES[dt][0] and k != dt]
    new = c.rng.choice(same) if same and c.rng.random() < 0.7 else c.rng.choice(
        [*ST_DTYPES, "F4", "XX", "f32", "", 5, None])
    c.note(f"{name}: dtype {dt} -> {new}")
    c.doc.header_edits.append(lambda h: h[name].__setitem__("dtype", new))


@mutator("st_header", 2.0)
def st_shape_lie(c: Ctx) -> None:
    name = pick_tensor(c)
    if name is None:
        return False
    shape = c.doc.tensors[name][1]
    numel = math.prod(shape)
    options = [[numel, 1], [1, numel], [numel + 1], [max(numel - 1, 0)], [], [0],
               [-1] + shape, shape + [2**40], [2**32, 2**32], [2**63], [2**64 + numel],
               [numel // 2, 2] if numel % 2 == 0 else [numel, 1], [1.5], ["1"], None, [True],
               [2**31] * 8]
    new = c.rng.choice(options)
    c.note(f"{name}: shape {shape} -> {new}")
    c.doc.header_edits.append(lambda h: h[name].__setitem__("shape", new))


@mutator("st_header", 2.0)
def st_offsets_lie(c: Ctx) -> None:
    names = sorted(c.doc.tensors)
    if not names:
        return False
    name = c.rng.choice(names)
    kind = c.rng.choice(["overlap", "past_end", "inverted", "gap", "huge", "negative",
                         "float", "length", "share", "zero"])
    k = c.rng.choice([1, 2, 4, 8, 100])

    def edit(h: dict) -> None:
        s, e = h[name]["data_offsets"]
        total = max(v["data_offsets"][1] for key, v in h.items() if key != "__metadata__")
        new = {"overlap": [max(s - k, 0), e], "past_end": [s, e + k], "inverted": [e, s],
               "gap": [s + k, e + k], "huge": [s, 2**64 - 1], "negative": [-k, e],
               "float": [float(s), e + 0.5], "length": [s, e, e], "zero": [0, 0],
               "share": [0, e - s]}[kind]
        if kind == "past_end":
            new = [s, total + k]
        h[name]["data_offsets"] = new
        c.note(f"{name}: offsets [{s}, {e}] -> {new} ({kind})")
    c.doc.header_edits.append(edit)


@mutator("st_header")
def st_entry_keys(c: Ctx) -> None:
    name = pick_tensor(c)
    if name is None:
        return False
    key = c.rng.choice(["dtype", "shape", "data_offsets", "+extra"])

    def edit(h: dict) -> None:
        if key == "+extra":
            h[name]["extra"] = 1
        else:
            del h[name][key]
    c.note(f"{name}: {key}")
    c.doc.header_edits.append(edit)


@mutator("st_header")
def st_entry_type(c: Ctx) -> None:
    name = pick_tensor(c)
    if name is None:
        return False
    new = random_json(c.rng)
    c.note(f"{name} entry -> {new!r}")
    c.doc.header_edits.append(lambda h: h.__setitem__(name, new))


@mutator("st_header", 1.5)
def drop_tensor(c: Ctx) -> None:
    name = pick_tensor(c)
    if name is None:
        return False
    if c.rng.random() < 0.5:
        del c.doc.tensors[name]
        c.note(f"dropped {name} (header and data)")
    else:
        c.note(f"dropped {name} from the header only")
        c.doc.header_edits.append(lambda h: h.pop(name))


@mutator("st_header", 1.5)
def extra_tensor(c: Ctx) -> None:
    cfg = c.doc.config
    choices = ["sneaky", "targets.", "heads.sst2.extra"]
    for path, key in sparse_specs(cfg):
        spec = get_at(cfg, path)
        if spec.get("codec") in ("seed", "dense"):
            choices.append(f"{key}.indices")
    name = c.rng.choice(choices)
    dt = c.rng.choice(["F32", "I32", "U8", "BF16"])
    n = c.rng.choice([0, 1, 3])
    c.doc.tensors[name] = [dt, [n], bytes(n * ST_DTYPES[dt][0])]
    c.note(f"extra tensor {name} {dt}[{n}]")


@mutator("st_header")
def rename_tensor(c: Ctx) -> None:
    name = pick_tensor(c)
    if name is None:
        return False
    other = c.rng.choice([n for n in c.doc.tensors if n != name] or ["x"])
    new = c.rng.choice([name + "x", name.replace("values", "indices"), other, name.upper()])
    entry = c.doc.tensors.pop(name)
    c.doc.tensors[new] = entry
    c.note(f"renamed {name} -> {new}")


@mutator("st_header")
def st_metadata(c: Ctx) -> None:
    kind = c.rng.randrange(7)
    meta = c.doc.meta
    if kind == 0:
        c.doc.meta = random_json(c.rng)
    elif kind == 1:
        meta["other"] = c.rng.choice(["x", 5, None, ["a"]])
    elif kind == 2:
        value = c.rng.choice([5, None, ["a"], {"a": "b"}, True])
        c.doc.header_edits.append(lambda h: h["__metadata__"].__setitem__(
            adapter_file.METADATA_KEY, value))
    elif kind == 3:
        c.doc.meta = {"format": "pt"}
    elif kind == 4:
        c.doc.header_edits.append(lambda h: h.pop("__metadata__"))
    elif kind == 5:
        c.doc.meta = {"sparsemerge2": "{}", **{k: v for k, v in meta.items()
                                               if k != adapter_file.METADATA_KEY}}
    else:
        c.doc.header_edits.append(lambda h: h.__setitem__("__metadata__", None))
    c.note(f"metadata edit {kind}")


@mutator("st_header", 0.5)
def st_header_type(c: Ctx) -> None:
    value = c.rng.choice([[], "text", 5, [None], [{"a": 1}], {"a": [[[[[[1]]]]]]}])
    c.note(f"header -> {value!r}")
    c.doc.header_edits.append(lambda h: value)


@mutator("st_header", 0.5)
def st_header_text(c: Ctx) -> None:
    kind = c.rng.randrange(5)

    def edit(t: str) -> str:
        if kind == 0:  # duplicate key
            return t.replace("{", '{"__metadata__":{},', 1)
        if kind == 1:  # a lone surrogate escape in a tensor name
            return t.replace('"targets.', '"\\ud800targets.', 1)
        if kind == 2:  # deep nesting
            return t[:-1] + ',"deep":' + "[" * 5000 + "]" * 5000 + "}"
        if kind == 3:  # not JSON
            return t[: len(t) // 2]
        return "\ufeff" + t  # byte order mark
    c.note(f"header text edit {kind}")
    c.doc.header_text_edits.append(edit)
