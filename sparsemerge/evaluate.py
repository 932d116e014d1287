"""Scoring adapters and merged models: load a base with an adapter applied, score it.

``load_adapted`` builds a base model with an adapter applied, as the ``evaluate`` and
``predict`` commands do; the metrics themselves come from :mod:`sparsemerge.scoring`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparsemerge.adapter import SparseAdapter
from sparsemerge.data.tasks import TASKS
from sparsemerge.errors import SparseMergeError
from sparsemerge.models import adapter_base


def trained_task(adapter: SparseAdapter) -> tuple[str | None, str | None]:
    """(preset task, data directory) the adapter was trained on, read from its
    hyper-parameters; ``None`` for a task that is not a preset or an unrecorded folder."""
    hp = adapter.hyperparameters
    task = hp.get("task") if hp.get("task") in TASKS else None
    data_dir = hp.get("data_dir") if isinstance(hp.get("data_dir"), str) else None
    return task, data_dir


def load_adapted(adapter: SparseAdapter | str | Path, base: str | None = None, *,
                 gguf_file: str | None = None, task: str | None = None,
                 force: bool = False, device: str | torch.device | None = None):
    """(task model with the adapter applied, on ``device`` if given; tokenizer, adapter,
    task name)."""
    from sparsemerge.apply import apply, pick_head
    from sparsemerge.formats.adapter_file import load_adapter
    from sparsemerge.models import load_task_model, load_tokenizer, resolve_pad_token_id

    if not isinstance(adapter, SparseAdapter):
        adapter = load_adapter(adapter)
    chosen = pick_head(adapter, task)
    if chosen is None:
        raise SparseMergeError("the adapter has no classification head; it cannot classify "
                               "(merge it with --heads, or evaluate the adapters it came from)")
    task_name, head = chosen
    base, gguf_file = adapter_base(adapter, base, gguf_file)
    tok = load_tokenizer(base, gguf_file)
    model = load_task_model(base, head.labels, gguf_file=gguf_file,
                            problem_type=head.problem_type,
                            pad_token_id=resolve_pad_token_id(tok))
    apply(model, adapter, task=task_name, force=force)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok, adapter, task_name
