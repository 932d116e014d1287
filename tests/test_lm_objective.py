"""``train --objective lm``: a causal-LM adapter trains on response tokens, round-trips, answers
through ``sparsemerge generate`` and merges into a standard causal-LM directory (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.errors import SparseMergeError
from sparsemerge.evaluate import generate
from sparsemerge.formats.adapter_file import load_adapter
from sparsemerge.merge.engine import merge_adapters
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.loop import train
from tests.test_prompted import CHAT

runner = CliRunner()
PAIRS = [("one", "1"), ("two", "2"), ("three", "3"), ("four", "4")]


@pytest.fixture(scope="module")
def causal_llama(minilm_dir, tmp_path_factory) -> Path:
    """A 2-layer Llama causal LM (untied LM head) with MiniLM's tokenizer and a chat
    template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("causal-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    tok.chat_template = CHAT
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lm-data") / "digits.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"digit of {w}", "response": d}) + "\n"
                            for w, d in PAIRS * 4))
    return path


@pytest.fixture(scope="module")
def adapters(causal_llama, lm_data, tmp_path_factory) -> dict[str, Path]:
    """A chat-rendered adapter (seed 0) and a plain one (seed 1), with their results."""
    root = tmp_path_factory.mktemp("lm-adapters")
    out = {}
    for name, chat, seed in (("chat", True, 0), ("plain", False, 1)):
        config = TrainConfig(base=str(causal_llama), objective="lm", train_file=str(lm_data),
                             eval_file=str(lm_data), chat_template=chat, density=0.2, lr=1e-2,
                             epochs=4, batch_size=4, seed=seed, device="cpu", quiet=True,
                             output=str(root / name), eval_generate=2 if chat else None)
        out[name] = train(config)
    return out


def test_lm_options_are_checked():
    with pytest.raises(SparseMergeError, match="--task"):
        TrainConfig(task="sst2", objective="lm")
    with pytest.raises(SparseMergeError, match="--label-tokens"):
        TrainConfig(train_file="x.jsonl", objective="lm", label_tokens=["No", "Yes"])
    with pytest.raises(SparseMergeError, match="--eval-generate"):
        TrainConfig(task="sst2", eval_generate=4)
    with pytest.raises(SparseMergeError, match="--method"):
        TrainConfig(train_file="x.jsonl", objective="lm", method="head")
    with pytest.raises(SparseMergeError, match="--objective"):
        TrainConfig(task="sst2", objective="seq2seq")
    TrainConfig(train_file="x.jsonl", objective="lm", chat_template=True)  # no --template


def test_lm_adapter_trains_on_responses_and_round_trips(adapters):
    result = adapters["chat"]
    evals = [h["eval"] for h in result.history]
    assert evals[-1]["loss"] < evals[0]["loss"]  # the response loss falls
    assert result.metrics["perplexity"] == pytest.approx(torch.tensor(
        result.metrics["loss"]).exp().item(), rel=1e-5)
    assert 0.0 <= result.metrics["exact_match"] <= 1.0
    assert result.head_params == 0
    loaded = load_adapter(result.output)
    assert loaded.heads == {}  # LM adapters carry no head
    assert loaded.hyperparameters["objective"] == "lm"
    assert loaded.hyperparameters["chat_template"] is True
    assert set(loaded.targets) == set(result.adapter.targets)
    for name, t in loaded.targets.items():
        assert torch.equal(t.sparse.indices, result.adapter.targets[name].sparse.indices)


@pytest.mark.parametrize("method,params", [("rigsa", {"rounds": 1, "round_steps": 1}),
                                           ("partial-lora", {}), ("lora", {}), ("full", {})])
def test_every_method_trains_the_lm_objective(method, params, causal_llama, lm_data):
    result = train(TrainConfig(base=str(causal_llama), objective="lm", train_file=str(lm_data),
                               method=method, method_params=params, density=0.1, max_steps=2,
                               batch_size=4, device="cpu", quiet=True))
    assert result.adapter.targets and result.adapter.heads == {}
    assert result.trainable > 0 and result.head_params == 0


def test_generate_answers_in_the_adapter_chat_format(adapters):
    path = adapters["chat"].output
    want = generate(path, ["digit of one", "digit of two"], max_new_tokens=3)
    r = runner.invoke(app, ["generate", str(path), "digit of one", "digit of two",
                            "--max-new-tokens", "3", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert [a["answer"] for a in json.loads(r.stdout)["answers"]] == want


def test_prompts_are_encoded_as_training_encodes_them(causal_llama):
    from sparsemerge.data.batching import encode_lm, encode_prompt
    from sparsemerge.data.examples import LMData, LMExample, Message
    from sparsemerge.models import load_tokenizer

    tok = load_tokenizer(str(causal_llama))
    conv = LMData([LMExample((Message("user", "digit of one"), Message("assistant", "1")))],
                  "mem")
    for chat in (True, False):
        enc, _ = encode_lm(conv, tok, 64, chat=chat)
        prompt = encode_prompt("digit of one", tok, chat=chat)
        assert enc["input_ids"][0][:len(prompt)] == prompt  # the prompt, up to the answer
        assert set(enc["labels"][0][:len(prompt)]) == {-100}
        assert enc["labels"][0][len(prompt)] != -100
    assert tok.decode(encode_prompt("x", tok, chat=True)).endswith("< assistant >")


def test_lm_adapters_merge_into_a_causal_lm_directory(adapters, causal_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged-lm"
    paths = [str(adapters[n].output) for n in ("chat", "plain")]
    r = runner.invoke(app, ["merge", *paths, "--heads", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kind"] == "causal-lm"
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # loads alone
    base = AutoModelForCausalLM.from_pretrained(causal_llama)
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)  # the untied LM head kept
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("digit of three", return_tensors="pt")["input_ids"]
    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    merged = merge_adapters([load_adapter(p) for p in paths], "sum")
    want = generate(merged, ["digit of three"], max_new_tokens=3)
    assert tok.decode(got[0, ids.shape[1]:], skip_special_tokens=True).strip() == want[0]


def test_forgetting_reports_zero_shot_prompted_tasks(adapters, causal_llama, tmp_path):
    from sparsemerge.data.examples import Message
    from sparsemerge.data.tasks import load_task
    from sparsemerge.data.templates import PromptTemplate, render_chat
    from sparsemerge.forgetting import ZERO_SHOT_PROMPTS, lm_forgetting, zero_shot_accuracy
    from sparsemerge.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(causal_llama))
    model = load_causal_lm(str(causal_llama)).eval()
    data = load_task("sst2", None, "dev").select(range(6))
    template, answers = ZERO_SHOT_PROMPTS["sst2"]
    ids = [tok(a, add_special_tokens=False)["input_ids"][0] for a in answers]
    want = 0
    for e in data:  # by hand: the answer tokens' scores at the chat prompt's last position
        text = render_chat([Message("user", template.format(sentence=e.text))], tok,
                           add_generation_prompt=True)
        enc = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            want += int(model(**enc).logits[0, -1, ids].argmax()) == e.label
    got = zero_shot_accuracy(model, tok, data, PromptTemplate(template, chat=True), answers)
    assert got == want / len(data)
    info = lm_forgetting(adapters["chat"].output, tasks=["sst2", "cola"], max_examples=8,
                         texts=["the cat sat on the mat", "rain falls on the trees"])
    assert set(info["zero_shot"]) == {"sst2", "cola"}
    for z in info["zero_shot"].values():
        assert z["examples"] == 8 and z["chat"] is True
        assert z["forgetting"] == pytest.approx(z["base"] - z["adapted"])
    assert info["adapted_loss"] != info["base_loss"]
    mrpc = tmp_path / "glue" / "MRPC"  # a pair task's prompt, through the CLI
    mrpc.mkdir(parents=True)
    (mrpc / "dev.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                  "1\t1\t2\tA cat sat.\tA cat was sitting.\n"
                                  "0\t3\t4\tIt rained.\tStocks fell.\n")
    r = runner.invoke(app, ["evaluate", str(adapters["chat"].output), "--forgetting", "--task",
                            "mrpc", "--data-dir", str(tmp_path), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    zero_shot = json.loads(r.stdout)["zero_shot"]
    assert list(zero_shot) == ["mrpc"] and zero_shot["mrpc"]["examples"] == 2


def test_exact_match_generates_equal_length_prompts_together(causal_llama):
    """Half the references are the model's own greedy answers (generated one prompt at a time
    here), half are not: exact match is 0.5 whatever the batch size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsemerge.data.batching import IGNORE_INDEX, Encoded
    from sparsemerge.scoring import evaluate_lm

    model = AutoModelForCausalLM.from_pretrained(causal_llama).eval()
    tok = AutoTokenizer.from_pretrained(causal_llama)
    encoded = Encoded(input_ids=[], attention_mask=[], labels=[])
    for i in range(8):
        prompt = [101] + [1000 + i + k for k in range(2 + i % 3)]  # lengths 3, 4, 5
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=2, do_sample=False,
                                pad_token_id=0)[0, len(prompt):].tolist()
        answer = greedy if i % 2 == 0 else [t + 1 for t in greedy]
        encoded["input_ids"].append(prompt + answer)
        encoded["attention_mask"].append([1] * len(prompt + answer))
        encoded["labels"].append([IGNORE_INDEX] * len(prompt) + answer)
    for batch_size in (1, 3, 64):
        got = evaluate_lm(model, encoded, batch_size, generate_tokens=2, tokenizer=tok)
        assert got["exact_match"] == 0.5
