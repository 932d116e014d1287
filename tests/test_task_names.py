"""Task names end to end (issue 20): any text a folder name can hold names a task's head,
from ``train --task-name`` through ``merge NAME=PATH`` (and recipes) to loading, ``predict``
and ``evaluate``; the default name of a training file; and every ``--option`` the package's
messages mention exists on the command line."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.errors import FormatError, SparseMergeError
from sparsemerge.formats.adapter_file import load_adapter, save_adapter
from sparsemerge.formats.merged import (
    RECIPE_NAME,
    check_task_names,
    read_merged,
    task_name_problem,
)
from sparsemerge.merge.recipe import build_recipe, load_recipe, run_recipe, split_input
from sparsemerge.multihead import MultiHeadModel, evaluate_merged, predict_merged
from sparsemerge.train.config import API_ONLY, TrainConfig, file_task_name, is_generic_name
from tests.test_merge_engine import make_adapter
from tests.test_train import write_synthetic

runner = CliRunner()
# Attributes of nn.Module, a dot and a space, the '=' of NAME=PATH: none may break a head.
ODD = ["train", "eval", "to", "forward", "a.b c", "k=v"]


def _run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _text(result) -> str:
    return re.sub(r"\s+", " ", result.output)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def same_name(tiny_bert_dir, tmp_path_factory) -> list[Path]:
    """Adapters whose heads are all called ``train`` (trained from ``train.tsv`` files)."""
    root = tmp_path_factory.mktemp("same-name")
    out = []
    for i in range(len(ODD)):
        labels = ("a", "b", "c") if i == 4 else ("negative", "positive")
        save_adapter(make_adapter(tiny_bert_dir, "train", i + 1, density=0.05, labels=labels),
                     root / f"run{i}")
        out.append(root / f"run{i}")
    return out


@pytest.fixture(scope="module")
def odd_merged(same_name, tmp_path_factory) -> Path:
    """``merge --heads train=.. eval=.. to=.. forward=.. 'a.b c'=.. k=v=..``: renamed at
    merge time."""
    out = tmp_path_factory.mktemp("odd") / "merged"
    r = _run("merge", "--heads", *(f"{n}={p}" for n, p in zip(ODD, same_name, strict=True)),
             "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tasks"] == ODD
    return out


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("odd-data")
    two, three = d / "two.csv", d / "three.csv"
    two.write_text("text,label\nfine film,positive\nawful,negative\nsuperb,positive\n")
    three.write_text("text,label\nalpha,a\nbeta,b\ngamma,c\nalpha beta,a\n")
    return {n: three if n == "a.b c" else two for n in ODD}


# ------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize("name", ["train", "to", "forward", "a.b c", "x=y", "-lead", "ünï",
                                  "Sentiment (v2)", "x" * 255, "é" * 127])
def test_any_folder_safe_text_is_a_task_name(name):
    assert task_name_problem(name) is None


@pytest.mark.parametrize("name,why", [
    ("", "empty"), (".", "heads folder itself"), ("..", "parent"),
    ("a/b", "path separator"), ("a\\b", "path separator"), ("a\x00b", "control character"),
    ("a\nb", "control character"), (" a", "whitespace"), ("a ", "whitespace"),
    ("x" * 256, "at most 255"), ("é" * 128, "at most 255"), (3, "must be a string"),
])
def test_unsafe_task_names_say_why(name, why):
    assert why in task_name_problem(name)


def test_names_that_share_a_folder_on_case_insensitive_disks():
    assert check_task_names(["sst2", "SST-2", "a.b c"]) == ["sst2", "SST-2", "a.b c"]
    with pytest.raises(SparseMergeError, match="differ only in case"):
        check_task_names(["news", "News"])
    with pytest.raises(SparseMergeError, match="differ only in case"):
        check_task_names(["caf\u00e9", "cafe\u0301"])  # NFC and NFD forms of one name


def test_dotted_names_cannot_collide_in_an_adapter_file(tiny_bert_dir, tmp_path):
    ad = make_adapter(tiny_bert_dir, "a.classifier", 1, density=0.01)
    ad.heads["a"] = make_adapter(tiny_bert_dir, "a", 2, density=0.01).heads["a"]
    ad.heads["a"].params = {"classifier.weight": ad.heads["a"].params["weight"]}
    with pytest.raises(FormatError, match="'heads.a.classifier.weight'"):
        save_adapter(ad, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ merged model, odd names


def test_odd_names_load_predict_and_evaluate_in_python(odd_merged, odd_data):
    files = read_merged(odd_merged)
    assert files.tasks == ODD
    assert sorted(p.name for p in (odd_merged / "heads").iterdir()) == sorted(ODD)
    model = MultiHeadModel.from_pretrained(odd_merged)
    assert model.tasks == ODD
    # nn.Module's own attributes are untouched by heads named after them
    assert model.train() is model and model.training and model.eval() is model
    assert model.to("cpu") is model and callable(model.forward)
    assert len([k for k in model.state_dict() if k.startswith("head_modules.")]) == 2 * len(ODD)
    preds = model.predict(["a fine film", "dull"])
    assert list(preds) == ODD and all(len(v) == 2 for v in preds.values())
    assert preds["a.b c"][0][0] in ("a", "b", "c")
    assert predict_merged(odd_merged, ["a fine film", "dull"], tasks=["to"]) == \
        {"to": preds["to"]}
    scores = evaluate_merged(odd_merged, dict(odd_data))
    assert list(scores) == ODD
    assert scores["a.b c"]["examples"] == 4 and scores["train"]["examples"] == 3


def test_odd_names_predict_and_evaluate_on_the_cli(odd_merged, odd_data, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one table row for the five headers
    r = _run("predict", odd_merged, "a fine film", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["tasks"] == ODD and sorted(out["predictions"][0]["tasks"]) == sorted(ODD)
    r = _run("predict", odd_merged, "a fine film", "--head", "a.b c", "--json")
    assert r.exit_code == 0, r.output
    assert list(json.loads(r.stdout)["predictions"][0]["tasks"]) == ["a.b c"]
    r = _run("predict", odd_merged, "a fine film")  # the table names every head
    assert r.exit_code == 0, r.output
    assert all(f"{t} (label, p)" in _text(r) for t in ODD)
    args = [a for t in ODD for a in ("--task", f"{t}={odd_data[t]}")]
    r = _run("evaluate", odd_merged, *args, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert sorted(out["tasks"]) == sorted(ODD) and out["not_evaluated"] == []  # JSON: sorted
    assert {t: v["metrics"] for t, v in out["tasks"].items()} == \
        evaluate_merged(odd_merged, dict(odd_data))
    r = _run("evaluate", odd_merged, "--head", "forward")  # no preset: a real suggestion
    assert r.exit_code == 2 and "--task HEAD=FILE" in _text(r)


def test_merged_model_records_the_renames(odd_merged, same_name):
    recipe = json.loads((odd_merged / RECIPE_NAME).read_text())
    assert recipe["tasks"] == ODD
    assert [(i["tasks"], i.get("renamed_from"), i["path"]) for i in recipe["inputs"]] == \
        [([n], None if n == "train" else "train", str(p))
         for n, p in zip(ODD, same_name, strict=True)]


def test_a_merged_model_with_odd_names_merges_again(odd_merged, same_name, tmp_path):
    """A merged model is an input too; its heads keep their names."""
    out = tmp_path / "again"
    r = _run("merge", "--heads", odd_merged, f"extra={same_name[0]}", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert MultiHeadModel.from_pretrained(out).tasks == [*ODD, "extra"]


def test_recipe_rejects_an_unsafe_head_name(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / RECIPE_NAME).write_text(json.dumps({
        "format": "sparsemerge-merged-model", "format_version": 1, "tasks": ["../up"],
        "method": "sum", "parameters": {}, "inputs": []}))
    with pytest.raises(FormatError, match="invalid task name '../up': it contains a path"):
        read_merged(bad)


# ------------------------------------------------------------------------- renaming heads


def test_merge_renames_with_name_equals_path(same_name, tmp_path):
    a, b = same_name[:2]
    r = _run("merge", "--heads", a, b, "-o", tmp_path / "clash")
    assert r.exit_code == 2
    text = _text(r)  # every suggestion is real: NAME=PATH and train --task-name
    assert "two inputs have a head for task 'train'" in text
    assert "NAME=PATH" in text and "--task-name" in text
    out = tmp_path / "ab"
    r = _run("merge", "--heads", f"a={a}", f"b={b}", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tasks"] == ["a", "b"]
    assert MultiHeadModel.from_pretrained(out).tasks == ["a", "b"]
    # without --heads: a merged adapter with the renamed heads
    r = _run("merge", f"x y={a}", f"z.w={b}", "-o", tmp_path / "adapter", "--json")
    assert r.exit_code == 0, r.output
    assert load_adapter(tmp_path / "adapter").tasks == ["x y", "z.w"]


@pytest.mark.parametrize("item,match", [
    ("a/b={}", "contains a path separator"),
    ("={}", "write NAME=PATH"),
    (" padded={}", "whitespace"),
    ("name=/no/such/dir", "head name 'name', path '/no/such/dir'"),
])
def test_bad_renames_exit_2(same_name, tmp_path, item, match):
    r = _run("merge", "--heads", item.format(same_name[0]), f"ok={same_name[1]}",
             "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert match in _text(r)
    assert not (tmp_path / "out").exists()


def test_rename_needs_an_input_with_one_head(odd_merged, same_name, tmp_path):
    r = _run("merge", "--heads", f"all={odd_merged}", f"b={same_name[1]}", "-o", tmp_path / "o")
    assert r.exit_code == 2
    assert f"has {len(ODD)} heads" in _text(r) and "exactly one" in _text(r)


def test_a_path_holding_equals_is_a_path(same_name, tmp_path):
    weird = tmp_path / "lr=0.01"
    weird.symlink_to(same_name[0], target_is_directory=True)
    assert split_input(str(weird)) == (None, str(weird))
    assert split_input(f"n={weird}") == ("n", str(weird))
    assert split_input("hf://owner/repo") == (None, "hf://owner/repo")
    assert split_input("lr=0.01", root=tmp_path) == (None, "lr=0.01")
    assert split_input(f"a=b={weird}") == ("a=b", str(weird))  # a name holding '='
    assert split_input("a=b=missing") == ("a", "b=missing")
    r = _run("merge", "--heads", weird, f"b={same_name[1]}", "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tasks"] == ["train", "b"]


def test_recipe_inputs_rename_heads(same_name, tmp_path):
    a, b, c = same_name[:3]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "c").symlink_to(c, target_is_directory=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "heads": True, "output": "out",
        "inputs": [{"path": str(a), "task": "news topics"}, {"path": str(b), "name": "to"},
                   "c.v2=runs/c"]}))
    recipe = load_recipe(path)
    assert [(i.task, i.path) for i in recipe.inputs] == \
        [("news topics", str(a)), ("to", str(b)), ("c.v2", str(tmp_path / "runs" / "c"))]
    report = run_recipe(recipe)
    assert report["tasks"] == ["news topics", "to", "c.v2"]
    assert MultiHeadModel.from_pretrained(tmp_path / "out").tasks == report["tasks"]
    # Python: the same through build_recipe
    r2 = build_recipe([f"p={a}", f"q={b}"], heads=True, output=str(tmp_path / "py"))
    assert run_recipe(r2)["tasks"] == ["p", "q"]
    for bad, match in (({"path": str(a), "task": 3}, "'task' must be a string"),
                       ({"path": str(a), "task": "x", "name": "y"}, "not both"),
                       ({"path": str(a), "task": "x/y"}, "path separator")):
        path.write_text(yaml.safe_dump({"inputs": [bad, str(b)]}))
        with pytest.raises(SparseMergeError, match=match):
            load_recipe(path)


# -------------------------------------------------------------------- training and naming


@pytest.mark.parametrize("file,name", [
    ("news/train.tsv", "news"), ("news/data/train.tsv", "news"),
    ("reviews.csv", "reviews"), ("reviews.v2.csv", "reviews"),
    ("spam/train-00000-of-00001.jsonl", "spam"), ("topics/dev_2.csv", "topics"),
    ("sms spam/Train.CSV", "sms spam"),
    ("hf://owner/news-topics@main/data/train.csv", "news-topics"),
])
def test_default_name_skips_generic_file_names(tmp_path, file, name):
    path = file if file.startswith("hf://") else str(tmp_path / "x" / file)
    assert file_task_name(path)[0] == name


def test_generic_names():
    assert all(map(is_generic_name, ["train", "DEV", "test_1", "data", "validation",
                                     "train-00000-of-00004", "eval"]))
    assert not any(map(is_generic_name, ["news", "trainer", "sst2", "reviews", "datum"]))


def test_config_head_name():
    kw = dict(train_file="/x/news/train.csv", text_column="t", label_column="l")
    assert TrainConfig(**kw).head_name()[0] == "news"
    assert TrainConfig(**kw, task_name="to").head_name() == ("to", "--task-name")
    assert TrainConfig(task="sst2").head_name()[0] == "sst2"
    with pytest.raises(SparseMergeError, match="--task-name: task name 'a/b' contains a path"):
        TrainConfig(**kw, task_name="a/b")


@pytest.fixture(scope="module")
def news_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("naming") / "news"
    d.mkdir()
    return write_synthetic(d / "train.csv", 32, 0), write_synthetic(d / "dev.csv", 16, 1)


def _train_args(base: Path, files: tuple[Path, Path], out: Path) -> list[object]:
    return ["train", "--base", base, "--train-file", files[0], "--eval-file", files[1],
            "--text-column", "text", "--label-column", "label", "--max-steps", "1",
            "--batch-size", "16", "--max-length", "32", "--density", "0.05", "--device",
            "cpu", "-o", out]


def test_train_names_a_generic_file_after_its_folder(tiny_bert_dir, news_files, tmp_path):
    r = _run(*_train_args(tiny_bert_dir, news_files, tmp_path / "ad"), "--quiet")
    assert r.exit_code == 0, r.output
    assert "task name: news (from the folder news (train.csv is a generic file name); " \
        "choose another with --task-name)" in _text(r)
    assert load_adapter(tmp_path / "ad").tasks == ["news"]


def test_train_task_name_then_merge_and_predict(tiny_bert_dir, news_files, tmp_path):
    r = _run(*_train_args(tiny_bert_dir, news_files, tmp_path / "a"), "--task-name", "to",
             "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["task"] == "to"
    r = _run(*_train_args(tiny_bert_dir, news_files, tmp_path / "b"), "--task-name",
             "news.v2 (dots, spaces)", "--quiet")
    assert r.exit_code == 0, r.output
    assert "task name:" not in _text(r)  # chosen, not derived: nothing to announce
    assert load_adapter(tmp_path / "b").tasks == ["news.v2 (dots, spaces)"]
    r = _run("merge", "--heads", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "m")
    assert r.exit_code == 0, r.output
    r = _run("predict", tmp_path / "m", "a fine film", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tasks"] == ["to", "news.v2 (dots, spaces)"]
    r = _run("predict", tmp_path / "b", "a fine film", "--json")  # the adapter alone
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["head"] == "news.v2 (dots, spaces)"


def test_train_rejects_an_unsafe_task_name(tiny_bert_dir, news_files, tmp_path):
    r = _run(*_train_args(tiny_bert_dir, news_files, tmp_path / "ad"), "--task-name", "a/b")
    assert r.exit_code == 2
    assert "--task-name: task name 'a/b' contains a path separator" in _text(r)
    assert not (tmp_path / "ad").exists()


# --------------------------------------------------------- options named in the messages

_OPTION = re.compile(r"(?<![\w-])--[a-z](?:[a-z0-9-]*[a-z0-9])?")
# Options of other programs that messages quote, with the program that must appear beside them.
_FOREIGN = {"--nproc-per-node": "torchrun", "--cpu": "accelerate"}


def _cli_options() -> dict[str, set[str]]:
    """``{command path: its --options}`` for every command of the Typer app."""
    out: dict[str, set[str]] = {}

    def walk(cmd, path: str) -> None:
        out[path] = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)
                     if o.startswith("--")} | {"--help"}
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return out


def _package_strings():
    root = Path(__file__).resolve().parents[1] / "sparsemerge"
    for file in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield f"{file.relative_to(root.parent)}:{node.lineno}", node.value


def test_every_option_in_the_package_messages_exists():
    known = set().union(*_cli_options().values())
    seen, missing = set(), []
    for where, text in _package_strings():
        for word in _OPTION.findall(text):
            seen.add(word)
            if word in _FOREIGN:
                if _FOREIGN[word] not in text:
                    missing.append(f"{where}: {word} without {_FOREIGN[word]}")
            elif word not in known:
                missing.append(f"{where}: {word}")
    assert not missing, "messages name options no command has:\n" + "\n".join(missing)
    assert {"--task-name", "--heads", "--task", "--data-dir"} <= seen  # the scan does scan


def test_train_config_errors_name_real_options():
    """TrainConfig.validate builds option names from field names: each field is either a
    ``train`` flag or listed in API_ONLY (and then named TrainConfig.<field>)."""
    train = _cli_options()["train"]
    fields = [f for f in TrainConfig.__dataclass_fields__ if f != "method_params"]  # -p
    flags = {f: f"--{f.replace('_', '-')}" for f in fields}
    no_flag = {f for f in fields if flags[f] not in train}
    assert no_flag == API_ONLY, (
        f"fields without a train flag {sorted(no_flag - API_ONLY)}: add the flag or list them "
        f"in sparsemerge.train.config.API_ONLY; listed but with a flag: "
        f"{sorted(API_ONLY - no_flag)}")
    with pytest.raises(SparseMergeError, match=r"^TrainConfig\.grad_clip: must be > 0"):
        TrainConfig(task="sst2", grad_clip=0.0)
    with pytest.raises(SparseMergeError, match=r"^--max-steps: must be >= 1"):
        TrainConfig(task="sst2", max_steps=0)
