"""Baselines trained by the same loop as the sparse methods, so one table compares them all.

- ``lora``: PEFT's own LoRA layers (``peft.inject_adapter_in_model`` on the task model, so
  the loop's model, head and checkpoints are unchanged) on the targets. Stored in our format
  as dense low-rank factors ``LowRank(A, B, scale = alpha / r)`` (the ``dense`` index codec:
  no index bytes); ``sparsemerge export --peft`` turns the adapter back into a PEFT adapter
  directory (``sparsemerge.export``).
- ``full``: full fine-tuning: every backbone parameter except the embedding tables is
  trainable (``--targets`` restricts it to the names the regex matches). Stored as the dense
  delta ``W - W0`` (``store=dense``, default) or its per-tensor top-``density`` entries by
  magnitude (``store=sparse``; the Elias-Fano codec; the final evaluation scores the
  sparsified model). Use a small ``--lr`` (e.g. 5e-5). On a bf16 / fp16 base the optimizer
  updates fp32 master weights (registered as ``<name>_fp32`` beside each weight): each
  backward moves the half-precision gradient into the master's fp32 gradient, and each step
  writes the master back rounded. Cost per parameter: 2 (weight) + 2 (kept W0) + 4 (master)
  + 4 (gradient) + 8 (AdamW) bytes. Not combined with DDP.
- ``head``: only the classification head is trained (the loop's own head); no targets.

None of them has its own training code: the loop (``sparsemerge.train.loop``) builds the
optimizer from ``param_groups()`` and runs every step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from sparsemerge import masks
from sparsemerge.adapter import LowRank, SparseTensor, TargetDelta
from sparsemerge.declare import Param
from sparsemerge.errors import SparseMergeError, import_extra
from sparsemerge.formats.adapter_file import DTYPES
from sparsemerge.models import backbone_of
from sparsemerge.train.config import SparseConfig
from sparsemerge.train.methods.base import Method

PEFT_ADAPTER = "default"


def dense_tensor(values: torch.Tensor) -> SparseTensor:
    """A dense tensor as a SparseTensor holding every entry (stored with the ``dense`` codec)."""
    flat = values.detach().reshape(-1).cpu().clone()
    return SparseTensor(tuple(values.shape), torch.arange(flat.numel(), dtype=torch.int64), flat)


def _prefix_of(model: nn.Module, module: nn.Module) -> str:
    """Attribute path of ``module`` inside ``model`` ('' if it is the model)."""
    for name, m in model.named_modules():
        if m is module:
            return name
    raise SparseMergeError("the backbone is not a submodule of the task model")


def _round_(params, dtype: str) -> None:
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(DTYPES[dtype]).to(p.dtype))


# ------------------------------------------------------------------------------------ LoRA


class LoRA(Method):
    name = "lora"
    summary = "PEFT LoRA (dense low-rank factors B @ A) on the targets, head too"
    reference = ("E. J. Hu et al. LoRA: Low-Rank Adaptation of Large Language Models. ICLR "
                 "2022 (arXiv:2106.09685); implementation: Hugging Face PEFT")
    params = (
        Param("rank", int, 8, "LoRA rank r", low=1),
        Param("alpha", float, 16.0, "LoRA alpha: the update is (alpha / r) * B @ A",
              low=0.0, low_open=True),
        Param("dropout", float, 0.0, "LoRA dropout on the adapter branch's input",
              low=0.0, high=1.0, high_open=True),
    )

    def __init__(self, config: SparseConfig) -> None:
        super().__init__(config)
        self._model: nn.Module | None = None
        self.layers: dict[str, nn.Module] = {}  # target weight name -> PEFT lora.Linear

    def prepare(self, model: nn.Module, target_names: list[str], config: SparseConfig, *,
                batches: Callable[[], Iterator[dict]] | None = None) -> list[dict[str, Any]]:
        peft = import_extra("peft", "peft", "--method lora")

        backbone = backbone_of(model)
        prefix = _prefix_of(model, backbone)
        modules = {}
        for name in target_names:
            mpath = name[: -len(".weight")]
            if not isinstance(backbone.get_submodule(mpath), nn.Linear):
                raise SparseMergeError(f"lora: target {name} is not an nn.Linear")
            modules[name] = f"{prefix}.{mpath}" if prefix else mpath
        lora_config = peft.LoraConfig(
            r=self.hparams["rank"], lora_alpha=self.hparams["alpha"],
            lora_dropout=self.hparams["dropout"], target_modules=sorted(modules.values()),
            bias="none")
        # PEFT freezes everything but its own layers: keep what the loop made trainable (head).
        keep = [p for p in model.parameters() if p.requires_grad]
        peft.inject_adapter_in_model(lora_config, model, adapter_name=PEFT_ADAPTER)
        for p in keep:
            p.requires_grad_(True)
        self._model = model
        self.layers = {name: model.get_submodule(full) for name, full in modules.items()}
        params = []
        for layer in self.layers.values():
            params += [layer.lora_A[PEFT_ADAPTER].weight, layer.lora_B[PEFT_ADAPTER].weight]
        for p in params:  # fp32 factors on a half base, as PEFT's autocast_adapter_dtype does
            p.data = p.data.float()
        self._groups = [{"params": params, "name": "lora"}]
        return self._groups

    def round_values(self, dtype: str) -> None:
        _round_(self._groups[0]["params"] if self._groups else [], dtype)

    def export(self) -> dict[str, TargetDelta]:
        out = {}
        for name, layer in self.layers.items():
            a = layer.lora_A[PEFT_ADAPTER].weight
            b = layer.lora_B[PEFT_ADAPTER].weight
            scale = float(layer.scaling[PEFT_ADAPTER])
            w = layer.get_base_layer().weight
            out[name] = TargetDelta(shape=tuple(w.shape),
                                    lowrank=LowRank(dense_tensor(a), dense_tensor(b), scale))
        return out

    def remove(self) -> None:
        """Put the original ``nn.Linear`` modules back (their weights were never changed)."""
        model = self._model
        if model is None:
            return
        for layer in self.layers.values():
            for full, m in list(model.named_modules()):
                if m is layer:
                    parent, _, child = full.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child,
                            layer.get_base_layer())
                    break
        if "peft_config" in model.__dict__:
            del model.__dict__["peft_config"]
        self.layers, self._model = {}, None

    def info(self) -> dict[str, Any]:
        peft = import_extra("peft", "peft", "--method lora")

        return {"peft_version": peft.__version__, "scale": self.hparams["alpha"]
                / self.hparams["rank"]}


# ------------------------------------------------------------------------------------ full


class Full(Method):
    name = "full"
    summary = ("full fine-tuning of every backbone parameter except the embeddings, stored "
               "dense or magnitude-sparsified (use a small --lr, e.g. 5e-5)")
    reference = ("J. Devlin et al. BERT: Pre-training of Deep Bidirectional Transformers for "
                 "Language Understanding. NAACL 2019 (fine-tuning baseline)")
    params = (
        Param("store", str, "dense", "how the delta W - W0 is stored: dense (every entry) or "
              "sparse (each tensor's top --density entries by magnitude)",
              choices=("dense", "sparse")),
        Param("density", float, 0.005, "with store=sparse: share of each tensor's entries "
              "kept (largest |delta|)", low=0.0, high=1.0, low_open=True),
    )

    def __init__(self, config: SparseConfig) -> None:
        super().__init__(config)
        self.params_by_name: dict[str, nn.Parameter] = {}
        self.masters: dict[str, nn.Parameter] = {}  # fp32 masters of half-precision weights
        self._hooks: list[Any] = []
        self._slots: list[tuple[nn.Module, str]] = []  # where the masters are registered
        self.w0: dict[str, torch.Tensor] = {}  # in the weights' own dtype (exact)
        self.final: dict[str, SparseTensor] = {}  # what round_values kept (stored exactly)

    def prepare(self, model: nn.Module, target_names: list[str], config: SparseConfig, *,
                batches: Callable[[], Iterator[dict]] | None = None) -> list[dict[str, Any]]:
        backbone = backbone_of(model)
        embedding = {id(m.weight) for m in backbone.modules() if isinstance(m, nn.Embedding)}
        rx = re.compile(config.targets) if config.targets else None
        for name, p in list(backbone.named_parameters()):  # masters get registered below
            if id(p) in embedding or (rx is not None and not rx.search(name)):
                continue
            self.params_by_name[name] = p
            self.w0[name] = p.detach().clone()
            p.requires_grad_(True)
            if p.dtype != torch.float32:
                self._add_master(backbone, name, p)
        if self.masters and torch.distributed.is_available() and torch.distributed.is_initialized():
            raise SparseMergeError("full: fp32 master weights on a half-precision base are not "
                                   "combined with DDP; use --base-dtype fp32 (or one process)")
        if not self.params_by_name:
            raise SparseMergeError(f"full: no backbone parameter matches --targets "
                                   f"{config.targets!r}")
        self._groups = [{"params": [self._trained(n) for n in self.params_by_name],
                         "name": "backbone"}]
        return self._groups

    def _add_master(self, backbone: nn.Module, name: str, p: nn.Parameter) -> None:
        """An fp32 master for the half-precision ``p``; ``p``'s gradient moves into it."""
        mod_path, _, attr = name.rpartition(".")
        master = nn.Parameter(p.detach().float())
        module = backbone.get_submodule(mod_path)
        module.register_parameter(f"{attr}_fp32", master)
        self.masters[name] = master
        self._slots.append((module, f"{attr}_fp32"))

        def to_master(param: torch.Tensor) -> None:
            g = param.grad.float()
            master.grad = g if master.grad is None else master.grad.add_(g)
            param.grad = None

        self._hooks.append(p.register_post_accumulate_grad_hook(to_master))

    def _trained(self, name: str) -> nn.Parameter:
        """What the optimizer updates for ``name``: its fp32 master, else the weight itself."""
        return self.masters.get(name, self.params_by_name[name])

    @torch.no_grad()
    def after_step(self) -> None:
        for name, master in self.masters.items():
            self.params_by_name[name].copy_(master)  # round(master) in the weight's dtype

    def _delta(self, name: str) -> torch.Tensor:
        return self._trained(name).detach().to(torch.float32) - self.w0[name].float()

    def _stored(self, name: str) -> SparseTensor:
        """What the adapter stores for ``name``: every entry, or the top ones by magnitude."""
        delta = self._delta(name)
        shape = tuple(delta.shape)
        if self.hparams["store"] == "dense":
            return dense_tensor(delta)
        flat = delta.reshape(-1)
        nnz = masks.nnz_for_density(flat.numel(), self.hparams["density"])
        idx = torch.from_numpy(masks.magnitude_indices(flat, nnz))
        return SparseTensor(shape, idx, flat[idx.to(flat.device)].cpu())

    @torch.no_grad()
    def round_values(self, dtype: str) -> None:
        """Keep exactly what the adapter will store: W = W0 + (sparsified, rounded) delta."""
        for name, p in self.params_by_name.items():
            st = self._stored(name)
            st.values = st.values.to(DTYPES[dtype]).to(torch.float32)
            self.final[name] = st
            w = self.w0[name].reshape(-1).to(torch.float32, copy=True)
            w[st.indices.to(w.device)] += st.values.to(w.device)
            self._trained(name).copy_(w.view_as(p))
            p.copy_(w.view_as(p))

    def export(self) -> dict[str, TargetDelta]:
        out = {}
        for name, p in self.params_by_name.items():
            st = self.final.get(name) or self._stored(name)
            out[name] = TargetDelta(shape=tuple(p.shape), sparse=st)
        return out

    @torch.no_grad()
    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for name, p in self.params_by_name.items():
            p.copy_(self.w0[name])
            p.requires_grad_(False)
        for module, attr in self._slots:
            del module._parameters[attr]
        self.params_by_name, self.w0, self.final = {}, {}, {}
        self.masters, self._hooks, self._slots = {}, [], []

    def info(self) -> dict[str, Any]:
        return {"store": self.hparams["store"], "tensors": len(self.params_by_name),
                "frozen": "embeddings"}


# ------------------------------------------------------------------------------------ head


class HeadOnly(Method):
    name = "head"
    summary = "train the classification head only (the backbone stays frozen)"
    reference = ("linear probing; e.g. A. Kumar et al. Fine-Tuning can Distort Pretrained "
                 "Features and Underperform Out-of-Distribution. ICLR 2022")
    uses_targets = False

    def prepare(self, model: nn.Module, target_names: list[str], config: SparseConfig, *,
                batches: Callable[[], Iterator[dict]] | None = None) -> list[dict[str, Any]]:
        self._groups = []
        return self._groups

    def export(self) -> dict[str, TargetDelta]:
        return {}


__all__ = ["Full", "HeadOnly", "LoRA", "dense_tensor"]
