"""Writing a merged backbone tensor by tensor (base tensors read by :mod:`sparsemerge.checkpoint`).

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

import copy
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from sparsemerge.adapter import BaseInfo, SparseAdapter, TargetDelta
from sparsemerge.checkpoint import BaseCheckpoint, check_targets, mismatch_message
from sparsemerge.errors import BaseMismatchError, SparseMergeError
from sparsemerge.formats.merged import (
    CARD_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    ST_NAMES,
    ShardPlan,
    TensorSpec,
    check_task_names,
    head_config,
    parse_size,
    write_head,
    write_recipe,
    write_shards,
)
from sparsemerge.models import quiet_transformers, tensor_hash

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def stream_backbone(ckpt: BaseCheckpoint, targets: Mapping[str, TargetDelta], out_dir: Path,
                    *, max_shard_size: int, expected: BaseInfo | None = None,
                    force: bool = False, progress: Progress | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Write base + deltas as safetensors shards into ``out_dir`` (streaming path), floating
    tensors cast to ``dtype`` first when given (the delta is then rounded once, into it)."""
    from sparsemerge.apply import add_delta_
    from sparsemerge.formats.merged import ST_DTYPES

    def out_dtype(st_dtype: str) -> str:
        cast = dtype is not None and ST_DTYPES[st_dtype].is_floating_point
        return ST_NAMES[dtype] if cast else st_dtype

    check_targets(ckpt, targets)
    order = sorted(ckpt.entries.items(), key=lambda kv: (str(kv[1].file), kv[1].start))
    specs = [TensorSpec(name, out_dtype(st.dtype), st.shape) for name, st in order]
    plan = ShardPlan.plan(specs, max_shard_size)
    total, done = len(specs), 0
    hashes = expected.tensor_hashes if expected is not None else {}
    warned = False

    def produce(spec: TensorSpec) -> torch.Tensor:
        nonlocal done, warned
        t = ckpt.read(ckpt.entries[spec.name])
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        target = targets.get(spec.name)
        if target is not None:
            want = hashes.get(spec.name)
            if want is not None and tensor_hash(spec.name, t) != want:
                msg = mismatch_message(expected, str(ckpt.path), spec.name, t.shape)
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
                           progress: Progress | None = None,
                           dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Fallback: load the whole backbone (in ``dtype``, default the checkpoint's), apply,
    ``save_pretrained`` (memory = the model)."""
    from sparsemerge.apply import apply

    check_targets(ckpt, adapter.targets)
    model = ckpt.backbone_model("auto" if dtype is None else dtype)
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

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)


def save_merged_model(adapter: SparseAdapter, out: str | Path, *,
                      base: str | Path | None = None, gguf_file: str | None = None,
                      recipe: Mapping[str, Any] | None = None,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
                      progress: Progress | None = None, card_info: Mapping[str, Any] | None = None,
                      base_dtype: str = "auto") -> dict[str, Any]:
    """Write ``adapter`` (a merged adapter with one head per task) as a merged multi-head
    model directory at ``out``, atomically. ``base`` defaults to the base the adapters were
    trained on. Returns a report (files, shards, bytes, streamed or not, seconds)."""
    from sparsemerge._version import __version__
    from sparsemerge.card import merged_card
    from sparsemerge.formats.atomic import atomic_directory
    from sparsemerge.models import (
        adapter_base,
        load_kwargs,
        load_tokenizer,
        resolve_pad_token_id,
    )
    from sparsemerge.task_heads import head_model

    t0 = time.perf_counter()
    limit = parse_size(max_shard_size)
    if not adapter.heads:
        raise SparseMergeError("none of the merged adapters has a classification head, so "
                               "there is nothing to put under heads/; merge without --heads to "
                               "write a merged adapter")
    check_task_names(adapter.heads, hint="; rename the head at merge time with NAME=PATH "
                     "(merge --heads NAME=ADAPTER ...)")
    base, gguf_file = adapter_base(adapter, None if base is None else str(base), gguf_file)
    dtype = None if base_dtype == "auto" else load_kwargs(base_dtype)["dtype"]
    ckpt = BaseCheckpoint(base, gguf_file)
    tok = load_tokenizer(base, gguf_file)
    pad = resolve_pad_token_id(tok)
    config = _backbone_config(ckpt, pad)
    if dtype is not None:
        config.dtype = dtype
    head_cfgs: dict[str, dict[str, Any]] = {}
    for task, head in adapter.heads.items():
        cfg = head_config(task, module=head.module, labels=head.labels,
                          problem_type=head.problem_type, hidden_size=ckpt.hidden_size,
                          architecture="", pad_token_id=pad, prompt=head.prompt)
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
                                          progress=progress, dtype=dtype))
            config.save_pretrained(tmp)
        else:
            report.update(load_and_save_backbone(ckpt, adapter, tmp, max_shard_size=limit,
                                                 force=force, progress=progress, dtype=dtype))
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


def save_merged_causal_lm(adapter: SparseAdapter, out: str | Path, *,
                          base: str | Path | None = None, gguf_file: str | None = None,
                          force: bool = False, base_dtype: str = "auto") -> dict[str, Any]:
    """Write ``adapter`` (merged ``--objective lm`` adapters: deltas, no heads) applied to its
    base as a standard causal-LM directory at ``out``, atomically: config, weights (the LM
    head, or embeddings tied to it, as the base has them) and tokenizer, so that
    ``AutoModelForCausalLM.from_pretrained(out)`` (and so vLLM) loads it alone. The model is
    loaded whole (memory = the model in ``base_dtype``), not streamed: transformers writes the
    weights under its own names. Returns a report (files, seconds)."""
    from sparsemerge.apply import apply
    from sparsemerge.formats.atomic import atomic_directory
    from sparsemerge.models import adapter_base, load_causal_lm, load_tokenizer

    t0 = time.perf_counter()
    base, gguf_file = adapter_base(adapter, None if base is None else str(base), gguf_file)
    model = load_causal_lm(base, gguf_file=gguf_file, dtype=base_dtype)
    apply(model, adapter, force=force)
    tok = load_tokenizer(base, gguf_file)
    with atomic_directory(out) as tmp:
        _readable(tmp)
        with quiet_transformers():
            model.save_pretrained(tmp, max_shard_size=DEFAULT_MAX_SHARD_SIZE)
            tok.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir())
    return {"output": str(out), "architecture": type(model).__name__, "files": files,
            "streamed": False, "seconds": round(time.perf_counter() - t0, 3)}
