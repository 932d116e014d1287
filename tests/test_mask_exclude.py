"""``train --mask-exclude ADAPTER``: SpaRTA masks disjoint from other adapters' entries."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sparsemerge import masks
from sparsemerge.cli import app
from sparsemerge.errors import SparseMergeError
from sparsemerge.formats.adapter_file import load_adapter, read_adapter, save_adapter
from sparsemerge.merge.recipe import build_recipe, run_recipe
from sparsemerge.train import loop
from sparsemerge.train.config import SparseConfig, TrainConfig
from sparsemerge.train.loop import train
from tests.test_half import one_thread  # noqa: F401  (autouse: one torch thread here)
from tests.test_merge_engine import make_adapter
from tests.test_train import write_synthetic

DENSITY = 0.3  # high enough that two independent masks of a 32-wide BERT surely overlap


def _config(base: Path, data: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"base": str(base), "train_file": str(data), "text_column": "text",
                          "label_column": "label", "max_steps": 2, "batch_size": 8,
                          "max_length": 16, "density": DENSITY, "device": "cpu", "quiet": True,
                          "output": str(out), **kw})


@pytest.fixture(scope="module")
def pair(tiny_bert_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapter ``a`` (seed 0), then ``b`` trained through the CLI with the same seed and
    ``--mask-exclude a``: without the exclusion their masks would be identical."""
    root = tmp_path_factory.mktemp("exclude")
    data = write_synthetic(root / "news.csv", 32)
    train(_config(tiny_bert_dir, data, root / "a", task_name="a"))
    r = CliRunner().invoke(app, [
        "train", "--base", str(tiny_bert_dir), "--train-file", str(data), "--text-column",
        "text", "--label-column", "label", "--task-name", "b", "--max-steps", "2",
        "--batch-size", "8", "--max-length", "16", "--density", str(DENSITY), "--device",
        "cpu", "--mask-exclude", str(root / "a"), "-o", str(root / "b"), "--json"])
    assert r.exit_code == 0, r.output
    return {"root": root, "data": data, "a": root / "a", "b": root / "b"}


def test_excluding_gives_exact_disjoint_reproducible_masks():
    numel, nnz = 1000, 300
    first = masks.seeded_indices(5, "w", numel, nnz)
    got = masks.seeded_indices_excluding(5, "w", numel, nnz, first[::-1])
    assert got.size == nnz and np.all(np.diff(got) > 0) and got.dtype == np.int64
    assert np.intersect1d(got, first).size == 0
    # The next entries of the same keyed permutation: the seeded mask of twice the size.
    assert np.array_equal(got, np.setdiff1d(masks.seeded_indices(5, "w", numel, 2 * nnz), first))
    assert np.array_equal(masks.seeded_indices_excluding(5, "w", numel, nnz, np.array([], int)),
                          first)
    everything_free = masks.seeded_indices_excluding(5, "w", numel, numel - nnz, first)
    assert np.array_equal(everything_free, np.setdiff1d(np.arange(numel), first))
    with pytest.raises(SparseMergeError, match="exceeds the 700 entries of 1000 left free"):
        masks.seeded_indices_excluding(5, "w", numel, 701, first)
    with pytest.raises(SparseMergeError, match="must be in"):
        masks.seeded_indices_excluding(5, "w", numel, 1, np.array([numel]))


def test_trained_masks_avoid_the_excluded_adapter_on_every_target(pair):
    a, b = load_adapter(pair["a"]), load_adapter(pair["b"])
    assert set(a.targets) == set(b.targets)
    h = hashlib.sha256()
    for name in sorted(b.targets):  # the fingerprint takes them in name order
        ia, ib = a.targets[name].sparse.indices.numpy(), b.targets[name].sparse.indices.numpy()
        numel = int(np.prod(b.targets[name].shape))
        assert np.intersect1d(ia, ib).size == 0, name
        # exactly the documented mask: reproducible from the seed and the excluded indices
        want = masks.seeded_indices_excluding(0, name, numel, ib.size, ia)
        assert np.array_equal(ib, want), name
        assert ib.size == masks.nnz_for_density(numel, DENSITY)
        h.update(name.encode() + b"\0" + ia.astype("<i8").tobytes())
    assert b.hyperparameters["mask_exclude"] == [str(pair["a"])]
    [rec] = b.extra["training"]["mask_exclude"]
    assert rec == {"path": str(pair["a"]), "tensors": len(a.targets),
                   "entries": sum(t.sparse.nnz for t in a.targets.values()),
                   "indices_sha256": h.hexdigest()}
    assert "mask_exclude" not in a.extra["training"] and a.hyperparameters["mask_exclude"] is None


def test_stored_with_explicit_indices_and_round_trips_bit_exactly(pair, tmp_path):
    a_storage = read_adapter(pair["a"])[1]
    b, b_storage, _ = read_adapter(pair["b"])
    assert {s.codec for s in a_storage.values()} == {"seed"}
    assert "seed" not in {s.codec for s in b_storage.values()}
    assert all(t.sparse.mask_seed is None for t in b.targets.values())
    save_adapter(b, tmp_path / "again")
    again = load_adapter(tmp_path / "again")
    for name, t in b.targets.items():
        assert torch.equal(again.targets[name].sparse.indices, t.sparse.indices)
        assert torch.equal(again.targets[name].sparse.values.view(torch.int16),
                           t.sparse.values.view(torch.int16))


def test_overlap_is_zero_and_a_merge_keeps_every_entry(pair, tmp_path):
    r = CliRunner().invoke(app, ["overlap", str(pair["a"]), str(pair["b"]), "--json"])
    assert r.exit_code == 0, r.output
    overall = json.loads(r.stdout)["pairs"][0]["overall"]
    assert overall["jaccard"] == 0 and overall["intersection"] == 0
    rep = run_recipe(build_recipe([str(pair["a"]), str(pair["b"])], output=str(tmp_path / "m")))
    nnz = sum(t.sparse.nnz for p in ("a", "b") for t in load_adapter(pair[p]).targets.values())
    assert rep["nnz"] == nnz


def test_only_sparta_takes_it(tmp_path):
    for method in ("rigsa", "partial-lora"):
        with pytest.raises(SparseMergeError, match="--mask-exclude: is for --method sparta"):
            SparseConfig(method=method, mask_exclude=["x"])
        with pytest.raises(SparseMergeError, match="--mask-exclude: is for --method sparta"):
            TrainConfig(task="sst2", method=method, mask_exclude=["x"])


def test_errors_name_the_excluded_adapter(pair, tiny_bert_dir, tmp_path):
    other = load_adapter(pair["a"])
    name = next(iter(other.targets))
    other.base.tensor_hashes[name] = "0" * 16
    save_adapter(other, tmp_path / "other")
    full = make_adapter(tiny_bert_dir, "full", 1, density=0.8)
    save_adapter(full, tmp_path / "full")
    query = [n for n in full.targets if "query" in n]
    save_adapter(make_adapter(tiny_bert_dir, "q", 2, names=query), tmp_path / "query")
    cases = {"other": ("made on another base model", {}),
             "full": ("left free by the excluded ones; lower --density", {}),
             "query": ("changes none of the tensors this run trains", {"targets": "value"})}
    for which, (msg, kw) in cases.items():
        cfg = _config(tiny_bert_dir, pair["data"], tmp_path / f"out-{which}",
                      mask_exclude=[str(tmp_path / which)], **kw)
        with pytest.raises(SparseMergeError, match=msg) as exc:
            train(cfg)
        assert f"--mask-exclude {tmp_path / which}" in str(exc.value)
        assert not (tmp_path / f"out-{which}").exists()


def test_resume_refuses_changed_excluded_adapters(pair, tiny_bert_dir, tmp_path, monkeypatch):
    excluded = tmp_path / "excluded"
    shutil.copytree(pair["a"], excluded)
    cfg = _config(tiny_bert_dir, pair["data"], tmp_path / "b", mask_exclude=[str(excluded)],
                  checkpoint_steps=1)
    real_step = loop.train_step
    calls = []

    def crashing_step(run, batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(run, batch)

    monkeypatch.setattr(loop, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop, "train_step", real_step)
    save_adapter(make_adapter(tiny_bert_dir, "a", 3, density=DENSITY), excluded)
    with pytest.raises(SparseMergeError, match="--mask-exclude changed"):
        train(cfg.replace(resume=True))
    shutil.rmtree(excluded)
    shutil.copytree(pair["a"], excluded)
    assert train(cfg.replace(resume=True)).steps == 2


def test_help_documents_the_option():
    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--mask-exclude" in r.stdout and "Jaccard 0" in r.stdout
