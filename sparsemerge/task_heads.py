"""A task's classification head, run on the output of a shared backbone forward.

A merged multi-head model runs its backbone once and hands the output to every task's head.

How the heads reproduce the single-task models exactly
------------------------------------------------------
Each head runs inside the *task model's own class*
(``AutoModelForSequenceClassification`` for the backbone's config, with the task's labels and
pad token), built on the ``meta`` device. Its backbone attribute (``base_model_prefix``:
``bert``, ``model``, ``roberta``, ...) is replaced by a stand-in that returns the output of the
one shared backbone forward, and only the head module (``classifier`` / ``score`` / ...) is
materialised with the task's weights. So the head sees exactly what it would see in the
single-task model and applies exactly the same code: for BERT the classifier on the pooled
output after dropout (a no-op in eval mode); for RoBERTa-style heads the head on the first
token's hidden state; for Llama-family decoders ``score`` on the hidden state of the last
token that is not the pad token (``config.pad_token_id``, stored per head). Logits equal the
single-task ``AutoModelForSequenceClassification`` with the same weights (tested on BERT and
Llama). Task models whose head spans several modules (e.g. DistilBERT's ``pre_classifier`` +
``classifier``) are refused with a clear error.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparsemerge.errors import SparseMergeError
from sparsemerge.models import quiet_transformers

__all__ = ["head_model", "task_config"]


class _SharedBackbone(nn.Module):
    """Stands in for a task model's backbone: returns the shared forward's output."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.output is None:
            raise RuntimeError("a head of MultiHeadModel was called outside its forward()")
        return self.output


def task_config(config, head_cfg: Mapping[str, Any]):
    """The single-task model's config: the backbone's plus the task's labels and pad id."""
    cfg = copy.deepcopy(config)
    labels = list(head_cfg["labels"])
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {n: i for i, n in enumerate(labels)}
    cfg.problem_type = head_cfg.get("problem_type", "single_label_classification")
    cfg.architectures = None
    pad = head_cfg.get("pad_token_id")
    if pad is not None:
        cfg.pad_token_id = pad
        if hasattr(cfg, "get_text_config"):
            cfg.get_text_config().pad_token_id = pad
    return cfg


def head_model(config, head_cfg: Mapping[str, Any], params: Mapping[str, torch.Tensor],
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """The task model of ``config`` with a shared-backbone stand-in and the given head."""
    from transformers import AutoModelForSequenceClassification

    cfg = task_config(config, head_cfg)
    try:
        with quiet_transformers(), torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(cfg)
    except (ValueError, KeyError) as exc:
        raise SparseMergeError(f"{type(config).__name__} has no sequence-classification model "
                               f"in transformers: {exc}") from None
    cls = type(model).__name__
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        raise SparseMergeError(f"{cls}: cannot find its backbone attribute ({prefix!r})")
    setattr(model, prefix, _SharedBackbone())
    module = head_cfg["module"]
    head = getattr(model, module, None)
    if not isinstance(head, nn.Module):
        raise SparseMergeError(f"{cls} has no head module {module!r}; the head was made for "
                               "another architecture")
    stray = [n for n, _ in model.named_parameters() if not n.startswith(module + ".")]
    stray += [n for n, _ in model.named_buffers() if not n.startswith(module + ".")]
    if stray:
        raise SparseMergeError(
            f"{cls} has parameters outside its head module {module!r} ({', '.join(stray[:3])}); "
            "multi-head models support architectures whose classification head is one module")
    own = dict(head.named_parameters())
    missing = sorted(set(own) - set(params))
    unknown = sorted(set(params) - set(own))
    if missing or unknown:
        raise SparseMergeError(f"head parameters {sorted(params)} do not fit {cls}.{module} "
                               f"(expects {sorted(own)})")
    for name, p in own.items():
        if tuple(params[name].shape) != tuple(p.shape):
            raise SparseMergeError(
                f"head parameter {name} has shape {tuple(params[name].shape)}, {cls}.{module} "
                f"with {len(head_cfg['labels'])} labels needs {tuple(p.shape)}; the head does "
                "not fit this backbone")
    if any(True for _ in head.buffers()):
        raise SparseMergeError(f"{cls}.{module} has buffers; not supported in a multi-head model")
    head.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(params[name].to(p.dtype))
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model
