"""Export adapters to other tools' formats.

``export_peft`` turns a low-rank adapter (``--method lora`` or ``partial-lora``: every target
is ``dW = scale * B @ A``) into a Hugging Face PEFT LoRA adapter directory --
``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's own key names -- that
``PeftModel.from_pretrained(base_model, DIR)`` loads and that computes the same logits as
the adapter applied with sparsemerge (up to float rounding: PEFT adds ``B (A x)`` at run time,
sparsemerge merges ``B @ A`` into the weight).

How: the base task model is loaded (as ``sparsemerge evaluate`` does; the base fingerprint is
checked), the adapter's head is copied into it, PEFT wraps it (``get_peft_model`` with a
``LoraConfig`` naming every target module, ``task_type="SEQ_CLS"`` and the head in
``modules_to_save``), the factors are copied into PEFT's ``lora_A`` / ``lora_B`` layers and
PEFT's own ``save_pretrained`` writes the directory, so key names and config fields are
whatever the installed PEFT uses. Sparse factors (Partial-LoRA) are written densely (zeros
included): PEFT has no sparse LoRA. Per-target ranks or scales that differ from the most
common one go to ``rank_pattern`` / ``alpha_pattern`` (PEFT's scale is ``lora_alpha / r``; a
gate is folded into alpha). ``base_model_name_or_path`` is the adapter's base model id.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from sparsemerge.adapter import SparseAdapter
from sparsemerge.errors import SparseMergeError

PEFT_ADAPTER = "default"


def _lowrank_targets(adapter: SparseAdapter) -> dict[str, tuple[int, float]]:
    """{target name: (rank, PEFT lora_alpha)}; SparseMergeError if a target is not low-rank."""
    out = {}
    for name, t in adapter.targets.items():
        if t.lowrank is None or t.sparse is not None or t.init is not None:
            raise SparseMergeError(
                f"cannot export {name} to PEFT LoRA: it is not a pure low-rank delta (method "
                f"{adapter.method!r}); only lora and partial-lora adapters can be exported")
        if not name.endswith(".weight") or len(t.shape) != 2:
            raise SparseMergeError(f"cannot export {name} to PEFT LoRA: not a 2-D weight")
        r = t.lowrank.rank
        out[name] = (r, float(t.lowrank.scale) * float(t.gate) * r)
    return out


def _module_path(root: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise SparseMergeError("the backbone is not a submodule of the task model")


def export_peft(adapter: SparseAdapter | str | Path, out: str | Path, *,
                base: str | None = None, gguf_file: str | None = None,
                task: str | None = None, force: bool = False) -> Path:
    """Write ``adapter`` as a PEFT LoRA adapter directory at ``out`` (atomically)."""
    import peft

    from sparsemerge.apply import pick_head
    from sparsemerge.formats.adapter_file import load_adapter
    from sparsemerge.formats.atomic import atomic_directory
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

    if not isinstance(adapter, SparseAdapter):
        adapter = load_adapter(adapter)
    if not adapter.targets:
        raise SparseMergeError("the adapter changes no backbone tensor (a head-only adapter); "
                               "there is nothing to export as LoRA")
    ranks = _lowrank_targets(adapter)
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

    (r0, alpha0), _ = Counter(ranks.values()).most_common(1)[0]
    rank_pattern = {}
    alpha_pattern = {}
    for name, (r, alpha) in ranks.items():
        key = full[name].replace(".", r"\.")
        if r != r0:
            rank_pattern[key] = r
        if alpha != alpha0:
            alpha_pattern[key] = alpha
    config = peft.LoraConfig(
        r=r0, lora_alpha=alpha0, lora_dropout=0.0, bias="none",
        target_modules=sorted(full.values()), rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type="SEQ_CLS" if chosen is not None else "FEATURE_EXTRACTION",
        modules_to_save=[chosen[1].module] if chosen is not None else None,
        base_model_name_or_path=adapter.base.model_id, revision=adapter.base.revision,
    )
    peft_model = peft.get_peft_model(model, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, t in adapter.targets.items():
            layer = inner.get_submodule(full[name])
            lr = t.lowrank
            a = layer.lora_A[PEFT_ADAPTER].weight
            b = layer.lora_B[PEFT_ADAPTER].weight
            a.copy_(lr.a.to_dense().to(a.dtype))
            b.copy_(lr.b.to_dense().to(b.dtype))
    peft_model.peft_config[PEFT_ADAPTER].base_model_name_or_path = adapter.base.model_id
    with atomic_directory(out) as tmp:
        peft_model.save_pretrained(tmp)
    return Path(out)


__all__ = ["export_peft"]
