"""Export adapters to other tools' formats.

``export_peft`` writes a Hugging Face PEFT adapter directory -- ``adapter_config.json`` +
``adapter_model.safetensors`` with PEFT's own key names -- that
``PeftModel.from_pretrained(base_model, DIR)`` loads and that computes the same logits as the
adapter applied with sparsemerge (up to float rounding):

* a low-rank adapter (``--method lora`` or ``partial-lora``: every target is
  ``dW = scale * B @ A``) as a LoRA adapter. PEFT adds ``B (A x)`` at run time, sparsemerge
  merges ``B @ A`` into the weight. Sparse factors (Partial-LoRA) are written densely (zeros
  included): PEFT has no sparse LoRA. Per-target ranks or scales that differ from the most
  common one go to ``rank_pattern`` / ``alpha_pattern`` (PEFT's scale is ``lora_alpha / r``;
  a gate is folded into alpha).
* a sparse adapter (SpaRTA, RIGSA with zero reset, a merge result: every target is values at
  indices) as a SHiRA adapter, whose mask is our indices. SHiRA stores exactly
  ``r * (in + out)`` entries per layer with one ``r`` for every layer, so ``r`` is the smallest
  that holds each target's entries and the remaining slots are filled with zero-valued entries
  at the lowest free indices (a zero changes nothing).

How: the base task model is loaded (as ``sparsemerge evaluate`` does; the base fingerprint is
checked), the adapter's head is copied into it, PEFT wraps it (``get_peft_model`` with a
config naming every target module, ``task_type="SEQ_CLS"`` and the head in
``modules_to_save``), our values are copied into PEFT's layers and PEFT's own
``save_pretrained`` writes the directory, so key names and config fields are whatever the
installed PEFT uses. ``base_model_name_or_path`` is the adapter's base model id.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from sparsemerge.adapter import SparseAdapter, TargetDelta
from sparsemerge.errors import SparseMergeError, import_extra

PEFT_ADAPTER = "default"


def _is_lowrank(t: TargetDelta) -> bool:
    return t.lowrank is not None and t.sparse is None and t.init is None


def _is_sparse(t: TargetDelta) -> bool:
    return t.sparse is not None and t.lowrank is None and t.init is None


def _peft_kind(adapter: SparseAdapter) -> str:
    """"lora" or "shira": what PEFT can hold every target as; SparseMergeError otherwise."""
    for name, t in adapter.targets.items():
        if not name.endswith(".weight") or len(t.shape) != 2:
            raise SparseMergeError(f"cannot export {name} to PEFT: not a 2-D weight")
    if all(_is_lowrank(t) for t in adapter.targets.values()):
        return "lora"
    if all(_is_sparse(t) for t in adapter.targets.values()):
        return "shira"
    name = next(n for n, t in adapter.targets.items() if not _is_sparse(t))
    raise SparseMergeError(
        f"cannot export {name} to PEFT: it is neither a pure low-rank delta (LoRA) nor values "
        f"at indices (SHiRA) (method {adapter.method!r}; e.g. RIGSA with reset=init keeps a "
        f"dense seeded init); export lora, partial-lora, sparta or rigsa (reset=zero) adapters")


def _module_path(root: nn.Module, module: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise SparseMergeError("the backbone is not a submodule of the task model")


def _base_model(adapter: SparseAdapter, base: str | None, gguf_file: str | None,
                task: str | None, force: bool) -> tuple[nn.Module, str | None, dict[str, str]]:
    """(the base model with the adapter's head copied in, the head's module or None, each
    target's module path in that model); the base fingerprint is checked."""
    from sparsemerge.apply import pick_head
    from sparsemerge.models import (
        adapter_base,
        backbone_of,
        check_base,
        load_backbone,
        load_task_model,
        load_tokenizer,
        named_base_tensors,
        resolve_pad_token_id,
    )

    chosen = pick_head(adapter, task)
    base, gguf_file = adapter_base(adapter, base, gguf_file)
    if chosen is None:
        model = load_backbone(base, gguf_file)
    else:
        head = chosen[1]
        tok = load_tokenizer(base, gguf_file)
        model = load_task_model(base, head.labels, gguf_file=gguf_file,
                                problem_type=head.problem_type,
                                pad_token_id=resolve_pad_token_id(tok))
        module = getattr(model, head.module, None)
        if module is None:
            raise SparseMergeError(f"the base task model has no head module {head.module!r}")
        own = dict(module.named_parameters())
        with torch.no_grad():
            for pname, value in head.params.items():
                if pname not in own or own[pname].shape != value.shape:
                    raise SparseMergeError(f"head {chosen[0]}: parameter {pname} does not fit "
                                           f"the model's {head.module}")
                own[pname].copy_(value.to(own[pname].dtype))
    backbone = backbone_of(model)
    found = getattr(model.config, "_name_or_path", "") or "the given model"
    check_base(adapter.base, named_base_tensors(backbone), list(adapter.targets),
               found_id=found, force=force)
    prefix = _module_path(model, backbone)
    full = {n: (f"{prefix}.{n[:-7]}" if prefix else n[:-7]) for n in adapter.targets}
    for name, path in full.items():
        if not isinstance(model.get_submodule(path), nn.Linear):
            raise SparseMergeError(f"cannot export {name} to PEFT: {path} is not an nn.Linear")
    return model, chosen[1].module if chosen is not None else None, full


def _lora(peft: ModuleType, adapter: SparseAdapter, model: nn.Module, full: dict[str, str],
          common: dict[str, Any]) -> nn.Module:
    """``model`` wrapped in a PEFT LoRA adapter holding the adapter's factors."""
    ranks = {name: (t.lowrank.rank, float(t.lowrank.scale) * float(t.gate) * t.lowrank.rank)
             for name, t in adapter.targets.items()}
    (r0, alpha0), _ = Counter(ranks.values()).most_common(1)[0]
    rank_pattern = {}
    alpha_pattern = {}
    for name, (r, alpha) in ranks.items():
        key = full[name].replace(".", r"\.")
        if r != r0:
            rank_pattern[key] = r
        if alpha != alpha0:
            alpha_pattern[key] = alpha
    config = peft.LoraConfig(r=r0, lora_alpha=alpha0, lora_dropout=0.0, bias="none",
                             rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, **common)
    peft_model = peft.get_peft_model(model, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, t in adapter.targets.items():
            layer = inner.get_submodule(full[name])
            a = layer.lora_A[PEFT_ADAPTER].weight
            b = layer.lora_B[PEFT_ADAPTER].weight
            a.copy_(t.lowrank.a.to_dense().to(a.dtype))
            b.copy_(t.lowrank.b.to_dense().to(b.dtype))
    return peft_model


def _shira_rank(adapter: SparseAdapter) -> int:
    """The smallest SHiRA ``r`` whose ``r * (in + out)`` slots hold every target's entries;
    SparseMergeError when a target is too dense for SHiRA (it needs ``r (in + out) <= in out``).
    """
    r = max(1, *(math.ceil(t.sparse.nnz / sum(t.shape)) for t in adapter.targets.values()))
    for name, t in adapter.targets.items():
        if r * sum(t.shape) > t.shape[0] * t.shape[1]:
            raise SparseMergeError(
                f"cannot export {name} to PEFT SHiRA: SHiRA gives every layer r * (in + out) "
                f"entries with one r for all, the densest target needs r={r}, and this layer "
                f"has only {t.shape[0] * t.shape[1]:,} entries (< {r * sum(t.shape):,}); "
                f"export a sparser adapter")
    return r


def _shira_entries(t: TargetDelta, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted flat indices, fp32 values) of ``slots`` entries: the target's (gate applied)
    and zero-valued ones at the lowest free indices."""
    taken = torch.zeros(t.sparse.numel, dtype=torch.bool)
    taken[t.sparse.indices] = True
    free = (~taken).nonzero().view(-1)[: slots - t.sparse.nnz]
    indices = torch.cat([t.sparse.indices, free]).sort().values
    dense = torch.zeros(t.sparse.numel)
    dense[t.sparse.indices] = t.sparse.values.float() * t.gate
    return indices, dense[indices]


def _shira(peft: ModuleType, adapter: SparseAdapter, model: nn.Module, full: dict[str, str],
           common: dict[str, Any]) -> nn.Module:
    """``model`` wrapped in a PEFT SHiRA adapter whose mask is the adapter's indices (PEFT's
    documented ``config.mask_fn`` hook) and whose values are the adapter's."""
    r = _shira_rank(adapter)
    entries = {name: _shira_entries(t, r * sum(t.shape)) for name, t in adapter.targets.items()}
    masks = {}
    for name, (indices, _) in entries.items():
        layer = model.get_submodule(full[name])
        mask = torch.zeros(layer.weight.numel(), dtype=layer.weight.dtype,
                           device=layer.weight.device)
        mask[indices.to(mask.device)] = 1
        masks[id(layer)] = mask.view(layer.weight.shape)
    config = peft.ShiraConfig(r=r, **common)
    config.mask_fn = lambda base_layer, r, **_: masks[id(base_layer)]
    peft_model = peft.get_peft_model(model, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, (_, values) in entries.items():
            weight = inner.get_submodule(full[name]).shira_weight[PEFT_ADAPTER]
            weight.copy_(values.to(weight.device, weight.dtype))  # in the mask's row-major order
    return peft_model


def export_peft(adapter: SparseAdapter | str | Path, out: str | Path, *,
                base: str | None = None, gguf_file: str | None = None,
                task: str | None = None, force: bool = False) -> Path:
    """Write ``adapter`` as a PEFT adapter directory at ``out`` (atomically): LoRA for a
    low-rank adapter, SHiRA for a sparse one."""
    from sparsemerge.formats.adapter_file import load_adapter
    from sparsemerge.formats.atomic import atomic_directory

    peft = import_extra("peft", "peft", "export --peft")
    if not isinstance(adapter, SparseAdapter):
        adapter = load_adapter(adapter)
    if not adapter.targets:
        raise SparseMergeError("the adapter changes no backbone tensor (a head-only adapter); "
                               "there is nothing to export to PEFT")
    kind = _peft_kind(adapter)
    model, head_module, full = _base_model(adapter, base, gguf_file, task, force)
    common = {
        "target_modules": sorted(full.values()),
        "task_type": "SEQ_CLS" if head_module is not None else "FEATURE_EXTRACTION",
        "modules_to_save": [head_module] if head_module is not None else None,
        "base_model_name_or_path": adapter.base.model_id, "revision": adapter.base.revision,
    }
    peft_model = (_lora if kind == "lora" else _shira)(peft, adapter, model, full, common)
    peft_model.peft_config[PEFT_ADAPTER].base_model_name_or_path = adapter.base.model_id
    with atomic_directory(out) as tmp:
        peft_model.save_pretrained(tmp)
    return Path(out)


__all__ = ["export_peft"]
