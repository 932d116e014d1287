"""Reading a base checkpoint's tensors one at a time, without building the model.

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

Fingerprint checks live here too: :func:`check_targets` compares the checkpoint's tensors
with what an adapter recorded, before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsemerge.adapter import BaseInfo, TargetDelta
from sparsemerge.errors import BaseMismatchError, SparseMergeError
from sparsemerge.formats.merged import INDEX_NAME, SINGLE_WEIGHTS, ST_DTYPES
from sparsemerge.models import quiet_transformers, resolve_base, tensor_hash

__all__ = ["BaseCheckpoint", "StoredTensor", "check_targets", "fingerprint_of", "gguf_rows",
           "load_config", "meta_backbone", "mismatch_message", "read_safetensors_header"]


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

    def read_rows(self, st: StoredTensor, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of a stored 2-D tensor, each with one positioned read of its bytes
        (a few LM-head rows of a 7B base read a few kilobytes, not the whole matrix)."""
        if len(st.shape) != 2:
            raise SparseMergeError(f"{st.file}: tensor {st.key} has shape {st.shape}, not 2-D")
        n, width = st.shape
        if any(not 0 <= r < n for r in rows):
            raise SparseMergeError(f"{st.file}: tensor {st.key} has {n} rows; asked for {rows}")
        row = st.nbytes // n
        return torch.stack([self.read(dataclasses.replace(st, shape=(width,), nbytes=row,
                                                          start=st.start + r * row))
                            for r in rows])

    def lm_head_rows(self, ids: list[int]) -> torch.Tensor:
        """Rows ``ids`` of the base's own (untied) language-model head, as stored, read from
        the checkpoint alone: a safetensors slice, or the GGUF ``output.weight`` tensor."""
        if self.gguf_file is not None:
            return gguf_rows(self._gguf_path(), "output.weight", ids)
        key = self._lm_head_key()
        st = self.extra.get(key)
        if st is None:
            how = self.reason or f"no tensor {key} in its safetensors files"
            raise SparseMergeError(f"--label-tokens: cannot read the LM head of {self.path} "
                                   f"({how}); label-token heads need a safetensors or GGUF "
                                   "base")
        return self.read_rows(st, ids)

    def _lm_head_key(self) -> str:
        """The checkpoint key of the LM head's weight, from a causal LM built on ``meta``."""
        from transformers import AutoModelForCausalLM

        with quiet_transformers(), torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(self.config)
        head = lm.get_output_embeddings()
        for name, mod in lm.named_modules():
            if mod is head:
                return f"{name}.weight"
        raise SparseMergeError(f"--label-tokens: {type(lm).__name__} has no LM head")

    def _gguf_path(self) -> Path:
        local = Path(self.path) / self.gguf_file
        if local.is_file():
            return local
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.path, self.gguf_file))

    def backbone_model(self, dtype: str | torch.dtype = "auto") -> nn.Module:
        """The backbone loaded whole, in ``dtype`` the first time (fallback path; cached)."""
        if self._model is None:
            from sparsemerge.models import load_backbone

            self._model = load_backbone(self.path, self.gguf_file, dtype=dtype)
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


def gguf_rows(file: Path, name: str, rows: list[int]) -> torch.Tensor:
    """Rows ``rows`` of the GGUF tensor ``name``, dequantised to fp32. The reader maps the
    file; only the selected rows' blocks are dequantised (and so read)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(file)
    found = next((t for t in reader.tensors if t.name == name), None)
    if found is None:
        raise SparseMergeError(f"{file}: no tensor {name} (a GGUF with tied embeddings keeps "
                               "no separate LM head)")
    data = found.data.reshape(int(found.shape[-1]), -1)  # one row per vocabulary entry
    if any(not 0 <= r < data.shape[0] for r in rows):
        raise SparseMergeError(f"{file}: tensor {name} has {data.shape[0]} rows; asked for "
                               f"{rows}")
    out = dequantize(data[rows], found.tensor_type)
    return torch.from_numpy(out.astype("float32")).reshape(len(rows), -1)


def fingerprint_of(hashes: Mapping[str, str]) -> str:
    """The overall fingerprint from per-tensor hashes (the formula of ``models.fingerprint``)."""
    h = hashlib.sha256("".join(f"{n}={hashes[n]};" for n in sorted(hashes)).encode())
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------- writing


def mismatch_message(expected: BaseInfo, found: str, name: str, shape) -> str:
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
