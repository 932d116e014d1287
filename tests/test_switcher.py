"""AdapterSwitcher: many adapters over one resident base, switched in O(nnz); and
``evaluate A B C`` / ``predict A B C TEXT`` on one loaded base."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.errors import BaseMismatchError, SparseMergeError
from sparsemerge.evaluate import load_adapted
from sparsemerge.formats.adapter_file import save_adapter
from sparsemerge.switcher import AdapterSwitcher
from tests.test_merge_engine import make_adapter

TEXTS = ["a gripping, beautiful film", "a total bore of a movie"]
LABELS = {"two": ("neg", "pos"), "three": ("neg", "mixed", "pos"), "other": ("no", "yes")}


@pytest.fixture(scope="module")
def adapters(tiny_bert_dir, tmp_path_factory):
    """Three saved adapters on the tiny BERT: different masks, heads with 2, 3, 2 labels."""
    root = tmp_path_factory.mktemp("switch")
    out = {}
    for seed, (name, labels) in enumerate(LABELS.items()):
        out[name] = root / name
        save_adapter(make_adapter(tiny_bert_dir, name, seed, labels=labels, density=0.1),
                     out[name])
    return out


def _logits(model, tok) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(TEXTS, padding=True, return_tensors="pt")).logits


def test_each_switch_gives_the_adapters_own_model(adapters):
    switcher = AdapterSwitcher.load({n: p for n, p in adapters.items()})
    base = {k: v.clone() for k, v in switcher.model.state_dict().items()}
    for name in ["three", "two", "other", "three", "two"]:
        switcher.activate(name)
        alone, tok, _, _ = load_adapted(adapters[name])
        assert torch.equal(_logits(switcher.model, tok), _logits(alone, tok)), name
        assert switcher.model.config.id2label == dict(enumerate(LABELS[name]))
    switcher.deactivate()
    after = switcher.model.state_dict()
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)  # bit-exact base and head


def test_adding_a_wrong_base_adapter_fails_and_keeps_the_active_one(adapters, tiny_llama_dir):
    switcher = AdapterSwitcher.load({"two": adapters["two"]})
    switcher.activate("two")
    before = _logits(switcher.model, switcher.tokenizer)
    with pytest.raises(BaseMismatchError):
        switcher.add("llama", make_adapter(tiny_llama_dir, "x", 0))
    with pytest.raises(SparseMergeError, match="no adapter named 'nope'"):
        switcher.activate("nope")
    switcher.add("other", make_adapter(switcher.model.config._name_or_path, "other", 2,
                                       labels=LABELS["other"], density=0.1))
    assert switcher.active == "two"  # the check ran on the pristine base, then re-applied
    assert torch.equal(_logits(switcher.model, switcher.tokenizer), before)


def _json(*args: object):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_cli_evaluate_several_adapters_matches_one_at_a_time(adapters, tmp_path):
    data = tmp_path / "dev.csv"
    data.write_text("text,label\na good film,pos\na bad film,neg\nan odd one,yes\n")
    opts = ["--data", data, "--text-column", "text", "--label-column", "label",
            "--skip-bad-rows", "--json"]
    together = _json("evaluate", adapters["two"], adapters["other"], *opts)
    assert [r["adapter"] for r in together] == [str(adapters["two"]), str(adapters["other"])]
    alone = _json("evaluate", adapters["two"], *opts)
    for key in ("head", "data", "metrics", "skipped_bad_rows"):
        assert together[0][key] == alone[key]
    assert together[1]["skipped_bad_rows"] == 2  # its labels are no / yes


def test_cli_predict_several_adapters(adapters):
    out = _json("predict", adapters["two"], adapters["three"], *TEXTS, "--json")
    assert [r["head"] for r in out] == ["two", "three"]
    alone = _json("predict", adapters["three"], *TEXTS, "--json")
    assert out[1]["predictions"] == alone["predictions"]
    assert {p["label"] for p in out[1]["predictions"]} <= set(LABELS["three"])


def test_cli_predict_needs_texts_after_the_adapters(adapters):
    r = CliRunner().invoke(app, ["predict", str(adapters["two"]), str(adapters["three"])])
    assert r.exit_code == 2 and "give the texts to classify" in r.output
