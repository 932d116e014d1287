"""``merge --calibrate N``: weights chosen on held-out training rows, never on the dev split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.errors import SparseMergeError
from sparsemerge.formats.adapter_file import load_adapter, save_adapter
from sparsemerge.merge.calibrate import holdout, training_data
from sparsemerge.merge.recipe import build_recipe, recipe_from_dict, run_recipe
from sparsemerge.multihead import MultiHeadModel
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.loop import train
from tests.test_half import one_thread  # noqa: F401  (autouse: one torch thread here)
from tests.test_merge_engine import make_adapter
from tests.test_train import write_synthetic

TRAINED = 48  # rows each adapter trains on; the calibration slice starts after them
N = 16


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tmp_path_factory) -> dict[str, Path]:
    """Two adapters on opposite tasks (``flip`` reverses the labels), each with a dev file."""
    root = tmp_path_factory.mktemp("calibrate")
    out = {}
    for i, task in enumerate(("keep", "flip")):
        files = {}
        for split, n in (("train", TRAINED + 2 * N), ("dev", 16)):
            path = write_synthetic(root / f"{task}-{split}.csv", n, seed=10 * i + len(split))
            if task == "flip":
                path.write_text(path.read_text().replace(",pos", ",x").replace(",neg", ",pos")
                                .replace(",x", ",neg"))
            files[split] = path
        out[task] = root / task
        train(TrainConfig(base=str(tiny_bert_dir), train_file=str(files["train"]),
                          eval_file=str(files["dev"]), text_column="text", label_column="label",
                          task_name=task, max_train_examples=TRAINED, max_steps=12,
                          batch_size=16, max_length=32, density=0.05, device="cpu", quiet=True,
                          seed=i, output=str(out[task])))
        out[f"{task}-dev"] = files["dev"]
        out[f"{task}-train"] = files["train"]
    return out


def test_calibration_reads_training_rows_and_never_the_dev_split(trained, tmp_path, monkeypatch):
    for task in ("keep", "flip"):
        trained[f"{task}-dev"].write_text("poisoned: not a table\x00")
        trained[f"{task}-dev"].chmod(0)
    read: list[str] = []
    import sparsemerge.data.readers as readers
    import sparsemerge.train.loop as loop

    real = readers.read_table
    for module in (readers, loop):  # every reader of a file by path
        monkeypatch.setattr(module, "read_table", lambda path, **kw: read.append(str(path))
                            or real(path, **kw))
    r = CliRunner().invoke(app, ["merge", "--heads", str(trained["keep"]), str(trained["flip"]),
                                 "--calibrate", str(N), "-o", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    cal = report["calibration"]
    assert set(read) == {str(trained["keep-train"]), str(trained["flip-train"])}
    for task in ("keep", "flip"):
        assert cal["slices"][task] == {"source": str(trained[f"{task}-train"]),
                                       "rows": [TRAINED, TRAINED + N], "seen_in_training": False}
    assert cal["candidates"] > 1
    assert report["weights"] == cal["chosen"]["weights"]
    written = json.loads((tmp_path / "m" / "sparsemerge_recipe.json").read_text())
    assert written["calibration"] == cal


def test_a_merged_adapter_records_what_calibration_chose(trained, tmp_path):
    r = CliRunner().invoke(app, ["merge", str(trained["keep"]), str(trained["flip"]),
                                 "--calibrate", str(N), "--refit-heads", "2",
                                 "-o", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["kind"] == "adapter"
    merged = load_adapter(tmp_path / "m")
    assert merged.extra["merge"]["calibration"] == report["calibration"]
    assert merged.extra["merge"]["refit_heads"] == report["refit_heads"]
    assert merged.extra["merge"]["weights"] == report["calibration"]["chosen"]["weights"]
    assert merged.hyperparameters["weights"] == report["weights"]


def test_chosen_weights_do_at_least_as_well_as_uniform_on_the_slice(trained, tmp_path):
    paths = [str(trained["keep"]), str(trained["flip"])]
    rep = run_recipe(build_recipe(paths, method="sum", heads=True, calibrate=N,
                                  output=str(tmp_path / "cal")))
    run_recipe(build_recipe(paths, method="sum", heads=True, output=str(tmp_path / "uni")))
    slices = {t: holdout(load_adapter(trained[t]), N, t)[0] for t in ("keep", "flip")}
    single, metric = rep["calibration"]["single"], rep["calibration"]["metric"]
    assert metric == {"keep": "accuracy", "flip": "accuracy"}  # own data: no preset metric

    def worst(out: Path) -> float:
        m = MultiHeadModel.from_pretrained(out).evaluate(slices)
        return min(100 * m[t][metric[t]] - single[t] for t in slices)

    assert worst(tmp_path / "cal") >= worst(tmp_path / "uni")
    assert rep["calibration"]["start"]["weights"] == [1.0, 1.0]


def test_holdout_falls_back_to_the_last_rows_when_every_row_was_trained_on(trained):
    adapter = load_adapter(trained["keep"])
    adapter.hyperparameters["max_train_examples"] = None
    data, rec = holdout(adapter, N, "keep")
    assert rec["rows"] == [TRAINED + N, TRAINED + 2 * N] and rec["seen_in_training"]
    assert len(data) == N


def test_inputs_without_training_data_are_refused(tiny_bert_dir, tmp_path):
    for i in range(2):
        save_adapter(make_adapter(tiny_bert_dir, f"t{i}", i + 1, density=0.05), tmp_path / f"a{i}")
    with pytest.raises(SparseMergeError, match="records no classification training data"):
        run_recipe(build_recipe([str(tmp_path / "a0"), str(tmp_path / "a1")], heads=True,
                                calibrate=4, output=str(tmp_path / "m")))


def test_recipe_key():
    assert recipe_from_dict({"inputs": ["a"], "calibrate": 50}).validate(
        need_output=False).calibrate == 50
    with pytest.raises(SparseMergeError, match="calibrate"):
        recipe_from_dict({"inputs": ["a"], "calibrate": -1}).validate(need_output=False)


def test_refit_heads_lowers_the_training_loss_on_the_merged_backbone(trained, tmp_path):
    paths = [str(trained["keep"]), str(trained["flip"])]
    rep = run_recipe(build_recipe(paths, heads=True, refit_heads=30,
                                  output=str(tmp_path / "refit")))
    run_recipe(build_recipe(paths, heads=True, output=str(tmp_path / "plain")))
    rows = {t: training_data(load_adapter(trained[t]), t, "--refit-heads")[0].select(
        range(TRAINED)) for t in ("keep", "flip")}
    refit = MultiHeadModel.from_pretrained(tmp_path / "refit").evaluate(rows)
    plain = MultiHeadModel.from_pretrained(tmp_path / "plain").evaluate(rows)
    for t in rows:
        assert rep["refit_heads"][t]["rows"] == [0, TRAINED]
        assert refit[t]["loss"] < plain[t]["loss"]
    assert torch.equal(load_adapter(trained["keep"]).heads["keep"].params["weight"],
                       MultiHeadModel.from_pretrained(tmp_path / "plain")
                       .heads["keep"].classifier.weight)
