"""RIGSA: the pruning rule, frozen entries, the gate, storage and re-application, resume,
and the forgetting measurements. Tiny random-weight models keep this fast."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsemerge.adapter import SparseAdapter
from sparsemerge.apply import apply
from sparsemerge.data.batching import batches
from sparsemerge.errors import SparseMergeError
from sparsemerge.forgetting import forgetting, lm_forgetting, lm_loss, task_forgetting
from sparsemerge.formats.adapter_file import load_adapter, read_adapter
from sparsemerge.models import backbone_of, load_task_model
from sparsemerge.train import loop
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.loop import setup, train, train_step
from sparsemerge.train.methods import get_method
from sparsemerge.train.methods.rigsa import init_delta, keep_count, prune_entries

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rain", "snow"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """JSONL: 3 classes, the label is the first of three marker words present."""
    d = tmp_path_factory.mktemp("rigsa-data")
    marks = ["alpha", "beta", "gamma"]

    def write(path: Path, n: int, seed: int) -> Path:
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            y = rng.randrange(3)
            words = [rng.choice(WORDS) for _ in range(rng.randrange(3, 7))]
            words.insert(rng.randrange(len(words) + 1), marks[y])
            rows.append(json.dumps({"text": " ".join(words), "label": marks[y]}))
        path.write_text("\n".join(rows) + "\n")
        return path

    return write(d / "train.jsonl", 64, 0), write(d / "dev.jsonl", 24, 1)


def cfg(base: Path, data, **kw) -> TrainConfig:
    mp = kw.pop("method_params", {})
    opts = dict(method="rigsa", base=str(base), train_file=str(data[0]),
                eval_file=str(data[1]), text_column="text", label_column="label", lr=1e-2,
                batch_size=16, max_length=32, quiet=True, warmup_ratio=0.0, max_steps=8,
                device="cpu",
                method_params={"rounds": 2, "round_steps": 2, **mp})
    opts.update(kw)
    return TrainConfig(**opts)


def _batches(run, epoch=0):
    return batches(run.train_data, run.config.batch_size, True, run.config.seed, epoch)


# ------------------------------------------------------------------------- pruning rule


def test_keep_count_rule():
    # floor(n * keep + 1/2), clamped to [1, n]; 0 stays 0
    assert [keep_count(n, 0.8) for n in (0, 1, 2, 3, 4, 5, 7, 10)] == [0, 1, 2, 2, 3, 4, 6, 8]
    assert keep_count(10, 0.25) == 3  # 2.5 rounds half up
    assert keep_count(3, 0.01) == 1
    assert keep_count(9, 1.0) == 9


def test_prune_keeps_sign_consistent_top_k():
    init = torch.tensor([0.5, -0.5, 0.2, -0.2, 0.1, 0.3, -0.4, 0.6, -0.1, 0.05])
    vals = torch.tensor([0.9, 0.3, 0.4, -0.8, -0.7, 0.3, -0.05, 0.2, -0.3, 0.3])
    # same sign: 0, 2, 3, 5, 6, 7, 8, 9 (1 and 4 flipped) -> 8 eligible, keep 6
    pos, stats = prune_entries(vals, init, 0.8)
    # |v| of the eligible: 0:.9 2:.4 3:.8 5:.3 6:.05 7:.2 8:.3 9:.3; the top 6 are 0, 3, 2
    # and three of the tied .3 (5, 8, 9) -> all three, the cut falls at 7 (.2) and 6 (.05)
    assert pos.tolist() == [0, 2, 3, 5, 8, 9]
    assert stats == {"trainable_before": 10, "sign_flipped": 2, "kept": 6, "below_cut": 2}
    # ties at the cut go to the lower index
    pos, _ = prune_entries(torch.tensor([0.3, 0.3, 0.3]), torch.ones(3), 0.5)
    assert pos.tolist() == [0, 1]
    # a zero value has sign 0: it counts as a flip of a non-zero init
    pos, stats = prune_entries(torch.tensor([0.0, 0.2]), torch.tensor([0.1, 0.1]), 1.0)
    assert pos.tolist() == [1] and stats["sign_flipped"] == 1
    # nothing kept its sign: the largest |v| stays trainable (every tensor keeps one entry)
    pos, stats = prune_entries(torch.tensor([-0.1, -0.5, 0.2]), torch.tensor([1.0, 1.0, -1.0]),
                               0.8)
    assert pos.tolist() == [1] and stats["kept"] == 1


def test_prune_matches_a_brute_force_oracle():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 200, (1,), generator=g))
        init = torch.rand(n, generator=g) * 2 - 1
        vals = init + torch.randn(n, generator=g) * 0.7
        keep = float(torch.rand(1, generator=g)) * 0.9 + 0.1
        pos, _ = prune_entries(vals, init, keep)
        same = [i for i in range(n) if np.sign(float(vals[i])) == np.sign(float(init[i]))]
        k = max(1, min(len(same), int(np.floor(len(same) * keep + 0.5)))) if same else 0
        want = sorted(sorted(same, key=lambda i: (-abs(float(vals[i])), i))[:k])
        if not same:
            want = [int(torch.argmax(vals.abs()))]
        assert pos.tolist() == want, trial


# -------------------------------------------------------------------- training mechanics


@pytest.mark.parametrize("sparse_below", [1.0, 0.0], ids=["sparse-path", "dense-path"])
def test_rounds_freeze_at_init_and_gate_learns(tiny_bert_dir, data, sparse_below):
    config = cfg(tiny_bert_dir, data, method_params={"sparse_below": sparse_below})
    run = setup(config)
    m = run.method
    names = m.names
    assert m.num_trainable() == m._numel() + len(names)  # round 0: every entry + the gates
    batch_list = list(_batches(run)) * 2
    w0 = {n: backbone_of(run.model).get_parameter(n).detach().clone() for n in names}
    inits = {n: init_delta(m.init_seed, n, m.shapes[n], m.scales[n]) for n in names}

    seen = {}
    real_prune = m.prune

    def spy():
        seen.update(m.current())  # the values pruning looks at
        return real_prune()

    m.prune = spy
    train_step(run, batch_list[0])
    assert m.round == 0
    train_step(run, batch_list[1])  # round 1 ends here: prune
    assert m.round == 1 and len(m.history) == 1
    assert (m.sparse is not None) == (sparse_below == 1.0)
    after = m.current()
    # Exactly the entries prune_entries picks stay trainable, with their trained values.
    for n in names:
        i0, v0, g0 = seen[n]
        assert i0.numel() == inits[n].numel()  # round 0 trained every entry
        pos, _ = prune_entries(v0, inits[n].reshape(-1)[i0], 0.8)
        i1, v1, g1 = after[n]
        assert torch.equal(i1, i0[pos]) and torch.equal(v1, v0[pos]) and g1 == g0
    hist = m.history[0]
    assert hist["kept"] == sum(len(c[0]) for c in after.values())
    assert hist["kept"] + hist["sign_flipped"] + hist["below_cut"] == m._numel()

    for b in batch_list[2:6]:
        train_step(run, b)
    assert m.round == 2
    cur = m.current()
    for n in names:
        idx, vals, gate = cur[n]
        frozen = torch.ones(inits[n].numel(), dtype=torch.bool)
        frozen[idx] = False
        eff = m.effective_weight(n).reshape(-1)
        want = (w0[n].reshape(-1) + inits[n].reshape(-1) * gate)
        # frozen entries: exactly W0 + gate * init, bit for bit
        assert torch.equal(eff[frozen], want[frozen]), n
        if m.sparse is None:
            assert torch.equal(m.dense[n].delta.detach().reshape(-1)[frozen],
                               inits[n].reshape(-1)[frozen])
        else:
            assert torch.equal(m.sparse[n].dense.reshape(-1)[frozen],
                               inits[n].reshape(-1)[frozen])
        # the trainable entries moved away from their init
        assert not torch.equal(vals, inits[n].reshape(-1)[idx])
        # the gate learns: it moved far from its 1e-6 start (Adam: ~lr per step at most)
        assert abs(gate) > 1e-4, (n, gate)
    assert 0 < m.density() < 0.8
    assert m.num_trainable() == m.trainable_entries() + len(names)


def test_dense_and_sparse_paths_agree(tiny_bert_dir, data):
    results = []
    for sb in (1.0, 0.0):
        r = train(cfg(tiny_bert_dir, data, save_dtype="fp32", max_steps=6,
                      method_params={"sparse_below": sb}))
        results.append(r)
    a, b = (r.adapter.targets for r in results)
    for n in a:
        assert torch.equal(a[n].sparse.indices, b[n].sparse.indices), n
        torch.testing.assert_close(a[n].sparse.values, b[n].sparse.values, atol=1e-5, rtol=0)
        assert abs(a[n].gate - b[n].gate) < 1e-5


@pytest.mark.parametrize("reset", ["init", "zero"])
def test_saved_adapter_round_trips_and_reapplies_exactly(tiny_bert_dir, data, tmp_path, reset):
    config = cfg(tiny_bert_dir, data, output=str(tmp_path / "ad"), save_dtype="bf16",
                 method_params={"reset": reset, "sparse_below": 1.0})
    run = setup(config)
    result = train(config, run=run)
    m = run.method
    ad, storage, _ = read_adapter(tmp_path / "ad")
    assert ad.method == "rigsa"
    for name, t in ad.targets.items():
        mine = result.adapter.targets[name]
        assert torch.equal(t.sparse.indices, mine.sparse.indices)
        assert torch.equal(t.sparse.values.float(), mine.sparse.values.float())
        assert t.gate == mine.gate and t.gate != 1e-6
        assert storage[name].codec in ("elias-fano", "raw")
        if reset == "init":
            assert t.init is not None and t.init.seed == m.init_seed
            assert t.init.scale == pytest.approx(m.scales[name])
        else:
            assert t.init is None
            # a purely sparse delta: zero outside the ticket
            assert t.sparse_delta(name).nnz <= t.sparse.nnz
    assert ad.extra["training"]["rounds_done"] == 2
    assert len(ad.extra["training"]["prune_history"]) == 2
    assert ad.extra["training"]["density"] == pytest.approx(m.density())

    # Apply to a fresh model: bit-identical weights to the trained model's effective ones.
    fresh = load_task_model(tiny_bert_dir, ad.heads[ad.tasks[0]].labels)
    apply(fresh, ad)
    bb = backbone_of(fresh)
    for name in ad.targets:
        assert torch.equal(bb.get_parameter(name), m.effective_weight(name)), name
    enc = run.tokenizer(["alpha red cat", "beta sun", "gamma snow tree"], padding=True,
                        return_tensors="pt")
    fresh.eval()
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**enc).logits, run.model(**enc).logits)
    # remove() gives the base back exactly
    m.remove()
    base = load_task_model(tiny_bert_dir, ["a", "b", "c"])
    for name in ad.targets:
        assert torch.equal(backbone_of(run.model).get_parameter(name),
                           backbone_of(base).get_parameter(name))


def test_rounds_per_epoch_and_options(tiny_bert_dir, data):
    # 64 examples / 16 = 4 steps per epoch; rounds=2 of one epoch each, then the ticket.
    r = train(cfg(tiny_bert_dir, data, max_steps=None, epochs=3,
                  method_params={"round_steps": None}))
    hist = r.adapter.extra["training"]["prune_history"]
    assert [h["round"] for h in hist] == [1, 2]
    assert r.adapter.extra["training"]["rounds_done"] == 2
    assert hist[1]["density"] < hist[0]["density"] < 1
    with pytest.raises(SparseMergeError, match="--epochs >= 3"):
        setup(cfg(tiny_bert_dir, data, max_steps=None, epochs=2,
                  method_params={"round_steps": None}))
    with pytest.raises(SparseMergeError, match="reset"):
        setup(cfg(tiny_bert_dir, data, method_params={"reset": "half"}))
    with pytest.raises(SparseMergeError, match="patience"):
        setup(cfg(tiny_bert_dir, data, patience=2))
    assert "prune_keep" in get_method("rigsa").describe()


def test_resume_is_bit_exact(tiny_bert_dir, data, tmp_path, monkeypatch):
    # 4 steps per epoch, pruning after steps 2 and 4 (sparse path from round 2 on with
    # sparse_below=0.7), checkpoints every 3 steps: at 3 (masked dense) and 6 (sparse).
    common = dict(max_steps=10, checkpoint_steps=3, save_dtype="fp32",
                  method_params={"sparse_below": 0.7})
    full = train(cfg(tiny_bert_dir, data, output=str(tmp_path / "full"), **common))
    real_step = loop.train_step
    calls = {"n": 0}

    def crashing_step(run, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_step(run, batch)

    monkeypatch.setattr(loop, "train_step", crashing_step)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tiny_bert_dir, data, output=str(out), **common))
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train(cfg(tiny_bert_dir, data, output=str(out), resume=True, **common))
    a, b = load_adapter(tmp_path / "full"), load_adapter(out)
    for name, t in a.targets.items():
        assert torch.equal(t.sparse.indices, b.targets[name].sparse.indices)
        assert torch.equal(t.sparse.values, b.targets[name].sparse.values), name
        assert t.gate == b.targets[name].gate
    assert resumed.metrics == full.metrics


# ---------------------------------------------------------------------------- forgetting


def test_lm_forgetting_on_a_tiny_decoder_and_cli(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from sparsemerge.adapter import BaseInfo, SeededInit, SparseTensor, TargetDelta
    from sparsemerge.cli import app
    from sparsemerge.forgetting import is_causal_lm
    from sparsemerge.formats.adapter_file import save_adapter
    from sparsemerge.models import base_info, load_causal_lm, load_tokenizer

    assert is_causal_lm(str(tiny_llama_dir))
    model = load_causal_lm(str(tiny_llama_dir)).eval()
    tok = load_tokenizer(str(tiny_llama_dir))
    texts = ["the cat sat on the mat", "rain falls on the green trees today"]
    base = lm_loss(model, tok, texts)
    assert base["tokens"] > 10 and base["perplexity"] > 1
    name = "layers.0.mlp.down_proj.weight"
    shape = tuple(backbone_of(model).get_parameter(name).shape)
    info: BaseInfo = base_info(backbone_of(model), str(tiny_llama_dir), [name])
    one = SparseTensor(shape, torch.tensor([0]), torch.tensor([0.0]))
    gated = SparseAdapter(targets={name: TargetDelta(shape, sparse=one, init=SeededInit(1, 0.5),
                                                     gate=2.0)}, base=info, method="rigsa")
    none = SparseAdapter(targets={name: TargetDelta(shape, sparse=one)}, base=info)
    r0 = lm_forgetting(none, base=str(tiny_llama_dir), texts=texts, max_examples=8)
    assert r0["forgetting"] == 0.0 and r0["tokens"] == base["tokens"]
    assert r0["zero_shot"]["sst2"]["forgetting"] == 0.0  # an all-zero delta forgets nothing
    r1 = forgetting(gated, base=str(tiny_llama_dir), texts=texts, max_examples=8)
    assert r1["kind"] == "lm" and r1["adapted_loss"] != r1["base_loss"]

    save_adapter(gated, tmp_path / "gated")
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "gated"), "--forgetting",
                                   "--base", str(tiny_llama_dir), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kind"] == "lm" and out["texts"] > 100  # the shipped plain-text sample
    assert out["forgetting"] == pytest.approx(out["adapted_loss"] - out["base_loss"])
    assert {t: z["examples"] for t, z in out["zero_shot"].items()} == {"sst2": 200, "cola": 200}
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "gated"), "--forgetting",
                                   "--base", str(tiny_llama_dir), "--base-dtype", "bf16", "--json"])
    half = json.loads(res.stdout)  # --base-dtype is honoured: bf16 rounding moves the loss a bit
    assert half["base_loss"] != out["base_loss"]
    assert half["base_loss"] == pytest.approx(out["base_loss"], abs=0.05)


def test_task_forgetting_and_encoder_cli_error(tiny_bert_dir, data, tmp_path):
    from typer.testing import CliRunner

    from sparsemerge.cli import app

    # The "other" adapter: a SpaRTA adapter on a preset task (the shipped SST-2 subset).
    other = train(TrainConfig(base=str(tiny_bert_dir), task="sst2", max_train_examples=32,
                              max_steps=2, batch_size=16, max_length=32, quiet=True,
                              density=0.05)).adapter
    mine = train(cfg(tiny_bert_dir, data, max_steps=4, output=str(tmp_path / "mine"))).adapter
    r = task_forgetting(mine, other, base=str(tiny_bert_dir), max_examples=64)
    assert r["kind"] == "task" and r["task"] == "sst2" and r["examples"] == 64
    assert r["forgetting"] == pytest.approx(r["alone"]["accuracy"] - r["merged"]["accuracy"])
    # merged alone vs with a zero delta: no forgetting
    zero = dataclasses.replace(mine, targets={n: dataclasses.replace(t, gate=0.0)
                                              for n, t in mine.targets.items()})
    assert task_forgetting(zero, other, base=str(tiny_bert_dir),
                           max_examples=64)["forgetting"] == 0.0
    with pytest.raises(SparseMergeError, match="--alongside"):
        lm_forgetting(mine, base=str(tiny_bert_dir))
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "mine"), "--forgetting"])
    assert res.exit_code == 2 and "--alongside" in res.stderr
