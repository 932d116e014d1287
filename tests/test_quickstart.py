"""``sparsemerge quickstart``: the plumbing of the two-task run (train, overlap, merge,
evaluate) and the single-task run, on a tiny model for a few steps (``--base``,
``--max-steps`` are hidden options for this)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.cli.train import _quickstart_table
from sparsemerge.formats.adapter_file import load_adapter
from sparsemerge.quickstart import MERGE, QUICKSTART_DEFAULTS

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_two_task_quickstart(tiny_bert_dir, tmp_path):
    out = tmp_path / "qs"
    r = _run("quickstart", "--base", tiny_bert_dir, "--max-steps", 2, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert set(summary["tasks"]) == {"sst2", "cola"}
    sst2, cola = summary["tasks"]["sst2"], summary["tasks"]["cola"]
    assert sst2["metric"] == "accuracy" and cola["metric"] == "matthews"
    for task, t in summary["tasks"].items():
        assert t["steps"] == 2 and t["adapter"] == str(out / task)
        m = t["metric"]
        assert t["change_points"] == round(100 * (t["merged"][m] - t["alone"][m]), 2)
    assert sst2["merged"]["examples"] == 872 and cola["merged"]["examples"] == 1043
    # each adapter has its own mask: few shared entries
    (pair,) = summary["overlap"]
    assert (pair["a"], pair["b"]) == ("sst2", "cola") and 0 < pair["jaccard"] < 0.2
    seeds = [load_adapter(out / t).hyperparameters["method_params"]["mask_seed"]
             for t in ("sst2", "cola")]
    assert seeds == [0, 1]
    assert load_adapter(out / "sst2").hyperparameters["density"] == QUICKSTART_DEFAULTS["density"]
    recipe = json.loads((out / "merged" / "sparsemerge_recipe.json").read_text())
    assert recipe["method"] == MERGE["method"] == "ties" and recipe["tasks"] == ["sst2", "cola"]
    # the merged scores are what `sparsemerge evaluate` reports for the merged model
    r = _run("evaluate", out / "merged", "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)["tasks"]
    assert {t: v["metrics"] for t, v in ev.items()} == {
        t: v["merged"] for t, v in summary["tasks"].items()}
    # the human-readable table
    console = Console(record=True, width=240)
    console.print(_quickstart_table(summary))
    text = console.export_text()
    assert "alone" in text and "merged" in text and "sign conflicts" in text
    assert re.search(r"sst2\W+accuracy", text) and re.search(r"cola\W+matthews", text)
    # ...fits the 80 columns rich uses when stdout is not a terminal (logs, CI)
    narrow = Console(record=True, width=80)
    narrow.print(_quickstart_table(summary))
    header = next(line for line in narrow.export_text().splitlines() if "┃" in line)
    assert "…" not in header and all(w in header for w in ("dev metric", "points", "trainable"))


def test_single_task_quickstart(tiny_bert_dir, tmp_path):
    out = tmp_path / "one"
    r = _run("quickstart", "--tasks", "sst2", "--base", tiny_bert_dir, "--max-steps", 2,
             "-o", out, "-q")
    assert r.exit_code == 0, r.output
    text = re.sub(r"\s+", " ", r.stdout)
    assert "dev accuracy" in text and f"sparsemerge predict {out}" in text
    assert load_adapter(out).tasks == ["sst2"] and not (out / "merged").exists()


@pytest.mark.parametrize("tasks,match", [("sst2,mrpc", "choose among"),
                                         ("cola,cola", "twice")])
def test_quickstart_bad_tasks(tasks, match, tmp_path):
    r = _run("quickstart", "--tasks", tasks, "-o", tmp_path / "x")
    assert r.exit_code == 2 and match in r.output
    assert not (tmp_path / "x").exists()


def test_quickstart_help_keeps_brackets():
    r = _run("quickstart", "--help")
    assert r.exit_code == 0 and "sparsemerge[demo]" in r.stdout
