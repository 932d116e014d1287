"""Hugging Face datasets as inputs (a save_to_disk folder, parquet, arrow), the missing-extra
error, and ``--no-header`` on train and evaluate."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.data.readers import read_lm, read_table
from sparsemerge.errors import DataError, SparseMergeError
from sparsemerge.formats.adapter_file import save_adapter
from tests.test_merge_engine import make_adapter

datasets = pytest.importorskip("datasets")

WORDS = ["good", "great", "fine", "bad", "awful", "poor"]


def _rows(n: int = 24) -> dict[str, list]:
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    return {"sentence": [f"the {w} film number {i}" for i, w in enumerate(words)],
            "label": [int(w in WORDS[:3]) for w in words], "idx": list(range(n))}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same rows (label a ClassLabel: negative, positive) as a save_to_disk folder, a
    parquet file, an arrow file and a DatasetDict folder."""
    d = tmp_path_factory.mktemp("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    ds = datasets.Dataset.from_dict(_rows(), features=features)
    ds.save_to_disk(str(d / "folder"))
    ds.to_parquet(str(d / "data.parquet"))
    shutil.copy(next((d / "folder").glob("*.arrow")), d / "data.arrow")
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(d / "dict"))
    return {"folder": d / "folder", "parquet": d / "data.parquet", "arrow": d / "data.arrow",
            "dict": d / "dict"}


@pytest.mark.parametrize("kind", ["folder", "parquet", "arrow"])
def test_datasets_read_like_tables(files, kind):
    data = read_table(files[kind], text_column="sentence", label_column="label")
    rows = _rows()
    assert data.labels == ["negative", "positive"]  # the ClassLabel's names, in id order
    assert [e.text for e in data] == rows["sentence"]
    assert [e.label for e in data] == rows["label"]
    assert data.examples[0].fields["idx"] == "0"
    by_index = read_table(files[kind], text_column=0, label_column=1)
    assert [e.text for e in by_index] == rows["sentence"]


def test_bad_dataset_rows_name_the_row_index(tmp_path):
    rows = _rows(4)
    rows["sentence"][2] = "  "
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet: row 2: column 'sentence': empty"):
        read_table(tmp_path / "bad.parquet", text_column="sentence", label_column="label")
    data = read_table(tmp_path / "bad.parquet", text_column="sentence", label_column="label",
                      skip_bad_rows=True)
    assert len(data) == 3 and data.skipped == 1 and data.labels == ["0", "1"]
    with pytest.raises(DataError, match=r"no column 'text'.*0:'sentence'"):
        read_table(tmp_path / "bad.parquet", text_column="text", label_column="label")


def test_a_dataset_dict_asks_for_a_split(files):
    with pytest.raises(DataError, match=r"splits train, validation.*dict/train"):
        read_table(files["dict"], text_column="sentence", label_column="label")
    assert len(read_table(files["dict"] / "validation", text_column="sentence",
                          label_column="label")) == 24


def test_lm_rows_from_a_dataset(tmp_path):
    chats = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
    datasets.Dataset.from_dict({"messages": chats}).to_parquet(str(tmp_path / "chat.parquet"))
    data = read_lm(tmp_path / "chat.parquet", messages_column="messages")
    assert [m.content for m in data.examples[0].messages] == ["2+2?", "4"]


def test_missing_extra_names_it(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SparseMergeError, match=r"pip install 'sparsemerge\[datasets\]'"):
        read_table(files["parquet"], text_column="sentence", label_column="label")


def _invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_train_and_evaluate_on_datasets(files, tiny_bert_dir, tmp_path):
    out = tmp_path / "adapter"
    r = _invoke("train", "--base", tiny_bert_dir, "--dataset", files["folder"], "--eval-file",
                files["parquet"], "--text-column", "sentence", "--label-column", "label",
                "--max-steps", "2", "--batch-size", "8", "--device", "cpu", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["labels"] == ["negative", "positive"] and info["metrics"]
    r = _invoke("evaluate", out, "--dataset", files["arrow"], "--text-column", "sentence",
                "--label-column", "label", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["data"] == str(files["arrow"])


def test_cli_no_header_on_train_and_evaluate(tiny_bert_dir, tmp_path):
    rows = _rows()
    tsv = tmp_path / "train.tsv"
    tsv.write_text("".join(f"{lab}\t{text}\n" for text, lab in zip(rows["sentence"],
                                                                   rows["label"], strict=True)))
    out = tmp_path / "adapter"
    r = _invoke("train", "--base", tiny_bert_dir, "--train-file", tsv, "--no-header",
                "--text-column", "1", "--label-column", "0", "--max-steps", "2",
                "--batch-size", "8", "--device", "cpu", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["labels"] == ["0", "1"]
    r = _invoke("evaluate", out, "--data", tsv, "--no-header", "--text-column", "1",
                "--label-column", "0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]
    r = _invoke("evaluate", out, "--data", tsv, "--text-column", "1", "--label-column", "0")
    assert r.exit_code == 2  # with a header row the first line names the columns


def test_cli_evaluate_merged_model_no_header(tiny_bert_dir, tmp_path):
    """--no-header reaches a merged model's HEAD=FILE data too."""
    a, b = tmp_path / "a", tmp_path / "b"
    save_adapter(make_adapter(tiny_bert_dir, "left", 0, labels=("0", "1")), a)
    save_adapter(make_adapter(tiny_bert_dir, "right", 1, labels=("0", "1")), b)
    merged = tmp_path / "merged"
    assert _invoke("merge", a, b, "-m", "ties", "--heads", "-o", merged).exit_code == 0
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("1\ta good film\n0\ta bad film\n")
    r = _invoke("evaluate", merged, "--task", f"left={tsv}", "--no-header", "--text-column",
                "1", "--label-column", "0", "--json")
    assert r.exit_code == 0, r.output
