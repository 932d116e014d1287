"""Causal-LM steps weigh micro-batches and ranks by their response tokens: an accumulated or
DDP step equals the plain step on the whole batch, whose loss is the mean over all of its
response tokens (issues 16/17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsemerge.adapter import SparseAdapter
from sparsemerge.formats.adapter_file import load_adapter
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.loop import train
from tests.conftest import _copy_tokenizer
from tests.test_distributed import torchrun_train

# Responses of 1 to 36 words: every micro-batch / rank share holds a different token count.
ROWS = [(f"say {i}", " ".join(["go"] * (1 + (i * 7) % 36))) for i in range(16)]


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory) -> Path:
    """A 2-layer Llama causal LM (no dropout) with MiniLM's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("accum-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, max_position_embeddings=128,
                                 pad_token_id=0)).save_pretrained(out)
    _copy_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("accum-data") / "uneven.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ROWS))
    return path


def _options(base: Path, data: Path) -> dict:
    return dict(base=str(base), objective="lm", train_file=str(data), density=0.1, lr=1e-2,
                epochs=2, warmup_ratio=0.0, max_length=64, save_dtype="fp32", device="cpu",
                quiet=True)


def _worst_diff(a: SparseAdapter, b: SparseAdapter) -> float:
    assert set(a.targets) == set(b.targets)
    worst = 0.0
    for name, t in a.targets.items():
        u = b.targets[name]
        assert torch.equal(t.sparse.indices, u.sparse.indices), name
        worst = max(worst, float((t.sparse.values - u.sparse.values).abs().max()))
    return worst


def test_accumulated_lm_step_equals_the_full_batch_step(causal_lm, uneven_data):
    opts = _options(causal_lm, uneven_data)
    full = train(TrainConfig(**opts, batch_size=8))
    accum = train(TrainConfig(**opts, batch_size=4, grad_accum=2))
    assert full.steps == accum.steps == 4
    assert max(float(t.sparse.values.abs().max()) for t in full.adapter.targets.values()) > 1e-3
    assert _worst_diff(full.adapter, accum.adapter) <= 1e-6
    # The reported loss is the token mean of the whole batch, accumulated or not.
    assert [h["train_loss"] for h in accum.history] == pytest.approx(
        [h["train_loss"] for h in full.history], abs=1e-6)


def test_two_lm_processes_match_one_with_the_same_global_batch(causal_lm, uneven_data,
                                                                tmp_path):
    """2 gloo processes x 2 micro-batches of 2 rows (about 12 s on CPU)."""
    opts = _options(causal_lm, uneven_data)
    two = torchrun_train({**opts, "batch_size": 2, "grad_accum": 2,
                          "output": tmp_path / "two"}, 2)
    assert two["steps"] == 4
    one = train(TrainConfig(**opts, batch_size=8))
    adapter = load_adapter(tmp_path / "two")
    assert _worst_diff(one.adapter, adapter) <= 1e-6
    # the history's loss is the token mean over both ranks, as the one-process run's
    assert [h["train_loss"] for h in adapter.extra["history"]] == pytest.approx(
        [h["train_loss"] for h in one.history], abs=1e-6)
