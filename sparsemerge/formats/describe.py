"""A summary of an adapter file: what ``sparsemerge inspect`` shows, as plain data.

Reads through :mod:`sparsemerge.formats.adapter_reader`: fully validated, without torch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from sparsemerge.formats.adapter_reader import WEIGHTS_NAME, read_stored

_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")


def layer_of(name: str) -> str:
    """The transformer block a tensor belongs to (``"other"`` for embeddings, pooler, ...)."""
    m = _LAYER.search(name)
    return m.group(1) if m else "other"


def _bits(nbytes: int, nnz: int) -> float:
    return 8.0 * nbytes / nnz if nnz else 0.0


def describe_adapter(path: str | Path) -> dict[str, Any]:
    """Method, base, counts, density, bits per entry (index / value), codecs, heads, metrics."""
    path = Path(path)
    adapter = read_stored(path)
    storage = adapter.storage
    file = path / WEIGHTS_NAME if path.is_dir() else path
    tensors = []
    for name, s in storage.items():
        tensors.append({"name": name, "layer": layer_of(name), "codec": s.codec, "nnz": s.nnz,
                        "numel": s.numel, "density": s.nnz / s.numel,
                        "value_dtype": s.value_dtype, "index_bytes": s.index_bytes,
                        "value_bytes": s.value_bytes,
                        "index_bits_per_entry": _bits(s.index_bytes, s.nnz),
                        "value_bits_per_entry": _bits(s.value_bytes, s.nnz)})
    layers: dict[str, dict[str, Any]] = {}
    for name, t in adapter.targets.items():
        row = layers.setdefault(layer_of(name), {"layer": layer_of(name), "targets": 0, "nnz": 0,
                                                 "numel": 0, "index_bytes": 0, "value_bytes": 0})
        row["targets"] += 1
        row["numel"] += math.prod(t.sparse.shape if t.sparse is not None else t.shape)
    for s in tensors:
        row = layers[s["layer"]]
        row["nnz"] += s["nnz"]
        row["index_bytes"] += s["index_bytes"]
        row["value_bytes"] += s["value_bytes"]
    for row in layers.values():
        row["density"] = row["nnz"] / row["numel"] if row["numel"] else 0.0
        row["index_bits_per_entry"] = _bits(row["index_bytes"], row["nnz"])
        row["value_bits_per_entry"] = _bits(row["value_bytes"], row["nnz"])
    nnz = sum(s["nnz"] for s in tensors)
    index_bytes = sum(s["index_bytes"] for s in tensors)
    value_bytes = sum(s["value_bytes"] for s in tensors)
    codecs: dict[str, int] = {}
    for s in tensors:
        codecs[s["codec"]] = codecs.get(s["codec"], 0) + 1
    numel = adapter.target_numel
    return {
        "path": str(path),
        "file_bytes": file.stat().st_size,
        "method": adapter.method,
        "base": {"model_id": adapter.base.model_id, "revision": adapter.base.revision,
                 "fingerprint": adapter.base.fingerprint},
        "targets": len(adapter.targets),
        "nnz": nnz,
        "target_numel": numel,
        "density": nnz / numel if numel else 0.0,
        "gated_targets": sum(1 for t in adapter.targets.values() if t.gate != 1.0),
        "index_bits_per_entry": _bits(index_bytes, nnz),
        "value_bits_per_entry": _bits(value_bytes, nnz),
        "codecs": codecs,
        "heads": {t: {"labels": h.labels, "problem_type": h.problem_type, "module": h.module}
                  for t, h in adapter.heads.items()},
        "metrics": adapter.metrics,
        "hyperparameters": adapter.hyperparameters,
        "layers": sorted(layers.values(), key=lambda r: (r["layer"] == "other",
                                                         int(r["layer"]) if r["layer"].isdigit()
                                                         else 0)),
        "tensors": tensors,
    }
