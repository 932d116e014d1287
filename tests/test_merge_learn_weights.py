"""``merge --learn-weights STEPS``: a weight per input and block, learned on training rows."""

from __future__ import annotations

import pytest
import torch

from sparsemerge.errors import SparseMergeError
from sparsemerge.formats.adapter_file import load_adapter
from sparsemerge.merge.calibrate import training_data
from sparsemerge.merge.recipe import build_recipe, recipe_from_dict, run_recipe
from sparsemerge.merge.stats import layer_of
from sparsemerge.multihead import MultiHeadModel
from tests.test_half import one_thread  # noqa: F401  (autouse: one torch thread here)
from tests.test_merge_calibrate import TRAINED, N, trained  # noqa: F401  (fixture)

TASKS = ("keep", "flip")


def training_rows(trained):  # noqa: F811
    return {t: training_data(load_adapter(trained[t]), t, "--learn-weights")[0].select(
        range(TRAINED)) for t in TASKS}


def test_learned_weights_approach_each_own_adapter_and_are_what_was_merged(trained, tmp_path):  # noqa: F811
    paths = [str(trained[t]) for t in TASKS]
    rep = run_recipe(build_recipe(paths, heads=False, learn_weights=40,
                                  output=str(tmp_path / "learned")))
    record = rep["learned_weights"]
    assert record["steps"] == 40
    # held-out rows: none are left after the 300 it wants, so the last 300 (every row here)
    assert all(record["rows"][t] | {"source": None} == {"source": None, "rows": [0, TRAINED + 32],
                                                        "seen_in_training": True} for t in TASKS)
    factors = list(record["factors"].values())
    assert any(abs(c - 1.0) > 1e-3 for f in factors for c in f.values())  # it moved
    assert all(c >= 0.0 for f in factors for c in f.values())
    # the objective (KL from each task's own adapter) went down
    assert sum(record["last_loss"].values()) < sum(record["first_loss"].values())
    # the merged delta of every tensor is the sum of the inputs scaled by their block's factor
    merged = load_adapter(tmp_path / "learned")
    inputs = [load_adapter(p) for p in paths]
    for name, target in merged.targets.items():
        ref = sum(f[layer_of(name)] * a.targets[name].dense_delta(name)
                  for f, a in zip(factors, inputs, strict=True) if name in a.targets)
        torch.testing.assert_close(target.dense_delta(name), ref, atol=1e-3, rtol=1e-2)
    # and the merged backbone scores the training rows better than the plain sum
    for label, extra in (("learned", {"learn_weights": 40}), ("plain", {})):
        run_recipe(build_recipe(paths, heads=True, output=str(tmp_path / f"{label}-model"),
                                **extra))
    rows = training_rows(trained)
    learned = MultiHeadModel.from_pretrained(tmp_path / "learned-model").evaluate(rows)
    plain = MultiHeadModel.from_pretrained(tmp_path / "plain-model").evaluate(rows)
    assert sum(learned[t]["loss"] for t in TASKS) < sum(plain[t]["loss"] for t in TASKS)


def test_with_calibrate_it_learns_on_the_calibration_rows(trained, tmp_path):  # noqa: F811
    rep = run_recipe(build_recipe([str(trained[t]) for t in TASKS], heads=True, calibrate=N,
                                  learn_weights=3, output=str(tmp_path / "m")))
    for t in TASKS:
        assert rep["learned_weights"]["rows"][t]["rows"] == [TRAINED, TRAINED + N]
        assert rep["calibration"]["slices"][t]["rows"] == [TRAINED, TRAINED + N]


def test_only_linear_methods_take_learned_weights(trained, tmp_path):  # noqa: F811
    with pytest.raises(SparseMergeError, match="sum or weighted, not 'ties'"):
        run_recipe(build_recipe([str(trained[t]) for t in TASKS], method="ties", heads=True,
                                learn_weights=4, output=str(tmp_path / "m")))


def test_learning_never_reads_the_dev_split(trained, tmp_path):  # noqa: F811
    saved = {t: trained[f"{t}-dev"].read_bytes() for t in TASKS}
    try:
        for t in TASKS:
            trained[f"{t}-dev"].write_text("poisoned: not a table\x00")
            trained[f"{t}-dev"].chmod(0)
        rep = run_recipe(build_recipe([str(trained[t]) for t in TASKS], heads=True,
                                      learn_weights=3, output=str(tmp_path / "m")))
        assert set(rep["learned_weights"]["last_loss"]) == set(TASKS)
    finally:
        for t in TASKS:
            trained[f"{t}-dev"].chmod(0o644)
            trained[f"{t}-dev"].write_bytes(saved[t])


def test_recipe_key():
    assert recipe_from_dict({"inputs": ["a"], "learn_weights": 50}).validate(
        need_output=False).learn_weights == 50
    with pytest.raises(SparseMergeError, match="learn_weights"):
        recipe_from_dict({"inputs": ["a"], "learn_weights": -1}).validate(need_output=False)
