"""SpaRTA: train a random subset of the backbone's weight entries (plus the head).

Per target weight ``W`` (every linear layer of the backbone by default) the trainable entries
are ``masks.seeded_indices(seed, name, numel, nnz_for_density(numel, density))``: an
exact-count random subset fixed by ``(seed, tensor name)``, so the saved adapter stores no
index bytes (the ``seed`` codec). The deltas are trained through the fast sparse path
(``attach_sparse_deltas``: weight kept merged in place, SDDMM gradient, optimizer state only
for the ``nnz`` entries), or through plain autograd with ``impl="autograd"`` (the oracle).
Everything else in the backbone (token embeddings included) stays frozen; the loop trains
the classification head fully.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from sparsemerge import masks
from sparsemerge.adapter import SparseTensor, TargetDelta
from sparsemerge.declare import Param
from sparsemerge.formats.adapter_file import DTYPES
from sparsemerge.models import backbone_of
from sparsemerge.train.config import SparseConfig
from sparsemerge.train.methods.base import Method
from sparsemerge.train.sparse_linear import SparseDeltaSet, attach_sparse_deltas


class SpaRTA(Method):
    name = "sparta"
    summary = "train a seeded random subset of each target tensor's entries (density), head too"
    reference = ("J. Rios, P. Dognin, R. Luss, K. N. Ramamurthy. Sparsity May Be All You Need: "
                 "Sparse Random Parameter Adaptation. Findings of EMNLP 2025 "
                 "(arXiv:2502.15975)")
    params = (
        Param("density", float, 0.005, "share of each target tensor's entries that is "
              "trainable (exact count: round(numel * density))", low=0.0, high=1.0,
              low_open=True),
        Param("mask_seed", int, None, "seed of the random masks (default: --seed); give "
              "adapters meant to be merged different mask seeds to make them overlap less",
              low=0),
    )

    def __init__(self, config: SparseConfig) -> None:
        super().__init__(config)
        self.deltas: SparseDeltaSet | None = None
        seed = self.hparams["mask_seed"]
        self.mask_seed = int(config.seed if seed is None else seed)

    def masks_for(self, backbone: nn.Module, target_names: list[str]) -> dict[str, torch.Tensor]:
        """The seeded mask (sorted flat int64 indices) of every target."""
        out = {}
        for name in target_names:
            numel = backbone.get_parameter(name).numel()
            nnz = masks.nnz_for_density(numel, self.hparams["density"])
            out[name] = torch.from_numpy(masks.seeded_indices(self.mask_seed, name, numel, nnz))
        return out

    def prepare(self, model: nn.Module, target_names: list[str], config: SparseConfig, *,
                batches: Callable[[], Iterator[dict]] | None = None) -> list[dict[str, Any]]:
        backbone = backbone_of(model)
        self.deltas = attach_sparse_deltas(backbone, self.masks_for(backbone, target_names),
                                           impl=config.impl)
        self._groups = [{"params": list(self.deltas.parameters()), "name": "deltas"}]
        return self._groups

    def after_step(self) -> None:
        # The fast path also re-syncs lazily on the next forward (version counters); doing it
        # here keeps the merged weights current for anything that reads them between steps.
        self.deltas.sync()

    def round_values(self, dtype: str) -> None:
        with torch.no_grad():
            for p in self.deltas.parameters():
                p.copy_(p.to(DTYPES[dtype]).to(p.dtype))
        self.deltas.sync()

    def export(self) -> dict[str, TargetDelta]:
        out = {}
        for name, (idx, values) in self.deltas.deltas().items():
            shape = self.deltas[name].shape
            out[name] = TargetDelta(shape=tuple(shape), sparse=SparseTensor(
                tuple(shape), idx.cpu(), values.cpu(), mask_seed=self.mask_seed))
        return out

    def remove(self) -> None:
        if self.deltas is not None:
            self.deltas.remove()
            self.deltas = None

    def info(self) -> dict[str, Any]:
        return {"mask_seed": self.mask_seed, "impl": self.config.impl}
