"""SpaRTA: train a random subset of the backbone's weight entries (plus the head).

Per target weight ``W`` (every linear layer of the backbone by default) the trainable entries
are ``masks.seeded_indices(seed, name, numel, nnz_for_density(numel, density))``: an
exact-count random subset fixed by ``(seed, tensor name)``, so the saved adapter stores no
index bytes (the ``seed`` codec). The deltas are trained through the fast sparse path
(``attach_sparse_deltas``: weight kept merged in place, SDDMM gradient, optimizer state only
for the ``nnz`` entries), or through plain autograd with ``impl="autograd"`` (the oracle).
Everything else in the backbone (token embeddings included) stays frozen; the loop trains
the classification head fully.

``mask_exclude`` (``train --mask-exclude ADAPTER``) draws each mask from the entries the given
adapters leave untouched (``masks.seeded_indices_excluding``), so adapters meant to be merged
never share an entry. Such a mask depends on the excluded adapters' indices, not on the seed
alone: its tensors are stored with explicit indices, and the metadata (``extra["training"]``)
records a fingerprint of the indices excluded from each adapter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsemerge import masks
from sparsemerge.adapter import SparseTensor, TargetDelta
from sparsemerge.declare import Param
from sparsemerge.errors import SparseMergeError
from sparsemerge.formats.adapter_file import DTYPES
from sparsemerge.models import backbone_of, tensor_hash
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
        self.excluded: dict[str, np.ndarray] = {}
        self.exclude_records: list[dict[str, Any]] = []
        seed = self.hparams["mask_seed"]
        self.mask_seed = int(config.seed if seed is None else seed)

    def masks_for(self, backbone: nn.Module, target_names: list[str]) -> dict[str, torch.Tensor]:
        """The seeded mask (sorted flat int64 indices) of every target, avoiding the entries
        of the ``mask_exclude`` adapters."""
        paths = self.config.mask_exclude
        self.excluded, self.exclude_records = excluded_entries(paths, backbone, target_names)
        out = {}
        for name in target_names:
            numel = backbone.get_parameter(name).numel()
            nnz = masks.nnz_for_density(numel, self.hparams["density"])
            if name not in self.excluded:
                out[name] = torch.from_numpy(masks.seeded_indices(self.mask_seed, name, numel,
                                                                  nnz))
                continue
            try:
                idx = masks.seeded_indices_excluding(self.mask_seed, name, numel, nnz,
                                                     self.excluded[name])
            except SparseMergeError as exc:
                raise SparseMergeError(f"--mask-exclude {' '.join(paths)}: tensor {name}: "
                                       f"{exc}; lower --density") from None
            out[name] = torch.from_numpy(idx)
        return out

    def prepare(self, model: nn.Module, target_names: list[str], config: SparseConfig, *,
                batches: Callable[[], Iterator[dict]] | None = None) -> list[dict[str, Any]]:
        backbone = backbone_of(model)
        self.deltas = attach_sparse_deltas(backbone, self.masks_for(backbone, target_names),
                                           impl=config.impl)
        self._groups = [{"params": list(self.deltas.parameters()), "name": "deltas"}]
        return self._groups

    def start_from(self, model: nn.Module, target_names: list[str], config: SparseConfig,
                   targets: dict[str, TargetDelta]) -> list[dict[str, Any]]:
        """The adapter's config gives the same masks: check them, then take its values."""
        groups = self.prepare(model, target_names, config)
        if set(targets) != set(self.deltas.targets):
            raise SparseMergeError("the adapter's targets differ from those its options select "
                                   "on this model; load it with is_trainable=False")
        with torch.no_grad():
            for name, t in targets.items():
                own = self.deltas[name]
                if t.sparse is None or not torch.equal(t.sparse.indices.to(own.indices.device),
                                                       own.indices):
                    raise SparseMergeError(f"tensor {name}: the adapter's entries are not the "
                                           "mask its options draw; load it with "
                                           "is_trainable=False")
                own.values.copy_(t.sparse.values)
        self.deltas.sync()
        return groups

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
            seed = None if name in self.excluded else self.mask_seed  # not the seeded mask
            out[name] = TargetDelta(shape=tuple(shape), sparse=SparseTensor(
                tuple(shape), idx.cpu(), values.cpu(), mask_seed=seed))
        return out

    def remove(self) -> None:
        if self.deltas is not None:
            self.deltas.remove()
            self.deltas = None

    def state_dict(self) -> dict[str, Any]:
        return {"mask_exclude": self.exclude_records} if self.exclude_records else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mask_exclude", []) != self.exclude_records:
            raise SparseMergeError("--resume: the adapters given to --mask-exclude changed "
                                   "since the checkpoint was written (their indices differ), so "
                                   "the masks would too; resume with the same adapters")

    def info(self) -> dict[str, Any]:
        out = {"mask_seed": self.mask_seed, "impl": self.config.impl}
        if self.exclude_records:
            out["mask_exclude"] = self.exclude_records
        return out


def excluded_entries(paths: Sequence[str], backbone: nn.Module, target_names: list[str]
                     ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """(per target, the flat indices the adapters at ``paths`` change; per adapter, a record
    with a SHA-256 of those indices, tensors in name order). An adapter's entries are those
    of its effective deltas, as ``sparsemerge overlap`` counts them; it must be made on this
    base."""
    from sparsemerge.formats.adapter_file import load_adapter
    from sparsemerge.hub import resolve_path

    used: dict[str, list[np.ndarray]] = {}
    records = []
    for path in paths:
        where = f"--mask-exclude {path}"
        try:
            adapter = load_adapter(resolve_path(path))
        except SparseMergeError as exc:
            raise SparseMergeError(f"{where}: {exc}") from None
        shared = sorted(set(target_names) & set(adapter.targets))
        if not shared:
            raise SparseMergeError(f"{where}: it changes none of the tensors this run trains "
                                   f"(made on {adapter.base.model_id}); exclude adapters made "
                                   "on this --base with the same --targets")
        h = hashlib.sha256()
        entries = 0
        for name in shared:
            weight = backbone.get_parameter(name)
            want = adapter.base.tensor_hashes.get(name)
            if tuple(adapter.targets[name].shape) != tuple(weight.shape) or (
                    want is not None and want != tensor_hash(name, weight)):
                raise SparseMergeError(f"{where}: made on another base model "
                                       f"({adapter.base.model_id}, fingerprint "
                                       f"{adapter.base.fingerprint or 'unknown'}): tensor "
                                       f"{name} differs from this run's; exclude adapters "
                                       "made on this --base")
            idx = adapter.targets[name].sparse_delta(name).indices.numpy().astype("<i8")
            used.setdefault(name, []).append(idx)
            entries += idx.size
            h.update(name.encode() + b"\0" + idx.tobytes())
        records.append({"path": str(path), "tensors": len(shared), "entries": entries,
                        "indices_sha256": h.hexdigest()})
    return {n: np.concatenate(v) for n, v in used.items()}, records
