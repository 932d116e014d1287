"""The scripts in ``examples/`` run as a user runs them (a fresh ``python`` process each), on a
tiny random model and a few rows of GLUE-layout data, and do what their docstrings say.

``train_and_merge.py`` runs once (module fixture); the recipe and overlap examples then work
on the adapters it wrote, as the README tells users to run them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sparsemerge import load_adapter
from sparsemerge.cli import app
from tests.test_lm_objective import causal_llama  # noqa: F401 (fixture of test_trl_sft)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TASKS = ("sst2", "cola")
LABELS = {"sst2": {"negative", "positive"}, "cola": {"unacceptable", "acceptable"}}

SST2 = ["a charming film", "dull and far too long", "superb acting", "a boring mess",
        "warm and funny", "tedious", "great fun", "awful script"]
COLA = ["the cat sat on the mat .", "cat the on sat mat the .", "dogs bark loudly .",
        "bark dogs the .", "she reads books .", "reads she books the ."]


def glue_dir(root: Path) -> Path:
    """SST-2 and CoLA files in GLUE's own layout (CoLA: no header, train in two parts)."""
    (root / "SST-2").mkdir(parents=True)
    (root / "CoLA").mkdir()
    sst2 = "sentence\tlabel\n" + "".join(f"{t}\t{i % 2 ^ 1}\n" for i, t in enumerate(SST2))
    (root / "SST-2" / "train.tsv").write_text(sst2)
    (root / "SST-2" / "dev.tsv").write_text(sst2)
    cola = [f"x\t{i % 2 ^ 1}\t{'' if i % 2 == 0 else '*'}\t{t}\n" for i, t in enumerate(COLA)]
    (root / "CoLA" / "train_part1.tsv").write_text("".join(cola[:4]))
    (root / "CoLA" / "train_part2.tsv").write_text("".join(cola[4:]))
    (root / "CoLA" / "dev.tsv").write_text("".join(cola))
    return root


def run(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a fresh process on one thread (the tests share the machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd or ROOT, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def last_json(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The examples' ``--json`` summary: the last line of stdout."""
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("examples")
    data = glue_dir(root / "glue")
    out = root / "out"
    r = run(EXAMPLES / "train_and_merge.py", "--base", tiny_bert_dir, "--data-dir", data,
            "--out", out, "--max-steps", 2, "--json")
    return {"root": root, "data": data, "out": out, "summary": last_json(r)}


def test_train_and_merge(trained):
    out, summary = trained["out"], trained["summary"]
    for task in TASKS:
        adapter = load_adapter(out / task)
        assert adapter.method == "sparta" and adapter.tasks == [task]
        assert summary["adapters"][task] == str(out / task)
    # the two masks are drawn with different seeds
    seeds = [load_adapter(out / t).hyperparameters["method_params"]["mask_seed"] for t in TASKS]
    assert seeds == [0, 1]
    merged = out / "merged"
    assert summary["merged"] == str(merged) and summary["tasks"] == list(TASKS)
    assert all((merged / "heads" / t).is_dir() for t in TASKS)
    assert json.loads((merged / "sparsemerge_recipe.json").read_text())["method"] == "ties"
    # every head answered every text with one of its own labels, and was scored on its dev set
    assert len(summary["predictions"]) == 2
    for row in summary["predictions"]:
        for task in TASKS:
            label, p = row[task]
            assert label in LABELS[task] and 0.5 <= p <= 1.0
    assert summary["merged_scores"]["sst2"]["examples"] == len(SST2)
    assert summary["merged_scores"]["cola"]["examples"] == len(COLA)
    assert summary["alone"]["sst2"]["examples"] == len(SST2)


def test_recipe_yaml_cli_and_python_agree(trained):
    """The YAML as shipped (its paths relative to its own folder) through the documented CLI
    command (in process: one interpreter start less), and through run_recipe.py with an
    output override: the same merged weights."""
    root = trained["root"]
    recipe = root / "merge_recipe.yaml"
    shutil.copy(EXAMPLES / "merge_recipe.yaml", recipe)  # next to out/, as in examples/
    r = CliRunner().invoke(app, ["merge", "--config", str(recipe), "--json"])
    assert r.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    assert cli["output"] == str(trained["out"] / "merged-recipe")
    assert cli["kind"] == "merged-model" and cli["method"] == "ties" and cli["tasks"] == list(TASKS)
    assert cli["parameters"] == {"density": 1.0, "lam": 1.0} and cli["weights"] == [1.0, 1.0]

    script_out = root / "from-script"
    r = run(EXAMPLES / "run_recipe.py", "--recipe", recipe, "--data-dir", trained["data"],
            "--out", script_out, "--json")
    py = last_json(r)
    assert py["output"] == str(script_out) and py["tasks"] == list(TASKS)
    assert py["nnz"] == cli["nnz"] > 0
    assert py["scores"]["sst2"]["examples"] == len(SST2)
    assert py["scores"]["cola"]["examples"] == len(COLA)
    a = load_file(trained["out"] / "merged-recipe" / "model.safetensors")
    b = load_file(script_out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the recipe's merge is the one train_and_merge.py does from Python
    c = load_file(trained["out"] / "merged" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_inspect_and_overlap(trained):
    out = trained["out"]
    report_dir = trained["root"] / "report"
    r = run(EXAMPLES / "inspect_and_overlap.py", out / "sst2", out / "cola", "--per-layer",
            "--out", report_dir)
    assert "Jaccard" in r.stdout and "TIES sign conflicts" in r.stdout
    report = json.loads((report_dir / "overlap.json").read_text())
    assert list(report["adapters"]) == list(TASKS)
    for task, info in report["adapters"].items():
        adapter = load_adapter(out / task)
        assert info["entries"] == adapter.trainable > 0
        assert info["heads"] == {task: adapter.heads[task].labels}
        assert info["bits_per_entry"] > 0 and info["file_bytes"] > 0
    (pair,) = report["pairs"]
    s = pair["overall"]
    assert (pair["a"], pair["b"]) == TASKS
    assert (s["nnz_a"], s["nnz_b"]) == (report["adapters"]["sst2"]["entries"],
                                        report["adapters"]["cola"]["entries"])
    assert 0 < s["intersection"] < s["union"] and 0 < s["jaccard"] < 1
    assert s["sign_agreement"] is not None and s["cosine"] is not None
    assert s["ties_sign_conflicts"] >= 0 and pair["layers"]
    assert f"{s['intersection']:,} shared of {s['union']:,}" in r.stdout
    # shared entries are stored once in the merge
    assert report["merged_entries"] == s["union"] < report["summed_entries"]


def test_trainer(tiny_bert_dir, tmp_path):
    """``trainer.py``: a transformers Trainer through get_sparse_model; the CLI reads its
    adapter."""
    out = tmp_path / "adapter"
    summary = last_json(run(EXAMPLES / "trainer.py", "--base", tiny_bert_dir, "--data-dir",
                            glue_dir(tmp_path / "glue"), "--out", out, "--max-steps", 2,
                            "--json"))
    assert summary["adapter"] == str(out) and summary["steps"] == 2
    adapter = load_adapter(out)
    assert adapter.method == "sparta" and adapter.tasks == ["sst2"]
    assert adapter.heads["sst2"].labels == ["negative", "positive"]
    assert adapter.metrics["accuracy"] == summary["dev_accuracy"]
    r = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["method"] == "sparta"


@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="trl not installed: pip install -e '.[trl]'")
def test_trl_sft(causal_llama, tmp_path):  # noqa: F811
    """``trl_sft.py``: TRL's SFTTrainer through get_sparse_model; its adapter answers through
    ``generate`` in the chat format it was trained in."""
    out = tmp_path / "adapter"
    summary = last_json(run(EXAMPLES / "trl_sft.py", "--base", causal_llama, "--data-dir",
                            glue_dir(tmp_path / "glue"), "--out", out, "--max-steps", 2,
                            "--max-train-examples", 8, "--eval-examples", 2, "--json"))
    assert summary["adapter"] == str(out) and summary["steps"] == 2
    assert summary["dev_examples"] == 2 and 0.0 <= summary["dev_exact_match"] <= 1.0
    adapter = load_adapter(out)
    assert adapter.method == "sparta" and adapter.heads == {}
    assert adapter.trainable == summary["trainable"] > 0
    assert adapter.hyperparameters["chat_template"] is True
