"""Scoring any classifier: metrics on labelled data, and predictions for raw texts.

``evaluate_model`` and ``predict`` call ``model(**batch).logits`` by default; pass ``logits=``
(a function of a batch) to score something else, e.g. one task of a multi-head model. Inputs
are moved to the device of the model's parameters (see :func:`on_model_device`), so a model
moved to CUDA just works. This sits below ``train`` (the loop scores its dev split each epoch)
and below ``evaluate``, which loads adapters and merged models and scores them with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsemerge.data.batching import IGNORE_INDEX, Encoded, batches, encode, keeps_end
from sparsemerge.data.examples import LabeledData
from sparsemerge.data.templates import PromptTemplate, texts_data
from sparsemerge.errors import SparseMergeError
from sparsemerge.metrics import compute_metrics

LogitsFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def metric_names(num_labels: int) -> tuple[str, ...]:
    """accuracy, F1 (binary for two classes, else macro) and Matthews correlation."""
    return ("accuracy", "f1", "matthews") if num_labels <= 2 else (
        "accuracy", "f1_macro", "matthews")


def on_model_device(model: nn.Module | None, batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with its tensors on the device of ``model``'s parameters (unchanged without
    a model or parameters)."""
    param = next(model.parameters(), None) if model is not None else None
    if param is None:
        return dict(batch)
    return {k: v.to(param.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _default_logits(model: nn.Module) -> LogitsFn:
    def fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
        return model(**inputs).logits

    return fn


def _by_length(encoded: dict) -> dict:
    """The same examples sorted by length, so batches need little padding (metrics do not
    depend on the order; this makes a dev pass ~1.5-2x faster)."""
    ids = encoded["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = type(encoded)({k: [v[i] for i in order] for k, v in encoded.items()})
    if hasattr(encoded, "pad_token_id"):
        out.pad_token_id = encoded.pad_token_id
    return out


@torch.no_grad()
def evaluate_model(model: nn.Module | None, encoded: dict, batch_size: int = 64, *,
                   num_labels: int | None = None, logits: LogitsFn | None = None
                   ) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and accuracy / F1 / Matthews on ``encoded`` (from
    ``data.encode``), plus ``examples``. The model is put in eval mode for the call; batches
    go to its device."""
    fn = logits or _default_logits(model)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    total, preds, labels = 0.0, [], []
    try:
        for batch in batches(_by_length(encoded), batch_size, shuffle=False, seed=0):
            batch = on_model_device(model, batch)
            out = fn(batch).float()
            y = batch["labels"].to(out.device)  # fn may return its logits on another device
            total += float(F.cross_entropy(out, y, reduction="sum"))
            preds.append(out.argmax(-1))
            labels.append(y)
    finally:
        if model is not None and was_training:
            model.train()
    p, y = torch.cat(preds), torch.cat(labels)
    k = num_labels or int(out.shape[-1])
    result = compute_metrics(p, y, metric_names(k))
    result["loss"] = total / len(y)
    result["examples"] = len(y)
    return result


def encode_for(model: nn.Module | None, tokenizer: Any, data: LabeledData, max_length: int,
               template: PromptTemplate | None = None) -> Encoded:
    """``data`` encoded as ``model`` reads it: wrapped in ``template`` (the head's prompt),
    over-long examples truncated (never dropped) at the end the model does not read
    (:func:`keeps_end`), to at most ``max_length`` and the tokenizer's own limit."""
    limit = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
    encoded, _ = encode(data, tokenizer, limit, drop_long=False, template=template,
                        keep_end=keeps_end(getattr(model, "config", None), template))
    return encoded


@torch.no_grad()
def evaluate_lm(model: nn.Module, encoded: dict, batch_size: int = 64, *,
                generate_tokens: int | None = None, tokenizer: Any = None) -> dict[str, float]:
    """Causal-LM metrics on ``encoded`` (from ``data.encode_lm``): ``loss`` (mean
    cross-entropy per response token), ``perplexity`` (``exp(loss)``), ``examples`` and, with
    ``generate_tokens``, ``exact_match``: the share of examples whose greedy answer of up to
    that many tokens, decoded without special tokens, equals the reference (the last
    response) with surrounding whitespace stripped -- for short-answer tasks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches(_by_length(encoded), batch_size, shuffle=False, seed=0):
            batch = on_model_device(model, batch)
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            target = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           target.reshape(-1), ignore_index=IGNORE_INDEX,
                                           reduction="sum"))
            count += int((target != IGNORE_INDEX).sum())
        if count == 0:
            raise SparseMergeError("the dev data holds no response token to score")
        result = {"loss": total / count, "perplexity": math.exp(total / count),
                  "examples": len(encoded["input_ids"])}
        if generate_tokens is not None:
            result["exact_match"] = _exact_match(model, encoded, generate_tokens, tokenizer,
                                                 batch_size)
    finally:
        model.train(was_training)
    return result


def _exact_match(model: nn.Module, encoded: dict, max_new_tokens: int, tokenizer: Any,
                 batch_size: int) -> float:
    """Share of examples whose greedy continuation of the prompt (everything before the last
    response) decodes to the last response. Prompts of equal length are generated together,
    ``batch_size`` at a time: a batch needs no padding, so each answer is the one its prompt
    gets alone (up to the batched kernels' rounding)."""
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, labels in enumerate(encoded["labels"]):
        start = len(labels)  # the last response: the final run of labelled tokens
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        by_length.setdefault(start, []).append(i)
    hits = 0
    for start, rows in by_length.items():
        for k in range(0, len(rows), batch_size):
            chunk = rows[k:k + batch_size]
            prompts = torch.tensor([encoded["input_ids"][i][:start] for i in chunk],
                                   device=device)
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=getattr(encoded, "pad_token_id", 0))
            for i, row in zip(chunk, out, strict=True):
                answer = tokenizer.decode(row[start:], skip_special_tokens=True).strip()
                ref = encoded["input_ids"][i][start:]
                hits += answer == tokenizer.decode(ref, skip_special_tokens=True).strip()
    return hits / len(encoded["input_ids"])


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Any, texts: Sequence[str],
            pairs: Sequence[str] | None = None, *, batch_size: int = 32,
            max_length: int = 512, labels: Sequence[str] | None = None,
            logits: LogitsFn | None = None,
            template: PromptTemplate | None = None) -> list[tuple[str, float]]:
    """(label, probability) of the most likely class for each text (or text pair).

    Texts are encoded as for training (:func:`encode_for`; with the head's ``template``
    they fill its fields, see :func:`~sparsemerge.data.templates.texts_data`). Label names
    come from ``labels`` or the model's ``config.id2label``.
    """
    if not texts:
        return []
    fn = logits or _default_logits(model)
    if labels is None:
        id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
        labels = [id2label.get(i, str(i)) for i in range(len(id2label))]
    encoded = encode_for(model, tokenizer, texts_data(texts, pairs, template), max_length,
                         template)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    out: list[tuple[str, float]] = []
    try:
        for batch in batches(encoded, batch_size, shuffle=False, seed=0):
            probs = fn(on_model_device(model, batch)).float().softmax(-1)
            p, i = probs.max(-1)
            for pi, ii in zip(p.tolist(), i.tolist(), strict=True):
                out.append((labels[ii] if ii < len(labels) else str(ii), pi))
    finally:
        if model is not None and was_training:
            model.train()
    return out


def evaluate_data(model: nn.Module, tokenizer: Any, data: LabeledData, *,
                  batch_size: int = 64, max_length: int = 512,
                  template: PromptTemplate | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``data``, encoded by :func:`encode_for` (pass the head's
    ``template``: ``Head.prompt`` through ``stored_template``)."""
    encoded = encode_for(model, tokenizer, data, max_length, template)
    return evaluate_model(model, encoded, batch_size, num_labels=len(data.labels))
