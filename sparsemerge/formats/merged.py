"""The merged multi-head model directory: layout, low-level writers and the validating reader.

Layout (``sparsemerge merge --heads -o OUT``)::

    OUT/
      config.json                         the backbone's config (architectures = [e.g. BertModel])
      model.safetensors                   backbone weights, or shards
      model-00001-of-0000N.safetensors    ... with model.safetensors.index.json when N > 1
      tokenizer files                     as the base's tokenizer saves them
      heads/<task>/head.safetensors       the task's head parameters ("weight", "bias", ...)
      heads/<task>/head_config.json       HEAD_FORMAT, task, module, labels, id2label, label2id,
                                          problem_type, num_labels, hidden_size,
                                          architecture (the task-model class), pad_token_id,
                                          prompt (optional: the head's prompt template)
      sparsemerge_recipe.json             RECIPE_FORMAT: method, parameters, weights, inputs
                                          (path, kind, sha256, tasks, weight), base (id,
                                          revision, fingerprint), tasks, backbone files,
                                          sparsemerge version
      README.md                           model card (card.merged_card)

``AutoModel.from_pretrained(OUT)`` loads the backbone alone; :class:`MultiHeadModel` loads the
backbone and every head. This module knows nothing of merging: it writes safetensors shards
tensor by tensor (:class:`ShardPlan` / :func:`write_shards`), head files and the recipe, and
reads a directory back with full validation (:func:`read_merged`), raising
:class:`~sparsemerge.errors.FormatError` naming the offending file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from sparsemerge.adapter import is_prompt
from sparsemerge.errors import FormatError, SparseMergeError
from sparsemerge.formats import strict_json

RECIPE_NAME = "sparsemerge_recipe.json"
RECIPE_FORMAT = "sparsemerge-merged-model"
RECIPE_VERSION = 1
HEADS_DIR = "heads"
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"
HEAD_FORMAT = "sparsemerge-head"
CARD_NAME = "README.md"
SINGLE_WEIGHTS = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 2 * 10**9
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
MAX_TASK_NAME_BYTES = 255  # a folder name (NAME_MAX on Linux and macOS)
MAX_JSON_BYTES = 64 * 1024 * 1024
FINITE_CHUNK_BYTES = 64 * 1024 * 1024  # NaN/Inf scan of backbone shards: block size

# safetensors dtype names <-> torch dtypes (what the streaming writer can copy through)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def task_name_problem(task: object) -> str | None:
    """Why ``task`` cannot name a head (its folder ``heads/<task>/``), or ``None`` if it can.

    Any string is a task name except what is unsafe as one folder name: the empty string,
    ``.`` and ``..``, path separators (``/``, ``\\``), control characters (NUL, newlines,
    ...), leading or trailing whitespace (Windows drops trailing spaces, and the command line
    strips them) and more than 255 bytes in UTF-8. Dots, spaces, ``=`` and names of Python
    attributes (``train``, ``to``) are fine: heads are held by name, never as attributes.
    """
    if not isinstance(task, str):
        return f"must be a string, not {type(task).__name__}"
    if not task:
        return "is empty"
    if task in (".", ".."):
        return "would name the heads folder itself or its parent"
    if "/" in task or "\\" in task:
        return "contains a path separator ('/' or '\\')"
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in task):
        return "contains a control character"
    if task != task.strip():
        return "starts or ends with whitespace"
    size = len(task.encode("utf-8"))  # no surrogates left (category Cs above)
    if size > MAX_TASK_NAME_BYTES:
        return f"is {size} bytes in UTF-8; a folder name holds at most {MAX_TASK_NAME_BYTES}"
    return None


def check_task_name(task: str, error: type[SparseMergeError] = SparseMergeError,
                    hint: str = "") -> str:
    """``task`` if it can name a head folder, else ``error`` saying why (see
    :func:`task_name_problem`), followed by ``hint`` (how to choose another name)."""
    why = task_name_problem(task)
    if why is not None:
        raise error(f"task name {task!r} {why}, so it cannot name the head's folder "
                    f"heads/<task>/{hint}")
    return task


def check_task_names(tasks: Iterable[str], error: type[SparseMergeError] = SparseMergeError,
                     hint: str = "") -> list[str]:
    """Every name checked, and no two that would share a folder on a case-insensitive or
    Unicode-normalising file system (macOS, Windows): ``SST2`` and ``sst2`` cannot both be
    heads of one merged model."""
    seen: dict[str, str] = {}
    out = []
    for task in tasks:
        check_task_name(task, error, hint)
        key = unicodedata.normalize("NFC", task).casefold()
        if key in seen and seen[key] != task:
            raise error(f"task names {seen[key]!r} and {task!r} differ only in case (or Unicode "
                        "form), so their folders heads/<task>/ would be one folder on macOS "
                        f"and Windows{hint}")
        seen.setdefault(key, task)
        out.append(task)
    return out


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or digits with a unit as transformers takes them
    (``"2GB"`` = 2·10⁹, ``"500MB"``, ``"64KB"``, ``"1GiB"`` = 2³⁰, ``"512KiB"``, ``"100B"``)."""
    if isinstance(size, bool):
        raise SparseMergeError(f"invalid size {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.I)
        if not m:
            raise SparseMergeError(
                f"invalid size {size!r}: use a number of bytes or digits with a unit, e.g. "
                "2GB, 500MB, 1GiB")
        unit = (m.group(2) or "B").upper()
        mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
                "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise SparseMergeError(f"invalid size {size!r}: must be positive")
    return n


# --------------------------------------------------------------------------------- shards


@dataclass
class TensorSpec:
    """One tensor of an output shard: its name, safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=ST_DTYPES[self.dtype]).element_size()


@dataclass
class ShardPlan:
    """Tensors assigned to shard files of at most ``max_shard_size`` bytes, in order.

    A tensor larger than the limit gets a shard of its own (as transformers does). One shard
    is called ``model.safetensors``; several are ``model-0000i-of-0000N.safetensors`` and an
    index ``model.safetensors.index.json`` maps every tensor to its file.
    """

    shards: list[list[TensorSpec]] = field(default_factory=list)

    @classmethod
    def plan(cls, tensors: Iterable[TensorSpec], max_shard_size: int) -> ShardPlan:
        out = cls()
        size = 0
        for t in tensors:
            if not out.shards or (out.shards[-1] and size + t.nbytes > max_shard_size):
                out.shards.append([])
                size = 0
            out.shards[-1].append(t)
            size += t.nbytes
        if not out.shards:
            out.shards.append([])
        return out

    def file_names(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return [SINGLE_WEIGHTS]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s)


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in specs:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors pads
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _drop_cache(f) -> None:
    """Flush a finished shard and tell the kernel its pages need not stay cached, so page
    cache for GBs of output does not pile up under a memory cap (best effort)."""
    f.flush()
    os.fsync(f.fileno())
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def write_shards(out_dir: Path, plan: ShardPlan, produce: Callable[[TensorSpec], torch.Tensor],
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``plan`` into ``out_dir``, calling ``produce(spec)`` for each tensor in order.

    Each shard's header is known from the plan, so every tensor is written as soon as it is
    produced and then dropped: peak memory is one tensor, not one shard. Returns the file
    names (the index file included when there are several shards).
    """
    metadata = {"format": "pt", **(metadata or {})}
    names = plan.file_names()
    weight_map: dict[str, str] = {}
    for specs, fname in zip(plan.shards, names, strict=True):
        with open(out_dir / fname, "wb") as f:
            f.write(_header(specs, metadata))
            for spec in specs:
                t = produce(spec)
                if tuple(t.shape) != spec.shape or ST_NAMES.get(t.dtype) != spec.dtype:
                    raise SparseMergeError(
                        f"tensor {spec.name}: produced {tuple(t.shape)} {t.dtype}, planned "
                        f"{spec.shape} {spec.dtype}")
                data = _tensor_bytes(t)
                if data.nbytes != spec.nbytes:
                    raise SparseMergeError(f"tensor {spec.name}: {data.nbytes} bytes, planned "
                                           f"{spec.nbytes}")
                f.write(data)
                weight_map[spec.name] = fname
                del t, data
            _drop_cache(f)
    if len(names) > 1:
        index = {"metadata": {"total_size": plan.total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        names = [*names, INDEX_NAME]
    return names


# --------------------------------------------------------------------------------- heads


def head_config(task: str, *, module: str, labels: list[str], problem_type: str,
                hidden_size: int | None, architecture: str, pad_token_id: int | None,
                prompt: dict[str, Any] | None = None) -> dict[str, Any]:
    """A head's ``head_config.json``; ``prompt``: the template its inputs are wrapped in
    (``Head.prompt``), stored only when there is one."""
    return {
        "format": HEAD_FORMAT,
        "format_version": RECIPE_VERSION,
        "task": task,
        "module": module,
        "labels": list(labels),
        "num_labels": len(labels),
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "problem_type": problem_type,
        "hidden_size": hidden_size,
        "architecture": architecture,
        "pad_token_id": pad_token_id,
        **({"prompt": dict(prompt)} if prompt is not None else {}),
    }


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A whole safetensors file, byte-reproducible: tensors sorted by name, the header written
    by :func:`_header` (``safetensors.torch.save`` orders ``__metadata__`` keys differently
    from one process to the next, so identical inputs gave different bytes)."""
    names = sorted(tensors)
    specs = [TensorSpec(n, ST_NAMES[tensors[n].dtype], tuple(tensors[n].shape)) for n in names]
    return _header(specs, metadata) + b"".join(bytes(_tensor_bytes(tensors[n])) for n in names)


def write_head(out_dir: Path, task: str, params: dict[str, torch.Tensor],
               config: dict[str, Any]) -> Path:
    """``out_dir/heads/<task>/{head.safetensors, head_config.json}`` (inside an atomic dir);
    the same head gives the same bytes."""
    d = out_dir / HEADS_DIR / check_task_name(task)
    d.mkdir(parents=True, exist_ok=True)
    (d / HEAD_WEIGHTS).write_bytes(safetensors_bytes(params, {"format": "pt", "task": task}))
    (d / HEAD_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return d


def write_recipe(out_dir: Path, recipe: dict[str, Any]) -> None:
    body = {"format": RECIPE_FORMAT, "format_version": RECIPE_VERSION, **recipe}
    (out_dir / RECIPE_NAME).write_text(
        json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------- reading


@dataclass
class HeadFiles:
    """One task's head as read from ``heads/<task>/``."""

    task: str
    config: dict[str, Any]
    params: dict[str, torch.Tensor]
    path: Path

    @property
    def labels(self) -> list[str]:
        return list(self.config["labels"])


@dataclass
class MergedFiles:
    """A validated merged-model directory (weights themselves are left to transformers)."""

    path: Path
    recipe: dict[str, Any]
    config: dict[str, Any]
    weight_files: list[str]
    heads: dict[str, HeadFiles]

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise FormatError(f"{file}: no such file (is this a sparsemerge merged-model directory?)")
    if file.stat().st_size > MAX_JSON_BYTES:
        raise FormatError(f"{file}: larger than {MAX_JSON_BYTES} bytes; not a config file")
    return strict_json.loads(file.read_bytes(), str(file))


def is_merged_dir(path: str | Path) -> bool:
    """True when ``path`` looks like a merged multi-head model directory (has the recipe)."""
    return (Path(path) / RECIPE_NAME).is_file()


def _weight_files(path: Path) -> list[str]:
    index = path / INDEX_NAME
    if index.is_file():
        data = _read_json(index)
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise FormatError(f"{index}: 'weight_map' must map tensor names to file names")
        files = sorted(set(wm.values()))
        for f in files:
            try:
                ok = not ("/" in f or "\\" in f or f.startswith(".")) and (path / f).is_file()
            except (OSError, ValueError):  # a name too long or with NUL bytes
                ok = False
            if not ok:
                raise FormatError(f"{index}: shard {f!r} is missing or not a plain file name")
        return files
    if (path / SINGLE_WEIGHTS).is_file():
        return [SINGLE_WEIGHTS]
    raise FormatError(f"{path}: no {SINGLE_WEIGHTS} or {INDEX_NAME}: the backbone weights "
                      "are missing")


def _check_shard_header(file: Path) -> list[tuple[str, str, int, int]]:
    """Cheap structural check of a safetensors file (header only, no tensor data read).

    Returns each tensor's name, dtype name and absolute byte span in the file.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{file}: truncated safetensors file")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, MAX_JSON_BYTES):
                raise FormatError(f"{file}: not a safetensors file (bad header length)")
            raw = f.read(n)
    except OSError as exc:
        raise FormatError(f"{file}: cannot read: {exc}") from None
    header = strict_json.loads(raw, f"{file}: safetensors header")
    if not isinstance(header, dict):
        raise FormatError(f"{file}: corrupt safetensors header")
    spans = []
    for name, spec in header.items():
        if name == "__metadata__":
            if not (isinstance(spec, dict)
                    and all(isinstance(v, str) for v in spec.values())):
                raise FormatError(f"{file}: __metadata__ must map strings to strings")
            continue
        spans.append((*_tensor_span(file, name, spec), name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise FormatError(f"{file}: tensor {name}: data_offsets leave a gap or overlap")
        end = stop
    if 8 + n + end != size:
        raise FormatError(f"{file}: size {size} does not match its header ({8 + n + end} "
                          "bytes expected); the file is truncated or corrupt")
    return [(name, header[name]["dtype"], 8 + n + start, 8 + n + stop)
            for start, stop, name in spans]


def _check_finite(file: Path, spans: list[tuple[str, str, int, int]]) -> None:
    """No NaN / Inf in any floating-point tensor of a shard whose header is checked.

    Streams the file in blocks of at most :data:`FINITE_CHUNK_BYTES` into one reused
    buffer, so memory stays bounded whatever the shard size; the pages read are the ones
    transformers reads next, so loading pays little extra.
    """
    buf = bytearray(min(FINITE_CHUNK_BYTES, max((b - a for _, _, a, b in spans), default=0)))
    try:
        with open(file, "rb") as f:
            for name, dtype_name, start, stop in spans:
                dtype = ST_DTYPES[dtype_name]
                if not dtype.is_floating_point or stop == start:
                    continue
                step = len(buf) - len(buf) % dtype.itemsize
                f.seek(start)
                for lo in range(start, stop, step):
                    got = f.readinto(memoryview(buf)[:min(step, stop - lo)])
                    if not got:
                        raise FormatError(f"{file}: tensor {name}: the file ends early")
                    block = torch.frombuffer(buf, dtype=dtype, count=got // dtype.itemsize)
                    if not torch.isfinite(block if dtype.itemsize > 1 else block.float()).all():
                        raise FormatError(f"{file}: tensor {name} contains NaN or Inf")
    except OSError as exc:
        raise FormatError(f"{file}: cannot read: {exc}") from None


def _naturals(xs: Any) -> bool:
    return isinstance(xs, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)


def _tensor_span(file: Path, name: str, spec: Any) -> tuple[int, int]:
    """A header entry's byte span, checked against its dtype and shape."""
    if not isinstance(spec, dict) or spec.get("dtype") not in ST_DTYPES:
        raise FormatError(f"{file}: tensor {name}: missing or unknown dtype")
    shape, offs = spec.get("shape"), spec.get("data_offsets")
    if not _naturals(shape) or not (_naturals(offs) and len(offs) == 2 and offs[0] <= offs[1]):
        raise FormatError(f"{file}: tensor {name}: invalid shape or data_offsets")
    itemsize = torch.empty((), dtype=ST_DTYPES[spec["dtype"]]).element_size()
    if offs[1] - offs[0] != math.prod(shape) * itemsize:
        raise FormatError(f"{file}: tensor {name}: {offs[1] - offs[0]} bytes do not hold "
                          f"{spec['dtype']} {shape}")
    return offs[0], offs[1]


def _field(obj: dict, key: str, kind: type | tuple, file: Path) -> Any:
    if key not in obj:
        raise FormatError(f"{file}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"{file}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def read_head(path: Path, task: str) -> HeadFiles:
    d = path / HEADS_DIR / task
    cfile, wfile = d / HEAD_CONFIG, d / HEAD_WEIGHTS
    cfg = _read_json(cfile)
    if not isinstance(cfg, dict) or cfg.get("format") != HEAD_FORMAT:
        raise FormatError(f"{cfile}: format is not {HEAD_FORMAT!r}")
    if cfg.get("format_version") != RECIPE_VERSION:
        raise FormatError(f"{cfile}: format_version {cfg.get('format_version')!r} is not "
                          f"supported (reads {RECIPE_VERSION}); upgrade sparsemerge")
    if _field(cfg, "task", str, cfile) != task:
        raise FormatError(f"{cfile}: task {cfg['task']!r} does not match its directory {task!r}")
    labels = _field(cfg, "labels", list, cfile)
    if not labels or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        raise FormatError(f"{cfile}: labels must be a non-empty list of distinct strings")
    if _field(cfg, "num_labels", int, cfile) != len(labels):
        raise FormatError(f"{cfile}: num_labels {cfg['num_labels']} != {len(labels)} labels")
    id2label = _field(cfg, "id2label", dict, cfile)
    if id2label != {str(i): n for i, n in enumerate(labels)}:
        raise FormatError(f"{cfile}: id2label does not match labels")
    if _field(cfg, "problem_type", str, cfile) not in PROBLEM_TYPES:
        raise FormatError(f"{cfile}: problem_type {cfg['problem_type']!r} is not one of "
                          f"{', '.join(PROBLEM_TYPES)}")
    module = _field(cfg, "module", str, cfile)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", module):
        raise FormatError(f"{cfile}: module {module!r} is not an attribute name")
    _field(cfg, "architecture", str, cfile)
    pad = cfg.get("pad_token_id")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 0):
        raise FormatError(f"{cfile}: pad_token_id must be a non-negative integer or null")
    if cfg.get("prompt") is not None and not is_prompt(cfg["prompt"]):
        raise FormatError(f"{cfile}: prompt must be an object {{template: string, chat: "
                          f"boolean}}")
    if not wfile.is_file():
        raise FormatError(f"{wfile}: no such file")
    if wfile.stat().st_size > 2**34:
        raise FormatError(f"{wfile}: implausibly large for a classification head")
    try:
        params = safetensors.torch.load(wfile.read_bytes())
    except Exception as exc:  # the parser reports corruption with several exception types
        raise FormatError(f"{wfile}: corrupt safetensors file: {exc}") from None
    if not params:
        raise FormatError(f"{wfile}: holds no tensors")
    for name, t in params.items():
        if not t.is_floating_point():
            raise FormatError(f"{wfile}: tensor {name} is {t.dtype}, expected floating point")
        if not torch.isfinite(t.float()).all():
            raise FormatError(f"{wfile}: tensor {name} contains NaN or Inf")
    return HeadFiles(task, cfg, params, d)


def read_merged(path: str | Path) -> MergedFiles:
    """Validate a merged-model directory and read its recipe, config and heads.

    Every backbone shard's header is checked against its size and every floating-point
    tensor in it is scanned for NaN / Inf (streamed, see :func:`_check_finite`); head
    tensors likewise. Failures raise :class:`FormatError` naming the file and tensor.
    """
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"{path}: not a directory (a merged model is a directory)")
    recipe_file = path / RECIPE_NAME
    recipe = _read_json(recipe_file)
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise FormatError(f"{recipe_file}: format is not {RECIPE_FORMAT!r}")
    if recipe.get("format_version") != RECIPE_VERSION:
        raise FormatError(f"{recipe_file}: format_version {recipe.get('format_version')!r} is "
                          f"not supported (reads {RECIPE_VERSION}); upgrade sparsemerge")
    tasks = _field(recipe, "tasks", list, recipe_file)
    for t in tasks:
        why = task_name_problem(t)
        if why is not None:
            raise FormatError(f"{recipe_file}: invalid task name {t!r}: it {why}")
    if len(set(tasks)) != len(tasks):
        raise FormatError(f"{recipe_file}: duplicate task names in {tasks}")
    _field(recipe, "method", str, recipe_file)
    _field(recipe, "parameters", dict, recipe_file)
    _field(recipe, "inputs", list, recipe_file)
    config_file = path / "config.json"
    config = _read_json(config_file)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise FormatError(f"{config_file}: not a transformers config (no model_type)")
    files = _weight_files(path)
    for f in files:
        _check_finite(path / f, _check_shard_header(path / f))
    heads_dir = path / HEADS_DIR
    on_disk = sorted(p.name for p in heads_dir.iterdir() if p.is_dir()) if heads_dir.is_dir() \
        else []
    extra = sorted(set(on_disk) - set(tasks))
    if extra:
        raise FormatError(f"{heads_dir}: head directories {extra} are not listed in "
                          f"{RECIPE_NAME}")
    heads = {t: read_head(path, t) for t in tasks}
    return MergedFiles(path, recipe, config, files, heads)
