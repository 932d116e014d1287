"""Scale-out: ``sparsemerge train`` under torchrun (2 real CPU processes, gloo) vs one process,
resume under DDP, the launcher environment, and the compute dtype / device options."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsemerge.errors import SparseMergeError
from sparsemerge.formats.adapter_file import load_adapter
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.distributed import launch_env, resolve_device
from sparsemerge.train.loop import train
from tests.test_train import write_synthetic

REPO = Path(__file__).resolve().parents[1]
# 91 rows, 4 per process and step: global batches of 8, the last one (3 rows) dealt 2 / 1.
ROWS, PER_RANK = 91, 4


@pytest.fixture(scope="module")
def plain_bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT without dropout (one process and two see different dropout masks) whose
    random features separate inputs (init std 0.3), so the loss moves in a few steps."""
    from transformers import BertConfig, BertModel

    from tests.conftest import _copy_tokenizer

    out = tmp_path_factory.mktemp("plain-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=128, initializer_range=0.3,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
              ).save_pretrained(out)
    _copy_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ddp-data")
    return write_synthetic(d / "train.csv", ROWS, 0), write_synthetic(d / "dev.csv", 24, 1)


def _options(base: Path, data: tuple[Path, Path]) -> dict:
    return dict(base=str(base), train_file=str(data[0]), eval_file=str(data[1]),
                text_column="text", label_column="label", density=0.1, lr=1e-2, head_lr=5e-2,
                epochs=2, max_length=32, warmup_ratio=0.0, save_dtype="fp32", device="cpu",
                quiet=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(opts: dict, nproc: int, *extra: str) -> dict:
    """``torchrun --nproc-per-node N -m sparsemerge.cli train ...`` on loopback (gloo);
    returns rank 0's JSON summary."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
            "-m", "sparsemerge.cli", "train", "--json"]
    for k, v in opts.items():
        if k not in ("quiet",):
            args += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args + list(extra), capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return json.loads("\n".join(lines[lines.index("{"):]))


@pytest.fixture(scope="module")
def ddp_run(plain_bert_dir, data, tmp_path_factory) -> tuple[dict, Path, dict]:
    """Two processes, 4 rows each per step, checkpoints every 5 steps."""
    out = tmp_path_factory.mktemp("ddp") / "two"
    opts = {**_options(plain_bert_dir, data), "batch_size": PER_RANK, "output": out,
            "checkpoint_steps": 5}
    return torchrun_train(opts, 2), out, opts


def _assert_adapters_close(a: Path, b: Path, atol: float) -> float:
    x, y = load_adapter(a), load_adapter(b)
    assert set(x.targets) == set(y.targets)
    worst = 0.0
    for name, t in x.targets.items():
        u = y.targets[name]
        assert torch.equal(t.sparse.indices, u.sparse.indices), name
        worst = max(worst, float((t.sparse.values - u.sparse.values).abs().max()))
    for p, v in x.heads[x.tasks[0]].params.items():
        worst = max(worst, float((v - y.heads[x.tasks[0]].params[p]).abs().max()))
    assert worst <= atol, worst
    return worst


def test_two_processes_match_one_with_the_same_global_batch(ddp_run, plain_bert_dir, data,
                                                            tmp_path):
    info, two, _ = ddp_run
    assert info["output"] == str(two) and info["steps"] == 2 * 12  # ceil(91 / 8) per epoch
    ad = load_adapter(two)
    assert ad.extra["training"]["world_size"] == 2
    assert ad.trainable > 0 and any(float(t.sparse.values.abs().max()) > 1e-3
                                    for t in ad.targets.values())  # it did train
    one = train(TrainConfig(**_options(plain_bert_dir, data), batch_size=2 * PER_RANK,
                            output=str(tmp_path / "one")))
    # Same examples per step, gradients averaged by DDP (the uneven last batch weighted by
    # rows): equal up to summation order, amplified a little by Adam's normalisation.
    _assert_adapters_close(two, tmp_path / "one", atol=2e-5)
    hist_two = ad.extra["history"]
    assert [h["step"] for h in hist_two] == [h["step"] for h in one.history]
    for h2, h1 in zip(hist_two, one.history, strict=True):  # losses summed over the ranks
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=1e-5)
        assert h2["train_accuracy"] == h1["train_accuracy"]
        assert h2["eval"]["loss"] == pytest.approx(h1["eval"]["loss"], abs=1e-5)


def test_resume_under_ddp_is_bit_exact(ddp_run, tmp_path):
    info, two, opts = ddp_run
    ckpt = Path(str(two) + ".ckpt")
    blob = torch.load(ckpt / "state.pt", weights_only=True)
    assert blob["position"] == {"step": 20, "epoch": 1, "batch": 8, "world_size": 2}
    assert len(blob["rng"]) == 2  # one RNG state per rank
    resumed = torchrun_train({**opts, "output": tmp_path / "resumed"}, 2,
                             "--checkpoint-dir", str(ckpt), "--resume")
    assert resumed["steps"] == info["steps"]
    _assert_adapters_close(two, tmp_path / "resumed", atol=0.0)
    assert load_adapter(tmp_path / "resumed").extra["history"] == \
        load_adapter(two).extra["history"]


def test_resume_needs_the_same_number_of_processes(ddp_run):
    _, two, opts = ddp_run
    cfg = TrainConfig(**{**opts, "output": str(two), "resume": True})
    with pytest.raises(SparseMergeError, match="2 process.*this one has 1.*nproc-per-node 2"):
        train(cfg)


def test_launch_env():
    assert launch_env({}) is None
    full = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}
    env = launch_env(full)
    assert env is not None and (env.rank, env.world_size, env.local_rank) == (1, 2, 1)
    assert launch_env({**full, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    with pytest.raises(SparseMergeError, match="MASTER_ADDR, MASTER_PORT not set.*torchrun"):
        launch_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(SparseMergeError, match="integers"):
        launch_env({**full, "RANK": "one"})
    with pytest.raises(SparseMergeError, match="not a valid rank"):
        launch_env({**full, "RANK": "2"})


# ------------------------------------------------------------------------- device, dtype


def test_device_and_dtype_options():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SparseMergeError, match="--dtype"):
        TrainConfig(task="sst2", dtype="int8")
    with pytest.raises(SparseMergeError, match="--device"):
        TrainConfig(task="sst2", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SparseMergeError, match="no CUDA device"):
            resolve_device("cuda")


def test_cli_device_dtype_options():
    from typer.testing import CliRunner

    from sparsemerge.cli import app

    res = CliRunner().invoke(app, ["train", "--task", "sst2", "--dtype", "int8", "-o", "x"])
    assert res.exit_code != 0 and "--dtype: must be one of fp32, bf16, fp16" in res.output
    res = CliRunner().invoke(app, ["train", "--task", "sst2", "--device", "tpu", "-o", "x"])
    assert res.exit_code != 0 and "--device: must be one of auto, cpu, cuda" in res.output


@pytest.fixture(scope="module")
def fp32_run(plain_bert_dir, data):
    opts = {**_options(plain_bert_dir, data), "batch_size": 8, "epochs": 3}
    return opts, train(TrainConfig(**opts))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cpu_autocast_learns_like_fp32(fp32_run, dtype):
    opts, ref = fp32_run
    half = train(TrainConfig(**opts, dtype=dtype))
    first, last = half.history[0]["train_loss"], half.history[-1]["train_loss"]
    assert last < first - 0.1  # it learns
    for h, r in zip(half.history, ref.history, strict=True):  # and tracks the fp32 run
        assert h["train_loss"] == pytest.approx(r["train_loss"], abs=0.05)
    assert half.metrics["loss"] == pytest.approx(ref.metrics["loss"], abs=0.05)
    assert half.metrics["loss"] != ref.metrics["loss"]  # autocast did run in half precision
    assert half.adapter.hyperparameters["dtype"] == dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_training_matches_cpu(plain_bert_dir, data, tmp_path, dtype):
    """The fast path on CUDA (dvalues from dense dW blocks gathered at the indices)."""
    opts = {**_options(plain_bert_dir, data), "batch_size": 8}
    cpu = train(TrainConfig(**opts, output=str(tmp_path / "cpu")))
    gpu = train(TrainConfig(**{**opts, "device": "cuda"}, dtype=dtype,
                            output=str(tmp_path / "gpu")))
    atol = 1e-3 if dtype == "fp32" else 0.05
    assert gpu.metrics["loss"] == pytest.approx(cpu.metrics["loss"], abs=atol)
    _assert_adapters_close(tmp_path / "cpu", tmp_path / "gpu",
                           atol=1e-3 if dtype == "fp32" else 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sddmm_matches_autograd():
    from torch import nn

    from sparsemerge.train.sparse_linear import attach_sparse_deltas

    g = torch.Generator().manual_seed(0)
    grads = {}
    for impl in ("fast", "autograd"):
        torch.manual_seed(1)  # before building: the biases come from the global RNG too
        lin = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40)).cuda()
        for m in lin:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight)
        idx = {n: torch.randperm(p.numel(), generator=g)[: p.numel() // 20].sort().values
               for n, p in lin.named_parameters() if n.endswith("weight")}
        deltas = attach_sparse_deltas(lin, idx, impl=impl)
        x = torch.randn(64, 48, generator=torch.Generator().manual_seed(2)).cuda()
        lin(x).square().sum().backward()
        grads[impl] = {n: t.values.grad.clone() for n, t in deltas.targets.items()}
        g = torch.Generator().manual_seed(0)
    for n, v in grads["fast"].items():
        torch.testing.assert_close(v, grads["autograd"][n], rtol=1e-4, atol=1e-4)
