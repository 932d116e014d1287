"""``sparsemerge predict`` / ``evaluate`` on a merged multi-head model directory, end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.formats.adapter_file import save_adapter
from sparsemerge.multihead import MultiHeadModel, evaluate_merged
from tests.test_merge_engine import make_adapter
from tests.test_train import json_by_device

runner = CliRunner()


def _run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _text(result) -> str:
    return re.sub(r"\s+", " ", result.output)


@pytest.fixture(scope="module")
def merged(tiny_bert_dir, tmp_path_factory) -> Path:
    """sst2 + cola + topic adapters merged with TIES through the CLI (``merge --heads``)."""
    root = tmp_path_factory.mktemp("cli-multihead")
    made = {"sst2": make_adapter(tiny_bert_dir, "sst2", 1, density=0.1),
            "cola": make_adapter(tiny_bert_dir, "cola", 2, density=0.1,
                                 labels=("unacceptable", "acceptable")),
            "topic": make_adapter(tiny_bert_dir, "topic", 3, density=0.1,
                                  labels=("a", "b", "c"))}
    for task, a in made.items():
        save_adapter(a, root / task)
    out = root / "merged"
    r = _run("merge", *(root / t for t in made), "-m", "ties", "--heads", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Dev files in each task's own layout, and a GLUE-style --data-dir holding them."""
    d = tmp_path_factory.mktemp("multihead-data")
    (d / "glue" / "SST-2").mkdir(parents=True)
    (d / "glue" / "CoLA").mkdir(parents=True)
    sst2 = d / "glue" / "SST-2" / "dev.tsv"
    sst2.write_text("sentence\tlabel\nfine film\t1\nawful\t0\nsuperb work\t1\nboring\t0\n")
    cola = d / "glue" / "CoLA" / "dev.tsv"  # no header: source, label, original, sentence
    cola.write_text("x\t1\t\tthe cat sat .\nx\t0\t*\tcat the sat .\nx\t1\t\tdogs bark .\n")
    topic = d / "topic.csv"
    topic.write_text("text,label\nalpha,a\nbeta,b\ngamma,c\nalpha beta,a\n")
    return {"dir": d, "sst2": sst2, "cola": cola, "topic": topic}


def test_predict_every_head(merged):
    texts = ["a [demo] of charm", "dull and long"]
    r = _run("predict", merged, *texts, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["tasks"] == ["sst2", "cola", "topic"]
    want = MultiHeadModel.from_pretrained(merged).predict(texts)
    for i, row in enumerate(out["predictions"]):
        assert row["text"] == texts[i]
        for task, rows in want.items():
            assert row["tasks"][task] == {"label": rows[i][0], "probability": rows[i][1]}
    r = _run("predict", merged, *texts)  # the table: every head, the text verbatim
    assert r.exit_code == 0, r.output
    assert "a [demo] of charm" in r.stdout
    assert all(f"{t} (label, p)" in r.stdout for t in want)
    r = _run("predict", merged, "one", "--head", "cola", "--json")
    assert r.exit_code == 0, r.output
    assert list(json.loads(r.stdout)["predictions"][0]["tasks"]) == ["cola"]


def test_evaluate_task_files(merged, data):
    r = _run("evaluate", merged, "--task", f"sst2={data['sst2']}", "--task",
             f"cola={data['cola']}", "--task", f"topic={data['topic']}", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    want = evaluate_merged(merged, {t: data[t] for t in ("sst2", "cola", "topic")})
    assert {t: v["metrics"] for t, v in out["tasks"].items()} == want
    assert out["tasks"]["sst2"]["metric"] == "accuracy"
    assert out["tasks"]["cola"]["metric"] == "matthews"
    assert out["tasks"]["topic"]["metric"] is None
    assert out["tasks"]["cola"]["metrics"]["examples"] == 3 and out["not_evaluated"] == []
    r = _run("evaluate", merged, "--task", f"sst2={data['sst2']}")  # the table
    assert r.exit_code == 0, r.output
    assert "sst2" in r.stdout and "accuracy" in r.stdout and "not evaluated" in r.stdout


def test_evaluate_presets_from_data_dir(merged, data):
    """No --task: every head named after a preset, on its dev split (here from --data-dir)."""
    r = _run("evaluate", merged, "--data-dir", data["dir"], "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out["tasks"]) == {"sst2", "cola"} and out["not_evaluated"] == ["topic"]
    assert out["tasks"]["sst2"]["data"] == str(data["sst2"])
    r2 = _run("evaluate", merged, "--task", "sst2=sst2", "--task", "cola", "--data-dir",
              data["dir"], "--json")
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.stdout)["tasks"] == out["tasks"]


@pytest.mark.parametrize("args,match", [
    (["--task", "nope=x.csv"], "has no head 'nope'"),
    (["--task", "topic"], "not a preset task"),
    (["--task", "sst2="], "HEAD=FILE"),
    (["--task", "topic=missing.csv"], "missing.csv: no such file"),
    (["--base", "somewhere"], "apply to adapters only"),
    (["--forgetting"], "--forgetting apply to adapters only"),
])
def test_evaluate_merged_errors_exit_2(merged, args, match):
    r = _run("evaluate", merged, *args)
    assert r.exit_code == 2, r.output
    assert match in _text(r)


def test_adapter_takes_one_preset_task(merged, tmp_path):
    r = _run("evaluate", merged.parent / "sst2", "--task", "sst2=dev.tsv")
    assert r.exit_code == 2 and "merged models" in _text(r)


def _evaluate_args(merged: Path, data: dict[str, Path]) -> list[object]:
    return ["evaluate", merged, *(a for t in ("sst2", "cola", "topic")
                                  for a in ("--task", f"{t}={data[t]}"))]


def test_device_cpu_and_auto_match_default(merged, data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto = cpu here
    for args in (_evaluate_args(merged, data), ["predict", merged, "fine film", "dull"]):
        default, cpu, auto = json_by_device(*args, devices=(None, "cpu", "auto"))
        assert cpu == default and auto == default


@pytest.mark.parametrize("cmd", [["evaluate"], ["predict", "hi"]])
def test_bad_device_exits_2(merged, cmd):
    r = _run(cmd[0], merged, *cmd[1:], "--device", "tpu")
    assert r.exit_code == 2, r.output
    assert "--device: must be one of" in _text(r) and "'tpu'" in _text(r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_on_cuda_matches_cpu(merged, data):
    cpu, cuda = json_by_device(*_evaluate_args(merged, data), devices=("cpu", "cuda"))
    for task, r in cpu["tasks"].items():
        assert cuda["tasks"][task]["metrics"] == pytest.approx(r["metrics"], abs=1e-4)
