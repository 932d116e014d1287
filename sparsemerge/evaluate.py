"""Scoring adapters and merged models: load a base with an adapter applied, score it.

``load_adapted`` builds a base model with an adapter applied, as the ``evaluate`` and
``predict`` commands do, and ``head_template`` gives the prompt its head was trained on; the
metrics themselves come from :mod:`sparsemerge.scoring`. ``generate`` answers prompts with an
``--objective lm`` adapter applied to its base as a causal LM.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sparsemerge.adapter import SparseAdapter
from sparsemerge.data.tasks import TASKS
from sparsemerge.data.templates import PromptTemplate, stored_template


def trained_task(adapter: SparseAdapter) -> tuple[str | None, str | None]:
    """(preset task, data directory) the adapter was trained on, read from its
    hyper-parameters; ``None`` for a task that is not a preset or an unrecorded folder."""
    hp = adapter.hyperparameters
    task = hp.get("task") if hp.get("task") in TASKS else None
    data_dir = hp.get("data_dir") if isinstance(hp.get("data_dir"), str) else None
    return task, data_dir


def head_template(adapter: SparseAdapter, task: str | None) -> PromptTemplate | None:
    """The prompt template of ``adapter``'s head ``task`` (None: no such head, or a head that
    reads the raw text): scoring wraps inputs in it as training did."""
    head = adapter.heads.get(task) if task is not None else None
    return None if head is None else stored_template(head.prompt)


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


@torch.no_grad()
def generate(adapter: SparseAdapter | str | Path, prompts: Sequence[str], *,
             base: str | None = None, gguf_file: str | None = None, max_new_tokens: int = 64,
             force: bool = False, device: str | torch.device | None = None,
             base_dtype: str | torch.dtype = "auto") -> list[str]:
    """Greedy answers of the base as a causal LM with ``adapter`` (an ``--objective lm``
    adapter) applied, one per prompt; each prompt is wrapped as the adapter was trained
    (chat-rendered when its ``chat_template`` hyper-parameter is set)."""
    from sparsemerge.apply import apply
    from sparsemerge.data.batching import encode_prompt
    from sparsemerge.formats.adapter_file import load_adapter
    from sparsemerge.models import adapter_base, load_causal_lm, load_tokenizer

    if not isinstance(adapter, SparseAdapter):
        adapter = load_adapter(adapter)
    base, gguf_file = adapter_base(adapter, base, gguf_file)
    tok = load_tokenizer(base, gguf_file)
    model = load_causal_lm(base, gguf_file=gguf_file, dtype=base_dtype, device=device).eval()
    apply(model, adapter, force=force)
    chat = adapter.hyperparameters.get("chat_template") is True
    answers = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(prompt, tok, chat=chat)], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers
