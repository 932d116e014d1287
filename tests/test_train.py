"""The training loop, SpaRTA, evaluation and the train/evaluate/predict CLI.

Tiny random-weight models (conftest) keep this fast; the ``minilm`` tests use the real
MiniLM-L6 and the shipped SST-2 subset for a few steps.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsemerge import masks
from sparsemerge.cli import app
from sparsemerge.errors import SparseMergeError
from sparsemerge.evaluate import load_adapted
from sparsemerge.formats.adapter_file import load_adapter, read_adapter
from sparsemerge.models import backbone_of
from sparsemerge.scoring import predict
from sparsemerge.train import loop
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.heads import HEAD_SIGMA
from sparsemerge.train.loop import lr_factor, setup, train
from sparsemerge.train.methods import METHODS, get_method

POS = ["good", "great", "fine", "superb", "lovely", "brilliant"]
NEG = ["bad", "awful", "poor", "dull", "terrible", "boring"]
FILLER = ["the", "movie", "plot", "was", "really", "quite", "actors", "story", "a", "film",
          "ending", "music", "and", "very", "overall", "it"]


def write_synthetic(path: Path, n: int, seed: int = 0) -> Path:
    """A CSV where the label is given by one sentiment word among filler words."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randrange(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label else NEG))
        lines.append(f"{' '.join(words)},{'pos' if label else 'neg'}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread (and do not fight other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield before
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("synth")
    return write_synthetic(d / "train.csv", 96, 0), write_synthetic(d / "dev.csv", 48, 1)


@pytest.fixture(scope="module")
def learnable_bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT whose random features separate inputs (init std 0.3, no dropout).

    With the default init std 0.02 a random 32-wide BERT maps every sentence to nearly the
    same pooled vector, so nothing can be learned in a few steps.
    """
    from transformers import BertConfig, BertModel

    from tests.conftest import _copy_tokenizer

    out = tmp_path_factory.mktemp("learnable-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=128, initializer_range=0.3,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
              ).save_pretrained(out)
    _copy_tokenizer(out)
    return out


def cfg(base: Path, synth, **kw) -> TrainConfig:
    opts = dict(base=str(base), train_file=str(synth[0]), eval_file=str(synth[1]),
                text_column="text", label_column="label", density=0.1, lr=1e-2, head_lr=5e-2,
                epochs=2, batch_size=16, max_length=32, quiet=True, warmup_ratio=0.0,
                device="cpu")  # the tests feed CPU tensors to run.model
    opts.update(kw)
    return TrainConfig(**opts)


# ------------------------------------------------------------------------------ learning


def test_tiny_bert_learns(learnable_bert_dir, synth):
    result = train(cfg(learnable_bert_dir, synth, epochs=6))
    hist = result.history
    assert len(hist) == 6
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.2
    assert hist[-1]["train_accuracy"] > hist[0]["train_accuracy"] + 0.2
    assert result.metrics["accuracy"] >= 0.6
    assert set(result.metrics) >= {"accuracy", "f1", "matthews", "loss", "examples"}


def test_tiny_llama_trains_and_saves(tiny_llama_dir, synth, tmp_path):
    result = train(cfg(tiny_llama_dir, synth, epochs=2, output=str(tmp_path / "ad")))
    ad = load_adapter(tmp_path / "ad")
    assert ad.tasks == [synth[0].parent.name]  # train.csv is generic: the folder's name
    assert ad.heads[ad.tasks[0]].module == "score"
    assert "bias" not in ad.heads[ad.tasks[0]].params
    assert any(n.startswith("layers.0.self_attn.q_proj") for n in ad.targets)
    assert ad.trainable == result.trainable > 0


def test_head_init_and_initial_loss(tiny_bert_dir, synth):
    run = setup(cfg(tiny_bert_dir, synth))
    w, b = run.model.classifier.weight, run.model.classifier.bias
    sigma = HEAD_SIGMA / math.sqrt(w.shape[1])
    assert abs(float(w.detach().std()) - sigma) < 0.35 * sigma
    assert torch.count_nonzero(b) == 0
    # Only the deltas and the head train; embeddings and every base weight are frozen.
    trainable = run.trainable()
    assert all(n.endswith("sparse_delta_values") or n.startswith("classifier.")
               for n in trainable)
    first = loop.evaluate(run)
    assert abs(first["loss"] - math.log(2)) < 0.02


def test_label_tokens_head_rows(tmp_path, synth):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _copy_tokenizer

    for tied in (False, True):
        d = tmp_path / f"llm-{tied}"
        torch.manual_seed(1)
        c = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                        max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=tied)
        lm = LlamaForCausalLM(c)
        lm.save_pretrained(d)
        _copy_tokenizer(d)
        run = setup(cfg(d, synth, label_tokens=["no", "yes"], labels=["neg", "pos"]))
        ids = run.tokenizer.convert_tokens_to_ids(["no", "yes"])
        want = lm.get_output_embeddings().weight.detach()[ids]
        head = run.model.score.weight
        assert torch.equal(head.detach(), want)
        emb = backbone_of(run.model).get_input_embeddings().weight
        assert head.data_ptr() != emb.data_ptr()  # a copy, never tied
    with pytest.raises(SparseMergeError, match="one token per label"):
        setup(cfg(d, synth, label_tokens=["no"]))


# ---------------------------------------------------------------- fast vs autograd oracle


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_llama_dir"])
def test_fast_and_autograd_agree(fixture, request, synth):
    base = request.getfixturevalue(fixture)
    runs = {impl: setup(cfg(base, synth, impl=impl, max_steps=4)) for impl in ("fast",
                                                                               "autograd")}
    batch = next(loop.batches(runs["fast"].train_data, 16, True, 0, 0))
    grads = {}
    for impl, run in runs.items():
        torch.manual_seed(5)
        run.model.train()
        run.model(**batch).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in run.trainable().items()}
        run.optimizer.zero_grad(set_to_none=True)
    assert grads["fast"].keys() == grads["autograd"].keys()
    for n in grads["fast"]:
        torch.testing.assert_close(grads["fast"][n], grads["autograd"][n], rtol=1e-4,
                                   atol=1e-6, msg=n)
    out = {impl: train(run.config, run=run).adapter for impl, run in runs.items()}
    for name, t in out["fast"].targets.items():
        other = out["autograd"].targets[name]
        assert torch.equal(t.sparse.indices, other.sparse.indices)
        # saved in bf16: fp32 values that agree to 1e-4 can round one bf16 step (2**-7) apart
        torch.testing.assert_close(t.sparse.values.float(), other.sparse.values.float(),
                                   rtol=2 ** -7, atol=1e-5)


def test_sparta_mask_is_seeded(tiny_bert_dir, synth, tmp_path):
    train(cfg(tiny_bert_dir, synth, max_steps=2, output=str(tmp_path / "a"), seed=3))
    ad, storage, _ = read_adapter(tmp_path / "a")
    for name, t in ad.targets.items():
        numel = math.prod(t.shape)
        nnz = masks.nnz_for_density(numel, 0.1)
        want = masks.seeded_indices(3, name, numel, nnz)
        assert t.sparse.indices.numpy().tolist() == want.tolist()
        assert storage[name].codec == "seed" and storage[name].index_bytes == 0
        assert storage[name].value_dtype == "bf16"
    assert ad.hyperparameters["method_params"] == {"density": 0.1, "mask_seed": None}


# ------------------------------------------------------------------------------ apply back


@pytest.mark.parametrize("save_dtype", ["fp32", "bf16"])
def test_saved_adapter_reproduces_trained_logits(tiny_bert_dir, synth, tmp_path, save_dtype):
    config = cfg(tiny_bert_dir, synth, max_steps=6, save_dtype=save_dtype,
                 output=str(tmp_path / "ad"))
    run = setup(config)
    result = train(config, run=run)
    texts = ["the movie was great", "a dull and boring film", "it was fine"]
    want = predict(run.model, run.tokenizer, texts)
    model, tok, adapter, task = load_adapted(tmp_path / "ad")
    got = predict(model, tok, texts)
    assert [g[0] for g in got] == [w[0] for w in want]
    enc = run.tokenizer(texts, padding=True, return_tensors="pt")
    run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, run.model(**enc).logits, rtol=0,
                                   atol=1e-6)
    # The reported metrics are those of the saved adapter.
    from sparsemerge.scoring import evaluate_model

    again = evaluate_model(model, run.dev_data, 64)
    assert again["accuracy"] == result.metrics["accuracy"]
    assert abs(again["loss"] - result.metrics["loss"]) < 1e-5
    assert adapter.metrics["accuracy"] == result.metrics["accuracy"]


# ----------------------------------------------------------------------------- resume


def test_resume_is_bit_exact(tiny_bert_dir, synth, tmp_path, monkeypatch):
    # 96 examples / batch 16 = 6 steps per epoch; checkpoints every 4 steps: at 4 (mid
    # epoch 1), the end of epoch 1 (6), 8 (mid epoch 2), the end of epoch 2 (12).
    common = dict(epochs=3, checkpoint_steps=4, save_dtype="fp32", patience=5)
    full = train(cfg(tiny_bert_dir, synth, output=str(tmp_path / "full"), **common))

    real_step = loop.train_step
    calls = {"n": 0}

    def crashing_step(run, batch):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return real_step(run, batch)

    monkeypatch.setattr(loop, "train_step", crashing_step)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tiny_bert_dir, synth, output=str(out), **common))
    assert not out.exists() and (tmp_path / "resumed.ckpt" / "state.pt").is_file()
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train(cfg(tiny_bert_dir, synth, output=str(out), resume=True, **common))

    a, b = load_adapter(tmp_path / "full"), load_adapter(out)
    for name, t in a.targets.items():
        assert torch.equal(t.sparse.values, b.targets[name].sparse.values), name
    for p, v in a.heads[a.tasks[0]].params.items():
        assert torch.equal(v, b.heads[a.tasks[0]].params[p])
    assert resumed.metrics == full.metrics
    assert resumed.history == full.history
    assert resumed.steps == full.steps == 18

    with pytest.raises(SparseMergeError, match="lr"):
        train(cfg(tiny_bert_dir, synth, output=str(out), resume=True, lr=0.5, **common))
    with pytest.raises(SparseMergeError, match="no checkpoint"):
        train(cfg(tiny_bert_dir, synth, output=str(tmp_path / "none"), resume=True, **common))


def test_max_steps_and_schedule(tiny_bert_dir, synth):
    result = train(cfg(tiny_bert_dir, synth, max_steps=8, eval_steps=3))
    assert result.steps == 8
    assert [h["step"] for h in result.history] == [3, 6]
    assert lr_factor(0, 10, 2) == pytest.approx(1 / 3)
    assert lr_factor(2, 10, 2) == 1.0
    assert lr_factor(9, 10, 2) == pytest.approx(1 / 8)


def test_early_stopping_keeps_best(tiny_bert_dir, synth):
    # A huge learning rate makes the dev loss rise: training stops after `patience` evals.
    result = train(cfg(tiny_bert_dir, synth, epochs=10, lr=3.0, head_lr=30.0, patience=2,
                       save_dtype="fp32"))
    assert result.stopped_early
    losses = [h["eval"]["loss"] for h in result.history]
    assert len(losses) < 10
    assert result.metrics["loss"] == pytest.approx(min(losses), rel=1e-2, abs=1e-3)


def test_method_registry_and_params(tiny_bert_dir, synth):
    assert "sparta" in METHODS
    sparta = get_method("sparta")
    assert "arXiv:2502.15975" in sparta.reference
    assert sparta.describe().startswith("sparta:")
    with pytest.raises(SparseMergeError, match="available: sparta"):
        get_method("nope")
    with pytest.raises(SparseMergeError, match="no parameter"):
        setup(cfg(tiny_bert_dir, synth, method_params={"rank": 4}))
    with pytest.raises(SparseMergeError, match="density"):
        cfg(tiny_bert_dir, synth, density=0.0)
    run = setup(cfg(tiny_bert_dir, synth, method_params={"mask_seed": "7"},
                    targets=r"attention\.self\.query"))
    assert run.method.mask_seed == 7
    assert all("query" in n for n in run.target_names) and len(run.target_names) == 2


# ------------------------------------------------------------------------------------ CLI


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_cli_train_evaluate_predict(tiny_bert_dir, synth, tmp_path):
    out = tmp_path / "cli-adapter"
    r = _invoke("train", "--base", str(tiny_bert_dir), "--train-file", str(synth[0]),
                "--eval-file", str(synth[1]), "--text-column", "text", "--label-column",
                "label", "--density", "0.1", "--lr", "1e-2", "--epochs", "3",
                "--batch-size", "16", "--max-length", "32", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["output"] == str(out) and info["labels"] == ["neg", "pos"]
    assert 0.0 <= info["metrics"]["accuracy"] <= 1.0

    r = _invoke("inspect", str(out), "--json")
    assert r.exit_code == 0, r.output
    ins = json.loads(r.stdout)
    assert ins["method"] == "sparta" and ins["codecs"] == {"seed": len(ins["tensors"])}

    r = _invoke("evaluate", str(out), "--data", str(synth[1]), "--text-column", "text",
                "--label-column", "label", "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["metrics"]["accuracy"] == pytest.approx(info["metrics"]["accuracy"])

    r = _invoke("predict", str(out), "a great film", "boring and dull", "--json")
    assert r.exit_code == 0, r.output
    preds = json.loads(r.stdout)["predictions"]
    assert [p["text"] for p in preds] == ["a great film", "boring and dull"]
    assert all(p["label"] in ("neg", "pos") and 0.5 <= p["probability"] <= 1 for p in preds)

    r = _invoke("predict", str(out), "a great film")  # human-readable table
    assert r.exit_code == 0 and "a great film" in r.stdout


def test_cli_data_errors_name_file_and_line(tiny_bert_dir, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nnice film,pos\nbad film,neg\n   ,pos\nok film,neg\n"
                   "fine,pos\n")
    args = ["train", "--base", str(tiny_bert_dir), "--train-file", str(bad), "--text-column",
            "text", "--label-column", "label", "--max-steps", "1", "-o", str(tmp_path / "o"),
            "--quiet"]
    r = _invoke(*args)
    assert r.exit_code == 2
    assert f"{bad}:4" in r.stderr and "empty" in r.stderr
    r = _invoke(*args, "--skip-bad-rows", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["data"]["train"]["skipped_bad_rows"] == 1

    r = _invoke("train", "--base", str(tiny_bert_dir), "--train-file", str(bad),
                "--text-column", "sentence", "--label-column", "label", "-o",
                str(tmp_path / "o"))
    assert r.exit_code == 2 and "no column 'sentence'" in r.stderr
    r = _invoke("train", "--task", "sst2", "--density", "2", "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "--density" in r.stderr


def test_cli_help_teaches():
    for cmd in ("train", "evaluate", "predict", "quickstart"):
        r = _invoke(cmd, "--help")
        assert r.exit_code == 0
        assert "Examples" in r.stdout and f"sparsemerge {cmd}" in r.stdout


@pytest.fixture(scope="module")
def random_adapter(tiny_bert_dir, tmp_path_factory) -> Path:
    """A saved random adapter (head ``synth``: neg, pos) on the tiny BERT; no training."""
    from sparsemerge.formats.adapter_file import save_adapter
    from tests.test_merge_engine import make_adapter

    out = tmp_path_factory.mktemp("random-adapter") / "adapter"
    save_adapter(make_adapter(tiny_bert_dir, "synth", 1, labels=("neg", "pos"), density=0.1),
                 out)
    return out


def json_by_device(*args: object, devices: tuple[str | None, ...]) -> list[dict]:
    """The command's JSON for each ``--device`` (None: no flag), wall time dropped."""
    outs = []
    for device in devices:
        r = _invoke(*map(str, args), *(["--device", device] if device else []), "--json")
        assert r.exit_code == 0, r.output
        info = json.loads(r.stdout)
        info.pop("wall_time_s", None)
        outs.append(info)
    return outs


def test_cli_device_cpu_and_auto_match_default(random_adapter, synth, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto = cpu here
    for args in (("evaluate", str(random_adapter), "--data", str(synth[1]), "--text-column",
                  "text", "--label-column", "label"),
                 ("predict", str(random_adapter), "a great film", "boring and dull")):
        default, cpu, auto = json_by_device(*args, devices=(None, "cpu", "auto"))
        assert cpu == default and auto == default


def test_cli_bad_device_is_a_clear_error(random_adapter, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in (["evaluate", str(random_adapter)], ["predict", str(random_adapter), "hi"]):
        r = _invoke(*cmd, "--device", "tpu")
        assert r.exit_code == 2 and "--device" in r.stderr and "'tpu'" in r.stderr
        r = _invoke(*cmd, "--device", "cuda")
        assert r.exit_code == 2 and "--device cuda: no CUDA device" in r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_evaluate_on_cuda_matches_cpu(random_adapter, synth):
    args = ("evaluate", str(random_adapter), "--data", str(synth[1]), "--text-column", "text",
            "--label-column", "label")
    cpu, cuda = (d["metrics"] for d in json_by_device(*args, devices=("cpu", "cuda")))
    assert cuda == pytest.approx(cpu, abs=1e-4)


# --------------------------------------------------------------------------- real MiniLM


@pytest.mark.minilm
def test_minilm_sst2_few_steps(minilm_dir, tmp_path, one_thread):
    """Real MiniLM on real SST-2 rows: 40 steps already beat chance clearly."""
    from sparsemerge.data.tasks import shipped_dir

    torch.set_num_threads(one_thread)  # a real model: use every core
    dev = tmp_path / "dev.tsv"
    dev.write_text("".join((shipped_dir() / "sst2_dev.tsv").read_text().splitlines(True)[:301]))
    config = TrainConfig(task="sst2", eval_file=str(dev), max_steps=40, eval_steps=20,
                         batch_size=32, max_length=64, density=0.05, lr=5e-3, quiet=True,
                         output=str(tmp_path / "sst2"))
    result = train(config)
    hist = result.history
    assert hist[-1]["train_accuracy"] > hist[0]["train_accuracy"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert result.metrics["accuracy"] >= 0.75
    ad = load_adapter(tmp_path / "sst2")
    assert ad.base.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert ad.metrics["examples"] == 300
