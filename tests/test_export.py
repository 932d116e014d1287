"""PEFT SHiRA export of sparse adapters, ``sparsemerge apply -o DIR`` and the missing-extra
errors. (LoRA / Partial-LoRA export: tests/test_partial_lora.py.)"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.errors import SparseMergeError
from sparsemerge.evaluate import load_adapted
from sparsemerge.export import export_peft
from sparsemerge.formats.adapter_file import save_adapter
from sparsemerge.train import loop
from sparsemerge.train.config import TrainConfig
from tests.test_merge_engine import make_adapter

TEXTS = ["a gripping, beautiful film", "a total bore of a movie, really"]


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("export-toy") / "toy.csv"
    rows = [f"the {w} film number {i},{int(w in ('good', 'great'))}"
            for i in range(24) for w in (("good", "bad", "great", "awful")[i % 4],)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def _logits(model, tok) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tok(TEXTS, padding=True, return_tensors="pt")).logits


def _peft_logits(base_dir, peft_dir, tok) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    return _logits(PeftModel.from_pretrained(base, peft_dir), tok)


@pytest.mark.minilm
def test_shira_export_matches_applied_minilm(minilm_dir, tmp_path):
    """SpaRTA-shaped random adapter at 0.5 % (the masks a SpaRTA run has), gate folded in."""
    adapter = make_adapter(minilm_dir, "sst2", 0, density=0.005, gate=0.7)
    out = export_peft(adapter, tmp_path / "shira")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SHIRA" and cfg["task_type"] == "SEQ_CLS"
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(".shira_indices" in k for k in keys)
    assert any(k.startswith("base_model.model.classifier") for k in keys)
    ours, tok, _, _ = load_adapted(adapter)
    torch.testing.assert_close(_peft_logits(minilm_dir, out, tok), _logits(ours, tok),
                               atol=1e-5, rtol=0)


RIGSA_ZERO = {"reset": "zero", "rounds": 1, "round_steps": 2, "prune_keep": 0.1}


@pytest.mark.parametrize("method,params", [("sparta", {}), ("rigsa", RIGSA_ZERO)])
def test_trained_sparse_adapters_export_to_shira(method, params, tiny_bert_dir, toy_csv,
                                                 tmp_path):
    config = TrainConfig(base=str(tiny_bert_dir), train_file=str(toy_csv), text_column="text",
                         label_column="label", method=method, method_params=params,
                         density=0.05, max_steps=4, batch_size=8, lr=1e-2, quiet=True,
                         device="cpu", output=str(tmp_path / method))
    adapter_dir = loop.train(config).output
    res = CliRunner().invoke(app, ["export", "--peft", str(adapter_dir), "-o",
                                   str(tmp_path / "peft"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["peft_type"] == "SHIRA"
    ours, tok, _, _ = load_adapted(adapter_dir)
    torch.testing.assert_close(_peft_logits(tiny_bert_dir, tmp_path / "peft", tok),
                               _logits(ours, tok), atol=1e-5, rtol=0)


def test_shira_refuses_a_target_too_dense_for_it(tiny_bert_dir, tmp_path):
    with pytest.raises(SparseMergeError, match="SHiRA"):
        export_peft(make_adapter(tiny_bert_dir, "sst2", 0, density=0.9), tmp_path / "out")


def test_cli_apply_writes_a_model_transformers_loads(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    adapter = make_adapter(tiny_bert_dir, "sst2", 1, labels=("neg", "pos"))
    save_adapter(adapter, tmp_path / "adapter")
    res = CliRunner().invoke(app, ["apply", str(tmp_path / "adapter"), "-o",
                                   str(tmp_path / "model"), "--json"])
    assert res.exit_code == 0, res.output
    assert "config.json" in json.loads(res.stdout)["files"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    ours, tok, _, _ = load_adapted(adapter)
    torch.testing.assert_close(_logits(model, tok), _logits(ours, tok), atol=0, rtol=0)


def test_export_without_peft_names_the_extra(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(SparseMergeError, match=r"pip install 'sparsemerge\[peft\]'"):
        export_peft(make_adapter(tiny_bert_dir, "sst2", 0), tmp_path / "out")


def test_lora_training_without_peft_names_the_extra(tiny_bert_dir, toy_csv, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    res = CliRunner().invoke(app, ["train", "--base", str(tiny_bert_dir), "--train-file",
                                   str(toy_csv), "--text-column", "text", "--label-column",
                                   "label", "--method", "lora", "--max-steps", "1",
                                   "--device", "cpu", "-o", "unused", "--json"])
    assert res.exit_code == 2
    assert "--method lora needs 'peft'" in res.output
    assert "pip install 'sparsemerge[peft]'" in res.output
