"""Forgetting: what the base model could do before adaptation, and still can after.

Two measurements, chosen by the base model:

- **Decoder** (a causal language model such as SmolLM2): the next-token loss (mean
  cross-entropy in nats per predicted token, and its perplexity ``exp(loss)``) on a held-out
  plain-text sample (:func:`sparsemerge.data.plain_text_sample`, shipped with the package:
  ~300 English news sentences), for the base and for the base with the adapter's deltas
  applied (the language-model head is the base's own; only the adapter's target tensors
  change). Forgetting = ``adapted_loss - base_loss`` (> 0: the adapter made the model worse
  at plain text). Beside it, what an instruction model could answer: its zero-shot accuracy
  on other prompted tasks (:data:`ZERO_SHOT_PROMPTS`: SST-2, CoLA, MRPC asked in the chat
  format, answered through the label tokens' scores at the answer position), before and
  after.
- **Encoder** (no language-model head, e.g. MiniLM): the dev metrics of *another* task's
  adapter (``alongside``, e.g. an SST-2 SpaRTA adapter) alone and merged with this adapter
  (deltas summed, ``merge_adapters(..., "sum")``, the other task's head on the merged
  backbone). Forgetting = ``accuracy_alone - accuracy_merged``. This is what matters when
  adapters are merged into one multi-task backbone.

An adapter's effective delta is ``gate * dW`` (``TargetDelta.dense_delta`` /
``sparse_delta``), so gated RIGSA adapters with a seeded dense init are measured like any
other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsemerge.adapter import SparseAdapter
from sparsemerge.data.examples import LabeledData
from sparsemerge.data.templates import PromptTemplate
from sparsemerge.errors import SparseMergeError

__all__ = ["ZERO_SHOT_PROMPTS", "forgetting", "is_causal_lm", "lm_forgetting", "lm_loss",
           "task_forgetting", "zero_shot_accuracy"]

#: Prompts an instruction model answers zero-shot, SpaRTA-style (§6.3): per preset task, the
#: template over its columns and one answer per label, in the preset's label order. SST-2 asks
#: for "positive or negative", not the paper's "Respond Yes or No": on SmolLM2-135M-Instruct
#: (Q4_1) the Yes/No wording scores 51.49 % on the SST-2 dev set (chance: it answers "No"),
#: this one 65.71 % (README, Instruction models); a forgetting probe at chance measures nothing.
ZERO_SHOT_PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": ("Is the sentiment of the following sentence positive or negative? Answer with one "
             "word.\n\n{sentence}", ("negative", "positive")),
    "cola": ("Determine if the following sentence is grammatically acceptable. Respond Yes or "
             "No.\n\n{sentence}", ("No", "Yes")),
    "mrpc": ("Determine if the following two sentences mean the same thing. Respond Yes or "
             "No.\n\nSentence 1: {#1 String}\nSentence 2: {#2 String}", ("No", "Yes")),
}
SHIPPED_ZERO_SHOT = ("sst2", "cola")  # the presets whose dev split ships with sparsemerge
ZERO_SHOT_EXAMPLES = 200  # default: the first 200 examples of each split (a probe, not a score)


def _load(adapter: SparseAdapter | str | Path) -> SparseAdapter:
    if isinstance(adapter, SparseAdapter):
        return adapter
    from sparsemerge.formats.adapter_file import load_adapter

    return load_adapter(adapter)


def is_causal_lm(base: str | None = None, gguf_file: str | None = None) -> bool:
    """Whether the base is a decoder-only language model (its model type has a causal-LM
    class and no masked-LM class in transformers: Llama yes, BERT no)."""
    from transformers import AutoConfig

    from sparsemerge.models import is_causal_lm_config, resolve_base

    path, gguf = resolve_base(base, gguf_file)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as exc:
        raise SparseMergeError(f"cannot read the config of base model {path}: {exc}") from None
    return is_causal_lm_config(config)


@torch.no_grad()
def lm_loss(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, max_length: int = 256,
            batch_size: int = 8) -> dict[str, float]:
    """Mean next-token cross-entropy (nats per predicted token) of a causal LM on ``texts``.

    Each text is tokenised on its own (special tokens as the tokenizer adds them, truncated to
    ``max_length``); every token after the first is predicted from the ones before it.
    Returns ``loss``, ``perplexity`` (``exp(loss)``), ``tokens`` (predicted tokens) and
    ``texts``.
    """
    if not texts:
        raise SparseMergeError("no texts to measure the language-model loss on")
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for lo in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[lo:lo + batch_size]), truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt")
        ids = enc["input_ids"].to(device)
        att = enc["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        target = ids[:, 1:]
        mask = att[:, 1:].bool() & att[:, :-1].bool()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                              reduction="none").view_as(target)
        total += float(nll[mask].double().sum())
        count += int(mask.sum())
    if count == 0:
        raise SparseMergeError("the texts hold no token to predict (each is one token long)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "texts": len(texts)}


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, tokenizer: Any, data: LabeledData,
                       template: PromptTemplate, answers: Sequence[str], *,
                       max_length: int = 256, batch_size: int = 8) -> float:
    """Accuracy of a causal LM answering ``data`` in ``template``: the predicted label is the
    one whose answer (its first token) scores highest at the answer position, the prompt's
    last token (right padding: the last attended one). Only that position goes through the
    LM head (the vocabulary-wide logits of every position would dominate the time)."""
    from sparsemerge.data.batching import batches, encode
    from sparsemerge.models import backbone_of

    ids = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers]
    encoded, _ = encode(data, tokenizer, max_length, template=template, keep_end=True)
    device = next(model.parameters()).device
    correct = 0
    for batch in batches(encoded, batch_size, shuffle=False, seed=0):
        att = batch["attention_mask"].to(device)
        hidden = backbone_of(model)(input_ids=batch["input_ids"].to(device),
                                    attention_mask=att).last_hidden_state
        last = hidden[torch.arange(len(att), device=device), att.sum(1) - 1]
        scores = model.get_output_embeddings()(last)[:, ids]
        correct += int((scores.argmax(-1).cpu() == batch["labels"]).sum())
    return correct / len(encoded["labels"])


def lm_forgetting(adapter: SparseAdapter | str | Path, *, base: str | None = None,
                  gguf_file: str | None = None, texts: Sequence[str] | None = None,
                  tasks: Sequence[str] | None = None, data_dir: str | None = None,
                  split: str = "dev", max_examples: int | None = ZERO_SHOT_EXAMPLES,
                  max_length: int = 256, batch_size: int = 8, force: bool = False,
                  device: str | torch.device | None = None,
                  base_dtype: str | torch.dtype = "fp32") -> dict[str, Any]:
    """Plain-text next-token loss of a decoder base, and its zero-shot accuracy on the
    prompted ``tasks`` (default: SST-2 and CoLA, whose dev splits ship; with ``data_dir``
    every task of :data:`ZERO_SHOT_PROMPTS`), before and after applying ``adapter``
    (computed on ``device``, default CPU, with the base in ``base_dtype``). ``max_examples``:
    the first N of each split (None: all)."""
    from sparsemerge.apply import apply
    from sparsemerge.data.tasks import load_task, plain_text_sample
    from sparsemerge.models import adapter_base, load_causal_lm, load_tokenizer

    ad = _load(adapter)
    base, gguf_file = adapter_base(ad, base, gguf_file)
    if not is_causal_lm(base, gguf_file):
        raise SparseMergeError(
            "the base is not a causal language model (an encoder has no next-token head); "
            "measure forgetting as another task's accuracy instead: --alongside OTHER_ADAPTER")
    texts = list(plain_text_sample() if texts is None else texts)
    tok = load_tokenizer(base, gguf_file)
    chat = bool(getattr(tok, "chat_template", None))
    prompted = {}
    for task in tasks or (SHIPPED_ZERO_SHOT if data_dir is None else ZERO_SHOT_PROMPTS):
        if task not in ZERO_SHOT_PROMPTS:
            raise SparseMergeError(f"no zero-shot prompt for task {task!r}; known: "
                                   f"{', '.join(ZERO_SHOT_PROMPTS)}")
        data = load_task(task, data_dir, split)
        if max_examples is not None:
            data = data.select(range(min(max_examples, len(data))))
        template, answers = ZERO_SHOT_PROMPTS[task]
        prompted[task] = (data, PromptTemplate(template, chat), answers)
    model = load_causal_lm(base, gguf_file=gguf_file, dtype=base_dtype, device=device).eval()

    def measure() -> tuple[dict[str, float], dict[str, float]]:
        return (lm_loss(model, tok, texts, max_length=max_length, batch_size=batch_size),
                {t: zero_shot_accuracy(model, tok, d, tp, a, max_length=max_length,
                                       batch_size=batch_size)
                 for t, (d, tp, a) in prompted.items()})

    before, zero_before = measure()
    apply(model, ad, force=force)
    after, zero_after = measure()
    zero_shot = {t: {"examples": len(prompted[t][0]), "chat": chat, "base": zero_before[t],
                     "adapted": zero_after[t], "forgetting": zero_before[t] - zero_after[t]}
                 for t in prompted}
    return {"kind": "lm", "texts": len(texts), "tokens": before["tokens"],
            "base_loss": before["loss"], "adapted_loss": after["loss"],
            "base_perplexity": before["perplexity"], "adapted_perplexity": after["perplexity"],
            "forgetting": after["loss"] - before["loss"], "zero_shot": zero_shot}


def task_forgetting(adapter: SparseAdapter | str | Path, alongside: SparseAdapter | str | Path,
                    *, base: str | None = None, gguf_file: str | None = None,
                    task: str | None = None, data_dir: str | None = None, split: str = "dev",
                    max_examples: int | None = None, batch_size: int = 64,
                    max_length: int = 512, force: bool = False,
                    device: str | torch.device | None = None,
                    base_dtype: str | torch.dtype = "auto") -> dict[str, Any]:
    """Dev metrics of the ``alongside`` adapter's task alone and merged (sum) with ``adapter``
    (computed on ``device``, default CPU, with the base in ``base_dtype``).

    ``task``: the preset to evaluate (default: the one ``alongside`` was trained on, with its
    ``data_dir``); ``max_examples``: score only the first N examples of the split.
    """
    from sparsemerge.data.tasks import load_task
    from sparsemerge.evaluate import head_template, load_adapted, trained_task
    from sparsemerge.merge.engine import merge_adapters
    from sparsemerge.scoring import evaluate_data

    ad, other = _load(adapter), _load(alongside)
    if not other.heads:
        raise SparseMergeError("--alongside: that adapter has no classification head to "
                               "evaluate")
    other_task = next(iter(other.heads))
    if task is None:
        task, trained_dir = trained_task(other)
        if task is None:
            raise SparseMergeError("--alongside: that adapter was not trained on a preset task; "
                                   "name the preset to evaluate it on (task=...)")
        data_dir = data_dir if data_dir is not None else trained_dir
    data = load_task(task, data_dir, split)
    if max_examples is not None:
        data = data.select(range(min(max_examples, len(data))))
    labels = other.heads[other_task].labels
    if list(data.labels) != list(labels):
        raise SparseMergeError(f"task {task} has labels {data.labels}, the head {other_task} of "
                               f"--alongside {labels}")

    def score(a: SparseAdapter) -> dict[str, float]:
        model, tok, _, _ = load_adapted(a, base, gguf_file=gguf_file, task=other_task,
                                        force=force, device=device, base_dtype=base_dtype)
        return evaluate_data(model, tok, data, batch_size=batch_size, max_length=max_length,
                             template=head_template(other, other_task))

    alone = score(other)
    merged = merge_adapters([other, dataclasses.replace(ad, heads={})], "sum")
    together = score(merged)
    return {"kind": "task", "task": task, "head": other_task, "examples": alone["examples"],
            "alone": alone, "merged": together,
            "forgetting": alone["accuracy"] - together["accuracy"]}


def forgetting(adapter: SparseAdapter | str | Path, *,
               alongside: SparseAdapter | str | Path | None = None, **kw: Any) -> dict[str, Any]:
    """:func:`task_forgetting` when ``alongside`` is given, else :func:`lm_forgetting` (whose
    zero-shot ``tasks`` are ``[task]`` when a ``task`` is given)."""
    if alongside is not None:
        return task_forgetting(adapter, alongside, **kw)
    task = kw.pop("task", None)
    return lm_forgetting(adapter, tasks=None if task is None else [task], **kw)
