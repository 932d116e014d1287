"""Apply an adapter to a model in place, undo it exactly, or save the result as a HF model.

Applying writes ``W0 + delta`` into the base weights and keeps the original values at the
touched indices, so ``undo()`` restores the base bit-exactly (no ``W - delta`` round-off).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparsemerge.adapter import Head, SparseAdapter, TargetDelta
from sparsemerge.errors import SparseMergeError
from sparsemerge.models import backbone_of, check_base, head_module_name, named_base_tensors


@dataclass
class _Saved:
    tensor: torch.Tensor
    indices: torch.Tensor | None  # None: the whole tensor was saved
    original: torch.Tensor


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def prefault_for_write(weight: torch.Tensor) -> None:
    """Fault in ``weight``'s pages for writing in one kernel call (best effort).

    transformers and safetensors map the base file lazily (copy-on-write). A sparse write
    touches nearly every page (0.5 % density is ~5 entries per 4 KiB page), and taking those
    copy-on-write faults one trap at a time cost 2.7x more than this batched populate on
    MiniLM (46 ms vs 17 ms, bench/format.py). On resident memory it is a no-op, but not a
    free one (~60 us per MiniLM target): ``AdapterSwitcher`` calls it once per base tensor and
    skips it on every switch.
    """
    madvise = _madvise()
    if madvise is None or weight.device.type != "cpu" or weight.numel() == 0:
        return
    start = weight.data_ptr()
    aligned = start - start % mmap.PAGESIZE
    madvise(aligned, start + weight.numel() * weight.element_size() - aligned,
            _MADV_POPULATE_WRITE)  # an error (old kernel, odd mapping) just means no prefault


def add_delta_(weight: torch.Tensor, target: TargetDelta, name: str, *,
               prefault: bool = True) -> _Saved:
    """Write ``weight + delta`` into ``weight`` (computed in fp32, on the weight's device);
    return what undoes it.

    Call under ``torch.no_grad()``. Gathers/scatters use index_select/scatter_, which cost a
    fraction of advanced indexing's per-call overhead (this runs once per target tensor).
    """
    if target.init is None and target.lowrank is None and target.sparse is not None:
        flat = weight.view(-1)
        if prefault:
            prefault_for_write(flat)
        idx = target.sparse.indices.to(weight.device)
        original = flat.index_select(0, idx)
        delta = target.sparse.values.to(weight.device, torch.float32)
        if target.gate != 1.0:
            delta = delta * target.gate
        flat.scatter_(0, idx, (original.float() + delta).to(weight.dtype))
        return _Saved(weight, idx, original)
    original = weight.detach().clone()
    weight.copy_((original.float() + target.dense_delta(name).to(weight.device)).to(weight.dtype))
    return _Saved(weight, None, original)


def _restore(saved: _Saved) -> None:
    if saved.indices is None:
        saved.tensor.copy_(saved.original)
    else:
        saved.tensor.view(-1).scatter_(0, saved.indices, saved.original)


@dataclass
class AppliedAdapter:
    """Handle returned by :func:`apply`; ``undo()`` restores the model exactly."""

    model: nn.Module | None
    task: str | None
    saved: list[_Saved] = field(default_factory=list)

    @torch.no_grad()
    def undo(self) -> None:
        for s in reversed(self.saved):
            _restore(s)
        self.saved.clear()


def pick_head(adapter: SparseAdapter, task: str | None) -> tuple[str, Head] | None:
    if not adapter.heads:
        return None
    if task is None:
        if len(adapter.heads) > 1:
            raise SparseMergeError(f"the adapter has heads for {', '.join(adapter.heads)}; "
                                   "choose one with task=... (--task)")
        task = next(iter(adapter.heads))
    if task not in adapter.heads:
        raise SparseMergeError(f"the adapter has no head for task {task!r}; it has "
                               f"{', '.join(adapter.heads)}")
    return task, adapter.heads[task]


def apply_to_tensors(tensors: Mapping[str, torch.Tensor], adapter: SparseAdapter, *,
                     found_id: str = "the given tensors", force: bool = False) -> AppliedAdapter:
    """Apply the adapter's deltas to base tensors named as in the backbone's state dict."""
    check_base(adapter.base, tensors, list(adapter.targets), found_id=found_id, force=force)
    return add_deltas(tensors, adapter)


def add_deltas(tensors: Mapping[str, torch.Tensor], adapter: SparseAdapter, *,
               prefault: bool = True) -> AppliedAdapter:
    """Apply the adapter's deltas without checking the base fingerprint (which hashes every
    target tensor): for a caller that checked this base once already and switches often
    (and, with ``prefault=False``, made the targets resident for writing already)."""
    handle = AppliedAdapter(None, None)
    with torch.no_grad():
        for name, target in adapter.targets.items():
            weight = tensors[name]
            if tuple(weight.shape) != target.shape:
                handle.undo()
                raise SparseMergeError(f"tensor {name}: the base has shape "
                                       f"{tuple(weight.shape)}, the adapter {target.shape}")
            handle.saved.append(add_delta_(weight.data, target, name, prefault=prefault))
    return handle


def apply(model: nn.Module, adapter: SparseAdapter, *, task: str | None = None,
          force: bool = False) -> AppliedAdapter:
    """Apply ``adapter`` to a transformers model (backbone or task model) in place.

    The base fingerprint is checked first (``force=True`` turns a mismatch into a warning).
    If the model has a classification head, the adapter's head for ``task`` is loaded into it.
    """
    found = getattr(getattr(model, "config", None), "_name_or_path", "") or "the given model"
    handle = apply_to_tensors(named_base_tensors(backbone_of(model)), adapter, found_id=found,
                              force=force)
    handle.model = model
    head_name = head_module_name(model)
    chosen = pick_head(adapter, task) if head_name is not None else None
    if chosen is not None:
        handle.task, head = chosen
        module = getattr(model, head_name)
        own = dict(module.named_parameters())
        for pname, value in head.params.items():
            if pname not in own or own[pname].shape != value.shape:
                handle.undo()
                raise SparseMergeError(
                    f"head {handle.task}: parameter {pname} {tuple(value.shape)} does not fit the "
                    f"model's {head_name} ({tuple(own[pname].shape) if pname in own else 'absent'})"
                    f"; load the model with num_labels={len(head.labels)}")
            original = own[pname].detach().clone()
            with torch.no_grad():
                own[pname].copy_(value.to(own[pname].dtype))
            handle.saved.append(_Saved(own[pname].data, None, original))
    return handle


def materialize(adapter: SparseAdapter, base: str | Path | None, out: str | Path, *,
                task: str | None = None, gguf_file: str | None = None,
                force: bool = False) -> Path:
    """Save base + adapter as a standard HF model directory that transformers loads alone.

    With a head, the directory holds a sequence-classification model (config.id2label set);
    without, the bare backbone. ``base=None`` is the base the adapter was trained on.
    """
    from sparsemerge.formats.atomic import atomic_directory
    from sparsemerge.models import (
        adapter_base,
        load_backbone,
        load_task_model,
        load_tokenizer,
        resolve_pad_token_id,
    )

    chosen = pick_head(adapter, task)
    base, gguf_file = adapter_base(adapter, None if base is None else str(base), gguf_file)
    tok = load_tokenizer(base, gguf_file)
    if chosen is None:
        model = load_backbone(base, gguf_file)
    else:
        model = load_task_model(base, chosen[1].labels, gguf_file=gguf_file,
                                problem_type=chosen[1].problem_type,
                                pad_token_id=resolve_pad_token_id(tok))
    apply(model, adapter, task=chosen[0] if chosen else None, force=force)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out)
