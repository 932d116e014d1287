"""Writing a merged backbone tensor by tensor, and reading base checkpoints lazily.

:class:`BaseCheckpoint` exposes a base model's weights under *backbone* names (as in
``AutoModel``'s state dict, the names adapters use) without loading the model: it builds the
backbone on the ``meta`` device to learn the names and shapes, then maps the checkpoint's
safetensors keys onto them, stripping the task-model prefix (``base_model_prefix``:
``bert.``, ``model.``, ...) where the checkpoint was saved from a task model. Keys that are
not backbone weights (``lm_head``, ``cls.*``, stale buffers such as ``position_ids``) are
dropped. Tensors are read one at a time from the
offsets in the safetensors header, with positioned reads rather than a memory map, so the
resident set holds one tensor at a time (a memory map would keep every touched page of the
base resident until it is unmapped).

:func:`save_merged_model` writes the merged multi-head directory (see
:mod:`sparsemerge.formats.merged`). The backbone is *streamed*: the output shards are planned
from the checkpoint's header (names, dtypes, shapes), then each base tensor is read, its
fingerprint hash checked if it is a target, the merged delta added in fp32 at its indices
(O(nnz)), the result cast back to the checkpoint's dtype and written straight into its shard.
Peak memory is one tensor plus the merged deltas (O(total nnz)) — not one shard, and not
dependent on how many adapters were merged.

Fallback: a base without a local safetensors checkpoint whose keys map cleanly onto the
backbone (a GGUF file, ``pytorch_model.bin``, legacy key names, weights missing from the file)
is loaded whole with transformers (GGUF dequantised to fp32), the deltas applied with
:func:`sparsemerge.apply.apply` (which checks the fingerprint) and its state dict written with
the same shard writer (``save_pretrained`` refuses GGUF-loaded models); memory is then the
whole model. The report says which path ran and why.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import struct
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsemerge.adapter import BaseInfo, SparseAdapter, TargetDelta
from sparsemerge.errors import BaseMismatchError, SparseMergeError
from sparsemerge.formats.merged import (
    CARD_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    SINGLE_WEIGHTS,
    ST_DTYPES,
    ST_NAMES,
    ShardPlan,
    TensorSpec,
    check_task_name,
    head_config,
    parse_size,
    write_head,
    write_recipe,
    write_shards,
)
from sparsemerge.models import quiet_transformers, resolve_base, tensor_hash

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def load_config(base: str | Path | None, gguf_file: str | None = None):
    from transformers import AutoConfig

    path, gguf = resolve_base(base, gguf_file)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise SparseMergeError(f"cannot read the config of base model {path}: {exc}") from None


def meta_backbone(config) -> nn.Module:
    """The backbone (``AutoModel``) for ``config`` on the meta device: names and shapes only."""
    from transformers import AutoModel

    with quiet_transformers(), torch.device("meta"):
        return AutoModel.from_config(config)


def _local_dir(path: str) -> Path | None:
    p = Path(path)
    if p.is_dir():
        return p
    try:  # a Hub id: the checkpoint files through the cache (downloads unless offline)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # no network, no such repo, ...: the fallback path loads the model
        return None


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file (absolute byte offset)."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_safetensors_header(file: Path) -> list[StoredTensor]:
    """The tensors of a safetensors file, from its header alone (validated), in file order."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= min(size - 8, 100 * 2**20):
                raise SparseMergeError(f"{file}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SparseMergeError(f"{file}: unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise SparseMergeError(f"{file}: corrupt safetensors header")
    out = []
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
            itemsize = torch.empty((), dtype=ST_DTYPES[dtype]).element_size()
        except (KeyError, TypeError, ValueError):
            raise SparseMergeError(f"{file}: tensor {key}: unsupported or invalid header entry "
                                   f"{spec!r}") from None
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if not (isinstance(b, int) and isinstance(e, int) and 0 <= b <= e
                and e - b == nbytes and 8 + n + e <= size):
            raise SparseMergeError(f"{file}: tensor {key}: data offsets {[b, e]} do not fit "
                                   f"its dtype/shape or the file size")
        out.append(StoredTensor(file, key, dtype, shape, 8 + n + b, nbytes))
    return sorted(out, key=lambda st: st.start)


class BaseCheckpoint:
    """A model's weights under backbone names, read tensor by tensor (see the module doc).

    ``streamable`` is False (with ``reason``) when the weights cannot be mapped from local
    safetensors files; :meth:`tensor` then loads the backbone once with transformers.
    """

    def __init__(self, base: str | Path | None, gguf_file: str | None = None):
        self.base = base
        self.path, self.gguf_file = resolve_base(base, gguf_file)
        self.config = load_config(base, gguf_file)
        self.reason: str | None = None
        self.dropped: list[str] = []
        self._handles: dict[Path, Any] = {}
        self._model: nn.Module | None = None
        try:
            bb = meta_backbone(self.config)
        except Exception as exc:  # an architecture transformers cannot build from config
            raise SparseMergeError(f"base model {self.path}: cannot build its backbone with "
                                   f"transformers' AutoModel: {exc}") from None
        self.backbone_class = type(bb).__name__
        self.prefix: str = getattr(bb, "base_model_prefix", "") or ""
        self.shapes = {k: tuple(v.shape) for k, v in bb.state_dict().items()}
        self.linear_weights = [f"{n}.weight" for n, m in bb.named_modules()
                               if isinstance(m, nn.Linear)]
        self.hidden_size = getattr(self.config.get_text_config(), "hidden_size", None) \
            if hasattr(self.config, "get_text_config") else getattr(self.config, "hidden_size",
                                                                     None)
        del bb
        self.entries: dict[str, StoredTensor] = {}  # backbone name -> where it is stored
        self.extra: dict[str, StoredTensor] = {}  # checkpoint key -> non-backbone tensors
        self._map_keys()

    # -- key mapping -------------------------------------------------------------------------

    def _files(self) -> list[Path] | None:
        if self.gguf_file is not None:
            self.reason = f"the base is a GGUF file ({self.gguf_file})"
            return None
        d = _local_dir(self.path)
        if d is None:
            self.reason = f"no local copy of {self.path}"
            return None
        index = d / INDEX_NAME
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
                return [d / f for f in sorted(set(wm.values()))]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.reason = f"unreadable {index}: {exc}"
                return None
        if (d / SINGLE_WEIGHTS).is_file():
            return [d / SINGLE_WEIGHTS]
        found = sorted(d.glob("*.safetensors"))
        if len(found) == 1:
            return found
        self.reason = f"no {SINGLE_WEIGHTS} in {d}"
        return None

    def _map_keys(self) -> None:
        files = self._files()
        if files is None:
            return
        pre = f"{self.prefix}." if self.prefix else None
        for file in files:
            try:
                stored = read_safetensors_header(file)
            except SparseMergeError as exc:  # odd or corrupt file: let transformers try
                self.reason = str(exc)
                self.entries.clear()
                return
            for st in stored:
                name = st.key
                if name not in self.shapes and pre and name.startswith(pre):
                    name = name[len(pre):]
                if name in self.shapes and name not in self.entries:
                    self.entries[name] = st
                else:
                    self.extra[st.key] = st
                    self.dropped.append(st.key)
        missing = [n for n in self.shapes if n not in self.entries]
        if missing:
            self.reason = (f"{len(missing)} backbone weight(s) are not in the checkpoint under "
                           f"the expected names (e.g. {missing[0]})")
            return
        for name, st in self.entries.items():
            if st.shape != self.shapes[name]:
                raise SparseMergeError(
                    f"base model {self.path}: tensor {st.key} has shape {st.shape} but its "
                    f"config makes {self.shapes[name]}; the checkpoint and config.json disagree")

    @property
    def streamable(self) -> bool:
        return self.reason is None

    # -- reading -----------------------------------------------------------------------------

    def read(self, st: StoredTensor) -> torch.Tensor:
        """Read one stored tensor with a positioned read into a fresh tensor (no mmap, so
        resident memory is this tensor only), and drop its pages from the page cache."""
        f = self._handles.get(st.file)
        if f is None:
            f = self._handles[st.file] = open(st.file, "rb")  # noqa: SIM115 (kept open)
        t = torch.empty(st.shape, dtype=ST_DTYPES[st.dtype])
        if st.nbytes:
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            n = os.preadv(f.fileno(), [buf], st.start) if hasattr(os, "preadv") else None
            if n is None:
                f.seek(st.start)
                n = f.readinto(buf)
            if n != st.nbytes:
                raise SparseMergeError(f"{st.file}: tensor {st.key} is truncated ({n} of "
                                       f"{st.nbytes} bytes)")
            if hasattr(os, "posix_fadvise"):
                with contextlib.suppress(OSError):
                    os.posix_fadvise(f.fileno(), st.start, st.nbytes, os.POSIX_FADV_DONTNEED)
        return t

    def backbone_model(self) -> nn.Module:
        """The backbone loaded whole (fallback path; cached)."""
        if self._model is None:
            from sparsemerge.models import load_backbone

            self._model = load_backbone(self.path, self.gguf_file)
        return self._model

    def tensor(self, name: str) -> torch.Tensor:
        """The base tensor ``name`` (backbone naming), as stored (a copy)."""
        if name not in self.shapes:
            raise SparseMergeError(f"base model {self.path} has no tensor {name}")
        if self.streamable:
            return self.read(self.entries[name])
        return self.backbone_model().state_dict()[name].detach().clone()

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """A lazy mapping name -> tensor (what ``models.check_base`` takes)."""
        ckpt = self

        class _Lazy(Mapping):
            def __getitem__(self, k):
                return ckpt.tensor(k)

            def __contains__(self, k):
                return k in ckpt.shapes

            def __iter__(self):
                return iter(ckpt.shapes)

            def __len__(self):
                return len(ckpt.shapes)

        return _Lazy()

    def base_info(self, names: list[str], model_id: str | None = None) -> BaseInfo:
        """Fingerprint of the named tensors (as ``models.base_info`` computes it)."""
        hashes = {n: tensor_hash(n, self.tensor(n)) for n in sorted(names)}
        from sparsemerge.models import DEMO_BASE_ID

        if model_id is None:
            model_id = DEMO_BASE_ID if self.base is None else str(self.base)
        return BaseInfo(model_id=model_id,
                        fingerprint=fingerprint_of(hashes), tensor_hashes=hashes,
                        architecture=self.backbone_class)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self._model = None


def fingerprint_of(hashes: Mapping[str, str]) -> str:
    """The overall fingerprint from per-tensor hashes (the formula of ``models.fingerprint``)."""
    h = hashlib.sha256("".join(f"{n}={hashes[n]};" for n in sorted(hashes)).encode())
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------- writing


def _mismatch(expected: BaseInfo, found: str, name: str, shape) -> str:
    return (f"wrong base model: the merged adapters expect {expected.model_id}"
            f"{'@' + expected.revision if expected.revision else ''} (fingerprint "
            f"{expected.fingerprint or 'unknown'}), found {found}; tensor {name} (shape "
            f"{tuple(shape)}) differs from the one the adapters were made on. Pass --base with "
            "the model they were trained on, or --force (force=True) to merge anyway.")


def check_targets(ckpt: BaseCheckpoint, targets: Mapping[str, TargetDelta]) -> None:
    """Every target exists in the base backbone with the adapter's shape."""
    missing = [n for n in targets if n not in ckpt.shapes]
    if missing:
        some = next(iter(ckpt.shapes), "?")
        raise BaseMismatchError(
            f"wrong base model: {len(missing)} target tensor(s) of the merged adapters do not "
            f"exist in {ckpt.path} (e.g. {missing[0]}; its backbone names look like {some})")
    for n, t in targets.items():
        if tuple(t.shape) != ckpt.shapes[n]:
            raise BaseMismatchError(f"tensor {n}: the base {ckpt.path} has shape "
                                    f"{ckpt.shapes[n]}, the merged adapters {tuple(t.shape)}")


def stream_backbone(ckpt: BaseCheckpoint, targets: Mapping[str, TargetDelta], out_dir: Path,
                    *, max_shard_size: int, expected: BaseInfo | None = None,
                    force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Write base + deltas as safetensors shards into ``out_dir`` (streaming path)."""
    from sparsemerge.apply import add_delta_

    check_targets(ckpt, targets)
    order = sorted(ckpt.entries.items(), key=lambda kv: (str(kv[1].file), kv[1].start))
    specs = [TensorSpec(name, st.dtype, st.shape) for name, st in order]
    plan = ShardPlan.plan(specs, max_shard_size)
    total, done = len(specs), 0
    hashes = expected.tensor_hashes if expected is not None else {}
    warned = False

    def produce(spec: TensorSpec) -> torch.Tensor:
        nonlocal done, warned
        t = ckpt.read(ckpt.entries[spec.name])
        target = targets.get(spec.name)
        if target is not None:
            want = hashes.get(spec.name)
            if want is not None and tensor_hash(spec.name, t) != want:
                msg = _mismatch(expected, str(ckpt.path), spec.name, t.shape)
                if not force:
                    raise BaseMismatchError(msg)
                if not warned:
                    warnings.warn(msg, stacklevel=2)
                    warned = True
            if not t.is_floating_point():
                raise SparseMergeError(f"tensor {spec.name} is {t.dtype}; deltas only apply "
                                       "to floating-point weights")
            add_delta_(t, target, spec.name)
        done += 1
        if progress is not None:
            progress("write", done, total)
        return t

    files = write_shards(out_dir, plan, produce)
    return {"streamed": True, "files": files, "shards": len(plan.shards),
            "bytes": plan.total_size, "tensors": total, "dropped_keys": len(ckpt.dropped)}


def load_and_save_backbone(ckpt: BaseCheckpoint, adapter: SparseAdapter, out_dir: Path, *,
                           max_shard_size: int, force: bool = False,
                           progress: Progress | None = None) -> dict[str, Any]:
    """Fallback: load the whole backbone, apply, ``save_pretrained`` (memory = the model)."""
    from sparsemerge.apply import apply

    check_targets(ckpt, adapter.targets)
    model = ckpt.backbone_model()
    bare = SparseAdapter(targets=adapter.targets, base=adapter.base)
    apply(model, bare, force=force)
    # write the state dict with the same shard writer (save_pretrained refuses models loaded
    # from GGUF: transformers marks them as quantized)
    sd = model.state_dict()
    specs = []
    for name, t in sd.items():
        if t.dtype not in ST_NAMES:
            raise SparseMergeError(f"tensor {name} has dtype {t.dtype}, which cannot be saved")
        specs.append(TensorSpec(name, ST_NAMES[t.dtype], tuple(t.shape)))
    plan = ShardPlan.plan(specs, max_shard_size)
    done = 0

    def produce(spec: TensorSpec) -> torch.Tensor:
        nonlocal done
        done += 1
        if progress is not None:
            progress("write", done, len(specs))
        return sd[spec.name].detach()

    files = write_shards(out_dir, plan, produce)
    return {"streamed": False, "reason": ckpt.reason, "files": files,
            "shards": len(plan.shards), "bytes": plan.total_size, "tensors": len(specs)}


def _backbone_config(ckpt: BaseCheckpoint, pad_token_id: int | None):
    cfg = copy.deepcopy(ckpt.config)
    cfg.architectures = [ckpt.backbone_class]
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "pad_token_id", None) is None and pad_token_id is not None:
        text.pad_token_id = pad_token_id
        cfg.pad_token_id = pad_token_id
    return cfg


def _readable(path: Path) -> None:
    """mkdtemp makes the directory 0700; give it the usual permissions (umask applied)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)


def save_merged_model(adapter: SparseAdapter, out: str | Path, *,
                      base: str | Path | None = None, gguf_file: str | None = None,
                      recipe: Mapping[str, Any] | None = None,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
                      progress: Progress | None = None, card_info: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Write ``adapter`` (a merged adapter with one head per task) as a merged multi-head
    model directory at ``out``, atomically. ``base`` defaults to the base the adapters were
    trained on. Returns a report (files, shards, bytes, streamed or not, seconds)."""
    from sparsemerge._version import __version__
    from sparsemerge.card import merged_card
    from sparsemerge.formats.atomic import atomic_directory
    from sparsemerge.models import adapter_base, load_tokenizer, resolve_pad_token_id
    from sparsemerge.task_heads import head_model

    t0 = time.perf_counter()
    limit = parse_size(max_shard_size)
    if not adapter.heads:
        raise SparseMergeError("none of the merged adapters has a classification head, so "
                               "there is nothing to put under heads/; merge without --heads to "
                               "write a merged adapter")
    for task in adapter.heads:
        check_task_name(task)
    base, gguf_file = adapter_base(adapter, None if base is None else str(base), gguf_file)
    ckpt = BaseCheckpoint(base, gguf_file)
    tok = load_tokenizer(base, gguf_file)
    pad = resolve_pad_token_id(tok)
    config = _backbone_config(ckpt, pad)
    head_cfgs: dict[str, dict[str, Any]] = {}
    for task, head in adapter.heads.items():
        cfg = head_config(task, module=head.module, labels=head.labels,
                          problem_type=head.problem_type, hidden_size=ckpt.hidden_size,
                          architecture="", pad_token_id=pad)
        try:
            model = head_model(config, cfg, head.params)
        except SparseMergeError as exc:
            raise SparseMergeError(f"head {task}: {exc}") from None
        cfg["architecture"] = type(model).__name__
        head_cfgs[task] = cfg
    report: dict[str, Any] = {"output": str(out), "tasks": list(adapter.heads)}
    with atomic_directory(out) as tmp:
        _readable(tmp)
        if ckpt.streamable:
            report.update(stream_backbone(ckpt, adapter.targets, tmp, max_shard_size=limit,
                                          expected=adapter.base, force=force,
                                          progress=progress))
            config.save_pretrained(tmp)
        else:
            report.update(load_and_save_backbone(ckpt, adapter, tmp, max_shard_size=limit,
                                                 force=force, progress=progress))
            config.save_pretrained(tmp)  # architectures = the backbone, pad id set
        ckpt.close()
        with quiet_transformers():
            tok.save_pretrained(tmp)
        for task, head in adapter.heads.items():
            write_head(tmp, task, head.params, head_cfgs[task])
        b = adapter.base
        body = {
            **(dict(recipe) if recipe else {}),
            "sparsemerge_version": __version__,
            "tasks": list(adapter.heads),
            "base": {"model_id": b.model_id, "revision": b.revision,
                     "fingerprint": b.fingerprint, "architecture": b.architecture,
                     "loaded_from": str(ckpt.path), "gguf_file": ckpt.gguf_file},
            "backbone": {"files": report["files"], "streamed": report["streamed"],
                         "max_shard_size": limit, "architecture": ckpt.backbone_class},
            "merged": {"targets": len(adapter.targets),
                       "nnz": sum(t.sparse.nnz for t in adapter.targets.values()
                                  if t.sparse is not None)},
        }
        body.setdefault("method", adapter.hyperparameters.get("merge_method", adapter.method))
        body.setdefault("parameters", adapter.hyperparameters.get("parameters", {}))
        body.setdefault("inputs", [])
        write_recipe(tmp, body)
        info = dict(card_info or {})
        info.setdefault("base_model", b.model_id)
        info.setdefault("method", body["method"])
        info.setdefault("tasks", list(adapter.heads))
        info.setdefault("labels", {t: h.labels for t, h in adapter.heads.items()})
        info.setdefault("parameters", body["parameters"])
        info.setdefault("sources", [{"path": i.get("path"), "task": ", ".join(i.get("tasks", [])),
                                     "weight": i.get("weight")} for i in body["inputs"]])
        info.setdefault("trainable", body["merged"]["nnz"])
        (tmp / CARD_NAME).write_text(merged_card(info))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report
