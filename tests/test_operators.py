"""Merge operators: sparse results against plain dense per-entry references.

Random inputs use exactly representable values (multiples of 1/4, weights multiples of 1/4),
so every sum is exact in any order and sign elections (including exact ties at 0) are
decided identically by the sparse kernels and the dense references; magnitude ties are
frequent, which exercises TIES's tie-break (lower index first).
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from sparsemerge.errors import SparseMergeError
from sparsemerge.merge import OPERATORS, Operator, SparseVector, get_operator, operator_params
from sparsemerge.merge.operators.dare import adapter_seed, dare_keep_mask
from sparsemerge.merge.operators.kernels import trim_count, trim_top_magnitude

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# ------------------------------------------------------------------------------------------
# Random inputs
# ------------------------------------------------------------------------------------------


@st.composite
def merge_inputs(draw, max_adapters: int = 5, max_numel: int = 200, n: int | None = None):
    """(numel, [SparseVector], dense float64 array (n, numel), weights)."""
    numel = draw(st.integers(1, max_numel))
    if n is None:
        n = draw(st.integers(1, max_adapters))
    # a small "hot" range makes overlaps between adapters likely
    hot = draw(st.integers(0, numel - 1))
    pos = st.one_of(st.integers(0, hot), st.integers(0, numel - 1))
    vectors, dense = [], np.zeros((n, numel))
    for i in range(n):
        # mostly tiny integers, so exact cancellations (total mass 0) and magnitude ties occur
        value = st.one_of(st.integers(-2, 2), st.integers(-8, 8))
        entries = draw(st.dictionaries(pos, value, max_size=min(numel, 40)))
        idx = sorted(entries)
        vals = [entries[j] / 4 for j in idx]  # may hold explicit zeros
        dense[i, idx] = vals
        vectors.append(
            SparseVector(
                torch.tensor(idx, dtype=torch.int64), torch.tensor(vals, dtype=torch.float32)
            )
        )
    weights = draw(
        st.lists(
            st.sampled_from([1.0, 1.0, 0.5, 2.0, 0.25, 1.5, -1.0, 0.0]), min_size=n, max_size=n
        )
    )
    return numel, vectors, dense, weights


LAMS = st.sampled_from([1.0, 1.0, 0.5, 2.0, 0.3, -1.0])
DENSITIES = st.sampled_from([1.0, 0.2, 0.5, 0.7, 0.35, 0.01, 0.9])


def _v(idx, vals, idx_dtype=torch.int64, val_dtype=torch.float32):
    return SparseVector(torch.tensor(idx, dtype=idx_dtype), torch.tensor(vals, dtype=val_dtype))


def check_output(out: SparseVector, numel: int) -> np.ndarray:
    """Invariants of every operator's output; returns it densified (float64)."""
    assert out.indices.dtype == torch.int64 and out.values.dtype == torch.float32
    assert out.indices.dim() == 1 and out.indices.shape == out.values.shape
    idx = out.indices.numpy()
    assert np.all(np.diff(idx) > 0), "indices must be sorted and unique"
    assert np.all(out.values.numpy() != 0), "exact zeros must be dropped"
    if idx.size:
        assert idx[0] >= 0 and idx[-1] < numel
    dense = np.zeros(numel)
    dense[idx] = out.values.numpy()
    return dense


def assert_close(out: SparseVector, ref: np.ndarray) -> None:
    got = check_output(out, ref.size)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Dense references: straightforward per-entry code
# ------------------------------------------------------------------------------------------


def ref_count(density: float, n: int) -> int:
    return min(n, math.ceil(Fraction(repr(density)) * n))


def ref_trim(row: np.ndarray, density: float) -> np.ndarray:
    nz = [j for j in range(row.size) if row[j] != 0]
    k = ref_count(density, len(nz))
    kept = sorted(nz, key=lambda j: (-abs(row[j]), j))[:k]
    out = np.zeros_like(row)
    out[kept] = row[kept]
    return out


def ref_sum(dense: np.ndarray, weights, lam: float) -> np.ndarray:
    out = np.zeros(dense.shape[1])
    for i, w in enumerate(weights):
        out += w * dense[i]
    return lam * out


def ref_elect(dense: np.ndarray, weights, lam: float, reduce: str) -> np.ndarray:
    n, numel = dense.shape
    out = np.zeros(numel)
    for j in range(numel):
        contrib = [weights[i] * dense[i, j] for i in range(n)]
        elected = 1.0 if sum(contrib) >= 0 else -1.0
        agree = [i for i in range(n) if contrib[i] != 0 and np.sign(contrib[i]) == elected]
        if not agree:
            continue
        mass = sum(contrib[i] for i in agree)
        out[j] = mass if reduce == "sum" else mass / sum(abs(weights[i]) for i in agree)
    return lam * out


def ref_ties(dense, weights, density, lam):
    trimmed = np.stack([ref_trim(row, density) for row in dense])
    return ref_elect(trimmed, weights, lam, "mean")


def ref_dare_drop(dense: np.ndarray, p: float, seed: int) -> np.ndarray:
    out = np.zeros_like(dense)
    for i, row in enumerate(dense):
        nz = np.flatnonzero(row)  # the non-zeros, in index order
        keep = dare_keep_mask(seed, i, nz.size, p).numpy()
        out[i, nz[keep]] = row[nz[keep]] / (1 - p)
    return out


# ------------------------------------------------------------------------------------------
# Sparse == dense reference, for every operator
# ------------------------------------------------------------------------------------------


@SETTINGS
@given(merge_inputs(), LAMS, st.sampled_from(["sum", "weighted"]))
def test_sum_and_weighted_match_dense(inputs, lam, name):
    numel, vectors, dense, weights = inputs
    out = get_operator(name).merge(vectors, weights, lam=lam)
    assert_close(out, ref_sum(dense, weights, lam))


@SETTINGS
@given(merge_inputs(), LAMS)
def test_weights_default_to_one(inputs, lam):
    numel, vectors, dense, _ = inputs
    ones = [1.0] * len(vectors)
    assert_close(get_operator("weighted").merge(vectors, lam=lam), ref_sum(dense, ones, lam))
    assert_close(get_operator("ties").merge(vectors, lam=lam), ref_ties(dense, ones, 0.2, lam))


@SETTINGS
@given(merge_inputs(), DENSITIES, LAMS)
def test_ties_matches_dense(inputs, density, lam):
    numel, vectors, dense, weights = inputs
    out = get_operator("ties").merge(vectors, weights, density=density, lam=lam)
    assert_close(out, ref_ties(dense, weights, density, lam))


@SETTINGS
@given(merge_inputs(), st.sampled_from(["sum", "mean"]), LAMS)
def test_sign_consensus_matches_dense(inputs, reduce, lam):
    numel, vectors, dense, weights = inputs
    out = get_operator("sign_consensus").merge(vectors, weights, reduce=reduce, lam=lam)
    assert_close(out, ref_elect(dense, weights, lam, reduce))


@SETTINGS
@given(
    merge_inputs(),
    st.sampled_from([0.0, 0.5, 0.75]),  # 1/(1-p) exact, so sign elections stay exact
    st.integers(0, 2**40),
    st.sampled_from(["sum", "ties"]),
    DENSITIES,
    LAMS,
)
def test_dare_matches_dense(inputs, p, seed, then, density, lam):
    numel, vectors, dense, weights = inputs
    extra = {"density": density} if then == "ties" else {}
    out = get_operator("dare").merge(vectors, weights, p=p, seed=seed, then=then, lam=lam,
                                     **extra)
    dropped = ref_dare_drop(dense, p, seed)
    if then == "sum":
        ref = ref_sum(dropped, weights, lam)
    else:
        ref = ref_ties(dropped, weights, density, lam)
    assert_close(out, ref)


@SETTINGS
@given(merge_inputs(), st.floats(0.01, 0.95), st.integers(0, 1000))
def test_dare_sum_any_p(inputs, p, seed):
    numel, vectors, dense, weights = inputs
    out = get_operator("dare").merge(vectors, weights, p=p, seed=seed)
    got = check_output(out, numel)
    np.testing.assert_allclose(got, ref_sum(ref_dare_drop(dense, p, seed), weights, 1.0),
                               rtol=1e-5, atol=1e-5)


def test_zero_total_mass_elects_plus():
    a = _v([3, 5], [1.0, 2.0])
    b = _v([3, 5], [-1.0, -1.0])
    c = _v([3], [-0.5])
    d = _v([3], [0.5])
    # entry 3: 1 - 1 - 0.5 + 0.5 = 0 -> '+' elected: a and d agree
    sc = get_operator("sign_consensus")
    assert sc.merge([a, b, c, d], reduce="sum").values.tolist() == [1.5, 2.0]
    assert sc.merge([a, b, c, d], reduce="mean").values.tolist() == [0.75, 2.0]
    out = get_operator("ties").merge([a, b, c, d], [1.0, 1.0, 2.0, 2.0], density=1.0)
    # entry 3: 1 - 1 - 1 + 1 = 0 -> '+': (1 + 1) / (1 + 2); entry 5: 2 - 1 > 0 -> 2 / 1
    torch.testing.assert_close(out.values, torch.tensor([2 / 3, 2.0]))


@st.composite
def multi_tensor_inputs(draw):
    """Several tensors' deltas from the same n adapters: ([[SparseVector]], weights)."""
    n = draw(st.integers(1, 4))
    groups = [draw(merge_inputs(max_numel=60, n=n))[1] for _ in range(draw(st.integers(1, 5)))]
    weights = draw(st.lists(st.sampled_from([1.0, 0.5, 2.0, -1.0, 0.0]), min_size=n, max_size=n))
    return groups, weights


MANY_PARAMS = st.sampled_from([
    ("sum", {}), ("weighted", {"lam": 0.5}), ("ties", {}), ("ties", {"density": 0.5}),
    ("ties", {"density": 1.0}), ("sign_consensus", {"reduce": "sum"}),
    ("sign_consensus", {"reduce": "mean"}), ("dare", {"p": 0.3, "seed": 4}),
    ("dare", {"p": 0.5, "then": "ties", "density": 0.5}),
])


@SETTINGS
@given(multi_tensor_inputs(), MANY_PARAMS, st.booleans())
def test_merge_many_equals_per_tensor_merges(inputs, op_params, give_numels):
    groups, weights = inputs
    name, params = op_params
    op = get_operator(name)
    numels = None
    if give_numels:
        numels = [max((int(v.indices[-1]) + 1 for v in g if v.nnz), default=0) + 3
                  for g in groups]
    many = op.merge_many(groups, weights, numels=numels, **params)
    assert len(many) == len(groups)
    for g, got in zip(groups, many, strict=True):
        want = op.merge(g, weights, **params)
        assert torch.equal(got.indices, want.indices), name
        assert torch.equal(got.values, want.values), name


def test_merge_many_errors():
    a, b = _v([1, 5], [1.0, 2.0]), _v([0], [3.0])
    ties = get_operator("ties")
    assert ties.merge_many([]) == []
    with pytest.raises(SparseMergeError, match="tensor 1 has 1 inputs, tensor 0 has 2"):
        ties.merge_many([[a, b], [a]])
    with pytest.raises(SparseMergeError, match="tensor 0 has index 5 >= numel 4"):
        ties.merge_many([[a, b], [a, b]], numels=[4, 10])
    with pytest.raises(SparseMergeError, match="2 tensors but 1 numels"):
        ties.merge_many([[a, b], [a, b]], numels=[10])
    with pytest.raises(SparseMergeError, match="tensor 1 input 0: negative index"):
        ties.merge_many([[a, b], [_v([-1, 2], [1.0, 1.0]), b]])
    with pytest.raises(SparseMergeError, match="tensor 1 input 1: indices must be sorted"):
        ties.merge_many([[a, b], [a, _v([3, 2], [1.0, 1.0])]])


@SETTINGS
@given(merge_inputs(), LAMS)
def test_sign_consensus_mean_is_ties_without_trim(inputs, lam):
    _, vectors, _, weights = inputs
    a = get_operator("sign_consensus").merge(vectors, weights, reduce="mean", lam=lam)
    b = get_operator("ties").merge(vectors, weights, density=1.0, lam=lam)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


@SETTINGS
@given(merge_inputs(max_adapters=1), DENSITIES)
def test_trim_top_magnitude_matches_dense(inputs, density):
    numel, vectors, dense, _ = inputs
    out = trim_top_magnitude(vectors[0], density)
    assert_close(out, ref_trim(dense[0], density))


def test_trim_count():
    assert trim_count(0.7, 10) == 7  # 0.7 * 10 == 7.000000000000001 in binary
    assert trim_count(0.2, 1) == 1 and trim_count(0.001, 3) == 1
    assert trim_count(1.0, 17) == 17 and trim_count(0.5, 0) == 0
    assert trim_count(1e-15, 5) == 1
    for d in (0.01, 0.1, 0.2, 0.3, 0.35, 0.5, 0.7, 0.9, 0.99):
        for n in range(0, 500, 7):
            assert trim_count(d, n) == ref_count(d, n), (d, n)


# ------------------------------------------------------------------------------------------
# Agreement with PEFT where the semantics coincide
# ------------------------------------------------------------------------------------------
# peft.utils.merge_utils.ties trims each dense task tensor to int(density * numel) entries
# (we trim to ceil(density * own nnz)), elects the sign on unweighted values and divides by
# the NUMBER of agreeing adapters (we elect on w_i * v_i and divide by the agreeing |w_i|).
# With all weights 1 the election and the mean coincide; the trim coincides when
# density = 1 (no trim on either side) or when peft's count int(d_p * numel) equals our
# ceil(d * nnz) (we pass d_p = (k + 0.5) / numel) and magnitudes have no ties (continuous
# random values). PEFT's dare draws from torch's global RNG, so it is not compared.


def random_dense(rng, n, numel, nnz):
    dense = np.zeros((n, numel), dtype=np.float32)
    for i in range(n):
        idx = rng.choice(numel, size=nnz[i], replace=False)
        dense[i, idx] = rng.standard_normal(nnz[i]).astype(np.float32)
    vectors = [SparseVector.from_dense(torch.from_numpy(row)) for row in dense]
    return dense, vectors


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(20, 400))
def test_ties_matches_peft_without_trim(seed, n, numel):
    rng = np.random.default_rng(seed)
    nnz = rng.integers(0, numel // 2 + 1, size=n)
    dense, vectors = random_dense(rng, n, numel, nnz)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that density 1 means no pruning
        ref = merge_utils.ties(list(torch.from_numpy(dense)), torch.ones(n), density=1.0)
    out = get_operator("ties").merge(vectors, density=1.0)
    np.testing.assert_allclose(out.to_dense(numel).numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(50, 400),
    st.sampled_from([0.1, 0.2, 0.5, 0.8]),
)
def test_ties_matches_peft_with_aligned_trim(seed, n, numel, density):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, numel // 2 + 1))
    dense, vectors = random_dense(rng, n, numel, [m] * n)  # same nnz for every adapter
    k = trim_count(density, m)
    ref = merge_utils.ties(list(torch.from_numpy(dense)), torch.ones(n), (k + 0.5) / numel)
    out = get_operator("ties").merge(vectors, density=density)
    np.testing.assert_allclose(out.to_dense(numel).numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 300))
def test_weighted_matches_peft_task_arithmetic(seed, n, numel):
    rng = np.random.default_rng(seed)
    dense, vectors = random_dense(rng, n, numel, rng.integers(0, numel + 1, size=n))
    w = rng.uniform(-2, 2, size=n).astype(np.float32)
    ref = merge_utils.task_arithmetic(list(torch.from_numpy(dense)), torch.from_numpy(w))
    out = get_operator("weighted").merge(vectors, w.tolist())
    np.testing.assert_allclose(out.to_dense(numel).numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# DARE randomness
# ------------------------------------------------------------------------------------------


def _big(seed=0, n=20000, numel=10**6):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(numel, generator=g)[:n].sort().values
    return SparseVector(idx, torch.randn(n, generator=g) + 3.0)  # all positive, non-zero


def test_dare_reproducible_and_seeded():
    v = [_big(0), _big(1)]
    dare = get_operator("dare")
    a = dare.merge(v, p=0.7, seed=5)
    b = dare.merge(v, p=0.7, seed=5)
    c = dare.merge(v, p=0.7, seed=6)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert not torch.equal(a.indices, c.indices)


def test_dare_drop_rate_and_rescale():
    v = _big(0)
    p = 0.9
    out = get_operator("dare").merge([v], p=p, seed=3)
    kept = out.nnz / v.nnz
    assert abs(kept - (1 - p)) < 0.01  # 20000 draws: sd ~ 0.002
    pos = torch.searchsorted(v.indices, out.indices)
    assert torch.equal(v.indices[pos], out.indices)
    torch.testing.assert_close(out.values, v.values[pos] / (1 - p))
    # unbiased: the total mass is preserved in expectation (within a few sd)
    assert abs(float(out.values.sum()) / float(v.values.sum()) - 1) < 0.05


def test_dare_masks_differ_by_adapter_position():
    v = _big(0)
    a = dare_keep_mask(7, 0, v.nnz, 0.5)
    b = dare_keep_mask(7, 1, v.nnz, 0.5)
    assert not torch.equal(a, b)
    assert adapter_seed(7, 0) != adapter_seed(7, 1) != adapter_seed(8, 1)
    assert 0 <= adapter_seed(2**64 - 1, 3) < 2**63


def test_dare_p0_equals_base_operators():
    v = [_big(0, n=500, numel=2000), _big(1, n=500, numel=2000)]
    a = get_operator("dare").merge(v, [1.0, -0.5], p=0.0, then="ties", density=0.3)
    b = get_operator("ties").merge(v, [1.0, -0.5], density=0.3)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


# ------------------------------------------------------------------------------------------
# Scale, dtypes, edge cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPERATORS))
def test_no_dense_allocation_for_huge_tensors(name):
    """Indices near 2**50: a numel-sized buffer would need petabytes."""
    base = 2**50
    a = SparseVector(torch.tensor([base, base + 7, base + 9]), torch.tensor([1.0, -2.0, 3.0]))
    b = SparseVector(torch.tensor([base + 7, base + 10]), torch.tensor([4.0, 5.0]))
    out = get_operator(name).merge([a, b], p=0.0) if name == "dare" else (
        get_operator(name).merge([a, b])
    )
    assert int(out.indices.min()) >= base


@pytest.mark.parametrize("name", list(OPERATORS))
def test_low_precision_inputs_and_int32_indices(name):
    a = SparseVector(torch.tensor([0, 3, 5], dtype=torch.int32),
                     torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16))
    b = SparseVector(torch.tensor([3, 4]), torch.tensor([4.0, 5.0], dtype=torch.float16))
    out = get_operator(name).merge([a, b])
    assert out.values.dtype == torch.float32 and out.indices.dtype == torch.int64


@pytest.mark.parametrize("name", list(OPERATORS))
def test_empty_and_cancelling_inputs(name):
    empty = SparseVector.empty()
    op = get_operator(name)
    assert op.merge([empty, empty]).nnz == 0
    a = SparseVector(torch.tensor([2]), torch.tensor([1.5]))
    b = SparseVector(torch.tensor([2]), torch.tensor([-1.5]))
    assert op.merge([a], lam=0.0).nnz == 0
    if name in ("sum", "weighted"):
        assert op.merge([a, b]).nnz == 0  # exact cancellation is dropped


def test_explicit_zeros_do_not_count_for_trim():
    v = SparseVector(torch.tensor([0, 1, 2, 3]), torch.tensor([0.0, 3.0, 0.0, -1.0]))
    out = get_operator("ties").merge([v], density=0.5)  # ceil(0.5 * 2 non-zeros) = 1
    assert out.indices.tolist() == [1] and out.values.tolist() == [3.0]


def test_weights_as_tensor_or_array():
    v = [_v([1, 2], [1.0, -2.0]), _v([2], [4.0])]
    ref = get_operator("weighted").merge(v, [0.5, 2.0])
    for w in (torch.tensor([0.5, 2.0]), np.array([0.5, 2.0]), (0.5, 2)):
        out = get_operator("weighted").merge(v, w)
        assert torch.equal(out.indices, ref.indices) and torch.equal(out.values, ref.values)


def test_input_tensors_are_not_modified():
    a = _big(0, n=300, numel=1000)
    b = _big(1, n=300, numel=1000)
    before = [t.clone() for t in (a.indices, a.values, b.indices, b.values)]
    for name in OPERATORS:
        get_operator(name).merge([a, b], [2.0, -1.0])
    for t, c in zip((a.indices, a.values, b.indices, b.values), before, strict=True):
        assert torch.equal(t, c)
    for name in OPERATORS:  # outputs never alias the inputs
        out = get_operator(name).merge([a], p=0.0) if name == "dare" else (
            get_operator(name).merge([a], density=1.0) if name == "ties"
            else get_operator(name).merge([a])
        )
        out.indices.add_(1)
        out.values.mul_(3)
        assert torch.equal(a.indices, before[0]) and torch.equal(a.values, before[1])
    trimmed = trim_top_magnitude(a, 1.0)
    trimmed.indices.add_(1)
    assert torch.equal(a.indices, before[0])


# ------------------------------------------------------------------------------------------
# Declarations, registry and validation
# ------------------------------------------------------------------------------------------


def test_registry_declarations():
    assert set(OPERATORS) == {"sum", "weighted", "ties", "sign_consensus", "dare"}
    for name, op in OPERATORS.items():
        assert issubclass(op, Operator) and op.name == name
        assert op.reference and op.summary
        names = [p.name for p in op.params]
        assert "lam" in names and len(set(names)) == len(names)
        assert operator_params(name) == op.params
        assert op.validate_params({}) == {p.name: p.default for p in op.params}
        text = op.describe()
        assert name in text and all(p.name in text for p in op.params)
        for p in op.params:
            assert p.check(p.default) == p.default  # defaults satisfy their own constraints
    assert get_operator("ties").validate_params({"density": "0.5"}) == {"density": 0.5,
                                                                        "lam": 1.0}
    assert get_operator("dare").validate_params({"seed": 3.0, "then": "ties"})["seed"] == 3


def test_unknown_operator():
    with pytest.raises(SparseMergeError, match="unknown merge method 'avg'.*ties"):
        get_operator("avg")


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("ties", {"densty": 0.5}, "no parameter.*densty.*known: density, lam"),
        ("ties", {"density": 0.0}, r"density.*\(0, 1\]"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"density": "abc"}, "type float"),
        ("ties", {"density": True}, "type float"),
        ("ties", {"density": float("nan")}, "finite"),
        ("ties", {"density": None}, "type float"),
        ("dare", {"p": 1.0}, r"p.*\[0, 1\)"),
        ("dare", {"p": -0.1}, "'p'"),
        ("dare", {"seed": -1}, "seed"),
        ("dare", {"seed": 1.5}, "type int"),
        ("dare", {"then": "mean"}, "one of 'sum', 'ties'"),
        ("dare", {"density": 0.5}, "'density' applies only with then=ties"),
        ("sign_consensus", {"reduce": "max"}, "reduce"),
        ("sum", {"lam": "x"}, "lam"),
        ("weighted", {"lam": float("inf")}, "finite"),
        ("sum", {"density": 0.5}, "no parameter"),
    ],
)
def test_invalid_params(name, params, match):
    op = get_operator(name)
    with pytest.raises(SparseMergeError, match=match):
        op.validate_params(params)
    v = SparseVector(torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(SparseMergeError, match=match):
        op.merge([v], **params)


@pytest.mark.parametrize(
    ("vectors", "weights", "match"),
    [
        ([], None, "nothing to merge"),
        ([_v([1], [1.0])], [1.0, 2.0], "1 inputs but 2 weights"),
        ([_v([1], [1.0])], [float("nan")], "weight 0 must be a finite number"),
        ([_v([1], [1.0])], ["1"], "weight 0"),
        ([_v([1], [1.0]), _v([3, 2], [1.0, 2.0])], None, "input 1: indices must be sorted"),
        ([_v([2, 2], [1.0, 2.0])], None, "input 0: indices must be sorted and unique"),
        ([_v([-1, 2], [1.0, 2.0])], None, "input 0: negative index"),
        ([_v([1, 2], [1.0, float("nan")])], None, "input 0: values contain NaN"),
        ([_v([1, 2], [1.0, float("inf")])], None, "NaN or Inf"),
        ([SparseVector(torch.tensor([1, 2]), torch.tensor([1.0]))], None, "2 indices but 1"),
        ([SparseVector(torch.tensor([[1]]), torch.tensor([[1.0]]))], None, "must be 1-D"),
        ([_v([1], [1], val_dtype=torch.int64)], None, "floating point"),
        ([_v([1.0], [1.0], idx_dtype=torch.float32)], None, "must be integers"),
    ],
)
def test_invalid_inputs(vectors, weights, match):
    for name in OPERATORS:
        with pytest.raises(SparseMergeError, match=match):
            get_operator(name).merge(vectors, weights)


def test_sparse_vector_conversions():
    from sparsemerge.adapter import SparseTensor

    dense = torch.tensor([[0.0, 1.0], [0.0, -2.0]])
    v = SparseVector.from_dense(dense)
    assert v.indices.tolist() == [1, 3] and v.nnz == 2
    st_ = v.to_sparse_tensor((2, 2))
    assert isinstance(st_, SparseTensor) and torch.equal(st_.to_dense(), dense)
    assert torch.equal(SparseVector.from_sparse_tensor(st_).to_dense(4), dense.reshape(-1))
    with pytest.raises(SparseMergeError, match="out of range"):
        v.validate("x", numel=3)
