"""Train a few chosen entries of frozen ``nn.Linear`` weights with memory ∝ trainable entries.

The fast path (``impl="fast"``)
-------------------------------
Per target weight ``W`` (out x in) with sorted flat indices ``idx`` (``flat = row * in + col``)
and trainable fp32 ``values`` the effective weight is kept *merged in place*::

    W[idx] = orig + gate * values            (SpaRTA: no gate, i.e. gate = 1)
    W      = W0 + gate * (D + scatter(values))   (with a frozen dense init D, e.g. RIGSA)

``orig`` is a copy of ``W0`` at the indices taken at attach time, so every re-sync
recomputes the weight from the original values: no drift however many steps are taken, and
``remove()`` restores ``W0`` bit-exactly. (With a dense ``D`` the whole ``W0`` is kept, since
the whole weight changes whenever the gate does.)

The forward is the ordinary ``F.linear(x, W, b)`` on that weight, wrapped in a custom
``torch.autograd.Function`` whose backward computes only

    dX      = dY @ W
    dvalues = gate * (dY^T @ X)[idx]            (an SDDMM: ``torch.sparse.sampled_addmm`` on a
                                                CSR pattern built once per layer)
    dgate   = <SDDMM, values> (+ sum(dY * (X @ D^T)) with a dense D: one extra matmul)

The dense out x in weight gradient is never formed; optimizer state exists only for the
values. Bias and weight stay frozen (``requires_grad=False``).

Speed on CPU (what the measurements here taught)
------------------------------------------------
The CPU ``sampled_addmm`` kernel computes ``dot(mat1[r, :], mat2t[c, :])``: it needs ``dY^T``
and ``X^T`` with the token axis contiguous. In the natural (tokens, features) layout both are
transposed copies, and those copies (torch's serial blocked transpose: ~0.35 ms for
2048 x 384 fp32, ~2 ms for 2048 x 1536) cost more than the dot products themselves (~0.1-0.3 ms
per MiniLM layer at 0.5-0.7 % density); the dense weight gradient would be ~3-13 ms. So:

- each transpose is made exactly once, explicitly. ``X^T`` is made in the forward, while
  ``X`` is still in cache, and saved instead of ``X`` (the backward needs nothing else from
  it); ``dY^T`` in the backward (fused with the fp32 cast for bf16/fp16 models, which the CPU
  kernel does not support). Pitfall: ``a.t().to(torch.float32,
  memory_format=torch.contiguous_format)`` silently returns the non-contiguous view for fp32
  ``a``, and ``sampled_addmm`` then transposes internally on every call;
- targets reading the same input tensor (query/key/value) share one ``X^T``;
- the kernel walks the CSR rows of its first operand in order and reads the second at random
  rows; for wide inputs (in > out) the pattern is built for ``W^T`` so that the random reads
  hit the smaller ``dY^T`` (a precomputed permutation restores row-major order);
- features-major layouts: a target whose input is a purely elementwise function of other
  targets' outputs (``intermediate -> GELU -> output``, ``act(gate) * up -> down``) switches
  those producers to compute ``(W @ X^T)^T`` (a features-major result, same values) and
  itself returns ``dX`` as ``(W^T @ dY^T)^T``. The elementwise ops in between keep that layout,
  so the two widest transposes per block (2048 x 1536 input of the down projection and
  output gradient of the up projection) disappear. Decided once, on the first training
  forward, by looking at the autograd graph; anything else in between (a norm, a view,
  dropout) and layouts stay natural. Only for fp32 weights on CPU; ``layouts=False``
  disables it. Values depend on the layout only in the last bits (summation order).

On a GPU
--------
No CSR pattern: ``dvalues`` comes from dense blocks of ``dY^T @ X`` (at most 64 MiB of fp32
each, freed at once) gathered at the indices: tensor cores make that matmul cheap, and it uses
only the plainest kernels. (``sampled_addmm`` on CUDA was suspected of wrong gradients on an
H200; the failing test turned out to seed its layers badly, so that suspicion is unproven.)

Re-sync
-------
Automatic: each forward compares the ``_version`` counters of ``values`` (and ``gate``) with
the ones at the last sync and re-writes the weight when they changed. In-place updates
(``add_``, ``addcdiv_``, plain and foreach AdamW, ``load_state_dict``'s ``copy_``) bump these
counters, so ``opt.step(); model(x)`` just works and costs one Python comparison per layer
when nothing changed. Invisible are changes made through ``.data`` (its own counter) and
torch's *fused* AdamW (``fused=True``, transformers' default ``adamw_torch_fused``), which
updates without bumping them: call :func:`sync_all` (``SparseModel.after_step`` does) after
those. The weight is
never written between a forward and its backward unless ``values`` change in between (which
would be a bug in the training loop anyway).

The oracle (``impl="autograd"``)
--------------------------------
``W_eff = W0 + gate * (D + W0.new_zeros().index_add(idx, values))`` recomputed every forward
through plain autograd (dense weight gradient per layer). Slow and memory-hungry; it is the
test oracle and the ``--impl autograd`` baseline. It never writes into the weight.

Precision
---------
``values`` and ``gate`` are fp32 whatever the weight dtype; ``orig`` is kept in the weight's
dtype (exact) and upcast to fp32 per sync. For bf16/fp16 weights each sync writes
``(orig + gate * values).to(weight.dtype)`` (round to nearest even): a delta
smaller than half an ulp of ``W0`` at that entry does not show in the forward yet, but it keeps
accumulating in fp32 (its gradient does not depend on the rounding) and appears once large
enough. The SDDMM is computed in fp32 (both operands cast up per layer, transiently). The
input is saved for backward in the compute dtype (autocast's, else the input's own): bf16 on a
bf16 base or under bf16 autocast. Attach after casting/moving the model: ``model.to()``
afterwards would also cast the values. See docs/NUMERICS.md.

Integration
-----------
``attach_sparse_deltas`` registers each target's ``values`` (and ``gate``) on the target
``nn.Linear`` as parameters ``sparse_delta_values`` / ``sparse_delta_gate`` (``register=True``),
so ``[p for p in model.parameters() if p.requires_grad]``, DDP and ``model.zero_grad()`` see
them like any PEFT adapter parameter; ``remove()`` unregisters them. The module's
``forward`` is overridden on the instance only, so state-dict names are unchanged. While
attached, ``model.state_dict()`` holds the merged weights plus the ``sparse_delta_*`` entries:
take adapters from ``deltas()``, and ``remove()`` before saving a base. The base weights are
written in place: never share the attached model with code that expects ``W0`` (e.g. a
frozen reference model); use a copy.

Memory
------
Per trainable entry: values, their gradient and two AdamW moments (16 B), ``orig`` in the
weight's dtype (2 B on a bf16 base, 4 B on fp32), the flat indices in int32 (4 B; int64 only
for a weight of 2**31 entries or more): 22-24 B, plus 8 B on wide layers on the CPU (in >
out: the int32 CSR columns of W^T and the permutation back). The row-major pattern's columns
(``indices % in``) and the pattern's zeros are made per backward, and the int64 copy of the
indices that ``index_copy_`` needs per sync: transient, one layer at a time. No dense weight
gradient. Activations: each target keeps its input (as ``X^T``, shared by targets that read
the same input), like full fine-tuning does; LoRA keeps inputs only of the layers it adapts.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import SparseMergeError

IMPLS = ("fast", "autograd")
_GPU_BLOCK = 1 << 24  # fp32 entries of one transient dense dW block on a GPU (64 MiB)
VALUES_ATTR = "sparse_delta_values"
GATE_ATTR = "sparse_delta_gate"
_MARK = "_sparse_delta_target"


def _t_as(a: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a.t()`` as a contiguous ``dtype`` tensor (one copy, cast fused in).

    Not ``a.t().to(dtype, memory_format=torch.contiguous_format)`` alone: when ``a`` already
    has that dtype ``.to`` returns the non-contiguous view unchanged and ``sampled_addmm``
    would then transpose internally, on every call.
    """
    if a.dtype == dtype:
        return a.t().contiguous()
    return a.t().to(dtype, memory_format=torch.contiguous_format)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the forward's matmul runs in: autocast's when it is on for ``x``'s device,
    else ``x``'s own. The input is saved for backward in it (an fp32 activation under bf16
    autocast is kept in bf16: half the memory, and the values the matmul really used)."""
    dev = x.device.type
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        on, dtype = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
    elif dev == "cpu":
        on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    else:
        on, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return dtype if on else x.dtype


def _f32(a: torch.Tensor) -> torch.Tensor:
    return a if a.dtype == torch.float32 else a.float()


def _index_dtype(numel: int) -> torch.dtype:
    """int32 for the index state of a weight with fewer than 2**31 entries (half of int64's
    bytes per trainable entry), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def _crow(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row pointers (in ``rows``' dtype) of the entries in rows ``rows`` (sorted or not)."""
    crow = torch.zeros(n_rows + 1, dtype=rows.dtype, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return crow


class _TransposeCache:
    """Single-entry cache of ``x.t().contiguous()``, shared by the targets of one set, so that
    targets reading the same input (query/key/value) transpose it once.

    Keyed on the input tensor (held strongly, so its storage cannot be reused while cached)
    plus its version counter, shape and strides.
    """

    __slots__ = ("key", "src", "xt")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.key: tuple | None = None
        self.src: torch.Tensor | None = None
        self.xt: torch.Tensor | None = None

    def get(self, x2: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (base.data_ptr(), base._version, tuple(x2.shape), x2.stride(), x2.dtype, dtype)
        if self.key == key and self.xt is not None:
            return self.xt
        xt = _t_as(x2, dtype)
        self.key, self.src, self.xt = key, base, xt
        return xt


def _is_feature_major(a2: torch.Tensor) -> bool:
    """True when the 2-D (tokens, features) ``a2`` is stored features-major (``a2.t()`` is
    contiguous), i.e. its transpose for the SDDMM is free."""
    return a2.size(0) > 1 and a2.size(1) > 1 and a2.t().is_contiguous()


def _linear_feature_major(x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(W @ x^T)^T`` so that the result is stored
    features-major: same values (up to summation order), strides ``(..., 1, tokens)``."""
    x2 = x.reshape(-1, x.shape[-1])
    if bias is None:
        yt = torch.mm(weight, x2.t())
    else:
        yt = torch.addmm(bias.unsqueeze(1), weight, x2.t())
    return yt.t().view(*x.shape[:-1], weight.shape[0])


def _transposed_input(target: SparseDeltaTarget, x: torch.Tensor,
                      dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """``(X^T contiguous (in, T) in ``dtype``, x is features-major)``, made in the forward
    while ``x`` is still in cache and saved *instead of* ``x`` (same memory or less: the
    backward needs nothing else from ``x``). Free for a features-major ``x`` of that dtype;
    shared between targets that read the same ``x``."""
    x2 = x.reshape(-1, x.shape[-1])
    if _is_feature_major(x2):
        return x2.t().to(dtype), True
    cache = target._xt_cache
    return (_t_as(x2, dtype) if cache is None else cache.get(x2, x, dtype)), False


def _row_blocks(indices: torch.Tensor, shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """``(first row, end row, first index, end index)`` blocks of the weight's rows, each at most
    ``_GPU_BLOCK`` entries, with the slice of the sorted ``indices`` that falls in each."""
    out_f, in_f = shape
    step = max(1, _GPU_BLOCK // in_f)
    starts = list(range(0, out_f, step))
    edges = torch.tensor([r * in_f for r in starts] + [out_f * in_f], device=indices.device)
    bounds = torch.searchsorted(indices, edges).tolist()
    return [(r, min(r + step, out_f), bounds[i], bounds[i + 1]) for i, r in enumerate(starts)]


def _sddmm(target: SparseDeltaTarget, gyt: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """(dY^T @ X) at the target's indices in row-major order, fp32; ``gyt`` = dY^T (out, T)
    and ``xt`` = X^T (in, T), both contiguous fp32."""
    if target._row_blocks is not None:  # a GPU: dense blocks of dW, gathered
        vals = torch.empty(target.nnz, dtype=torch.float32, device=gyt.device)
        in_f = xt.shape[0]
        for r0, r1, lo, hi in target._row_blocks:
            block = torch.mm(gyt[r0:r1], xt.t()).view(-1)
            vals[lo:hi] = block.index_select(0, target._idx[lo:hi] - r0 * in_f)
        return vals
    if target._perm is None:
        return torch.sparse.sampled_addmm(target._csr(), gyt, xt.t(), beta=0.0).values()
    # Wide input (in > out): stream the bigger X^T row by row, gather from the smaller dY^T,
    # then put the values back in row-major order.
    vals_t = torch.sparse.sampled_addmm(target._csr(), xt, gyt.t(), beta=0.0).values()
    return vals_t.index_select(0, target._perm)


class _SparseDeltaLinearFn(torch.autograd.Function):
    """y = x W^T + b with W already holding W0 + gate*(D + S); grads for x, values, gate."""

    @staticmethod
    def forward(ctx, x, values, gate, target):
        module = target.module
        xt, x_fm = _transposed_input(target, x, _compute_dtype(x))
        ctx.target, ctx.x_shape, ctx.x_fm = target, x.shape, x_fm
        ctx.save_for_backward(xt, values, gate)
        if target.feature_major_out:
            return _linear_feature_major(x, module.weight, module.bias)
        return F.linear(x, module.weight, module.bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        xt, values, gate = ctx.saved_tensors
        target: SparseDeltaTarget = ctx.target
        if target._xt_cache is not None:
            target._xt_cache.clear()  # forward-only; don't keep the last input alive
        weight = target.module.weight
        need_x, need_v, need_g = ctx.needs_input_grad[:3]
        out_f = weight.shape[0]
        gy2 = gy.reshape(-1, out_f)  # a view for natural and features-major layouts alike
        gyt = _t_as(gy2) if (need_v or need_g) else None  # (out, T), free if gy is f-major
        gx = gv = gg = None
        if need_x:
            if (gyt is not None and ctx.x_fm and target.layouts
                    and weight.dtype == torch.float32):
                # Give the gradient back in the layout x came in (features-major): computed
                # as W^T @ dY^T from the transpose we need anyway, it costs nothing extra and
                # spares the producer of x (and the elementwise ops between) a transpose.
                gx = torch.mm(weight.t(), gyt).t().view(ctx.x_shape)
            else:
                gx = torch.mm(gy2, weight.to(gy2.dtype)).view(ctx.x_shape)
        if gyt is not None:
            s = _sddmm(target, gyt, _f32(xt))
            if gate is None:
                gv = s
            else:
                if need_v:
                    gv = s * gate
                if need_g:
                    gg = torch.dot(s, values)
                    if target.dense is not None:
                        proj = F.linear(xt.t(), target.dense.to(xt.dtype))
                        gg = gg + (proj.float() * gy2.float()).sum()
                    gg = gg.reshape(gate.shape)
        return gx, gv, gg, None


# Autograd nodes of elementwise ops that may sit between two targets (activations, GLU
# products, composite GELUs). See ``SparseDeltaTarget._probe``.
_ELEMENTWISE_NODES = frozenset({
    "GeluBackward0", "SiluBackward0", "ReluBackward0", "TanhBackward0", "SigmoidBackward0",
    "MulBackward0", "MulBackward1", "AddBackward0", "AddBackward1", "PowBackward0",
    "DivBackward0", "DivBackward1", "LeakyReluBackward0", "EluBackward0", "MishBackward0",
    "HardswishBackward0", "HardsigmoidBackward0", "SoftplusBackward0",
})


def _elementwise_producers(node: Any, depth: int = 8) -> list[SparseDeltaTarget] | None:
    """The targets of which the tensor made by ``node`` is a purely elementwise function.

    ``None`` as soon as any path leads to something else (a norm, a view, dropout, a leaf,
    another kind of layer) or runs deeper than ``depth``: then nothing may be assumed.
    """
    if node is None:
        return []  # a constant (does not require grad)
    target = getattr(node, "target", None)
    if isinstance(target, SparseDeltaTarget):
        return [target]
    if depth == 0 or type(node).__name__ not in _ELEMENTWISE_NODES:
        return None
    found: list[SparseDeltaTarget] = []
    for nxt, _ in node.next_functions:
        sub = _elementwise_producers(nxt, depth - 1)
        if sub is None:
            return None
        found.extend(sub)
    return found


class SparseDeltaTarget:
    """The trainable sparse delta of one ``nn.Linear`` weight. Built by ``attach_sparse_deltas``."""

    def __init__(
        self,
        name: str,
        module: nn.Linear,
        indices: torch.Tensor,
        impl: str,
        values: torch.Tensor | None = None,
        gate: float | None = None,
        dense: torch.Tensor | None = None,
        xt_cache: _TransposeCache | None = None,
        layouts: bool = True,
    ) -> None:
        weight = module.weight
        out_f, in_f = weight.shape
        self.name = name
        self.module = module
        self.impl = impl
        self.shape = (out_f, in_f)
        dev = weight.device
        # The index state (flat indices, CSR pointers/columns, permutation) in int32 when the
        # weight allows; ``indices`` / ``delta()`` give int64 copies.
        self._idx = indices.to(device=dev, dtype=_index_dtype(weight.numel())).contiguous()
        nnz = self._idx.numel()
        if values is None:
            v = torch.zeros(nnz, dtype=torch.float32, device=dev)
        else:
            v = values.detach().to(device=dev, dtype=torch.float32).reshape(-1).clone()
            if v.numel() != nnz:
                raise SparseMergeError(
                    f"{name}: initial values have {v.numel()} entries, indices {nnz}"
                )
        self.values = nn.Parameter(v)
        self.gate = (
            None if gate is None
            else nn.Parameter(torch.tensor(float(gate), dtype=torch.float32, device=dev))
        )
        if dense is not None:
            if tuple(dense.shape) != self.shape:
                raise SparseMergeError(
                    f"{name}: dense init has shape {tuple(dense.shape)}, weight {self.shape}"
                )
            dense = dense.detach().to(device=dev, dtype=torch.float32).contiguous()
        self.dense = dense
        self._xt_cache = xt_cache
        # CPU: the SDDMM's CSR pattern as row pointers plus, for W^T, columns and the
        # permutation back to row-major order (see ``_csr``).
        self._crow: torch.Tensor | None = None
        self._col: torch.Tensor | None = None
        self._perm: torch.Tensor | None = None
        self._row_blocks: list[tuple[int, int, int, int]] | None = None
        if impl == "fast" and dev.type != "cpu":
            self._row_blocks = _row_blocks(self._idx, self.shape)
        elif impl == "fast":
            rows, cols = self._idx // in_f, self._idx % in_f
            if in_f > out_f:
                # The CPU kernel walks the CSR rows of its first operand in order and reads the
                # second at random rows: better the random reads hit the smaller dY^T. So the
                # pattern is built for W^T (in x out); _perm maps back to row-major order.
                order = torch.argsort(cols * out_f + rows)
                self._crow = _crow(cols, in_f)
                self._col = rows[order]
                self._perm = torch.empty_like(rows)
                self._perm[order] = torch.arange(nnz, dtype=rows.dtype, device=dev)
            else:
                self._crow = _crow(rows, out_f)
        with torch.no_grad():
            # Original entries in the weight's dtype (exact), upcast to fp32 per sync.
            self.orig = weight.detach().view(-1).index_select(0, self._idx)
            # With a dense init the whole weight changes with the gate: keep all of W0.
            self.w0 = weight.detach().clone() if dense is not None else None
        self._synced: tuple[int, int] | None = None
        self._removed = False
        # Layout optimisation (fast impl, fp32 weights on CPU): see ``_probe``.
        self.layouts = (
            layouts and impl == "fast" and weight.dtype == torch.float32 and dev.type == "cpu"
        )
        self.feature_major_out = False
        self._probed = False

    # -- state ---------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self._idx.numel())

    @property
    def indices(self) -> torch.Tensor:
        """The sorted flat indices as int64 (a copy when they are stored as int32)."""
        return self._idx.to(torch.int64)

    def _csr(self) -> torch.Tensor:
        """The SDDMM's CSR pattern, an fp32 tensor of zeros (of W, or of W^T for wide layers).

        Built per call from the stored row pointers: the columns of W's row-major pattern are
        ``_idx % in`` (not stored), the values transient zeros. O(nnz), a few percent of the
        SDDMM itself, and it saves 8 bytes per trainable entry.
        """
        col = self._idx % self.shape[1] if self._col is None else self._col
        shape = self.shape if self._col is None else self.shape[::-1]
        # Zeros, not empty(): sampled_addmm multiplies the pattern by beta=0 and NaN * 0 = NaN.
        vals = torch.zeros(col.numel(), dtype=torch.float32, device=col.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
            return torch.sparse_csr_tensor(self._crow, col, vals, shape, check_invariants=False)

    def parameters(self) -> list[nn.Parameter]:
        return [self.values] if self.gate is None else [self.values, self.gate]

    def _versions(self) -> tuple[int, int]:
        return (self.values._version, -1 if self.gate is None else self.gate._version)

    @torch.no_grad()
    def sync(self, force: bool = False) -> None:
        """Write ``W0 + gate * (D + S)`` into the weight (fast impl) if the values changed."""
        if self.impl != "fast" or self._removed:
            return
        ver = self._versions()
        if not force and ver == self._synced:
            return
        weight = self.module.weight
        v = self.values.detach()
        if self.dense is None:
            # ``orig + v * gate`` (two roundings, no fused multiply-add as in addcmul): the
            # same arithmetic as ``apply.add_delta_``, so a saved adapter re-applies to
            # bit-identical weights.
            orig = _f32(self.orig)
            new = orig + v if self.gate is None else orig + v * self.gate
            # index_copy_ takes int64 indices only: a transient copy, as cheap as the write.
            weight.view(-1).index_copy_(0, self._idx.long(), new.to(weight.dtype))
        else:
            delta = self.dense.reshape(-1).index_add(0, self._idx, v)
            w0 = self.w0.reshape(-1).to(torch.float32)
            # Out of place: w0 must never be modified (it may alias self.w0 for fp32).
            full = w0 + delta if self.gate is None else w0 + delta * self.gate  # as above
            weight.copy_(full.view(self.shape).to(weight.dtype))
        self._synced = ver

    def effective_delta(self) -> torch.Tensor:
        """Dense fp32 ``gate * (D + S)`` (for checks; O(numel) memory)."""
        d = (
            torch.zeros(self.shape[0] * self.shape[1], dtype=torch.float32,
                        device=self._idx.device)
            if self.dense is None else self.dense.reshape(-1).clone()
        )
        d.index_add_(0, self._idx, self.values.detach())
        if self.gate is not None:
            d.mul_(self.gate.detach())
        return d.view(self.shape)

    def delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 indices, values) detached copies; the gate (if any) is *not* folded in."""
        return self._idx.to(torch.int64, copy=True), self.values.detach().clone()

    # -- forward -------------------------------------------------------------------------
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if self._synced != self._versions():
            self.sync()
        module = self.module
        trains = self.values.requires_grad or (self.gate is not None and self.gate.requires_grad)
        if not (trains and torch.is_grad_enabled()):  # eval / frozen delta: a frozen linear
            return F.linear(x, module.weight, module.bias)
        if self.layouts and not self._probed:
            self._probe(x)
        return _SparseDeltaLinearFn.apply(x, self.values, self.gate, self)

    def _probe(self, x: torch.Tensor) -> None:
        """First training forward: if this target's input is a purely elementwise function of
        other targets' outputs (``intermediate.dense -> GELU -> output.dense``,
        ``act(gate) * up -> down``), switch those producers to features-major output from their
        next forward on. The elementwise ops keep that layout, so this target's input and the
        producers' output gradients (which this target then returns features-major too) need
        no transposes for the SDDMM. Anything else between (a norm, a view, dropout) and
        nothing changes; values agree in any layout up to the last bits."""
        self._probed = True
        if x.grad_fn is None or getattr(x.grad_fn, "target", None) is not None:
            return  # a leaf, or straight from another target (no elementwise op between)
        producers = _elementwise_producers(x.grad_fn)
        if producers and all(p.layouts and p is not self for p in producers):
            for p in producers:
                p.feature_major_out = True

    def _forward_autograd(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        w = module.weight
        base = (
            torch.zeros(w.numel(), dtype=torch.float32, device=w.device)
            if self.dense is None else self.dense.reshape(-1)
        )
        delta = base.index_add(0, self._idx, self.values)
        if self.gate is not None:
            delta = delta * self.gate
        w_eff = (w.to(torch.float32) + delta.view(self.shape)).to(w.dtype)
        return F.linear(x, w_eff, module.bias)

    def attach(self, register: bool) -> None:
        m = self.module
        m.forward = self._forward_fast if self.impl == "fast" else self._forward_autograd
        setattr(m, _MARK, self)
        if register:
            m.register_parameter(VALUES_ATTR, self.values)
            if self.gate is not None:
                m.register_parameter(GATE_ATTR, self.gate)
        self.sync(force=True)

    @torch.no_grad()
    def remove(self) -> None:
        """Restore ``W0`` bit-exactly and return the module to plain ``nn.Linear`` behaviour."""
        if self._removed:
            return
        m = self.module
        if self.impl == "fast":
            w = m.weight
            if self.w0 is not None:
                w.copy_(self.w0)
            else:
                w.view(-1).index_copy_(0, self._idx.long(), self.orig)
        if "forward" in m.__dict__:
            del m.forward
        for attr in (VALUES_ATTR, GATE_ATTR, _MARK):
            if attr in m._parameters:
                del m._parameters[attr]
            elif attr in m.__dict__:
                delattr(m, attr)
        self._crow = self._col = self._perm = None
        self._removed = True


class SparseDeltaSet:
    """All sparse deltas attached to one model. Returned by ``attach_sparse_deltas``.

    ``parameters()`` are the trainable fp32 tensors (values, then gates); give them (and the
    heads) to the optimizer. Use as a context manager to ``remove()`` on exit.
    """

    def __init__(self, targets: dict[str, SparseDeltaTarget], impl: str,
                 xt_cache: _TransposeCache | None) -> None:
        self.targets = targets
        self.impl = impl
        self._xt_cache = xt_cache

    def __getitem__(self, name: str) -> SparseDeltaTarget:
        return self.targets[name]

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, t in self.targets.items():
            yield f"{name}.values", t.values
        for name, t in self.targets.items():
            if t.gate is not None:
                yield f"{name}.gate", t.gate

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def sync(self, force: bool = False) -> None:
        """Re-write every merged weight whose values/gate changed (all of them if ``force``)."""
        for t in self.targets.values():
            t.sync(force=force)
        if self._xt_cache is not None:
            self._xt_cache.clear()

    def remove(self) -> None:
        """Restore every weight to ``W0`` exactly and detach; the set is unusable afterwards."""
        for t in self.targets.values():
            t.remove()
        if self._xt_cache is not None:
            self._xt_cache.clear()

    def deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{weight name: (indices, values)}``, detached copies, gates not folded in."""
        return {name: t.delta() for name, t in self.targets.items()}

    def gates(self) -> dict[str, float]:
        return {n: float(t.gate.detach()) for n, t in self.targets.items() if t.gate is not None}

    def __enter__(self) -> SparseDeltaSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def sync_all(model: nn.Module) -> None:
    """Re-write every weight of ``model`` that carries a sparse delta, changed or not: what
    the lazy re-sync cannot see (see Re-sync above) reaches the next forward. O(nnz)."""
    for module in model.modules():
        target = getattr(module, _MARK, None)
        if target is not None:
            target.sync(force=True)


def layout_state(model: nn.Module) -> dict[str, list[bool]]:
    """Per module of ``model`` carrying a sparse delta: [probed, features-major output], the
    layouts its first training forward chose. Checkpoints keep them: a resumed run would
    choose at its own first forward, later than the uninterrupted one, and the layouts round
    differently (their sums run in another order)."""
    return {n: [t._probed, t.feature_major_out] for n, m in model.named_modules()
            if (t := getattr(m, _MARK, None)) is not None}


def set_layout_state(model: nn.Module, state: Mapping[str, list[bool]]) -> None:
    """Restore what :func:`layout_state` returned (for the modules named in it)."""
    for n, m in model.named_modules():
        t = getattr(m, _MARK, None)
        if t is not None and n in state:
            t._probed, t.feature_major_out = (bool(v) for v in state[n])


def _check_indices(name: str, idx: torch.Tensor, numel: int) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.is_floating_point():
        raise SparseMergeError(f"{name}: mask must be a 1-D integer tensor of flat indices")
    idx = idx.to(torch.int64)
    if idx.numel() == 0:
        raise SparseMergeError(f"{name}: mask is empty; drop the target instead")
    if int(idx[0]) < 0 or int(idx[-1]) >= numel:
        raise SparseMergeError(f"{name}: mask indices out of range [0, {numel})")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise SparseMergeError(f"{name}: mask indices must be sorted ascending and unique")
    return idx


def attach_sparse_deltas(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    impl: str = "fast",
    *,
    gate: float | None = None,
    dense_init: Mapping[str, torch.Tensor] | None = None,
    values_init: Mapping[str, torch.Tensor] | None = None,
    register: bool = True,
    share_input_transpose: bool = True,
    layouts: bool = True,
) -> SparseDeltaSet:
    """Make the entries ``masks[name]`` of each named ``nn.Linear`` weight trainable.

    ``masks`` maps weight parameter names relative to ``model`` (e.g.
    ``"encoder.layer.0.attention.self.query.weight"``) to sorted unique flat int64 indices.
    ``gate``: ``None`` (SpaRTA, W = W0 + S) or the initial value of a learnable scalar gate per
    target (RIGSA, e.g. 1e-6). ``dense_init``: optional frozen dense tensors D per target
    (W = W0 + gate * (D + S)). ``values_init``: optional initial values (default zeros).
    Weights (and biases) are frozen by this call. See the module docstring for the mechanics.
    """
    if impl not in IMPLS:
        raise SparseMergeError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    dense_init = dict(dense_init or {})
    values_init = dict(values_init or {})
    unknown = (set(dense_init) | set(values_init)) - set(masks)
    if unknown:
        raise SparseMergeError(f"dense_init/values_init name targets without a mask: "
                               f"{sorted(unknown)}")
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    cache = _TransposeCache() if impl == "fast" and share_input_transpose else None
    targets: dict[str, SparseDeltaTarget] = {}
    for name, idx in masks.items():
        if not name.endswith(".weight"):
            raise SparseMergeError(f"{name}: target must be a weight parameter name ('*.weight')")
        mod_path = name[: -len(".weight")]
        try:
            module = model.get_submodule(mod_path)
        except AttributeError as e:
            raise SparseMergeError(f"{name}: no module {mod_path!r} in the model") from e
        if not isinstance(module, nn.Linear):
            raise SparseMergeError(
                f"{name}: sparse deltas support nn.Linear weights, got {type(module).__name__}"
            )
        if hasattr(module, _MARK):
            raise SparseMergeError(f"{name}: a sparse delta is already attached")
        weight = module.weight
        if len(owners.get(id(weight), [])) > 1:
            raise SparseMergeError(
                f"{name}: weight is shared with {owners[id(weight)]} (tied); untie it first"
            )
        if not weight.is_contiguous():
            raise SparseMergeError(f"{name}: weight is not contiguous")
        if not weight.is_floating_point():
            raise SparseMergeError(f"{name}: weight dtype {weight.dtype} is not floating point")
        targets[name] = SparseDeltaTarget(
            name, module, _check_indices(name, idx, weight.numel()), impl,
            values=values_init.get(name), gate=gate, dense=dense_init.get(name),
            xt_cache=cache, layouts=layouts,
        )
    # Everything validated: now freeze and attach.
    for t in targets.values():
        t.module.weight.requires_grad_(False)
        if t.module.bias is not None:
            t.module.bias.requires_grad_(False)
        t.attach(register)
    return SparseDeltaSet(targets, impl, cache)
