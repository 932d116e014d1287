"""Prompt templates follow the adapter: ``train --template`` stores them with the head, and
evaluate, predict, ``merge --heads`` and the multi-head model wrap inputs in them (issue 17)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.data.readers import read_table
from sparsemerge.data.templates import PromptTemplate
from sparsemerge.errors import SparseMergeError
from sparsemerge.evaluate import head_template, load_adapted
from sparsemerge.formats.adapter_file import load_adapter
from sparsemerge.merge.engine import merge_adapters
from sparsemerge.multihead import MultiHeadModel
from sparsemerge.scoring import evaluate_data, predict
from sparsemerge.train.config import TrainConfig

runner = CliRunner()
CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}>\n"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
SENTIMENT = "Is this sentence positive? Respond yes or no. {sentence}"
TOPIC = "Topic of: {text} Answer:"


def _run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def chat_llama(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a chat template set on its tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("chat-llama") / "llama"
    shutil.copytree(tiny_llama_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained(chat_llama, tmp_path_factory) -> dict[str, Path]:
    """A chat-templated sentiment adapter and a plain-templated topic adapter, with data."""
    d = tmp_path_factory.mktemp("prompted")
    sentiment = d / "sentiment.tsv"
    sentiment.write_text("sentence\tlabel\n" + "".join(
        f"{w} film\t{lab}\n" for w, lab in [("fine", "yes"), ("awful", "no"), ("superb", "yes"),
                                             ("boring", "no")] * 2))
    topic = d / "topic.csv"
    topic.write_text("text,label\n" + "".join(
        f"{t},{lab}\n" for t, lab in [("goal scored", "sport"), ("stock fell", "money"),
                                      ("match won", "sport"), ("bank rate", "money")] * 2))
    out = {"sentiment_data": sentiment, "topic_data": topic}
    for name, data, column, template, chat in [
            ("sentiment", sentiment, "sentence", SENTIMENT, ["--chat-template"]),
            ("topic", topic, "text", TOPIC, [])]:
        r = _run("train", "--base", chat_llama, "--train-file", data, "--text-column", column,
                 "--label-column", "label", "--template", template, *chat, "--density", "0.1",
                 "--max-steps", "2", "--batch-size", "4", "--device", "cpu", "-o", d / name,
                 "--json")
        assert r.exit_code == 0, r.output
        out[name] = d / name
    return out


def test_chat_template_needs_a_template():
    with pytest.raises(SparseMergeError, match="--chat-template"):
        TrainConfig(task="sst2", chat_template=True)
    with pytest.raises(SparseMergeError, match="--template"):
        TrainConfig(task="sst2", template="{sentence")
    r = _run("train", "--task", "sst2", "--chat-template", "-o", "x")
    assert r.exit_code == 2 and "--template" in r.output


def test_template_is_stored_with_the_head(trained):
    sentiment, topic = load_adapter(trained["sentiment"]), load_adapter(trained["topic"])
    assert sentiment.heads["sentiment"].prompt == {"template": SENTIMENT, "chat": True}
    assert topic.heads["topic"].prompt == {"template": TOPIC, "chat": False}
    assert sentiment.hyperparameters["template"] == SENTIMENT
    assert head_template(sentiment, "sentiment") == PromptTemplate(SENTIMENT, chat=True)


def test_predict_and_evaluate_wrap_inputs_in_the_adapter_template(trained):
    model, tok, adapter, task = load_adapted(trained["topic"], device="cpu")
    template = head_template(adapter, task)
    texts = ["goal again", "rate cut"]
    got = predict(model, tok, texts, template=template)
    # the same as classifying the filled prompts themselves (a plain template: same tokens)
    assert got == predict(model, tok, [f"Topic of: {t} Answer:" for t in texts])
    r = _run("predict", trained["topic"], *texts, "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["predictions"]
    assert [(row["label"], row["probability"]) for row in rows] == got
    data = read_table(trained["topic_data"], text_column="text", label_column="label",
                      labels=adapter.heads[task].labels)
    want = evaluate_data(model, tok, data, template=template)
    assert want["loss"] != evaluate_data(model, tok, data)["loss"]  # the prompt matters
    r = _run("evaluate", trained["topic"], "--data", trained["topic_data"], "--text-column",
             "text", "--label-column", "label", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["loss"] == pytest.approx(want["loss"])


def test_templates_survive_merge_heads_and_predict(trained, tmp_path):
    out = tmp_path / "merged"
    r = _run("merge", trained["sentiment"], trained["topic"], "--heads", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "heads" / "sentiment" / "head_config.json").read_text())
    assert config["prompt"] == {"template": SENTIMENT, "chat": True}
    model = MultiHeadModel.from_pretrained(out)
    assert model.template("topic") == PromptTemplate(TOPIC)
    assert [g for _, g in model.prompt_groups()] == [["sentiment"], ["topic"]]
    texts = ["fine goal", "awful rate"]
    got = model.predict(texts)
    # each head answers as the merged adapter applied to the base does, in its own prompt
    merged = merge_adapters([load_adapter(trained["sentiment"]), load_adapter(trained["topic"])],
                            "sum")
    for task in ("sentiment", "topic"):
        ref, tok, _, _ = load_adapted(merged, task=task, device="cpu")
        want = predict(ref, tok, texts, template=head_template(merged, task))
        assert [lab for lab, _ in got[task]] == [lab for lab, _ in want]
        assert torch.allclose(torch.tensor([p for _, p in got[task]]),
                              torch.tensor([p for _, p in want]), atol=1e-4)
    r = _run("predict", out, *texts, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["backbone_passes"] == 2
    r = _run("predict", out, *texts, "--head", "topic", "--json")
    assert json.loads(r.stdout)["backbone_passes"] == 1
    # merged again (a merged model as an input), the prompts are still there
    again = tmp_path / "again"
    r = _run("merge", out, "--heads", "-o", again, "--json")
    assert r.exit_code == 0, r.output
    assert MultiHeadModel.from_pretrained(again).template("sentiment") == PromptTemplate(
        SENTIMENT, chat=True)
