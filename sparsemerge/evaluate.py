"""Scoring adapters and merged models: load a base with an adapter applied, score it.

``load_adapted`` builds a base model with an adapter applied, as the ``evaluate`` and
``predict`` commands do; the metrics themselves come from :mod:`sparsemerge.scoring`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparsemerge.adapter import SparseAdapter
from sparsemerge.data.tasks import TASKS


def trained_task(adapter: SparseAdapter) -> tuple[str | None, str | None]:
    """(preset task, data directory) the adapter was trained on, read from its
    hyper-parameters; ``None`` for a task that is not a preset or an unrecorded folder."""
    hp = adapter.hyperparameters
    task = hp.get("task") if hp.get("task") in TASKS else None
    data_dir = hp.get("data_dir") if isinstance(hp.get("data_dir"), str) else None
    return task, data_dir


def load_adapted(adapter: SparseAdapter | str | Path, base: str | None = None, *,
                 gguf_file: str | None = None, task: str | None = None,
                 force: bool = False, device: str | torch.device | None = None,
                 base_dtype: str | torch.dtype = "auto"):
    """(task model with the adapter applied, on ``device`` if given; tokenizer, adapter,
    task name). The base is loaded in ``base_dtype`` (``auto``: the checkpoint's) straight
    onto ``device``."""
    from sparsemerge.apply import apply
    from sparsemerge.formats.adapter_file import load_adapter
    from sparsemerge.switcher import load_base

    if not isinstance(adapter, SparseAdapter):
        adapter = load_adapter(adapter)
    model, tok, task_name = load_base(adapter, base, gguf_file=gguf_file, task=task,
                                      device=device, base_dtype=base_dtype)
    apply(model, adapter, task=task_name, force=force)
    return model, tok, adapter, task_name
