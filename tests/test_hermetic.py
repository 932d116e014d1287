"""The autouse ``hermetic_hf_env`` fixture (conftest.py): whatever Hugging Face variables the
caller exported, a test sees the defaults, with HF_HOME in its own temporary folder.

Run it under a hostile environment to check that, e.g. ``HF_HUB_OFFLINE=1
HF_ENDPOINT=http://127.0.0.1:9 HF_TOKEN=bogus python -m pytest -q tests/test_hermetic.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from huggingface_hub import constants, get_token


def test_hub_client_sees_no_caller_settings(hermetic_hf_env: Path):
    assert os.environ["HF_HOME"] == str(hermetic_hf_env)
    assert not any(k.startswith(("HF_", "HUGGING")) for k in os.environ if k != "HF_HOME")
    assert constants.ENDPOINT == "https://huggingface.co"
    assert not constants.is_offline_mode() and not constants.HF_HUB_OFFLINE
    assert get_token() is None
    for path in (constants.HF_HOME, constants.HF_HUB_CACHE, constants.HF_TOKEN_PATH,
                 constants.HF_XET_CACHE, constants.HF_ASSETS_CACHE):
        assert Path(path).is_relative_to(hermetic_hf_env), path


def test_test_settings_win_and_reach_subprocesses(monkeypatch, hermetic_hf_env: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = ("from huggingface_hub import constants as c; "
            "print(c.HF_HUB_OFFLINE, c.ENDPOINT, c.HF_HUB_CACHE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "https://huggingface.co", str(hermetic_hf_env / "hub")]


def test_each_test_has_its_own_home(hermetic_hf_env: Path):
    assert not any(hermetic_hf_env.iterdir())
    (hermetic_hf_env / "token").write_text("hf_written_by_a_test")
    assert get_token() == "hf_written_by_a_test"  # read from HF_HOME, nowhere else
