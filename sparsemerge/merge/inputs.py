"""Bring-your-own merge inputs: sparsemerge adapters, PEFT LoRA adapters, full fine-tunes.

:func:`load_merge_input` detects what a directory holds and returns a
:class:`~sparsemerge.adapter.SparseAdapter`, with ``extra["source"]`` recording the path, the
kind and the SHA-256 of its weight file(s) (the merge recipe lists these):

- ``adapter`` — a sparsemerge adapter directory (``adapter.safetensors``): loaded as is.
- ``peft-lora`` — a PEFT directory whose ``adapter_config.json`` has ``peft_type: LORA``:
  per adapted module ΔW = scale · B @ A with scale = ``lora_alpha / r`` (``lora_alpha / √r``
  with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` honoured, matched as PEFT does),
  transposed for ``fan_in_fan_out`` (GPT-2 Conv1D) and for embedding LoRA. Module names are
  mapped to backbone weight names (``base_model.model.`` and the task-model prefix such as
  ``bert.`` stripped). Kept exactly, as low-rank factors (not sparsified). A saved
  classification head (``modules_to_save``) becomes the task's head with labels
  ``LABEL_0..`` (PEFT stores no label names). DoRA, LoRA biases and trained biases
  (``bias != "none"``) are refused: they are not a ΔW on the weights.
- ``merged-model`` — a directory written by ``merge --heads``: Δ = θ − θ0 exactly (every
  entry of every floating-point backbone tensor that differs from the base, no
  sparsification) and its heads, so merged models can be merged again.
- ``full`` — a fully fine-tuned transformers model directory (``config.json`` + safetensors):
  Δ = θ − θ0 on the backbone's linear weights (fp32), sparsified per tensor to ``density``
  either by magnitude (the ``ceil(density · numel)`` largest |Δ|) or by DARE (each entry kept
  with probability ``density`` and rescaled by 1/density; seeded by (seed, tensor name)).
  Other changed tensors (embeddings, norms, biases) are not carried. If the checkpoint has
  a classification head and ``id2label``, it becomes the task's head.

Task names come from the directory's name unless ``task`` is given; :func:`rename_head`
renames an input's one head (``merge NAME=PATH``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

from sparsemerge.adapter import (
    BaseInfo,
    Head,
    LowRank,
    SparseAdapter,
    SparseTensor,
    TargetDelta,
)
from sparsemerge.errors import SparseMergeError
from sparsemerge.models import HEAD_MODULES

SPARSIFY = ("magnitude", "dare")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def task_from_path(path: Path) -> str:
    from sparsemerge.formats.merged import task_name_problem

    name = path.resolve().name
    return name if task_name_problem(name) is None else "task"


def rename_head(adapter: SparseAdapter, task: str, path: str) -> SparseAdapter:
    """Give ``adapter``'s one head the name ``task`` (in place; ``merge NAME=PATH``); the
    old name is kept in ``extra["source"]["renamed_from"]``."""
    if len(adapter.heads) != 1:
        what = (f"{len(adapter.heads)} heads ({', '.join(adapter.heads)})" if adapter.heads
                else "no classification head")
        raise SparseMergeError(f"input {task}={path}: {path} has {what}; NAME=PATH names "
                               "the head of an input that has exactly one")
    (old, head), = adapter.heads.items()
    adapter.heads = {task: head}
    if old != task:
        adapter.extra = dict(adapter.extra)
        adapter.extra["source"] = {**adapter.extra.get("source", {}), "renamed_from": old}
    return adapter


def input_kind(path: str | Path) -> str:
    """``adapter``, ``merged-model``, ``peft-lora`` (any PEFT type is reported as
    ``peft-<type>``) or ``full``."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return "adapter"
    if not p.is_dir():
        raise SparseMergeError(f"{p}: no such adapter directory")
    if (p / "adapter.safetensors").is_file():
        return "adapter"
    from sparsemerge.formats.merged import is_merged_dir

    if is_merged_dir(p):
        return "merged-model"
    cfg = p / PEFT_CONFIG
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError) as exc:
            raise SparseMergeError(f"{cfg}: not valid JSON: {exc}") from None
        if isinstance(data, dict) and data.get("peft_type"):
            return f"peft-{str(data['peft_type']).lower()}"
    if (p / "config.json").is_file():
        return "full"
    raise SparseMergeError(
        f"{p}: not a sparsemerge adapter (adapter.safetensors), a PEFT adapter "
        f"({PEFT_CONFIG} with peft_type) or a transformers model directory (config.json)")


def _sha_files(files: list[Path]) -> str:
    from sparsemerge.merge.engine import file_sha256

    if len(files) == 1:
        return file_sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}={file_sha256(f)};".encode())
    return h.hexdigest()


def load_merge_input(path: str | Path, base: str | Path | None = None,
                     density: float = 0.01, *, sparsify: str = "magnitude", seed: int = 0,
                     task: str | None = None, gguf_file: str | None = None) -> SparseAdapter:
    """Load ``path`` (local or ``hf://``) as a SparseAdapter (see the module doc).

    ``base`` is needed for PEFT inputs whose config names no base and for full fine-tunes
    (θ0); ``None`` means the PEFT config's ``base_model_name_or_path``, else the demo base.
    ``density`` / ``sparsify`` / ``seed`` apply to full fine-tunes only.
    """
    from sparsemerge.hub import resolve_path

    given = str(path)
    local = resolve_path(path)
    kind = input_kind(local)
    if kind == "adapter":
        from sparsemerge.formats.adapter_file import WEIGHTS_NAME, load_adapter
        from sparsemerge.merge.engine import file_sha256

        adapter = load_adapter(local)
        file = local / WEIGHTS_NAME if local.is_dir() else local
        adapter.extra = dict(adapter.extra)
        adapter.extra["source"] = {"path": given, "kind": "adapter", "file": file.name,
                                   "sha256": file_sha256(file)}
        return adapter
    if kind == "peft-lora":
        return load_peft_lora(local, base, task=task, gguf_file=gguf_file, source=given)
    if kind == "merged-model":
        return load_merged_model(local, base, gguf_file=gguf_file, source=given)
    if kind.startswith("peft-"):
        raise SparseMergeError(f"{local}: PEFT adapter type {kind[5:].upper()} is not supported;"
                               " only LoRA adapters can be merged")
    return load_full_finetune(local, base, density, sparsify=sparsify, seed=seed, task=task,
                              gguf_file=gguf_file, source=given)


# --------------------------------------------------------------------------------- PEFT


def _peft_tensors(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    for name in PEFT_WEIGHTS:
        f = path / name
        if f.is_file():
            try:
                if f.suffix == ".safetensors":
                    import safetensors.torch

                    return safetensors.torch.load_file(str(f)), f
                return torch.load(f, map_location="cpu", weights_only=True), f
            except Exception as exc:  # corrupt file: several exception types
                raise SparseMergeError(f"{f}: cannot read PEFT weights: {exc}") from None
    raise SparseMergeError(f"{path}: no {' or '.join(PEFT_WEIGHTS)}")


def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():  # as peft.utils.other.get_pattern_key
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _dense_sparse(t: torch.Tensor) -> SparseTensor:
    t = t.detach().to(torch.float32).contiguous()
    return SparseTensor(tuple(t.shape), torch.arange(t.numel(), dtype=torch.int64),
                        t.reshape(-1).clone())


def _strip(module: str, prefix: str, names: set[str], suffix: str = ".weight") -> str | None:
    """Backbone weight name for a module path of the task model (or the backbone)."""
    for cand in (module, module[len(prefix) + 1:] if prefix and module.startswith(prefix + ".")
                 else None):
        if cand is not None and cand + suffix in names:
            return cand + suffix
    return None


def load_peft_lora(path: Path, base: str | Path | None = None, *, task: str | None = None,
                   gguf_file: str | None = None, source: str | None = None) -> SparseAdapter:
    from sparsemerge.checkpoint import BaseCheckpoint

    cfg_file = path / PEFT_CONFIG
    cfg = json.loads(cfg_file.read_text())
    for key, bad in (("use_dora", True), ("lora_bias", True)):
        if cfg.get(key) == bad:
            raise SparseMergeError(f"{cfg_file}: {key} is set; only plain LoRA (ΔW = scale·BA) "
                                   "can be merged")
    if cfg.get("bias", "none") != "none":
        raise SparseMergeError(f"{cfg_file}: bias={cfg['bias']!r} trains biases as well; only "
                               "bias='none' LoRA adapters can be merged")
    if base is None:
        base = cfg.get("base_model_name_or_path") or None
    ckpt = BaseCheckpoint(base, gguf_file)
    names = set(ckpt.shapes)
    tensors, wfile = _peft_tensors(path)
    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    head_params: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        k = key.removeprefix("base_model.model.")
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                         r"(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?", k)
        if m:
            factors.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        k = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)
        top = k.split(".", 1)[0]
        if top in HEAD_MODULES and "." in k:
            head_params.setdefault(top, {})[k.split(".", 1)[1]] = t
        else:
            unknown.append(key)
    if unknown:
        raise SparseMergeError(f"{wfile}: tensors that are neither LoRA factors nor a "
                               f"classification head: {unknown[:3]}")
    if not factors:
        raise SparseMergeError(f"{wfile}: no LoRA factors found")
    targets: dict[str, TargetDelta] = {}
    for module, f in sorted(factors.items()):
        name = _strip(module, ckpt.prefix, names)
        if name is None:
            raise SparseMergeError(f"{wfile}: LoRA module {module} matches no weight of the "
                                   f"base backbone {ckpt.path} (names look like "
                                   f"{next(iter(names), '?')}); pass --base with the right model")
        r = int(_pattern_value(cfg.get("rank_pattern"), module, r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha0))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        shape = ckpt.shapes[name]
        if "lora_A" in f and "lora_B" in f:
            a, b = f["lora_A"].float(), f["lora_B"].float()  # (r, in), (out, r)
            if fan_in_fan_out:
                a, b = b.T, a.T
        elif "lora_embedding_A" in f and "lora_embedding_B" in f:
            ea, eb = f["lora_embedding_A"].float(), f["lora_embedding_B"].float()  # (r,n),(d,r)
            a, b = eb.T, ea.T  # ΔW = (B A)^T = A^T B^T: (n, r) @ (r, d)
        else:
            raise SparseMergeError(f"{wfile}: module {module} lacks its A or B factor")
        if (b.shape[0], a.shape[1]) != tuple(shape) or a.shape[0] != b.shape[1]:
            raise SparseMergeError(f"{wfile}: LoRA factors of {module} make "
                                   f"{(b.shape[0], a.shape[1])}, the base weight {name} is "
                                   f"{shape}")
        targets[name] = TargetDelta(shape=shape, lowrank=LowRank(
            a=_dense_sparse(a), b=_dense_sparse(b), scale=scale))
    task = task or task_from_path(path)
    heads = {}
    if len(head_params) > 1:
        raise SparseMergeError(f"{wfile}: several head modules {sorted(head_params)}")
    for module, params in head_params.items():
        out = next((p.shape[0] for n, p in params.items() if n.endswith("weight")), None)
        labels = [f"LABEL_{i}" for i in range(int(out or 0))]
        if labels:
            heads[task] = Head(module=module, params={n: p.float().clone() for n, p in
                                                      params.items()}, labels=labels)
    info = ckpt.base_info(sorted(targets), model_id=str(base) if base else None)
    ckpt.close()
    return SparseAdapter(
        targets=targets, base=info, heads=heads, method="peft-lora",
        hyperparameters={"r": r0, "lora_alpha": alpha0, "use_rslora": rslora,
                         "target_modules": cfg.get("target_modules")},
        extra={"source": {"path": source or str(path), "kind": "peft-lora", "file": wfile.name,
                          "sha256": _sha_files([wfile])}})


# --------------------------------------------------------------------------------- full FT


def _name_seed(seed: int, name: str) -> int:
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def sparsify_delta(delta: torch.Tensor, density: float, method: str = "magnitude", *,
                   seed: int = 0, name: str = "") -> SparseTensor:
    """Keep ``density`` of a dense delta's entries: by magnitude, or DARE (see module doc)."""
    from sparsemerge.merge.operators.kernels import trim_count

    if not 0.0 < density <= 1.0:
        raise SparseMergeError(f"density must be in (0, 1], got {density}")
    if method not in SPARSIFY:
        raise SparseMergeError(f"sparsify must be one of {', '.join(SPARSIFY)}, got {method!r}")
    flat = delta.reshape(-1).to(torch.float32)
    nz = torch.nonzero(flat, as_tuple=False).reshape(-1)
    if method == "magnitude":
        k = trim_count(density, flat.numel())
        if k >= nz.numel():
            idx = nz
        else:
            idx = torch.sort(torch.topk(flat.abs(), k, sorted=False).indices).values
        return SparseTensor(tuple(delta.shape), idx, flat[idx].clone())
    g = torch.Generator().manual_seed(_name_seed(seed, name))
    keep = torch.rand(nz.numel(), generator=g) < density
    idx = nz[keep]
    return SparseTensor(tuple(delta.shape), idx, flat[idx] / density)


def load_full_finetune(path: Path, base: str | Path | None = None, density: float = 0.01, *,
                       sparsify: str = "magnitude", seed: int = 0, task: str | None = None,
                       gguf_file: str | None = None, source: str | None = None
                       ) -> SparseAdapter:
    from sparsemerge.checkpoint import BaseCheckpoint

    if not 0.0 < density <= 1.0:
        raise SparseMergeError(f"--input-density must be in (0, 1], got {density}")
    if sparsify not in SPARSIFY:
        raise SparseMergeError(f"--sparsify must be one of {', '.join(SPARSIFY)}")
    ft = BaseCheckpoint(path)
    if not ft.streamable:
        raise SparseMergeError(f"{path}: cannot read the fine-tuned weights ({ft.reason}); "
                               "save the model with safetensors (save_pretrained)")
    b0 = BaseCheckpoint(base, gguf_file)
    if ft.backbone_class != b0.backbone_class:
        raise SparseMergeError(f"{path} is a {ft.backbone_class}, the base {b0.path} a "
                               f"{b0.backbone_class}; they cannot be subtracted")
    targets: dict[str, TargetDelta] = {}
    names = [n for n in ft.linear_weights if n in ft.entries and n in b0.shapes]
    for name in names:
        if ft.shapes[name] != b0.shapes[name]:
            raise SparseMergeError(f"tensor {name}: {ft.shapes[name]} in {path}, "
                                   f"{b0.shapes[name]} in the base {b0.path}")
        delta = ft.tensor(name).to(torch.float32) - b0.tensor(name).to(torch.float32)
        st = sparsify_delta(delta, density, sparsify, seed=seed, name=name)
        del delta
        if st.nnz:
            targets[name] = TargetDelta(shape=ft.shapes[name], sparse=st)
    task = task or task_from_path(path)
    heads = {}
    id2label = getattr(ft.config, "id2label", None) or {}
    for module in HEAD_MODULES:
        keys = {k: info for k, info in ft.extra.items() if k.startswith(module + ".")}
        if keys and id2label:
            params = {k[len(module) + 1:]: ft.read(st).to(torch.float32)
                      for k, st in keys.items()}
            labels = [str(id2label[i]) for i in sorted(id2label)]
            heads[task] = Head(module=module, params=params, labels=labels,
                               problem_type=getattr(ft.config, "problem_type", None)
                               or "single_label_classification")
            break
    info: BaseInfo = b0.base_info(sorted(targets), model_id=str(base) if base else None)
    files = sorted({st.file for st in ft.entries.values()} | {st.file for st in ft.extra.values()})
    ft.close()
    b0.close()
    return SparseAdapter(
        targets=targets, base=info, heads=heads, method="full-finetune",
        hyperparameters={"density": density, "sparsify": sparsify, "seed": seed},
        extra={"source": {"path": source or str(path), "kind": "full",
                          "file": ", ".join(f.name for f in files),
                          "sha256": _sha_files(files)}})


# --------------------------------------------------------------------------------- merged


def load_merged_model(path: Path, base: str | Path | None = None, *,
                      gguf_file: str | None = None, source: str | None = None) -> SparseAdapter:
    """A merged multi-head directory back as a merged adapter: Δ = θ − θ0 exactly (every
    entry that differs from the base, on every floating-point backbone tensor) plus its heads.
    The base defaults to the one its recipe names."""
    from sparsemerge.checkpoint import BaseCheckpoint
    from sparsemerge.formats.merged import read_merged
    from sparsemerge.models import DEMO_BASE_ID

    files = read_merged(path)
    rb = files.recipe.get("base") if isinstance(files.recipe.get("base"), dict) else {}
    if base is None:
        mid = rb.get("model_id")
        base = None if mid in (None, DEMO_BASE_ID) else mid
        gguf_file = gguf_file or rb.get("gguf_file")
    merged = BaseCheckpoint(path)
    if not merged.streamable:
        raise SparseMergeError(f"{path}: cannot read the merged backbone ({merged.reason})")
    b0 = BaseCheckpoint(base, gguf_file)
    if merged.backbone_class != b0.backbone_class:
        raise SparseMergeError(f"{path} is a {merged.backbone_class}, the base {b0.path} a "
                               f"{b0.backbone_class}")
    targets: dict[str, TargetDelta] = {}
    for name, st in merged.entries.items():
        if name not in b0.shapes or not ST_FLOAT.get(st.dtype, False):
            continue
        if merged.shapes[name] != b0.shapes[name]:
            raise SparseMergeError(f"tensor {name}: {merged.shapes[name]} in {path}, "
                                   f"{b0.shapes[name]} in the base {b0.path}")
        delta = (merged.tensor(name).to(torch.float32) - b0.tensor(name).to(torch.float32))
        sp = SparseTensor.from_dense(delta)
        if sp.nnz:
            targets[name] = TargetDelta(shape=tuple(delta.shape), sparse=sp)
    heads = {t: Head(module=h.config["module"], labels=h.labels,
                     problem_type=h.config["problem_type"],
                     params={k: v.to(torch.float32) for k, v in h.params.items()},
                     prompt=h.config.get("prompt"))
             for t, h in files.heads.items()}
    info = b0.base_info(sorted(targets), model_id=str(base) if base else None)
    wfiles = [path / f for f in files.weight_files if f.endswith(".safetensors")]
    merged.close()
    b0.close()
    return SparseAdapter(
        targets=targets, base=info, heads=heads, method="merge",
        hyperparameters={"merge_method": files.recipe.get("method"),
                         "parameters": files.recipe.get("parameters", {})},
        extra={"source": {"path": source or str(path), "kind": "merged-model",
                          "file": ", ".join(f.name for f in wfiles),
                          "sha256": _sha_files(wfiles)}})


ST_FLOAT = {"F64": True, "F32": True, "F16": True, "BF16": True}


__all__ = ["input_kind", "load_full_finetune", "load_merge_input", "load_merged_model",
           "load_peft_lora", "sparsify_delta"]
