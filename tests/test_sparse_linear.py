"""The fast sparse-delta path for nn.Linear against its plain-autograd oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModel

from sparsemerge.errors import SparseMergeError
from sparsemerge.train.sparse_linear import (
    GATE_ATTR,
    VALUES_ATTR,
    attach_sparse_deltas,
)

DENSITIES = [0.01, 0.05, 0.3]


def _load(tiny_bert_dir, dtype=torch.float32) -> nn.Module:
    model = AutoModel.from_pretrained(tiny_bert_dir, dtype=dtype)
    model.eval()  # no dropout: the two impls must see the same function
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _linear_weight_names(model: nn.Module) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _masks(model: nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in _linear_weight_names(model):
        numel = model.get_parameter(name).numel()
        k = max(1, round(density * numel))
        out[name] = torch.randperm(numel, generator=g)[:k].sort().values
    return out


def _values(masks, scale=0.05, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(len(i), generator=g) * scale for n, i in masks.items()}


def _dense(model, masks, scale=0.02, seed=2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(model.get_parameter(n).shape, generator=g) * scale for n in masks}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (3, 11), generator=g)
    att = torch.ones_like(ids)
    att[1, 8:] = 0
    return ids, att


def _loss(model, batch):
    ids, att = batch
    out = model(input_ids=ids, attention_mask=att)
    h = out.last_hidden_state.float()
    w = torch.linspace(-1, 1, h.shape[-1])
    return (h * w).sum(-1).pow(2).mean() + out.pooler_output.float().sum()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _grads(ds):
    return {n: p.grad.detach().clone() for n, p in ds.named_parameters()}


def _run(tiny_bert_dir, impl, masks, *, steps=0, dtype=torch.float32, **kw):
    model = _load(tiny_bert_dir, dtype)
    ds = attach_sparse_deltas(model, masks, impl, **kw)
    opt = torch.optim.AdamW(ds.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(max(1, steps)):
        opt.zero_grad()
        loss = _loss(model, _batch(step))
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = _grads(ds)
        if steps:
            opt.step()  # no explicit sync: the next forward re-syncs on the version bump
    return model, ds, losses, grads


def _assert_close_dicts(a, b, rtol=1e-4, atol=1e-5):
    """allclose per tensor, ``atol`` relative to the tensor's largest magnitude."""
    assert a.keys() == b.keys()
    for k in a:
        scale = float(b[k].detach().abs().max()) or 1.0
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol * scale,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("density", DENSITIES)
def test_fast_matches_autograd_loss_and_grads(tiny_bert_dir, density):
    base = _load(tiny_bert_dir)
    masks = _masks(base, density)
    vals = _values(masks)
    _, fast, lf, gf = _run(tiny_bert_dir, "fast", masks, values_init=vals)
    _, ref, lr, gr = _run(tiny_bert_dir, "autograd", masks, values_init=vals)
    assert lf[0] == pytest.approx(lr[0], rel=1e-5)
    _assert_close_dicts(gf, gr)
    assert all(g.abs().sum() > 0 for g in gf.values())


@pytest.mark.parametrize("density", DENSITIES)
def test_fast_matches_autograd_after_adamw_steps(tiny_bert_dir, density):
    base = _load(tiny_bert_dir)
    w0 = _snapshot(base)
    masks = _masks(base, density, seed=3)
    mf, fast, lf, _ = _run(tiny_bert_dir, "fast", masks, steps=6)
    mr, ref, lr, _ = _run(tiny_bert_dir, "autograd", masks, steps=6)
    assert lf == pytest.approx(lr, rel=1e-4)
    df, dr = fast.deltas(), ref.deltas()
    for name in masks:
        assert torch.equal(df[name][0], masks[name]) and torch.equal(dr[name][0], masks[name])
        torch.testing.assert_close(df[name][1], dr[name][1], rtol=1e-4, atol=1e-6)
        assert df[name][1].abs().max() > 1e-3  # it actually trained
    # the fast impl holds W0 + delta merged in place; the oracle never touches the weight
    fast.sync()
    for name in masks:
        expect = w0[name].clone().view(-1)
        expect[masks[name]] += df[name][1]
        assert torch.equal(mf.get_parameter(name).detach().view(-1), expect)
        assert torch.equal(mr.get_parameter(name), w0[name])


@pytest.mark.parametrize("impl", ["fast", "autograd"])
def test_frozen_weights_get_no_grad_and_remove_is_exact(tiny_bert_dir, impl):
    base = _load(tiny_bert_dir)
    w0 = _snapshot(base)
    masks = _masks(base, 0.05)
    model, ds, _, _ = _run(tiny_bert_dir, impl, masks, steps=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n[: -len("weight")] + VALUES_ATTR for n in masks}
    for n, p in model.named_parameters():
        if not n.endswith(VALUES_ATTR):
            assert p.grad is None, n
            assert not p.requires_grad, n
    assert ds.num_trainable == sum(len(i) for i in masks.values())
    ds.remove()
    after = model.state_dict()
    assert after.keys() == w0.keys()
    for k in w0:
        assert torch.equal(after[k], w0[k]), k
    for name in masks:
        mod = model.get_submodule(name[: -len(".weight")])
        assert "forward" not in mod.__dict__
        assert type(mod).forward is nn.Linear.forward
    # plain behaviour again: same output as a freshly loaded model
    fresh = _load(tiny_bert_dir)
    with torch.no_grad():
        batch = _batch()
        assert torch.equal(_loss(model, batch), _loss(fresh, batch))
    # and a new set can be attached to the same model
    attach_sparse_deltas(model, masks, impl).remove()


def test_repeated_sync_does_not_drift(tiny_bert_dir):
    model = _load(tiny_bert_dir)
    masks = _masks(model, 0.05)
    w0 = _snapshot(model)
    vals = _values(masks, scale=1e-3)
    ds = attach_sparse_deltas(model, masks, "fast", values_init=vals)
    name = next(iter(masks))
    once = (w0[name].view(-1)[masks[name]].float() + vals[name])
    for _ in range(1000):
        ds.sync(force=True)
    for n in masks:
        w = model.get_parameter(n).detach().view(-1)
        assert torch.equal(w[masks[n]], w0[n].view(-1)[masks[n]] + vals[n])
    assert torch.equal(model.get_parameter(name).detach().view(-1)[masks[name]], once)
    # values changed 1000 times by tiny steps, then set back: weight is exactly W0 + values
    p = ds[name].values
    with torch.no_grad():
        for _ in range(1000):
            p.add_(1e-7)
            ds.sync()
        p.copy_(vals[name])
    ds.sync()
    assert torch.equal(model.get_parameter(name).detach().view(-1)[masks[name]], once)


def test_auto_sync_on_step_and_manual_sync_for_data_edits(tiny_bert_dir):
    base = _load(tiny_bert_dir)
    masks = _masks(base, 0.05)
    mf = _load(tiny_bert_dir)
    mr = _load(tiny_bert_dir)
    fast = attach_sparse_deltas(mf, masks, "fast")
    ref = attach_sparse_deltas(mr, masks, "autograd")
    new = _values(masks, scale=0.1, seed=7)
    with torch.no_grad():
        for n in masks:
            fast[n].values.copy_(new[n])  # in-place: bumps _version -> auto re-sync
            ref[n].values.copy_(new[n])
        batch = _batch()
        torch.testing.assert_close(_loss(mf, batch), _loss(mr, batch))
        n = next(iter(masks))
        fast[n].values.data.mul_(2)  # .data has its own version counter: invisible...
        ref[n].values.mul_(2)
        assert not torch.allclose(_loss(mf, batch), _loss(mr, batch))
        fast.sync(force=True)  # ...until an explicit sync
        torch.testing.assert_close(_loss(mf, batch), _loss(mr, batch))


@pytest.mark.parametrize("with_dense", [False, True])
@pytest.mark.parametrize("gate", [1e-6, 0.3])
def test_gate_variant_matches_oracle(tiny_bert_dir, gate, with_dense):
    base = _load(tiny_bert_dir)
    masks = _masks(base, 0.05, seed=4)
    dense = _dense(base, masks) if with_dense else None
    vals = _values(masks)
    kw = dict(gate=gate, dense_init=dense, values_init=vals)
    mf, fast, lf, gf = _run(tiny_bert_dir, "fast", masks, steps=4, **kw)
    mr, ref, lr, gr = _run(tiny_bert_dir, "autograd", masks, steps=4, **kw)
    assert lf == pytest.approx(lr, rel=1e-4)
    _assert_close_dicts(gf, gr)
    gate_grads = [g for n, g in gf.items() if n.endswith(".gate")]
    assert len(gate_grads) == len(masks) and all(g.shape == () for g in gate_grads)
    assert all(g != 0 for g in gate_grads)
    _assert_close_dicts(dict(fast.named_parameters()), dict(ref.named_parameters()))
    assert fast.gates() == pytest.approx(ref.gates(), rel=1e-4)
    assert all(g != gate for g in fast.gates().values())  # the gates trained
    trainable = {n for n, p in mf.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.endswith(GATE_ATTR)} == {
        n[: -len("weight")] + GATE_ATTR for n in masks
    }
    w0 = _snapshot(_load(tiny_bert_dir))
    fast.remove()
    for k, v in mf.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_bf16_weights(tiny_bert_dir):
    base = _load(tiny_bert_dir, torch.bfloat16)
    w0 = _snapshot(base)
    masks = _masks(base, 0.05)
    vals = _values(masks, scale=0.1)
    mf, fast, lf, gf = _run(tiny_bert_dir, "fast", masks, dtype=torch.bfloat16, values_init=vals)
    mr, ref, lr, gr = _run(tiny_bert_dir, "autograd", masks, dtype=torch.bfloat16,
                           values_init=vals)
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    assert lf[0] == pytest.approx(lr[0], rel=1e-2)
    for n in gf:
        a, b = gf[n], gr[n]
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
        assert cos > 0.99, n
    for n in masks:  # the merged weight is the bf16 rounding of the fp32 sum
        w = mf.get_parameter(n).detach().view(-1)[masks[n]]
        expect = (w0[n].view(-1)[masks[n]].float() + vals[n]).to(torch.bfloat16)
        assert torch.equal(w, expect)
    fast.remove()
    for k, v in mf.state_dict().items():
        assert torch.equal(v, w0[k]), k


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])  # tall, wide, square
def test_leading_dims_and_input_grad(shape):
    torch.manual_seed(0)
    lin = nn.Linear(*shape)
    idx = torch.randperm(shape[0] * shape[1])[:100].sort().values
    x = torch.randn(2, 3, 5, shape[0])
    v = torch.randn(100)
    results = {}
    for impl in ("fast", "autograd"):
        m = nn.Sequential(nn.Linear(*shape))
        m[0].load_state_dict(lin.state_dict())
        ds = attach_sparse_deltas(m, {"0.weight": idx}, impl,
                                  values_init={"0.weight": v})
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y.sin().sum()).backward()
        results[impl] = (y.detach(), xi.grad, ds["0.weight"].values.grad)
        assert m[0].weight.grad is None and m[0].bias.grad is None
    for a, b in zip(results["fast"], results["autograd"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_and_no_grad_eval(tiny_bert_dir):
    base = _load(tiny_bert_dir)
    masks = _masks(base, 0.05)
    model = _load(tiny_bert_dir)
    ds = attach_sparse_deltas(model, masks, "fast", values_init=_values(masks))
    _loss(model, _batch(0)).backward()
    _loss(model, _batch(1)).backward()
    acc = _grads(ds)
    ref_model = _load(tiny_bert_dir)
    ref = attach_sparse_deltas(ref_model, masks, "autograd", values_init=_values(masks))
    (_loss(ref_model, _batch(0)) + _loss(ref_model, _batch(1))).backward()
    _assert_close_dicts(acc, _grads(ref))
    with torch.no_grad():
        torch.testing.assert_close(_loss(model, _batch(2)), _loss(ref_model, _batch(2)))


def test_shared_input_transpose_is_exact(tiny_bert_dir):
    base = _load(tiny_bert_dir)
    masks = _masks(base, 0.05)
    vals = _values(masks)
    grads = []
    for share in (True, False):
        model = _load(tiny_bert_dir)
        ds = attach_sparse_deltas(model, masks, "fast", values_init=vals,
                                  share_input_transpose=share)
        _loss(model, _batch()).backward()
        grads.append(_grads(ds))
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_feature_major_layouts_engage_and_match_oracle(tiny_bert_dir, tiny_llama_dir, which):
    """Up-projections feeding an activation / GLU product switch to features-major output;
    the results still match the oracle and the layout-free fast path."""
    path = tiny_bert_dir if which == "bert" else tiny_llama_dir
    expect_fm = ({"intermediate.dense"} if which == "bert" else {"mlp.gate_proj", "mlp.up_proj"})
    base = _load(path)
    masks = _masks(base, 0.05)
    vals = _values(masks)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 9), generator=g)

    def run(impl, **kw):
        model = _load(path)
        ds = attach_sparse_deltas(model, masks, impl, values_init=vals, **kw)
        opt = torch.optim.AdamW(ds.parameters(), lr=1e-2)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            h = model(input_ids=ids).last_hidden_state
            loss = (h * torch.linspace(-1, 1, h.shape[-1])).sum(-1).pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return ds, losses

    fast, lf = run("fast")
    plain, lp = run("fast", layouts=False)
    ref, lr = run("autograd")
    fm = {n for n, t in fast.targets.items() if t.feature_major_out}
    assert fm == {n for n in masks if n.removesuffix(".weight").endswith(tuple(expect_fm))}
    assert len(fm) == 2 * len(expect_fm)  # two layers
    assert not any(t.feature_major_out for t in plain.targets.values())
    assert lf == pytest.approx(lr, rel=1e-4) and lp == pytest.approx(lr, rel=1e-4)
    _assert_close_dicts(dict(fast.named_parameters()), dict(ref.named_parameters()))
    _assert_close_dicts(dict(plain.named_parameters()), dict(ref.named_parameters()))


def test_context_manager_and_deltas(tiny_bert_dir):
    model = _load(tiny_bert_dir)
    w0 = _snapshot(model)
    masks = _masks(model, 0.01)
    vals = _values(masks)
    with attach_sparse_deltas(model, masks, values_init=vals) as ds:
        assert len(ds) == len(masks) and set(ds) == set(masks)
        d = ds.deltas()
        for n in masks:
            assert torch.equal(d[n][0], masks[n]) and torch.equal(d[n][1], vals[n])
            assert d[n][1].dtype == torch.float32
        assert not torch.equal(model.state_dict()[n], w0[n])
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_bad_input_raises(tiny_bert_dir):
    model = _load(tiny_bert_dir)
    name = "encoder.layer.0.attention.self.query.weight"
    ok = torch.tensor([0, 5, 9])
    bad = {
        "unsorted": {name: torch.tensor([5, 0])},
        "duplicate": {name: torch.tensor([0, 0, 1])},
        "range": {name: torch.tensor([0, 32 * 32])},
        "negative": {name: torch.tensor([-1, 3])},
        "float": {name: torch.tensor([0.0, 1.0])},
        "empty": {name: torch.tensor([], dtype=torch.int64)},
        "not weight": {"encoder.layer.0.attention.self.query.bias": ok},
        "missing": {"encoder.layer.9.attention.self.query.weight": ok},
        "not linear": {"embeddings.LayerNorm.weight": ok},
    }
    for why, masks in bad.items():
        with pytest.raises(SparseMergeError):
            attach_sparse_deltas(model, masks)
        assert "forward" not in model.encoder.layer[0].attention.self.query.__dict__, why
    with pytest.raises(SparseMergeError, match="impl"):
        attach_sparse_deltas(model, {name: ok}, impl="dense")
    with pytest.raises(SparseMergeError, match="values"):
        attach_sparse_deltas(model, {name: ok}, values_init={name: torch.zeros(4)})
    ds = attach_sparse_deltas(model, {name: ok})
    with pytest.raises(SparseMergeError, match="already"):
        attach_sparse_deltas(model, {name: ok})
    ds.remove()
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(SparseMergeError, match="shared"):
        attach_sparse_deltas(tied, {"0.weight": ok})


def test_gpu_dense_block_sddmm_matches_the_csr_kernel(monkeypatch):
    """The GPU's dvalues (dense dW blocks, gathered) run here on the CPU: several blocks, a
    tall and a wide layer, against the CPU's CSR kernel."""
    from sparsemerge.train import sparse_linear

    monkeypatch.setattr(sparse_linear, "_GPU_BLOCK", 500)  # 48 x 96 and 96 x 40: many blocks
    grads = {}
    for gpu_path in (False, True):
        torch.manual_seed(1)
        lin = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40))
        g = torch.Generator().manual_seed(0)
        idx = {n: torch.randperm(p.numel(), generator=g)[: p.numel() // 20].sort().values
               for n, p in lin.named_parameters() if n.endswith("weight")}
        deltas = attach_sparse_deltas(lin, idx)
        if gpu_path:
            for t in deltas.targets.values():
                t._row_blocks = sparse_linear._row_blocks(t._idx, t.shape)
                assert len(t._row_blocks) > 1
        lin(torch.randn(64, 48, generator=torch.Generator().manual_seed(2))).square().sum() \
            .backward()
        grads[gpu_path] = {n: t.values.grad.clone() for n, t in deltas.targets.items()}
    for n, v in grads[True].items():
        torch.testing.assert_close(v, grads[False][n], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_oracle():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96).cuda()
    idx = torch.randperm(64 * 96)[:300].sort().values
    x = torch.randn(4, 7, 64, device="cuda")
    v = torch.randn(300)
    res = {}
    for impl in ("fast", "autograd"):
        m = nn.Sequential(nn.Linear(64, 96)).cuda()
        m[0].load_state_dict(lin.state_dict())
        ds = attach_sparse_deltas(m, {"0.weight": idx}, impl, gate=0.5,
                                  values_init={"0.weight": v})
        xi = x.clone().requires_grad_(True)
        m(xi).square().sum().backward()
        res[impl] = (xi.grad, ds["0.weight"].values.grad, ds["0.weight"].gate.grad)
    for a, b in zip(res["fast"], res["autograd"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_index_state_is_int32_and_grads_match_the_oracle():
    """Per trainable entry the fast path stores no int64 index (flat indices, CSR columns and
    permutation in int32; the row-major CSR columns not at all), the originals in the
    weight's dtype; its gradients still equal the autograd oracle's and ``deltas()`` still
    gives the int64 indices. A tall (row-major pattern) and a wide (W^T pattern) layer."""
    from sparsemerge.train import sparse_linear

    torch.manual_seed(1)
    lin = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40))
    g = torch.Generator().manual_seed(0)
    idx = {n: torch.randperm(p.numel(), generator=g)[: p.numel() // 20].sort().values
           for n, p in lin.named_parameters() if n.endswith("weight")}
    vals = _values(idx)
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(2))
    grads = {}
    for impl in ("fast", "autograd"):
        m = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40))
        m.load_state_dict(lin.state_dict())
        ds = attach_sparse_deltas(m, idx, impl, gate=0.7, values_init=vals)
        xi = x.clone().requires_grad_(True)
        m(xi).square().sum().backward()
        grads[impl] = [xi.grad] + [p.grad for _, p in ds.named_parameters()]
        for name, (i, _) in ds.deltas().items():
            assert i.dtype == torch.int64 and torch.equal(i, idx[name])
        if impl == "fast":
            tall, wide = ds["0.weight"], ds["2.weight"]
            assert tall._col is None and tall._perm is None
            assert wide._col is not None and wide._perm is not None
            for t in (tall, wide):
                assert t.orig.dtype == t.module.weight.dtype
                state = [v for v in vars(t).values() if isinstance(v, torch.Tensor)
                         and not v.is_floating_point()]
                assert state and all(v.dtype == torch.int32 for v in state)
    for a, b in zip(grads["fast"], grads["autograd"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert sparse_linear._index_dtype(2**31 - 1) == torch.int32
    assert sparse_linear._index_dtype(2**31) == torch.int64
