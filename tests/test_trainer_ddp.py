"""``get_sparse_model`` under a multi-process ``Trainer``: ``examples/trainer.py`` under torchrun
(2 real CPU processes, gloo, loopback) trains SpaRTA through the Trainer's DDP exactly as one
process does with the same global batch, rank 0 alone writes the adapter and the CLI reads it;
and ``SparseCallback`` refuses the multi-process runs it cannot follow."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from sparsemerge import SparseCallback, SparseConfig, get_sparse_model
from sparsemerge.cli import app
from sparsemerge.errors import SparseMergeError
from tests.test_distributed import (
    _assert_adapters_close,
    _free_port,
    plain_bert_dir,  # noqa: F401 (fixture)
)
from tests.test_train import one_thread, write_synthetic  # noqa: F401 (one_thread: autouse)

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "examples" / "trainer.py"
# 32 rows, 4 per process and step: 4 full global batches of 8 per epoch (an uneven last
# batch would be topped up from the start of the data under DDP, not in one process).
ROWS, PER_RANK, EPOCHS = 32, 4, 3


def sst2_dir(root: Path) -> Path:
    """GLUE's SST-2 layout (sentence, 0/1 label) holding ``write_synthetic``'s rows: the
    label is given by one sentiment word, which a tiny BERT learns in a few steps."""
    (root / "SST-2").mkdir(parents=True)
    for split, n, seed in (("train", ROWS, 0), ("dev", 16, 1)):
        lines = write_synthetic(root / f"{split}.csv", n, seed).read_text().splitlines()[1:]
        rows = (line.rsplit(",", 1) for line in lines)
        (root / "SST-2" / f"{split}.tsv").write_text(
            "sentence\tlabel\n" + "".join(f"{t}\t{int(y == 'pos')}\n" for t, y in rows))
    return root


def example_main(argv: list[object]) -> dict[str, Any]:
    """``examples/trainer.py``'s ``main`` in this process."""
    spec = importlib.util.spec_from_file_location("trainer_example", TRAINER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def test_two_processes_train_as_one_with_the_same_global_batch(plain_bert_dir,  # noqa: F811
                                                                tmp_path):
    data = sst2_dir(tmp_path / "glue")
    opts = ["--base", plain_bert_dir, "--data-dir", data, "--epochs", EPOCHS,
            "--logging-steps", 1, "--save-dtype", "fp32", "--cpu", "--json"]
    two, one = tmp_path / "out" / "two", tmp_path / "one"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(TRAINER),
         *map(str, opts), "--batch-size", str(PER_RANK), "--out", str(two)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{"')]
    assert len(summaries) == 1  # rank 0 alone saves and reports
    info = summaries[0]
    assert info["world_size"] == 2 and info["steps"] == EPOCHS * ROWS // (2 * PER_RANK)
    # one adapter, whole: no second writer's temporary directory beside it
    assert sorted(p.name for p in two.parent.iterdir()) == ["two", "two.trainer"]

    # accelerate deals each process every other per-device batch of the one seeded shuffle,
    # so step k of the two processes sees batch k of one process with twice the batch; DDP
    # averages the gradients of the trainable values (and the head) over the processes.
    # The two runs are equal up to summation order, and only if both replicas computed
    # their gradients on the same merged weights after every step.
    ref = example_main([*opts, "--batch-size", 2 * PER_RANK, "--out", one])
    assert ref["world_size"] == 1 and ref["steps"] == info["steps"]
    _assert_adapters_close(two, one, atol=1e-5)
    assert info["losses"] == pytest.approx(ref["losses"], abs=1e-5)  # averaged over ranks
    assert info["dev_loss"] == pytest.approx(ref["dev_loss"], abs=1e-5)
    per_epoch = len(info["losses"]) // EPOCHS
    first, last = info["losses"][:per_epoch], info["losses"][-per_epoch:]
    assert sum(last) < sum(first) - 0.05 * per_epoch  # it learns: every row, every epoch

    r = CliRunner().invoke(app, ["inspect", str(two), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["method"] == "sparta"
    r = CliRunner().invoke(app, ["evaluate", str(two), "--task", "sst2", "--data-dir",
                                 str(data), "--json"])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)["metrics"]  # the saved adapter is the trained model
    assert metrics["accuracy"] == info["dev_accuracy"]
    assert metrics["loss"] == pytest.approx(info["dev_loss"], abs=1e-5)


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_callback_refuses_multi_process_runs_it_cannot_follow(tiny_bert_dir, monkeypatch):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)

    def begin(method: str, world_size: int, **params: Any) -> None:
        model = get_sparse_model(
            AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2),
            SparseConfig(method=method, method_params=params))
        # what on_train_begin reads of TrainingArguments (a real one with world_size 2
        # would join a process group)
        args = SimpleNamespace(num_train_epochs=3, max_steps=-1, world_size=world_size)
        SparseCallback().on_train_begin(args, None, None, model=model,
                                        optimizer=torch.optim.AdamW(model.param_groups(1e-2)))

    begin("rigsa", 1, rounds=2)
    begin("sparta", 2)
    # RIGSA's pruning rounds replace the tensors the Trainer's DDP wrapper holds
    with pytest.raises(SparseMergeError, match=r"'rigsa' replaces its trainable tensors.*"
                                               r"multi-process Trainer.*under torchrun"):
        begin("rigsa", 2, rounds=2)

    # started by torchrun as 2 processes, but a Trainer on CPUs without use_cpu=True runs
    # each alone: every one would train on all the data and write the same adapter
    for name, value in zip(_LAUNCH_VARS, ("0", "2", "0", "127.0.0.1", "29500"), strict=True):
        monkeypatch.setenv(name, value)
    begin("sparta", 2)
    with pytest.raises(SparseMergeError, match=r"started as 2 processes.*each alone.*"
                                               r"use_cpu=True"):
        begin("sparta", 1)
