"""``sparsemerge merge`` and ``sparsemerge overlap`` end to end through the CLI runner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.formats.adapter_file import load_adapter, save_adapter
from sparsemerge.merge.engine import adapter_vectors, file_sha256, merge_adapters
from sparsemerge.merge.operators import OPERATORS
from sparsemerge.merge.stats import aggregate_stats, pairwise_stats
from tests.test_merge_engine import make_adapter, read_weights

runner = CliRunner()


@pytest.fixture(scope="module")
def adapters(tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-merge")
    made = {
        "sst2": make_adapter(tiny_bert_dir, "sst2", 1, density=0.1),
        "cola": make_adapter(tiny_bert_dir, "cola", 2, density=0.1,
                             labels=("unacceptable", "acceptable")),
        "topic": make_adapter(tiny_bert_dir, "topic", 3, density=0.1, labels=("a", "b", "c"),
                              gate=0.5),
    }
    paths = {}
    for task, a in made.items():
        paths[task] = root / task
        save_adapter(a, paths[task])
    return root, paths


def _run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_merge_heads_end_to_end(adapters):
    from sparsemerge.multihead import MultiHeadModel

    root, paths = adapters
    out = root / "merged-heads"
    r = _run("merge", paths["sst2"], paths["cola"], "--method", "ties", "--density", "0.5",
             "--lambda", "1.0", "--heads", "--max-shard-size", "300KB", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["kind"] == "merged-model" and report["tasks"] == ["sst2", "cola"]
    assert report["backbone"]["streamed"] and report["backbone"]["shards"] > 1
    recipe = json.loads((out / "sparsemerge_recipe.json").read_text())
    assert recipe["method"] == "ties"
    assert recipe["parameters"] == {"density": 0.5, "lam": 1.0}
    assert [i["sha256"] for i in recipe["inputs"]] == [
        file_sha256(paths[t] / "adapter.safetensors") for t in ("sst2", "cola")]
    assert recipe["inputs"][0]["path"] == str(paths["sst2"])
    # same weights as the Python API
    expected = merge_adapters([load_adapter(paths["sst2"]), load_adapter(paths["cola"])], "ties",
                              {"density": 0.5})
    from sparsemerge.merge.stream import save_merged_model

    save_merged_model(expected, root / "api-heads")
    w1, w2 = read_weights(out), read_weights(root / "api-heads")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    mh = MultiHeadModel.from_pretrained(out)
    assert mh.tasks == ["sst2", "cola"]
    # the human-readable report
    r = _run("merge", paths["sst2"], paths["cola"], "-m", "sum", "--heads", "-o",
             root / "merged-sum")
    assert r.exit_code == 0, r.output
    assert "multi-head model directory" in r.stdout and "streamed" in r.stdout


def test_merge_without_heads_writes_a_mergeable_adapter(adapters):
    root, paths = adapters
    out = root / "merged-adapter"
    r = _run("merge", paths["sst2"], paths["cola"], paths["topic"], "-m", "dare", "-p", "p=0.3",
             "-p", "then=ties", "--weights", "1,0.5,2", "-o", out)
    assert r.exit_code == 0, r.output
    merged = load_adapter(out)
    assert set(merged.heads) == {"sst2", "cola", "topic"}
    assert merged.hyperparameters["merge_method"] == "dare"
    assert merged.hyperparameters["parameters"] == {"p": 0.3, "seed": 0, "then": "ties",
                                                    "density": 1.0, "lam": 1.0}
    assert merged.hyperparameters["weights"] == [1.0, 0.5, 2.0]
    expected = merge_adapters([load_adapter(paths[t]) for t in ("sst2", "cola", "topic")],
                              "dare", {"p": 0.3, "then": "ties"}, [1.0, 0.5, 2.0])
    for n, t in expected.targets.items():
        assert torch.equal(merged.targets[n].sparse.indices, t.sparse.indices)
        assert torch.equal(merged.targets[n].sparse.values, t.sparse.values)
    # the merged adapter is itself a merge input
    r = _run("merge", out, root / "merged-adapter", "-o", root / "again")
    assert r.exit_code == 2 and "two inputs have a head for task" in r.output


def test_merge_config_recipe(adapters, tmp_path):
    root, paths = adapters
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: ties\nparameters: {{density: 0.5}}\ninputs:\n"
                      f"  - {paths['sst2']}\n  - path: {paths['cola']}\n    weight: 2\n"
                      f"output: {tmp_path / 'from-yaml'}\n")
    r = _run("merge", "--config", recipe, "--json")
    assert r.exit_code == 0, r.output
    r2 = _run("merge", paths["sst2"], paths["cola"], "-m", "ties", "--density", "0.5",
              "--weights", "1,2", "-o", tmp_path / "from-flags", "--json")
    assert r2.exit_code == 0, r2.output
    a, b = load_adapter(tmp_path / "from-yaml"), load_adapter(tmp_path / "from-flags")
    assert a.targets.keys() == b.targets.keys()
    for n in a.targets:
        assert torch.equal(a.targets[n].sparse.values, b.targets[n].sparse.values)


@pytest.mark.parametrize("args,match", [
    (["-m", "sum", "--density", "0.3"], "has no parameter"),
    (["-m", "ties", "--density", "3"], "density"),
    (["-m", "nope"], "unknown merge method"),
    (["--weights", "1,2,3"], "3 weights for 2 inputs"),
    (["-p", "novalue"], "NAME=VALUE"),
])
def test_merge_bad_options_exit_2(adapters, args, match):
    root, paths = adapters
    r = _run("merge", paths["sst2"], paths["cola"], *args, "-o", root / "never")
    assert r.exit_code == 2, r.output
    assert match in re.sub(r"\s+", " ", r.output)
    assert not (root / "never").exists()


def test_merge_mixed_bases_exit_2(adapters, tiny_llama_dir, tmp_path):
    root, paths = adapters
    save_adapter(make_adapter(tiny_llama_dir, "llama", 1), tmp_path / "llama")
    r = _run("merge", paths["sst2"], tmp_path / "llama", "-o", tmp_path / "x")
    assert r.exit_code == 2
    text = re.sub(r"\s+", " ", r.output)
    assert "different base models" in text and str(tmp_path / "llama") in text


def test_merge_help_lists_methods_from_registry():
    r = _run("merge", "--help")
    assert r.exit_code == 0
    text = re.sub(r"\s+", " ", r.stdout)
    for op in OPERATORS.values():
        assert f"{op.name}:" in text
        for p in op.params:
            assert p.name in text
    assert "hf://owner/name[@rev]" in text


def test_overlap_json_equals_direct_stats(adapters):
    root, paths = adapters
    r = _run("overlap", paths["sst2"], paths["cola"], paths["topic"], "--json", "--per-layer")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    names = ["sst2", "cola", "topic"]
    assert report["matrix"]["names"] == names
    vectors = {t: adapter_vectors(load_adapter(paths[t])) for t in names}
    direct = pairwise_stats(vectors)
    assert len(report["pairs"]) == 3
    for pair in report["pairs"]:
        groups, overall = aggregate_stats(direct[(pair["a"], pair["b"])])
        assert pair["overall"] == pytest.approx(overall.summary())
        assert [row["layer"] for row in pair["layers"]] == list(groups)
        for row in pair["layers"]:
            expected = groups[row["layer"]].summary()
            assert {k: v for k, v in row.items() if k != "layer"} == pytest.approx(expected)
        i, j = names.index(pair["a"]), names.index(pair["b"])
        assert report["matrix"]["jaccard"][i][j] == pytest.approx(overall.summary()["jaccard"])
    # the gate of "topic" is folded into its values: cosine uses the effective deltas
    topic = load_adapter(paths["topic"])
    n = next(iter(topic.targets))
    assert torch.allclose(vectors["topic"][n].values, topic.targets[n].sparse.values * 0.5)
    assert report["pairs"][0]["overall"]["intersection"] > 0


def test_overlap_tables(adapters):
    root, paths = adapters
    r = _run("overlap", paths["sst2"], paths["cola"])
    assert r.exit_code == 0, r.output
    assert "Jaccard" in r.stdout and "sst2 ∩ cola" in r.stdout
    assert "pairwise index Jaccard" not in r.stdout
    r = _run("overlap", paths["sst2"], paths["cola"], paths["topic"], "--per-layer")
    assert r.exit_code == 0, r.output
    assert "pairwise index Jaccard" in r.stdout and "per layer" in r.stdout
    r = _run("overlap", paths["sst2"])
    assert r.exit_code == 2 and "at least two" in r.output


def test_cli_module_defers_the_registry_import():
    """The registry (and torch with it) is read only when merge's help is shown or it runs:
    cli/merge.py has no module-level import from sparsemerge.merge."""
    import ast
    import importlib

    from sparsemerge.merge import recipe

    cli_merge = importlib.import_module("sparsemerge.cli.merge")

    tree = ast.parse(Path(cli_merge.__file__).read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [n.module for n in top if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n and n.startswith(("sparsemerge.merge", "torch"))]
    assert cli_merge.DEFAULT_METHOD == recipe.DEFAULT_METHOD
    assert cli_merge.DEFAULT_INPUT_DENSITY == recipe.DEFAULT_INPUT_DENSITY
