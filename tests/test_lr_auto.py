"""``--lr auto``: SpaRTA's learning rate follows its density, an explicit ``--lr`` overrides it,
and the rate a run used is what its adapter records; ``--weight-decay auto`` likewise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.errors import SparseMergeError
from sparsemerge.formats.adapter_file import load_adapter
from sparsemerge.train.config import (
    DEFAULT_LR,
    SPARTA_AUTO_WEIGHT_DECAY,
    SPARTA_LR_MAX,
    TrainConfig,
    sparta_auto_lr,
)
from sparsemerge.train.loop import setup, train
from tests.test_train import write_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("synth")
    return write_synthetic(d / "train.csv", 32, 0), write_synthetic(d / "dev.csv", 16, 1)


def tiny(base: Path, synth, **kw) -> TrainConfig:
    return TrainConfig(**{"base": str(base), "train_file": str(synth[0]),
                          "eval_file": str(synth[1]), "text_column": "text",
                          "label_column": "label", "density": 0.1, "max_steps": 2,
                          "batch_size": 16, "max_length": 32, "quiet": True, "device": "cpu",
                          **kw})


def test_rule_scales_with_density_and_is_capped():
    assert sparta_auto_lr(0.0313927) == pytest.approx(5e-3, rel=1e-3)  # LoRA r=8's count
    assert sparta_auto_lr(0.05) == pytest.approx(3.14e-3)
    assert sparta_auto_lr(0.005) == SPARTA_LR_MAX == pytest.approx(2e-2)
    assert sparta_auto_lr(1e-4) == SPARTA_LR_MAX


def test_auto_resolution_per_method():
    sparta = TrainConfig(task="mrpc", density=0.01)
    assert sparta.lr == "auto"
    assert sparta.learning_rate == pytest.approx(1.57e-2)
    assert sparta.head_learning_rate == pytest.approx(5e-3)
    # -p density=... is the density the method uses, so the rule follows it
    assert TrainConfig(task="mrpc", method_params={"density": "0.05"}
                       ).learning_rate == pytest.approx(3.14e-3)
    lora = TrainConfig(task="mrpc", method="lora")
    assert lora.learning_rate == DEFAULT_LR
    assert lora.head_learning_rate == pytest.approx(5 * DEFAULT_LR)


def test_weight_decay_auto_per_method():
    assert TrainConfig(task="mrpc").decay_rate == SPARTA_AUTO_WEIGHT_DECAY
    for method in ("lora", "partial-lora", "rigsa", "full", "head"):
        assert TrainConfig(task="mrpc", method=method).decay_rate == 0.0
    assert TrainConfig(task="mrpc", weight_decay="0.1").decay_rate == 0.1  # as the CLI passes it
    for bad in ("strong", -1.0):
        with pytest.raises(SparseMergeError, match="--weight-decay"):
            TrainConfig(task="mrpc", weight_decay=bad)


def test_decay_pulls_noise_entries_back_and_keeps_the_signal():
    """The reason for the default: AdamW moves an entry whose gradient is pure noise by about
    ``lr`` per step in a random walk (0.44 after 750 steps at lr 2e-2); decoupled decay holds
    it near zero (0.07), while an entry with a consistent gradient still travels far (0.71)."""
    torch.manual_seed(0)
    final = {}
    for decay in (0.0, SPARTA_AUTO_WEIGHT_DECAY):
        w = torch.zeros(2, 4096, requires_grad=True)
        opt = torch.optim.AdamW([w], lr=2e-2, weight_decay=decay)
        for _ in range(750):
            opt.zero_grad()
            w.grad = torch.stack([torch.randn(4096), torch.full((4096,), -0.1)
                                  + 0.1 * torch.randn(4096)])
            opt.step()
        final[decay] = w.detach().abs().mean(dim=1)
    noise_free, noise_decayed = final[0.0][0], final[SPARTA_AUTO_WEIGHT_DECAY][0]
    assert noise_decayed < noise_free / 2
    assert final[SPARTA_AUTO_WEIGHT_DECAY][1] > 5 * noise_decayed  # the signal survives


def test_explicit_lr_overrides():
    cfg = TrainConfig(task="mrpc", density=0.01, lr="3e-3")  # as the CLI passes it
    assert cfg.lr == 3e-3 and cfg.learning_rate == 3e-3
    assert cfg.head_learning_rate == pytest.approx(1.5e-2)
    assert TrainConfig(task="mrpc", head_lr=1e-3).head_learning_rate == 1e-3
    for bad in ("fast", "0", -1.0):
        with pytest.raises(SparseMergeError, match="--lr"):
            TrainConfig(task="mrpc", lr=bad)


def test_auto_lr_reaches_optimizer_and_adapter(tiny_bert_dir, synth, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny(tiny_bert_dir, synth, output=str(tmp_path / "a"))
    run = setup(cfg)
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    assert lrs == {"deltas": pytest.approx(1.57e-3), "head": 5e-3, "head_bias": 5e-3}
    decays = {g["name"]: g["weight_decay"] for g in run.optimizer.param_groups}
    assert decays == {"deltas": SPARTA_AUTO_WEIGHT_DECAY, "head": SPARTA_AUTO_WEIGHT_DECAY,
                      "head_bias": 0.0}
    train(cfg)
    hp = load_adapter(tmp_path / "a").hyperparameters
    assert hp["lr"] == pytest.approx(1.57e-3) and hp["lr_rule"] == "auto"
    assert hp["head_lr"] == 5e-3 and hp["weight_decay"] == SPARTA_AUTO_WEIGHT_DECAY


def test_cli_explicit_lr_is_stored(tiny_bert_dir, synth, tmp_path):
    out = tmp_path / "b"
    r = CliRunner().invoke(app, [
        "train", "--base", str(tiny_bert_dir), "--train-file", str(synth[0]), "--eval-file",
        str(synth[1]), "--text-column", "text", "--label-column", "label", "--density", "0.1",
        "--lr", "3e-3", "--max-steps", "1", "--batch-size", "16", "--max-length", "32",
        "--device", "cpu", "-o", str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["output"] == str(out)
    hp = load_adapter(out).hyperparameters
    assert hp["lr"] == 3e-3 and hp["lr_rule"] == "explicit"
    assert hp["head_lr"] == pytest.approx(1.5e-2)
