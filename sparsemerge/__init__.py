"""sparsemerge: sparse adapters for transformers — train, store, inspect, merge, share.

Names are imported lazily so that ``sparsemerge --help`` and light commands start without
paying for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from sparsemerge._version import __version__

_EXPORTS = {
    "BaseInfo": "sparsemerge.adapter",
    "Head": "sparsemerge.adapter",
    "LowRank": "sparsemerge.adapter",
    "SeededInit": "sparsemerge.adapter",
    "SparseAdapter": "sparsemerge.adapter",
    "SparseTensor": "sparsemerge.adapter",
    "TargetDelta": "sparsemerge.adapter",
    "BaseMismatchError": "sparsemerge.errors",
    "DataError": "sparsemerge.errors",
    "FormatError": "sparsemerge.errors",
    "HubError": "sparsemerge.errors",
    "SparseMergeError": "sparsemerge.errors",
    "apply": "sparsemerge.apply",
    "materialize": "sparsemerge.apply",
    "MultiHeadModel": "sparsemerge.multihead",
    "AdapterSwitcher": "sparsemerge.switcher",
    "merge_adapters": "sparsemerge.merge.engine",
    "push_adapter": "sparsemerge.hub",
    "SparseConfig": "sparsemerge.train.config",
    "SparseModel": "sparsemerge.train.sparse_model",
    "get_sparse_model": "sparsemerge.train.sparse_model",
    "SparseCallback": "sparsemerge.train.callbacks",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sparsemerge' has no attribute {name!r}")


def load_adapter(path: str, **hub_kwargs: Any):
    """Load and validate an adapter from a directory, its safetensors file, or
    ``hf://owner/name[@rev]`` (downloaded through the Hugging Face cache)."""
    from sparsemerge.formats.adapter_file import load_adapter as _load
    from sparsemerge.hub import resolve_path

    return _load(resolve_path(path, **hub_kwargs))


def save_adapter(adapter: Any, path: Any, **kwargs: Any):
    """Write ``adapter`` as a format-v1 directory, atomically. See ``formats.adapter_file``."""
    from sparsemerge.formats.adapter_file import save_adapter as _save

    return _save(adapter, path, **kwargs)


__all__ = [*_EXPORTS, "__version__", "load_adapter", "save_adapter"]
