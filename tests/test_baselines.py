"""Baselines (lora, full, head) and Partial-LoRA through the one training loop.

A tiny BERT with larger random weights (init range 0.2, no dropout) learns a toy sentiment
task in a few dozen steps, so "loss falls" is checked in seconds.
"""

from __future__ import annotations

import inspect
import random
import re

import pytest
import torch
from torch import nn

import sparsemerge.train.loop as loop
from sparsemerge import masks
from sparsemerge.evaluate import load_adapted
from sparsemerge.formats.adapter_file import read_adapter
from sparsemerge.models import backbone_of
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.methods import baselines, get_method, partial_lora

POS = ["good", "great", "fine", "lovely", "nice", "superb"]
NEG = ["bad", "awful", "poor", "terrible", "ugly", "dull"]
METHODS = ["partial-lora", "lora", "full", "head"]
LR = {"partial-lora": 1e-2, "lora": 1e-2, "full": 2e-3, "head": 4e-3}


@pytest.fixture(scope="module")
def learnable_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    from tests.conftest import _copy_tokenizer

    out = tmp_path_factory.mktemp("learnable-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                     initializer_range=0.2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(out)
    _copy_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("toy") / "toy.csv"
    lines = ["text,label"]
    for i in range(64):
        word = rng.choice(POS if i % 2 else NEG)
        lines.append(f"{word} movie {word},{i % 2}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(base, csv, method, **kw) -> TrainConfig:
    args = dict(base=str(base), train_file=str(csv), eval_file=str(csv), text_column="text",
                label_column="label", batch_size=16, quiet=True, method=method,
                lr=LR.get(method, 1e-2), warmup_ratio=0.0, device="cpu")
    args.update(kw)
    return TrainConfig(**args)


def _logits(model: nn.Module, tok) -> torch.Tensor:
    enc = tok(["good movie good", "awful movie awful", "a fine day"], padding=True,
              return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**enc).logits


def test_methods_are_registered_and_declare_their_params():
    for name in METHODS:
        cls = get_method(name)
        assert cls.name == name and cls.reference and cls.summary
        assert name in cls.describe()
    assert {p.name for p in get_method("partial-lora").params} >= {
        "rank", "alpha", "budget", "energy", "min_density", "calib_batches", "mask_seed"}


def test_method_modules_have_no_training_code():
    """Every method is driven by the loop: no optimizer, backward or step of its own."""
    for module in (baselines, partial_lora):
        src = inspect.getsource(module)
        assert not re.search(r"\.backward\(|torch\.optim|zero_grad|clip_grad", src), module


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_through_the_loop(method, learnable_bert_dir, toy_csv,
                                              monkeypatch):
    calls = []
    real_step = loop.train_step

    def counting_step(run, batch):
        calls.append(type(run.method).name)
        return real_step(run, batch)

    monkeypatch.setattr(loop, "train_step", counting_step)
    result = loop.train(_config(learnable_bert_dir, toy_csv, method, epochs=6))
    assert calls == [method] * result.steps == [method] * 24  # 64 examples / 16 x 6 epochs
    losses = [h["eval"]["loss"] for h in result.history]
    # the head starts near zero logits (loss ln 2 = 0.693); the loss must fall below that
    assert losses[-1] < min(losses[0], 0.693) - 0.03, losses
    assert result.metrics["accuracy"] >= 0.6


def _trained(base, csv, method, tmp_path, **kw):
    config = _config(base, csv, method, max_steps=4, output=str(tmp_path / method), **kw)
    run = loop.setup(config)
    result = loop.train(config, run=run)
    return run, result


def test_lora_is_peft_stored_dense_and_applies_exactly(learnable_bert_dir, toy_csv, tmp_path):
    from peft.tuners.lora import Linear as PeftLoraLinear

    run, result = _trained(learnable_bert_dir, toy_csv, "lora", tmp_path)
    layers = run.method.layers
    assert layers and all(isinstance(m, PeftLoraLinear) for m in layers.values())
    n_targets = len(run.target_names)
    assert result.trainable == sum(8 * sum(m.get_base_layer().weight.shape)
                                   for m in layers.values())
    adapter, storage, _ = read_adapter(result.output)
    assert len(adapter.targets) == n_targets and adapter.method == "lora"
    for name, t in adapter.targets.items():
        assert t.lowrank is not None and t.lowrank.scale == pytest.approx(16 / 8)
        assert storage[f"{name}.a"].codec == "dense" and storage[f"{name}.a"].index_bytes == 0
    assert any(t.lowrank.b.values.abs().sum() > 0 for t in adapter.targets.values())
    model, tok, _, _ = load_adapted(result.output)
    torch.testing.assert_close(_logits(model, tok), _logits(run.model, run.tokenizer),
                               atol=1e-5, rtol=1e-4)
    # remove() puts the plain nn.Linear modules back: the base model again
    run.method.remove()
    assert not any(isinstance(m, PeftLoraLinear) for m in run.model.modules())


@pytest.mark.parametrize("store", ["dense", "sparse"])
def test_full_stores_dense_or_magnitude_sparse_delta(store, learnable_bert_dir, toy_csv,
                                                     tmp_path):
    run, result = _trained(learnable_bert_dir, toy_csv, "full", tmp_path,
                           method_params={"store": store}, density=0.05)
    backbone = backbone_of(run.model)
    embeddings = {n for n, _ in backbone.named_parameters() if "embeddings" in n
                  and "LayerNorm" not in n}
    adapter, storage, _ = read_adapter(result.output)
    expected = {n for n, _ in backbone.named_parameters()} - embeddings
    assert set(adapter.targets) == expected  # every backbone parameter but the tables
    assert result.trainable == sum(p.numel() for n, p in backbone.named_parameters()
                                   if n in expected)
    for name, t in adapter.targets.items():
        numel = t.sparse.numel
        want = numel if store == "dense" else masks.nnz_for_density(numel, 0.05)
        assert t.sparse.nnz == want
        if store == "dense":
            assert storage[name].codec == "dense"
    # the final metrics are those of the stored (sparsified, rounded) delta
    model, tok, _, _ = load_adapted(result.output)
    torch.testing.assert_close(_logits(model, tok), _logits(run.model, run.tokenizer),
                               atol=1e-5, rtol=1e-4)


def test_head_only_trains_no_backbone_entry(learnable_bert_dir, toy_csv, tmp_path):
    run, result = _trained(learnable_bert_dir, toy_csv, "head", tmp_path)
    assert result.trainable == 0 and run.target_names == []
    assert result.head_params == 32 * 2 + 2
    adapter, _, _ = read_adapter(result.output)
    assert adapter.targets == {} and adapter.method == "head"
    model, tok, _, _ = load_adapted(result.output)
    torch.testing.assert_close(_logits(model, tok), _logits(run.model, run.tokenizer))
