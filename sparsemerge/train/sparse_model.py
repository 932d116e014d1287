"""``get_sparse_model``: any training method on your own transformers model, PEFT-style.

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model = get_sparse_model(model, SparseConfig(method="sparta", density=0.01))
    model.print_trainable_parameters()
    ...                                   # train: transformers' Trainer, accelerate, a plain loop
    model.save_pretrained("my-adapter")   # the sparsemerge adapter format
    merged = model.merge_and_unload()     # a plain transformers model, deltas written in

    model = SparseModel.from_pretrained(fresh_model, "my-adapter")  # apply a saved adapter

A :class:`SparseModel` is an ``nn.Module`` that calls your model (``.model``) and reads the
attributes it lacks from it (``config``, ``generate``, ...). The CLI trainer
(``sparsemerge.train.loop``) attaches methods, steps, exports and saves through this class.

The stepping rule, the same in every loop. Call ``after_step(optimizer)`` after every
optimizer step and ``end_of_epoch(epoch, optimizer)`` after every full epoch
(:class:`~sparsemerge.train.callbacks.SparseCallback` does both inside a ``Trainer``). Most
methods keep their trainable tensors for the whole run, so any optimizer over the trainable
parameters works, fused ones too: ``after_step`` re-writes the weights the sparse fast path
keeps merged, whose lazy re-sync cannot see a fused optimizer's update. RIGSA's pruning
rounds replace the trainable tensors: build the optimizer from
:meth:`SparseModel.param_groups` (its groups are named), and the hooks put the new tensors
into the groups of the same names, in place -- AdamW's moments restart for them, as with a
new optimizer; learning rates and the schedule go on. The hooks return True when that
happened: whatever else holds the old tensors (a ``DistributedDataParallel`` wrapper) must be
rebuilt then. The CLI trainer re-wraps; a ``Trainer`` cannot, so ``SparseCallback`` refuses
RIGSA in a multi-process ``Trainer`` (train it with ``sparsemerge train`` under ``torchrun``).

Move the model to its device before ``get_sparse_model``: the methods keep index tensors
beside the weights, so a ``SparseModel`` with a method attached refuses to move.

Checkpoints: ``state_dict()`` of a ``SparseModel`` training a method holds only what
training changes -- the trainable tensors (the method's and the head's) and, under
``sparse_state``, the method's own state (RIGSA's round and mask, Partial-LoRA's
allocation) and the sparse path's memory layouts -- so a ``Trainer`` checkpoint, an
``accelerate`` ``save_state`` or a ``torch.save(model.state_dict())`` is adapter-sized, as
PEFT's are. ``load_state_dict`` takes it into the same ``get_sparse_model(base, config)``
(the frozen base is not in it): the method's state first (which may replace its trainable
tensors), then their values. An optimizer must then hold the new tensors before its own state
is loaded: :meth:`SparseModel.bind_optimizer` makes its ``load_state_dict`` take them first
(``SparseCallback`` binds the Trainer's). A resumed run then ends on the uninterrupted
run's adapter bit for bit (tested on CPU; GPU kernels need not be deterministic).

To continue training from a saved adapter instead (its deltas and head, not the optimizer):
``SparseModel.from_pretrained(model, path, is_trainable=True)`` (SpaRTA).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsemerge.adapter import BaseInfo, SparseAdapter, TargetDelta
from sparsemerge.apply import AppliedAdapter, apply, apply_to_tensors, pick_head
from sparsemerge.errors import SparseMergeError
from sparsemerge.models import (
    DEMO_BASE_ID,
    backbone_of,
    base_info,
    check_base,
    default_targets,
    demo_base_path,
    head_module_name,
    named_base_tensors,
)
from sparsemerge.train.config import HEAD_LR_FACTOR, SparseConfig, auto_weight_decay
from sparsemerge.train.heads import export_head, head_parameters, init_head
from sparsemerge.train.methods import Method, get_method
from sparsemerge.train.sparse_linear import layout_state, set_layout_state, sync_all

Batch = Mapping[str, torch.Tensor]
STATE_KEY = "sparse_state"  # the state dict's key of the method's state (see the module doc)
_TENSOR = "__tensor__"


def _pack(state: Any, key: str) -> dict[str, torch.Tensor]:
    """``state`` (JSON but for its tensors) as tensors only, as safetensors files (Trainer and
    accelerate checkpoints) need: the JSON text under ``key``, each tensor under ``key.N``."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[f"{key}.{len(tensors)}"] = x.detach().contiguous()
            return {_TENSOR: len(tensors) - 1}
        if isinstance(x, dict):
            return {k: encode(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [encode(v) for v in x]
        return x

    text = json.dumps(encode(state)).encode()
    return {key: torch.frombuffer(bytearray(text), dtype=torch.uint8), **tensors}


def _unpack(packed: Mapping[str, torch.Tensor], key: str) -> Any:
    def decode(x: Any) -> Any:
        if isinstance(x, dict):
            return (packed[f"{key}.{x[_TENSOR]}"] if set(x) == {_TENSOR}
                    else {k: decode(v) for k, v in x.items()})
        return [decode(v) for v in x] if isinstance(x, list) else x

    return decode(json.loads(packed[key].cpu().numpy().tobytes()))


def _load_pre_hook(module: SparseModel, state_dict: dict[str, Any], prefix: str,
                   *args: Any) -> None:
    """Restore the method's state before the children load the tensor values: it may
    replace the trainable tensors (RIGSA's pruned ones), which then take the values."""
    module._load_prefix = prefix
    key = prefix + STATE_KEY
    packed = {k: state_dict.pop(k) for k in list(state_dict)
              if k == key or k.startswith(key + ".")}
    if module.method is not None and key in packed:
        state = _unpack(packed, key)
        module.method.load_state_dict(state["method"])
        set_layout_state(module.model, state["layouts"])


def _load_post_hook(module: SparseModel, incompatible: Any) -> None:
    """A checkpoint holds no frozen tensor: those are not missing."""
    if module.method is None:
        return
    prefix = module._load_prefix
    keep = set(module.adapter_keys())
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if not k.startswith(prefix) or k[len(prefix):] in keep]


@functools.cache
def _typed(cls: type[SparseModel], model_cls: type[nn.Module]) -> type[SparseModel]:
    """``cls`` whose ``forward`` has ``model_cls.forward``'s signature: transformers' Trainer
    reads it from the class (label names) and the instance (dataset columns to keep)."""
    def forward(self: SparseModel, *args: Any, **kwargs: Any) -> Any:
        return cls.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(model_cls.forward)  # type: ignore[attr-defined]
    return type(cls.__name__, (cls,), {"forward": forward, "_wraps": model_cls,
                                       "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _model_id(model: nn.Module) -> str:
    """The id an adapter records for its base: the model's ``name_or_path``; the demo
    MiniLM by its Hub id, as the CLI records it."""
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    try:
        demo = demo_base_path()
    except SparseMergeError:
        return path
    return DEMO_BASE_ID if Path(path).exists() and Path(path).resolve() == demo.resolve() else path


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class SparseModel(nn.Module):
    """Your model with a sparse adapter being trained (:func:`get_sparse_model`) or applied
    (:meth:`from_pretrained`). See the module docstring for the stepping rule."""

    _wraps: type[nn.Module] | None = None

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> SparseModel:
        if model is not None and cls._wraps is None:
            cls = _typed(cls, type(model))
        return super().__new__(cls)

    def __init__(self, model: nn.Module, config: SparseConfig | None = None, *,
                 batches: Iterable[Batch] | None = None, init_head: bool = True,
                 method: Method | None = None, base_id: str | None = None) -> None:
        """Attach ``config``'s method to ``model`` (None: wrap only, as ``from_pretrained``
        does). See :func:`get_sparse_model` for the keywords."""
        super().__init__()
        self.model = model
        self.sparse_config = config
        self.method: Method | None = None
        self.base: BaseInfo | None = None
        self.target_names: list[str] = []
        self.adapter: SparseAdapter | None = None  # what from_pretrained applied
        self.applied: AppliedAdapter | None = None
        self._load_prefix = ""
        self.register_load_state_dict_pre_hook(_load_pre_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)
        if config is not None:
            self._attach(config, batches, init_head, method, base_id)

    def _attach(self, config: SparseConfig, batches: Iterable[Batch] | None, new_head: bool,
                method: Method | None, base_id: str | None,
                start: dict[str, TargetDelta] | None = None) -> None:
        model = self.model
        self.method = method or get_method(config.method)(config)
        backbone = backbone_of(model)
        if self.method.uses_targets:
            self.target_names = default_targets(backbone, config.targets)
        self.base = base_info(backbone, base_id or _model_id(model), self.target_names)
        model.requires_grad_(False)
        if head_module_name(model) is not None:
            if new_head:
                init_head(model, seed=config.seed)
            for _, p in head_parameters(model):
                p.requires_grad_(True)
        device = _device_of(model)

        def calibration() -> Iterator[dict[str, torch.Tensor]]:
            for b in batches or ():
                yield {k: v.to(device) for k, v in b.items()}

        if start is None:
            self.method.prepare(model, self.target_names, config,
                                batches=None if batches is None else calibration)
        else:
            self.method.start_from(model, self.target_names, config, start)

    # -- an nn.Module that is the user's model -----------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def _apply(self, fn: Any, recurse: bool = True) -> SparseModel:
        if self.method is not None:
            device = _device_of(self.model)
            if fn(torch.empty(0, device=device)).device != device:
                raise SparseMergeError(
                    f"this model trains a {self.method.name} adapter on {device}: it cannot "
                    "move now. Move the model to its device before get_sparse_model (with a "
                    "Trainer: model.to(training_args.device) first)")
        return super()._apply(fn, recurse)

    def adapter_keys(self) -> list[str]:
        """The state dict's tensors of what training changes: the trainable parameters."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """With a method attached: the trainable tensors and the method's state only (see
        the module docstring); else the whole model's."""
        out = super().state_dict(*args, destination=destination, prefix=prefix,
                                 keep_vars=keep_vars)
        if self.method is None:
            return out
        keep = {prefix + k for k in self.adapter_keys()}
        for k in [k for k in out if k.startswith(prefix) and k not in keep]:
            del out[k]
        out.update(_pack({"method": self.method.state_dict(), "layouts": layout_state(self.model)},
                         prefix + STATE_KEY))
        return out

    def require_method(self) -> Method:
        """The attached method; SparseMergeError when there is none."""
        if self.method is None:
            raise SparseMergeError("no training method is attached (the model was loaded with "
                                   "from_pretrained, or merged or unloaded): use "
                                   "get_sparse_model to train one")
        return self.method

    # -- training ----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT's method of the same name."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def param_groups(self, lr: float, *, head_lr: float | None = None,
                     weight_decay: float | None = None) -> list[dict[str, Any]]:
        """Named optimizer param groups: the method's (``lr`` and ``weight_decay`` unless the
        method sets its own, e.g. RIGSA's ``delta_decay``), then the head's at ``head_lr``
        (default 5 x ``lr``): its weights with ``weight_decay``, its biases without.
        ``weight_decay`` None is ``sparsemerge train``'s ``--weight-decay auto`` (1.0 for
        SpaRTA, 0 otherwise)."""
        if weight_decay is None:
            weight_decay = auto_weight_decay(self.require_method().name)
        groups = []
        for g in self.require_method().param_groups():
            g = {"lr": lr, "weight_decay": weight_decay, **g,
                 "params": [p for p in g["params"] if p.requires_grad]}
            if g["params"]:
                groups.append(g)
        head = ([p for _, p in head_parameters(self.model) if p.requires_grad]
                if head_module_name(self.model) is not None else [])
        head_lr = HEAD_LR_FACTOR * lr if head_lr is None else head_lr
        for name, params, wd in (("head", [p for p in head if p.dim() > 1], weight_decay),
                                 ("head_bias", [p for p in head if p.dim() <= 1], 0.0)):
            if params:
                groups.append({"params": params, "lr": head_lr, "weight_decay": wd,
                               "name": name})
        return groups

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Call after every optimizer step; True if the method replaced its trainable
        tensors (they are in ``optimizer`` now; see :meth:`sync_optimizer`)."""
        method = self.require_method()
        sync_all(self.model)  # a fused optimizer's update is invisible to the lazy re-sync
        method.after_step()
        return self.sync_optimizer(optimizer)

    def end_of_epoch(self, epoch: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Call after every full epoch (``epoch`` counts from 0; RIGSA prunes here unless it
        prunes every ``round_steps``); returns as :meth:`after_step`."""
        self.require_method().end_of_epoch(epoch)
        return self.sync_optimizer(optimizer)

    def sync_optimizer(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """If the method replaced its trainable tensors since the last call (a pruning round,
        a loaded state dict): put the new ones into ``optimizer``'s groups of the same names,
        dropping the old ones' state, and return True (without an ``optimizer``, build a new
        one from :meth:`param_groups`)."""
        method = self.require_method()
        if not method.rebuild_optimizer:
            return False
        if optimizer is not None and not self.holds(optimizer):
            self.check_optimizer(optimizer, replacing=True)
            new = {g["name"]: [p for p in g["params"] if p.requires_grad]
                   for g in method.param_groups()}
            for group in optimizer.param_groups:
                if group.get("name") in new:
                    kept = {id(p) for p in new[group["name"]]}
                    for p in group["params"]:
                        if id(p) not in kept:
                            optimizer.state.pop(p, None)
                    group["params"] = new[group["name"]]
        method.rebuild_optimizer = False
        return True

    def holds(self, optimizer: torch.optim.Optimizer) -> bool:
        """Does ``optimizer`` train every trainable tensor the method has now?"""
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        return all(id(p) in held for g in self.require_method().param_groups()
                   for p in g["params"] if p.requires_grad)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Make ``optimizer.load_state_dict`` first take the tensors a loaded model state
        brought (:meth:`sync_optimizer`), so that a checkpoint's optimizer state lands on
        them: call it on the optimizer before resuming (``SparseCallback`` binds a
        ``Trainer``'s). Returns ``optimizer``."""
        def take_new_tensors(opt: torch.optim.Optimizer, state: Any) -> None:
            self.sync_optimizer(opt)

        # accelerate's AcceleratedOptimizer loads through the optimizer it wraps
        getattr(optimizer, "optimizer", optimizer).register_load_state_dict_pre_hook(
            take_new_tensors)
        return optimizer

    def check_optimizer(self, optimizer: torch.optim.Optimizer | None, *,
                        replacing: bool = False) -> None:
        """Raise unless ``optimizer`` can take the tensors the method creates while training
        (or has created: ``replacing``): it needs a group named as each of the method's
        (:meth:`param_groups` makes them)."""
        method = self.require_method()
        if not (replacing or method.replaces_tensors()):
            return
        names = {g.get("name") for g in (optimizer.param_groups if optimizer else [])}
        missing = [g["name"] for g in method.param_groups() if g["name"] not in names]
        if missing:
            raise SparseMergeError(
                f"method '{method.name}' replaces its trainable tensors while training, so "
                f"the optimizer needs the groups {missing}: build it with "
                "torch.optim.AdamW(model.param_groups(lr=...)) (with a Trainer: "
                "optimizers=(that optimizer, None))")

    # -- the adapter -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The method's facts for the adapter's metadata (``extra["training"]``)."""
        method = self.require_method()
        return {"trainable": method.num_trainable(), "torch": torch.__version__,
                **method.info()}

    def export(self, *, metrics: dict[str, Any] | None = None,
               hyperparameters: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None,
               prompt: dict[str, Any] | None = None) -> SparseAdapter:
        """The adapter as trained so far: the method's deltas, the head (named
        ``task_name``, labels from ``model.config.id2label``) and the base's fingerprint.
        ``hyperparameters`` add to the config's; ``extra`` replaces the default metadata;
        ``prompt`` is the template the head's inputs were wrapped in
        (``PromptTemplate.to_dict()``), stored with the head so scoring wraps them alike."""
        method = self.require_method()
        cfg = self.sparse_config
        heads = {}
        if head_module_name(self.model) is not None:
            mc = self.model.config
            labels = [str(mc.id2label[i]) for i in range(mc.num_labels)]
            heads[cfg.task_name] = export_head(
                self.model, labels, mc.problem_type or "single_label_classification",
                prompt=prompt)
        hp = {k: v for k, v in cfg.to_dict().items() if k != "quiet"}
        hp.update(hyperparameters or {})
        hp["method_params"] = dict(method.hparams)  # resolved: every param, defaults included
        return SparseAdapter(targets=method.export(), base=self.base, heads=heads,
                             method=cfg.method, hyperparameters=hp, metrics=dict(metrics or {}),
                             extra={"training": self.info()} if extra is None else extra)

    def save_pretrained(self, path: str | Path, *, save_dtype: str = "bf16",
                        metrics: dict[str, Any] | None = None,
                        hyperparameters: dict[str, Any] | None = None) -> Path:
        """Write the adapter to ``path`` (atomically), its values in ``save_dtype``: what
        ``sparsemerge inspect / evaluate / merge`` and :meth:`from_pretrained` read."""
        from sparsemerge.formats.adapter_file import save_adapter

        adapter = self.export(metrics=metrics, hyperparameters=hyperparameters)
        return save_adapter(adapter, path, value_dtype=save_dtype)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, *, task: str | None = None,
                        force: bool = False, is_trainable: bool = False) -> SparseModel:
        """``model`` with the adapter at ``path`` (a directory, its safetensors file, or
        ``hf://owner/name[@rev]``) applied in place, as ``sparsemerge.apply`` does: base
        fingerprint checked (``force``: a warning), ``W0 + delta`` written into the weights,
        the head for ``task`` loaded (the model needs ``num_labels`` of it).

        ``is_trainable`` (PEFT's keyword): attach the adapter's method instead, with the
        options it was trained with and its deltas and head as the starting point, to train
        on (SpaRTA; a method whose adapter lacks its training state, e.g. RIGSA's pruning
        round, raises: resume its checkpoint instead)."""
        from sparsemerge.formats.adapter_file import load_adapter
        from sparsemerge.hub import resolve_path

        adapter = load_adapter(resolve_path(path))
        if not is_trainable:
            wrapper = cls(model)
            wrapper.adapter = adapter
            wrapper.applied = apply(model, adapter, task=task, force=force)
            return wrapper
        found = getattr(getattr(model, "config", None), "_name_or_path", "") or "the model"
        check_base(adapter.base, named_base_tensors(backbone_of(model)), list(adapter.targets),
                   found_id=found, force=force)
        fields = {f.name for f in dataclasses.fields(SparseConfig)}
        hp = {k: v for k, v in adapter.hyperparameters.items() if k in fields}
        head = pick_head(adapter, task) if head_module_name(model) is not None else None
        config = SparseConfig(**{**hp, "method": adapter.method,
                                 "mask_exclude": hp.get("mask_exclude") or [],
                                 "task_name": head[0] if head else hp.get("task_name", "task")})
        wrapper = cls(model)
        wrapper.sparse_config = config
        wrapper._attach(config, None, False, None, adapter.base.model_id, start=adapter.targets)
        wrapper.adapter = adapter
        if head is not None:  # the head's values (checked to fit), still trainable
            apply(model, dataclasses.replace(adapter, targets={}), task=head[0])
        return wrapper

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Your model with the adapter's deltas written into its weights (and the head in
        place): a plain transformers model, e.g. to ``save_pretrained``."""
        if self.method is not None:
            targets = self.method.export()
            self.method.remove()
            self.method = None
            apply_to_tensors(named_base_tensors(backbone_of(self.model)),
                             SparseAdapter(targets=targets, base=self.base))
        self.applied = None
        return self.model

    def unload(self) -> nn.Module:
        """Your model with its base weights back, exactly: the method detached, or the
        applied adapter (head included) undone."""
        if self.method is not None:
            self.method.remove()
            self.method = None
        if self.applied is not None:
            self.applied.undo()
            self.applied = None
        return self.model


def get_sparse_model(model: nn.Module, config: SparseConfig, *,
                     batches: Iterable[Batch] | None = None, init_head: bool = True,
                     method: Method | None = None, base_id: str | None = None) -> SparseModel:
    """Make ``model`` (a transformers model; with a classification head, the head trains
    too) train ``config``'s method: every other parameter is frozen.

    ``batches``: a few training batches (dicts of tensors the model takes), which
    Partial-LoRA needs to set its per-layer densities. ``init_head``: initialise the head as
    the SpaRTA paper does (small normal weights seeded by ``config.seed``, zero bias); False
    keeps the model's own. ``method``: a method instance instead of ``config.method`` (e.g.
    one defined outside the package). ``base_id``: the base's id recorded in the adapter
    (default: the model's ``name_or_path``).
    """
    return SparseModel(model, config, batches=batches, init_head=init_head, method=method,
                       base_id=base_id)


__all__ = ["SparseModel", "get_sparse_model"]
