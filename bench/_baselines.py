"""Baseline methods for the benchmarks, driven by the same training loop as SpaRTA.

``PeftLoRA`` (PEFT LoRA injected into the backbone) and ``FullFT`` (every backbone weight
trainable) plug into ``sparsemerge.train.loop`` like any registered method (passed to
``setup(method=...)``). They are kept here, fixed, so benchmark numbers stay comparable even
when the package's own ``lora`` / ``full`` methods change.
"""

from __future__ import annotations

import torch

from sparsemerge.adapter import LowRank, SparseTensor, TargetDelta
from sparsemerge.declare import Param
from sparsemerge.models import backbone_of
from sparsemerge.train.methods import METHODS
from sparsemerge.train.methods.base import Method


class PeftLoRA(Method):
    name = "bench-lora"
    summary = "PEFT LoRA on the given modules (benchmark baseline)"
    reference = "E. J. Hu et al. LoRA: Low-Rank Adaptation of Large Language Models. ICLR 2022"
    params = (Param("rank", int, 8, "LoRA rank", low=1),
              Param("alpha", float, 16.0, "LoRA alpha (scale = alpha / rank)"),
              Param("modules", str, "query,value", "comma-separated module names"))
    uses_targets = False

    def prepare(self, model, target_names, config, *, batches=None):
        from peft import LoraConfig, inject_adapter_in_model

        self.backbone = backbone_of(model)
        lc = LoraConfig(r=self.hparams["rank"], lora_alpha=self.hparams["alpha"],
                        lora_dropout=0.0, target_modules=self.hparams["modules"].split(","))
        inject_adapter_in_model(lc, self.backbone)
        params = [p for n, p in self.backbone.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        self._groups = [{"params": params, "name": "lora"}]
        return self._groups

    def export(self):
        out = {}
        scale = self.hparams["alpha"] / self.hparams["rank"]
        for name, mod in self.backbone.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                a = mod.lora_A["default"].weight.detach().float()
                b = mod.lora_B["default"].weight.detach().float()
                shape = (b.shape[0], a.shape[1])
                out[f"{name}.base_layer.weight"] = TargetDelta(shape, lowrank=LowRank(
                    SparseTensor.from_dense(a), SparseTensor.from_dense(b), scale))
        return out


class FullFT(Method):
    name = "bench-full"
    summary = "full fine-tuning of every backbone parameter (benchmark baseline)"
    reference = "J. Devlin et al. BERT. NAACL 2019 (standard fine-tuning)"
    uses_targets = False

    def prepare(self, model, target_names, config, *, batches=None):
        params = list(backbone_of(model).parameters())
        for p in params:
            p.requires_grad_(True)
        self._groups = [{"params": params, "name": "backbone"}]
        return self._groups

    def export(self):
        return {}  # the benches do not save full models


def method_for(name: str, config):
    """A method instance: ``lora`` / ``full`` are the bench baselines above (fixed, so the
    numbers stay comparable over time), anything else comes from the registry."""
    if name in ("lora", "full"):
        return {"lora": PeftLoRA, "full": FullFT}[name](config)
    return METHODS[name](config)


def lora_matched_density(base=None, rank: int = 8, modules=("query", "value"),
                         targets: str | None = None) -> tuple[float, int, int]:
    """(density, LoRA trainable count, numel of the targets): the SpaRTA density over
    ``targets`` (a regex as ``--targets``; default every linear layer) that trains as many
    entries as LoRA of ``rank`` on ``modules``."""
    from sparsemerge.models import default_targets, load_backbone

    bb = load_backbone(base)
    lora = sum(rank * (m.in_features + m.out_features) for n, m in bb.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in modules)
    numel = sum(bb.get_parameter(n).numel() for n in default_targets(bb, targets))
    return lora / numel, lora, numel


__all__ = ["FullFT", "PeftLoRA", "lora_matched_density", "method_for"]
