"""SparseAdapter: what one task changed in a base model, as pure data.

Per target tensor (named as in the backbone's state dict, e.g.
``encoder.layer.0.attention.self.query.weight``) the change is

    W = W0 + gate * dW

where ``dW`` is one of
- a sparse tensor: ``values`` at sorted flat ``indices`` (SpaRTA, merged deltas),
- a seeded dense init with ``values`` overriding it at ``indices`` (RIGSA with reset=init),
- ``scale * B @ A`` with sparse factors B (out x r) and A (r x in) (Partial-LoRA, LoRA).

Heads are dense and never merged. Nothing here touches files or models, and importing this
module does not import torch (the adapter file reader uses these classes without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1


@dataclass
class SparseTensor:
    """Values at sorted, unique flat (row-major) indices of a tensor of ``shape``.

    ``mask_seed`` is set when the indices are exactly
    ``masks.seeded_indices(mask_seed, name, numel, nnz)``: the format then stores no index bytes.
    """

    shape: tuple[int, ...]
    indices: torch.Tensor  # int64, 1-D, sorted ascending, unique, in [0, numel)
    values: torch.Tensor  # 1-D, same length as indices
    mask_seed: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor (``dtype`` default fp32)."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        out = torch.zeros(self.numel, dtype=dtype)
        out[self.indices] = self.values.to(dtype)
        return out.view(self.shape)

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> SparseTensor:
        """Keep the non-zero entries of a dense tensor."""
        import torch

        flat = dense.reshape(-1)
        idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
        return cls(tuple(dense.shape), idx, flat[idx].clone())


@dataclass
class SeededInit:
    """A dense random tensor regenerated from its seed (``masks.seeded_uniform``), never stored."""

    seed: int
    scale: float


@dataclass
class LowRank:
    """dW = scale * B @ A with (possibly sparse) factors."""

    a: SparseTensor  # r x in
    b: SparseTensor  # out x r
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class TargetDelta:
    """The change to one target tensor of the base."""

    shape: tuple[int, ...]
    sparse: SparseTensor | None = None
    init: SeededInit | None = None
    lowrank: LowRank | None = None
    gate: float = 1.0

    def dense_delta(self, name: str) -> torch.Tensor:
        """The effective change ``gate * dW`` as a dense fp32 tensor (``name`` keys the init)."""
        import torch

        from sparsemerge.masks import seeded_uniform

        numel = 1
        for s in self.shape:
            numel *= s
        if self.init is not None:
            dw = torch.from_numpy(seeded_uniform(self.init.seed, name, numel)) * self.init.scale
        else:
            dw = torch.zeros(numel, dtype=torch.float32)
        if self.sparse is not None:
            dw[self.sparse.indices] = self.sparse.values.float()
        dw = dw.view(self.shape)
        if self.lowrank is not None:
            lr = self.lowrank
            dw = dw + lr.scale * (lr.b.to_dense() @ lr.a.to_dense())
        return dw * self.gate

    def sparse_delta(self, name: str) -> SparseTensor:
        """The effective change as (indices, fp32 values); O(nnz) for a plain sparse delta."""
        if self.init is None and self.lowrank is None and self.sparse is not None:
            s = self.sparse
            return SparseTensor(self.shape, s.indices, s.values.float() * self.gate, s.mask_seed)
        return SparseTensor.from_dense(self.dense_delta(name))

    @property
    def trainable(self) -> int:
        """Number of stored trainable scalars."""
        n = self.sparse.nnz if self.sparse is not None else 0
        if self.lowrank is not None:
            n += self.lowrank.a.nnz + self.lowrank.b.nnz
        return n


@dataclass
class Head:
    """A task's classification head: dense parameters of the model's head module."""

    module: str  # attribute path of the head in the task model, e.g. "classifier" or "score"
    params: dict[str, torch.Tensor]  # e.g. {"weight": ..., "bias": ...}
    labels: list[str]
    problem_type: str = "single_label_classification"
    # The prompt template its inputs were wrapped in (``PromptTemplate.to_dict()``:
    # ``{"template": str, "chat": bool}``), so that scoring wraps them the same way; None:
    # the head reads the raw text.
    prompt: dict[str, Any] | None = None


def is_prompt(d: Any) -> bool:
    """Whether ``d`` has the stored shape of a :attr:`Head.prompt` (what the format allows;
    the template's syntax is checked where it is used, ``data.templates``)."""
    return (isinstance(d, dict) and set(d) <= {"template", "chat"}
            and isinstance(d.get("template"), str) and isinstance(d.get("chat", False), bool))


@dataclass
class BaseInfo:
    """Which base an adapter belongs to; ``fingerprint`` is checked on apply and merge."""

    model_id: str
    revision: str | None = None
    fingerprint: str = ""
    tensor_hashes: dict[str, str] = field(default_factory=dict)
    architecture: str = ""


@dataclass
class SparseAdapter:
    """Everything one task (or one merge of tasks) changes in a base model."""

    targets: dict[str, TargetDelta]
    base: BaseInfo
    heads: dict[str, Head] = field(default_factory=dict)
    method: str = "sparta"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    @property
    def trainable(self) -> int:
        return sum(t.trainable for t in self.targets.values())

    @property
    def target_numel(self) -> int:
        total = 0
        for t in self.targets.values():
            n = 1
            for s in t.shape:
                n *= s
            total += n
        return total
