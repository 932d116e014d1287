"""Mask generation: seeded, platform-independent, integer arithmetic only.

The ``seed`` index codec stores no index bytes: the mask of a tensor is regenerated from
``(seed, tensor name, numel, nnz)`` by :func:`seeded_indices`. Everything here is defined in
exact unsigned integer arithmetic (no floating point, no torch/numpy RNG streams), so the
same inputs give the same mask on every platform and library version. The generators are
specified precisely in ``docs/CODECS.md`` (to be folded into ``docs/FORMAT.md``) and pinned
by test vectors in ``tests/test_masks.py``; changing any constant here is a format break.

Summary of the construction (all arithmetic modulo 2**64 unless stated otherwise):

- ``name_key(name)``: FNV-1a 64 over the UTF-8 bytes of the name.
- ``mix64(z)``: the SplitMix64 finaliser; ``sm64(s, j) = mix64(s + j * GAMMA)`` is the j-th
  output (j >= 1) of a SplitMix64 generator whose state starts at ``s``.
- ``derive_key(seed, name, domain) = mix64(mix64(seed + GAMMA) ^ name_key(name) ^ domain)``
  with ``domain`` = ``DOMAIN_MASK`` for masks and ``DOMAIN_UNIFORM`` for dense values.
- ``seeded_indices``: a keyed bijection ``P`` of ``[0, 2**k)`` (2**k the smallest power of two
  >= numel) built from ``ROUNDS`` rounds of ``x = (M_r * x + B_r) mod 2**k;
  x ^= x >> ceil(k/2)``. Its order-preserving restriction to ``[0, numel)`` -- the sequence
  ``P(0), P(1), P(2), ...`` with the values >= numel skipped -- is a keyed permutation ``Q``
  of ``[0, numel)``; the mask is ``{Q(0), ..., Q(nnz-1)}``, sorted. Cost O(nnz log nnz),
  never O(numel) (fewer than 2 * nnz evaluations of P as 2**k < 2 * numel); masks are
  nested (the mask for nnz is a subset of the mask for any larger nnz, same seed and name).

  Why skipping rather than cycle-walking (re-applying P until the value is in range): both
  give an exact-count subset from a keyed permutation of [0, numel), but skipping needs one
  vectorised pass over ~nnz * 2**k / numel inputs instead of ~log(nnz) shrinking passes,
  which made small tensors (a few thousand entries) 3-4x faster.
- ``seeded_uniform``: value i is ``(top 24 bits of sm64(K, i + 1)) * 2**-23 - 1`` in float32.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sparsemerge.errors import SparseMergeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DOMAIN_MASK",
    "DOMAIN_UNIFORM",
    "ROUNDS",
    "derive_key",
    "magnitude_indices",
    "mix64",
    "name_key",
    "nnz_for_density",
    "permutation_keys",
    "seeded_indices",
    "seeded_indices_excluding",
    "seeded_uniform",
]

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # SplitMix64 increment (golden ratio * 2**64, odd)
MIX_C1 = 0xBF58476D1CE4E5B9  # SplitMix64 finaliser multipliers
MIX_C2 = 0x94D049BB133111EB
FNV_OFFSET = 0xCBF29CE484222325  # FNV-1a 64 offset basis
FNV_PRIME = 0x100000001B3  # FNV-1a 64 prime
DOMAIN_MASK = 0x6D61736B  # ASCII "mask": domain separation for seeded_indices
DOMAIN_UNIFORM = 0x756E6966  # ASCII "unif": domain separation for seeded_uniform
ROUNDS = 6  # rounds of the keyed bijection on [0, 2**k)
MAX_NUMEL = 1 << 63  # indices are int64

_BLOCK = 1 << 16  # inputs per vectorised block: keeps the temporaries in cache


# --------------------------------------------------------------------------- scalar helpers


def mix64(z: int) -> int:
    """SplitMix64 finaliser of a 64-bit integer (Python ints, exact)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX_C1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_C2) & MASK64
    return z ^ (z >> 31)


def _sm64(state: int, j: int) -> int:
    """The j-th output (j >= 1) of SplitMix64 started at ``state``."""
    return mix64(state + j * GAMMA)


def name_key(name: str) -> int:
    """64-bit FNV-1a hash of the UTF-8 bytes of ``name``."""
    if not isinstance(name, str):
        raise SparseMergeError(f"tensor name must be a str, got {type(name).__name__}")
    h = FNV_OFFSET
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def _check_seed(seed: int) -> int:
    try:
        seed = operator.index(seed)
    except TypeError:
        raise SparseMergeError(
            f"seed must be an integer, got {type(seed).__name__}"
        ) from None
    if not 0 <= seed <= MASK64:
        raise SparseMergeError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def _check_count(value: int, what: str) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise SparseMergeError(
            f"{what} must be an integer, got {type(value).__name__}"
        ) from None
    if value < 0:
        raise SparseMergeError(f"{what} must be >= 0, got {value}")
    return value


def derive_key(seed: int, name: str, domain: int) -> int:
    """``mix64(mix64(seed + GAMMA) ^ name_key(name) ^ domain)``: the per-tensor key."""
    seed = _check_seed(seed)
    return mix64(mix64(seed + GAMMA) ^ name_key(name) ^ domain)


@functools.lru_cache(maxsize=4096)
def permutation_keys(seed: int, name: str) -> tuple[tuple[int, int], ...]:
    """The ``ROUNDS`` (multiplier, addend) pairs, as 64-bit ints, of the mask bijection.

    Cached: the same adapter's masks are regenerated on every load, and deriving the keys
    in Python costs as much as generating a small tensor's mask.

    ``M_r = sm64(K, 2r + 1) | 1`` and ``B_r = sm64(K, 2r + 2)`` with
    ``K = derive_key(seed, name, DOMAIN_MASK)``; they are reduced mod 2**k when used.
    """
    key = derive_key(seed, name, DOMAIN_MASK)
    return tuple((_sm64(key, 2 * r + 1) | 1, _sm64(key, 2 * r + 2)) for r in range(ROUNDS))


def nnz_for_density(numel: int, density: float) -> int:
    """Number of mask entries for ``density``: ``floor(numel * density + 0.5)``.

    Computed in IEEE-754 double precision (identical on every platform), then clamped to
    ``[1, numel]`` when ``density > 0`` (and ``numel > 0``); ``density == 0`` gives 0.
    ``density`` must be a finite number in [0, 1].
    """
    numel = _check_count(numel, "numel")
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise SparseMergeError(f"density must be a number, got {density!r}") from None
    if not (math.isfinite(d) and 0.0 <= d <= 1.0):
        raise SparseMergeError(f"density must be in [0, 1], got {density!r}")
    if d == 0.0 or numel == 0:
        return 0
    n = math.floor(float(numel) * d + 0.5)
    return min(max(n, 1), numel)


# --------------------------------------------------------------------------- seeded masks


def _domain_bits(numel: int) -> int:
    """k such that 2**k is the smallest power of two >= numel (k = 0 for numel <= 1)."""
    return (numel - 1).bit_length() if numel > 1 else 0


class _Bijection:
    """P on [0, 2**k): ROUNDS rounds of ``x = (M_r*x + B_r) mod 2**k; x ^= x >> ceil(k/2)``.

    Vectorised in uint32 when k <= 32 (the low k bits of uint32 wrap-around arithmetic equal
    the arithmetic mod 2**k), else uint64.
    """

    def __init__(self, k: int, keys: Sequence[tuple[int, int]]) -> None:
        self.k = k
        self.dtype = np.dtype(np.uint32) if k <= 32 else np.dtype(np.uint64)
        width = self.dtype.itemsize * 8
        dt = self.dtype.type
        wmask = (1 << width) - 1
        self._np_keys = [(dt(m & wmask), dt(b & wmask)) for m, b in keys]
        self._np_mask = dt((1 << k) - 1) if k < width else None
        self._np_shift = dt((k + 1) // 2)

    def apply(self, x: np.ndarray, tmp: np.ndarray) -> None:
        """In place: x = P(x); ``tmp`` is scratch of the same size and dtype."""
        mask, shift = self._np_mask, self._np_shift
        for mult, add in self._np_keys:
            np.multiply(x, mult, out=x)
            np.add(x, add, out=x)
            if mask is not None:
                np.bitwise_and(x, mask, out=x)
            np.right_shift(x, shift, out=tmp)
            np.bitwise_xor(x, tmp, out=x)


def _first_in_range(numel: int, nnz: int, perm: _Bijection) -> np.ndarray:
    """The first ``nnz`` values ``< numel`` of the sequence P(0), P(1), P(2), ... (unsorted).

    P is a bijection of [0, 2**k) and numel <= 2**k, so the sequence holds exactly numel such
    values by i = 2**k - 1 and the loop ends. A fraction q = numel / 2**k (> 1/2) of the
    values is in range, so about nnz / q inputs are evaluated, in cache-sized blocks whose
    sizes never change the result (values are taken in input order).
    """
    dt = perm.dtype.type
    domain = 1 << perm.k
    limit = dt(numel) if numel < domain else None  # 2**32 does not fit uint32
    out = np.empty(nnz, dtype=perm.dtype)
    # Expected inputs nnz / q, plus ~5 standard deviations of slack so that one pass over
    # the blocks almost always suffices.
    first = min((nnz * domain) // numel + 5 * math.isqrt(nnz) + 16, domain)
    block = min(first, _BLOCK)
    ramp = np.arange(block, dtype=dt)
    x = np.empty(block, dtype=dt)
    tmp = np.empty(block, dtype=dt)
    okbuf = np.empty(block, dtype=np.bool_)
    filled = 0
    start = 0
    while filled < nnz:
        size = min(block, domain - start)
        xs = x[:size]
        np.add(ramp[:size], dt(start), out=xs)
        perm.apply(xs, tmp[:size])
        if limit is None:
            ok = None
            got = size
        else:
            ok = np.less(xs, limit, out=okbuf[:size])
            got = int(np.count_nonzero(ok))
        need = nnz - filled
        if ok is None:
            out[filled : filled + min(got, need)] = xs[:need]
        elif got <= need:
            # np.compress is several times faster than boolean fancy indexing.
            np.compress(ok, xs, out=out[filled : filled + got])
        else:
            out[filled:] = np.compress(ok, xs)[:need]
        filled += min(got, need)
        start += size
    return out


def seeded_indices(seed: int, name: str, numel: int, nnz: int) -> np.ndarray:
    """The ``seed``-codec mask: ``nnz`` distinct flat indices of a tensor with ``numel`` entries.

    Returns int64, sorted ascending, unique, in ``[0, numel)``: the first ``nnz`` values
    below ``numel`` of ``P(0), P(1), ...`` for the keyed bijection ``P`` of ``[0, 2**k)``
    (see the module docstring and docs/CODECS.md). Cost O(nnz log nnz) time and O(nnz)
    memory, independent of ``numel``. ``seed`` in [0, 2**64); ``0 <= nnz <= numel <= 2**63``.
    """
    seed = _check_seed(seed)
    numel = _check_count(numel, "numel")
    nnz = _check_count(nnz, "nnz")
    if numel > MAX_NUMEL:
        raise SparseMergeError(f"numel must be <= 2**63, got {numel}")
    if nnz > numel:
        raise SparseMergeError(f"nnz ({nnz}) must not exceed numel ({numel})")
    if nnz == 0:
        return np.empty(0, dtype=np.int64)
    if nnz == numel:
        return np.arange(numel, dtype=np.int64)
    perm = _Bijection(_domain_bits(numel), permutation_keys(seed, name))
    vals = _first_in_range(numel, nnz, perm)
    # numpy's default sort (introsort, SIMD-dispatched for integers) measured fastest here;
    # sorting the narrow uint32 values before widening halves the bytes moved. A numel-sized
    # bitmap instead of the sort was never faster, even at 50% density.
    vals.sort()
    return vals.astype(np.int64)


def seeded_indices_excluding(seed: int, name: str, numel: int, nnz: int,
                             exclude: np.ndarray) -> np.ndarray:
    """The first ``nnz`` values of the keyed permutation ``Q`` of :func:`seeded_indices` that
    are not in ``exclude`` (flat indices taken by other adapters), sorted int64.

    Why this construction: it is a pure function of ``(seed, name, numel, nnz, exclude)``,
    keeps the exact count, equals ``seeded_indices`` when ``exclude`` is empty, and needs one
    pass: ``Q`` is a permutation, so its first ``nnz + len(exclude)`` values hold ``nnz``
    free ones. The result is not reproducible from the seed alone, so adapters store it with
    an explicit index codec. ``nnz`` must not exceed the ``numel - len(exclude)`` free entries.
    """
    seed = _check_seed(seed)
    numel = _check_count(numel, "numel")
    nnz = _check_count(nnz, "nnz")
    exclude = np.unique(np.asarray(exclude, dtype=np.int64))
    if exclude.size and (exclude[0] < 0 or exclude[-1] >= numel):
        raise SparseMergeError(f"excluded indices must be in [0, {numel}), got "
                               f"{int(exclude[0])}..{int(exclude[-1])}")
    free = numel - exclude.size
    if nnz > free:
        raise SparseMergeError(f"nnz ({nnz}) exceeds the {free} entries of {numel} left free "
                               "by the excluded ones")
    if exclude.size == 0:
        return seeded_indices(seed, name, numel, nnz)
    if nnz == 0:
        return np.empty(0, dtype=np.int64)
    if nnz == free:  # every free entry, whatever the order
        return np.setdiff1d(np.arange(numel, dtype=np.int64), exclude, assume_unique=True)
    perm = _Bijection(_domain_bits(numel), permutation_keys(seed, name))
    vals = _first_in_range(numel, nnz + exclude.size, perm).astype(np.int64)
    out = vals[~np.isin(vals, exclude, assume_unique=True)][:nnz]
    out.sort()
    return out


def seeded_uniform(seed: int, name: str, numel: int) -> np.ndarray:
    """Dense counter-based values in [-1, 1) (float32), e.g. RIGSA's random init.

    Value ``i`` is ``(t_i - 2**23) * 2**-23`` with ``t_i = sm64(K, i + 1) >> 40`` (the top 24
    bits of the (i+1)-th SplitMix64 output from ``K = derive_key(seed, name,
    DOMAIN_UNIFORM)``); the conversion is exact in float32. O(numel); the caller scales it.
    """
    numel = _check_count(numel, "numel")
    key = derive_key(seed, name, DOMAIN_UNIFORM)
    out = np.empty(numel, dtype=np.float32)
    u64 = np.uint64
    chunk = 1 << 16
    ramp = np.arange(1, min(chunk, numel) + 1, dtype=np.uint64)
    z = np.empty_like(ramp)
    tmp = np.empty_like(ramp)
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        n = stop - start
        zc, tc = z[:n], tmp[:n]
        # z = K + (i + 1) * GAMMA  (mod 2**64), i in [start, stop)
        np.add(ramp[:n], u64(start), out=zc)
        np.multiply(zc, u64(GAMMA), out=zc)
        np.add(zc, u64(key), out=zc)
        np.right_shift(zc, u64(30), out=tc)
        np.bitwise_xor(zc, tc, out=zc)
        np.multiply(zc, u64(MIX_C1), out=zc)
        np.right_shift(zc, u64(27), out=tc)
        np.bitwise_xor(zc, tc, out=zc)
        np.multiply(zc, u64(MIX_C2), out=zc)
        np.right_shift(zc, u64(31), out=tc)
        np.bitwise_xor(zc, tc, out=zc)
        np.right_shift(zc, u64(40), out=zc)  # top 24 bits
        t = zc.astype(np.int32)
        t -= 1 << 23
        np.multiply(t, np.float32(2.0**-23), out=out[start:stop], casting="unsafe")
    return out


# --------------------------------------------------------------------------- magnitude masks


def magnitude_indices(values: np.ndarray | torch.Tensor, nnz: int) -> np.ndarray:
    """Sorted flat (row-major) indices of the ``nnz`` largest ``|values|``.

    Ties at the cut are broken in favour of the lower flat index, so the result is a pure
    function of the values. NaN values are rejected. Returns int64.
    """
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch.Tensor, no import
        t = values.detach().cpu()
        if not t.is_floating_point() or t.element_size() < 4:
            t = t.float()  # bf16/fp16 (no numpy equivalent for bf16) and integers
        arr = t.reshape(-1).numpy()
    else:
        arr = np.asarray(values).reshape(-1)
    if arr.dtype.kind not in "fiub":
        raise SparseMergeError(f"values must be numeric, got dtype {arr.dtype}")
    numel = arr.size
    nnz = _check_count(nnz, "nnz")
    if nnz > numel:
        raise SparseMergeError(f"nnz ({nnz}) must not exceed the number of values ({numel})")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise SparseMergeError("values contain NaN; cannot rank them by magnitude")
    if nnz == 0:
        return np.empty(0, dtype=np.int64)
    if nnz == numel:
        return np.arange(numel, dtype=np.int64)
    if arr.dtype.kind == "f":
        mag = np.abs(arr)
    elif arr.dtype.kind == "b":
        mag = arr.astype(np.uint8)
    elif arr.dtype.kind == "i":
        # |int64 min| overflows int64; the uint64 view of the negated value is exact.
        wide = arr.astype(np.int64)
        mag = np.where(wide < 0, -wide, wide).view(np.uint64)
    else:
        mag = arr
    cut = np.partition(mag, numel - nnz)[numel - nnz]  # the nnz-th largest magnitude
    above = np.flatnonzero(mag > cut)
    need = nnz - above.size
    at_cut = np.flatnonzero(mag == cut)[:need]
    out = np.concatenate([above, at_cut])
    out.sort()
    return out.astype(np.int64, copy=False)
