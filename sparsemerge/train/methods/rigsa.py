"""RIGSA: Random Initialization of Gated Sparse Adapters (Retault & Berreby, 2025).

Per target weight ``W`` (every linear layer of the backbone by default)::

    W = W0 + alpha * dW

- ``dW`` starts as a seeded, full-rank random tensor
  ``masks.seeded_uniform(init_seed, name, numel) * init_scale`` (uniform in
  ``[-init_scale, init_scale)``; ``init_scale`` defaults to ``1/sqrt(in_features)``, the bound
  of ``nn.Linear``'s own default init). It is regenerated from ``(init_seed, name)``, never
  stored (the adapter's :class:`~sparsemerge.adapter.SeededInit`).
- ``alpha`` is one learnable scalar gate per target, ReZero-style, initialised to ``1e-6``, so
  the model starts (numerically) at the base while ``dW`` is free to move.

Iterative magnitude pruning (IMP), ``rounds`` times (default 5):

1. train for one epoch (or ``round_steps`` optimizer steps);
2. per target tensor, among the currently trainable entries whose sign equals the sign of
   their initial value (``sign(dW) == sign(init)``, with ``sign(0) = 0``), keep the
   ``k = floor(n_same_sign * prune_keep + 1/2)`` largest by ``|dW|`` (``prune_keep`` default
   0.8; ``k`` is clamped to ``[1, n_same_sign]``, ties broken towards the lower flat index by
   ``masks.magnitude_indices``). Every other trainable entry -- sign-flipped or below the
   cut -- is *reset* and frozen: to its initial value (``reset=init``, the paper) or to zero
   (``reset=zero``: the adapter then is a purely sparse delta). If no entry of a tensor kept
   its sign, its single largest ``|dW|`` stays trainable, so that every tensor keeps a
   trainable entry and a trainable gate.

``reset`` stays ``init`` by default because that is the method as published. On MiniLM
Textual MNIST (README, "RIGSA, Textual MNIST and forgetting") ``reset=zero`` learned better
and forgot less with the same schedule: 93.8% vs 89.2% held-out, SST-2 forgetting -0.7 vs -2.8
points. The reason: with ``init``, half of the entries go back to their random values after
the first round behind a gate that has already grown, which adds full-rank noise to every
weight (held-out accuracy at step 250, after two rounds of 100 steps: 9% vs 49%).

After the last round the surviving mask (the "winning ticket") is trained for the rest of the
run. Kept entries continue from their trained values (no rewinding) and the gates carry over;
AdamW restarts its moment estimates for the new, smaller parameter set each round (the
learning-rate schedule runs over the whole run). Pruning is per tensor (layer-wise), on
``|dW|`` (the same order as ``|alpha * dW|`` within a tensor).

Weight decay: AdamW's decoupled decay ``dW <- dW * (1 - lr * delta_decay)`` on the trainable
``dW`` entries, default ``delta_decay = 1.0`` as in the paper. It pulls ``dW`` towards *zero*
(not towards its init), i.e. the effective weight back towards ``W0``; frozen entries and the
gates are not decayed. (``--weight-decay`` keeps applying to the head only.)

Memory. Round 0 trains the full dense ``dW`` (inherent to RIGSA: every entry is trainable,
with AdamW state, i.e. about four extra fp32 copies of every target weight). From round 1 on
the trainable entries go through the fast sparse path (``sparse_linear``: merged weight,
SDDMM gradient, optimizer state only for the trainable entries) with the frozen remainder as
its dense init ``D`` (``reset=init``: the initial values with the trainable entries zeroed;
``reset=zero``: no ``D`` at all, memory proportional to the trainable entries).

Export: per target ``TargetDelta(shape, sparse=SparseTensor(ticket indices, trained dW),
init=SeededInit(init_seed, init_scale) (reset=init only), gate=alpha)``; its effective delta
``alpha * dW`` is what apply, merge and overlap use. The ticket is an arbitrary mask, so the
format stores it with the Elias-Fano codec.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsemerge import masks
from sparsemerge.adapter import SeededInit, SparseTensor, TargetDelta
from sparsemerge.declare import Param
from sparsemerge.errors import SparseMergeError
from sparsemerge.formats.adapter_file import DTYPES
from sparsemerge.models import backbone_of
from sparsemerge.train.config import SparseConfig
from sparsemerge.train.methods.base import Method
from sparsemerge.train.sparse_linear import SparseDeltaSet, attach_sparse_deltas

DELTA_ATTR = "rigsa_delta"
GATE_ATTR = "rigsa_gate"


def keep_count(n_same_sign: int, prune_keep: float) -> int:
    """Entries a tensor keeps out of ``n_same_sign`` sign-consistent ones:
    ``floor(n * prune_keep + 1/2)`` in double precision, clamped to ``[1, n]`` (0 if n = 0)."""
    return masks.nnz_for_density(n_same_sign, prune_keep)


def init_delta(seed: int, name: str, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """The initial ``dW`` of a target, computed exactly as ``TargetDelta.dense_delta`` does
    (so a stored adapter re-applies bit-identically)."""
    return TargetDelta(tuple(shape), init=SeededInit(seed, scale)).dense_delta(name)


def prune_entries(values: torch.Tensor, init: torch.Tensor, prune_keep: float
                  ) -> tuple[torch.Tensor, dict[str, int]]:
    """One IMP step on one tensor's trainable entries.

    ``values`` and ``init``: 1-D, the current and the initial ``dW`` at the trainable entries.
    Returns (sorted positions into ``values`` that stay trainable, counts).
    """
    same = torch.sign(values) == torch.sign(init)
    eligible = torch.nonzero(same, as_tuple=False).reshape(-1)
    n = int(eligible.numel())
    if n == 0:
        pos = torch.from_numpy(masks.magnitude_indices(values, 1))
    else:
        k = keep_count(n, prune_keep)
        top = torch.from_numpy(masks.magnitude_indices(values[eligible], k))
        pos = eligible[top]  # eligible is sorted and top is sorted: pos is sorted
    stats = {"trainable_before": int(values.numel()), "sign_flipped": int(values.numel()) - n,
             "kept": int(pos.numel())}
    stats["below_cut"] = stats["trainable_before"] - stats["sign_flipped"] - stats["kept"]
    return pos, stats


class _DenseDelta:
    """One target trained densely: ``W_eff = W0 + gate * dW`` with ``dW`` one full parameter.

    Round 0 trains every entry. In later rounds with a high density (>= ``sparse_below``) the
    frozen entries are masked: their gradient is zeroed by a hook (so gradient clipping sees
    only trainable entries) and after every optimizer step they are written back to their
    reset values (AdamW's decay touches them, the write-back undoes it bit-exactly).
    The module's weight is never written (it stays ``W0``); the forward is overridden on the
    instance and builds ``W0 + dW * gate`` with the same rounding as ``apply.add_delta_``.
    ``delta`` is taken over, not copied (on the weight's device, in fp32): pass a fresh tensor.
    """

    def __init__(self, module: nn.Linear, delta: torch.Tensor, gate: float,
                 frozen: torch.Tensor | None = None, reset: torch.Tensor | None = None) -> None:
        w = module.weight
        self.module = module
        self.delta = nn.Parameter(delta.detach().to(device=w.device, dtype=torch.float32)
                                  .view(w.shape))
        self.gate = nn.Parameter(torch.tensor(float(gate), dtype=torch.float32, device=w.device))
        self.frozen = frozen  # bool, shape of w: True where the entry is frozen; None: none
        self.reset = reset  # frozen entries' values (None: zero)
        if frozen is not None:
            self.delta.register_hook(lambda g: g.masked_fill(self.frozen, 0.0))
            self.enforce()
        module.register_parameter(DELTA_ATTR, self.delta)
        module.register_parameter(GATE_ATTR, self.gate)
        module.forward = self._forward

    @torch.no_grad()
    def enforce(self) -> None:
        """Write the frozen entries' reset values back into ``dW``."""
        if self.frozen is None:
            return
        if self.reset is None:
            self.delta.masked_fill_(self.frozen, 0.0)
        else:  # in place: no dense temporary
            torch.where(self.frozen, self.reset, self.delta, out=self.delta)

    def trainable_indices(self) -> torch.Tensor:
        flat = None if self.frozen is None else self.frozen.reshape(-1)
        if flat is None:
            return torch.arange(self.delta.numel(), dtype=torch.int64)
        return torch.nonzero(~flat, as_tuple=False).reshape(-1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        w = m.weight
        # ``dW * gate + W0`` in place on the product: one dense fp32 temporary, not two or
        # three (product, sum, and W0 upcast on a half base); fp32 addition commutes exactly,
        # so the values are those of ``W0 + dW * gate`` (``apply.add_delta_``). Legal in
        # place: mul saves its inputs for backward, not its output.
        w_eff = (self.delta * self.gate).add_(w).to(w.dtype)
        return F.linear(x, w_eff, m.bias)

    def remove(self) -> None:
        m = self.module
        if "forward" in m.__dict__:
            del m.forward
        for attr in (DELTA_ATTR, GATE_ATTR):
            m._parameters.pop(attr, None)


class RIGSA(Method):
    name = "rigsa"
    summary = ("random full-rank dW behind a ReZero gate (W = W0 + alpha*dW), sparsified by "
               "iterative magnitude pruning; the surviving mask (the ticket) is trained last")
    reference = ("V. Retault, Y.-E. Berreby. Random Initialization of Gated Sparse Adapters. "
                 "NewInML workshop @ ICML 2025 (arXiv:2511.01794)")
    params = (
        Param("rounds", int, 5, "pruning rounds (one per epoch, or per round_steps); the "
              "ticket is trained for the rest of the run", low=0),
        Param("prune_keep", float, 0.8, "share of the sign-consistent trainable entries each "
              "round keeps (top by |dW|)", low=0.0, high=1.0, low_open=True),
        Param("round_steps", int, None, "optimizer steps per pruning round (default: one "
              "epoch)", low=1),
        Param("reset", str, "init", "what pruned entries become: their initial value (init, "
              "the paper) or zero (zero: a purely sparse delta)", choices=("init", "zero")),
        Param("init_scale", float, None, "dW starts uniform in [-s, s) (default per tensor: "
              "1/sqrt(in_features), nn.Linear's init bound)", low=0.0, low_open=True),
        Param("gate_init", float, 1e-6, "initial value of each tensor's gate alpha (ReZero)"),
        Param("delta_decay", float, 1.0, "AdamW weight decay on dW (pulls dW to zero, the "
              "weights back to W0); the head uses --weight-decay", low=0.0),
        Param("sparse_below", float, 0.2, "after a pruning round, train through the sparse "
              "SDDMM path (memory ~ trainable entries) once the density is below this; above "
              "it a masked dense dW (faster there)", low=0.0, high=1.0),
        Param("init_seed", int, None, "seed of the random init (default: --seed)", low=0),
    )

    def __init__(self, config: SparseConfig) -> None:
        super().__init__(config)
        hp = self.hparams
        seed = hp["init_seed"]
        self.init_seed = int(config.seed if seed is None else seed)
        self.backbone: nn.Module | None = None
        self.names: list[str] = []
        self.shapes: dict[str, tuple[int, int]] = {}
        self.scales: dict[str, float] = {}
        self.dense: dict[str, _DenseDelta] = {}  # round 0, and high-density rounds
        self.sparse: SparseDeltaSet | None = None  # low-density rounds
        self.round = 0  # pruning rounds done
        self.steps_in_round = 0
        self.history: list[dict[str, Any]] = []

    # -- set-up ------------------------------------------------------------------------------
    def check_schedule(self, *, epochs: float, max_steps: int | None,
                       early_stopping: bool) -> None:
        hp = self.hparams
        if early_stopping:
            raise SparseMergeError("method 'rigsa': --patience (early stopping) is not "
                                   "supported (the set of trainable entries changes every "
                                   "pruning round)")
        need = hp["rounds"] + 1
        if hp["round_steps"] is None and max_steps is None and epochs < need:
            raise SparseMergeError(
                f"method 'rigsa': {hp['rounds']} pruning rounds of one epoch each, then the "
                f"ticket, need --epochs >= {need} (a Trainer's num_train_epochs; got "
                f"{epochs:g}); or pass -p round_steps=N, or fewer rounds (-p rounds=...)")

    def replaces_tensors(self) -> bool:
        return self.hparams["rounds"] > 0

    def _init(self, name: str) -> torch.Tensor:
        return init_delta(self.init_seed, name, self.shapes[name], self.scales[name])

    def prepare(self, model: nn.Module, target_names: list[str], config: SparseConfig, *,
                batches: Callable[[], Iterator[dict]] | None = None) -> list[dict[str, Any]]:
        self.backbone = backbone_of(model)
        self.names = list(target_names)
        scale = self.hparams["init_scale"]
        for name in self.names:
            mod = self._module(name) if name.endswith(".weight") else None
            if not isinstance(mod, nn.Linear):
                raise SparseMergeError(f"{name}: rigsa targets must be nn.Linear weights")
            out_f, in_f = mod.weight.shape
            self.shapes[name] = (int(out_f), int(in_f))
            self.scales[name] = float(scale) if scale is not None else 1.0 / math.sqrt(in_f)
        gate = self.hparams["gate_init"]
        self._attach({n: None for n in self.names}, {n: self._init(n) for n in self.names},
                     {n: gate for n in self.names}, sparse=False)
        return self._groups

    def _module(self, name: str) -> nn.Linear:
        return self.backbone.get_submodule(name[: -len(".weight")])

    def _numel(self) -> int:
        return sum(h * w for h, w in self.shapes.values())

    def _attach(self, idx: dict[str, torch.Tensor | None], values: dict[str, torch.Tensor],
                gates: dict[str, float], sparse: bool) -> None:
        """Make ``dW`` trainable at ``idx[name]`` (sorted flat; None = every entry) with the
        given values there; every other entry frozen at its init (reset=init) or zero.
        ``sparse``: through the SDDMM path, else as a (masked) dense parameter."""
        reset_init = self.hparams["reset"] == "init"
        if sparse:
            dense_init = None
            if reset_init:
                dense_init = {}
                for name, i in idx.items():
                    d = self._init(name).reshape(-1)
                    d[i] = 0.0
                    dense_init[name] = d.view(self.shapes[name])
            # layouts=False: sparse_linear's layout switch is decided by probing the first
            # training forward after attaching, which happens at a different step in a
            # resumed run than in an uninterrupted one (pruning attaches mid-run), and the two
            # layouts sum in different orders: resuming would not be bit-exact.
            self.sparse = attach_sparse_deltas(self.backbone, idx, impl=self.config.impl,
                                               gate=1.0, dense_init=dense_init,
                                               values_init=values, layouts=False)
            with torch.no_grad():
                for name, t in self.sparse.targets.items():
                    t.gate.fill_(gates[name])
            self.sparse.sync(force=True)
            targets = list(self.sparse.targets.values())
            self._set_groups([t.values for t in targets], [t.gate for t in targets])
            return
        for name in self.names:
            mod = self._module(name)
            mod.weight.requires_grad_(False)
            if mod.bias is not None:
                mod.bias.requires_grad_(False)
            i = idx[name]
            if i is None:  # every entry trainable: ``values`` is the whole dW
                self.dense[name] = _DenseDelta(mod, values[name], gates[name])
                continue
            full = self._init(name).reshape(-1)
            frozen = torch.ones(full.numel(), dtype=torch.bool)
            frozen[i] = False
            reset = full.view(self.shapes[name]).clone() if reset_init else None
            full[i] = values[name].to(torch.float32)
            if not reset_init:
                full.masked_fill_(frozen, 0.0)
            self.dense[name] = _DenseDelta(mod, full, gates[name],
                                           frozen.view(self.shapes[name]), reset)
        dd = list(self.dense.values())
        self._set_groups([d.delta for d in dd], [d.gate for d in dd])

    def _set_groups(self, deltas: list[nn.Parameter], gates: list[nn.Parameter]) -> None:
        self._groups = [
            {"params": deltas, "weight_decay": self.hparams["delta_decay"], "name": "rigsa_dW"},
            {"params": gates, "weight_decay": 0.0, "name": "rigsa_gate"},
        ]

    def _detach(self) -> None:
        for d in self.dense.values():
            d.remove()
        self.dense = {}
        if self.sparse is not None:
            self.sparse.remove()
            self.sparse = None

    # -- current state -----------------------------------------------------------------------
    def current(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Per target: (trainable flat indices, their dW values, gate) -- detached copies."""
        out = {}
        if self.sparse is None:
            for name, d in self.dense.items():
                i = d.trainable_indices()
                out[name] = (i, d.delta.detach().reshape(-1)[i].clone(), float(d.gate.detach()))
        else:
            gates = self.sparse.gates()
            for name, (i, v) in self.sparse.deltas().items():
                out[name] = (i.cpu(), v.cpu(), gates[name])
        return out

    def trainable_entries(self) -> int:
        if self.sparse is not None:
            return sum(t.nnz for t in self.sparse.targets.values())
        return sum(d.delta.numel() - (0 if d.frozen is None else int(d.frozen.sum()))
                   for d in self.dense.values())

    def num_trainable(self) -> int:
        """Trainable dW entries plus one gate per target."""
        return self.trainable_entries() + len(self.names)

    @torch.no_grad()
    def effective_weight(self, name: str) -> torch.Tensor:
        """The weight the forward of target ``name`` uses now (``W0 + gate * dW``)."""
        if self.sparse is not None:
            t = self.sparse[name]
            t.sync()
            return t.module.weight.detach().clone()
        d = self.dense[name]
        w = d.module.weight
        return (w.to(torch.float32) + d.delta * d.gate).to(w.dtype)

    def density(self) -> float:
        n = self._numel()
        return self.trainable_entries() / n if n else 0.0

    # -- pruning -----------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.config.quiet:
            return
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        print(msg, file=sys.stderr, flush=True)  # rich's live progress bar renders it above

    @torch.no_grad()
    def prune(self) -> dict[str, Any]:
        """One IMP round over every target, then re-attach the smaller trainable set."""
        cur = self.current()
        idx, vals, gates = {}, {}, {}
        totals = {"trainable_before": 0, "sign_flipped": 0, "below_cut": 0, "kept": 0}
        for name, (i, v, g) in cur.items():
            init = self._init(name).reshape(-1).to(i.device)[i]  # init may sit on the CPU
            pos, stats = prune_entries(v, init, self.hparams["prune_keep"])
            idx[name], vals[name], gates[name] = i[pos], v[pos], g
            for k in totals:
                totals[k] += stats[k]
        density = totals["kept"] / self._numel()
        sparse = density < self.hparams["sparse_below"]
        self._detach()
        self._attach(idx, vals, gates, sparse=sparse)
        self.round += 1
        self.steps_in_round = 0
        entry = {"round": self.round, **totals, "density": density,
                 "gate_abs_mean": sum(abs(g) for g in gates.values()) / max(1, len(gates)),
                 "path": "sparse" if sparse else "dense"}
        self.history.append(entry)
        self.rebuild_optimizer = True
        self._log(f"rigsa round {self.round}/{self.hparams['rounds']}: kept "
                  f"{totals['kept']:,} of {totals['trainable_before']:,} trainable entries "
                  f"({totals['sign_flipped']:,} flipped sign, {totals['below_cut']:,} below "
                  f"the cut; reset to {self.hparams['reset']}); density {density:.4%}, "
                  f"mean |gate| {entry['gate_abs_mean']:.4g}, {entry['path']} path")
        return entry

    # -- loop hooks --------------------------------------------------------------------------
    def after_step(self) -> None:
        if self.sparse is not None:
            self.sparse.sync()
        for d in self.dense.values():
            d.enforce()
        self.steps_in_round += 1
        rs = self.hparams["round_steps"]
        if rs is not None and self.round < self.hparams["rounds"] and self.steps_in_round >= rs:
            self.prune()

    def end_of_epoch(self, epoch: int) -> None:
        if self.hparams["round_steps"] is None and self.round < self.hparams["rounds"]:
            self.prune()

    def round_values(self, dtype: str) -> None:
        with torch.no_grad():
            for p in self._groups[0]["params"]:
                p.copy_(p.to(DTYPES[dtype]).to(p.dtype))
        for d in self.dense.values():
            d.enforce()  # a reset value is stored exactly (regenerated), never rounded
        if self.sparse is not None:
            self.sparse.sync()

    def export(self) -> dict[str, TargetDelta]:
        out = {}
        reset_init = self.hparams["reset"] == "init"
        for name, (i, v, g) in self.current().items():
            shape = self.shapes[name]
            frozen = i.numel() < shape[0] * shape[1]
            init = SeededInit(self.init_seed, self.scales[name]) if reset_init and frozen else None
            out[name] = TargetDelta(shape=shape, sparse=SparseTensor(shape, i, v), init=init,
                                    gate=g)
        return out

    def remove(self) -> None:
        self._detach()

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"round": self.round, "steps_in_round": self.steps_in_round,
                                 "history": [dict(h) for h in self.history],
                                 "sparse": self.sparse is not None}
        if self.round:  # the mask; values and gates are saved as parameters by the loop
            state["masks"] = {n: i for n, (i, _, _) in self.current().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.steps_in_round = int(state["steps_in_round"])
        self.history = [dict(h) for h in state["history"]]
        if "masks" in state:
            idx = {n: state["masks"][n] for n in self.names}
            self._detach()
            # Values and gates are placeholders: the loop restores them next, by name.
            self._attach(idx, {n: torch.zeros(i.numel()) for n, i in idx.items()},
                         {n: 0.0 for n in idx}, sparse=bool(state["sparse"]))
            self.rebuild_optimizer = True

    def info(self) -> dict[str, Any]:
        return {"init_seed": self.init_seed, "impl": self.config.impl,
                "rounds_done": self.round, "density": self.density(),
                "trainable_entries": self.trainable_entries(),
                "init_scale": "1/sqrt(in_features)" if self.hparams["init_scale"] is None
                else self.hparams["init_scale"],
                "prune_history": [dict(h) for h in self.history]}
