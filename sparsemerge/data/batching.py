"""Tokenising data and cutting it into padded, rank-sharded, seeded batches.

:func:`encode` tokenises labelled data for classification (one class id per example),
:func:`encode_lm` conversations for the causal-LM objective (one label per token, -100 on
the prompt); :func:`batches` pads either kind.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from sparsemerge.data.examples import LabeledData, LMData, Message
from sparsemerge.data.templates import PromptTemplate, apply_template, chat_segments, render_chat
from sparsemerge.errors import DataError
from sparsemerge.models import is_causal_lm_config, resolve_pad_token_id

__all__ = ["IGNORE_INDEX", "Encoded", "LongCounts", "batches", "encode", "encode_lm",
           "encode_prompt", "keeps_end", "num_batches"]

#: The label of a token the loss ignores (PyTorch's and transformers' convention).
IGNORE_INDEX = -100


class Encoded(dict):
    """``encode``'s result: a plain dict of per-example lists, plus ``pad_token_id``."""

    pad_token_id: int = 0


class LongCounts(NamedTuple):
    """How many examples were longer than ``max_length``: truncated, or dropped."""

    truncated: int
    dropped: int


def encode(
    data: LabeledData,
    tokenizer: Any,
    max_length: int,
    drop_long: bool = False,
    *,
    template: PromptTemplate | None = None,
    keep_end: bool | None = None,
) -> tuple[Encoded, LongCounts]:
    """Tokenise ``data``; return (columns, how many long examples were truncated / dropped).

    The columns are lists with one entry per kept example, in data order: ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (only if the tokenizer makes them), ``labels``
    and ``index`` (the example's position in ``data``, to map predictions back). With a
    ``template`` each example is its filled prompt (:func:`apply_template`; one text, even for
    pair tasks) and, chat-wrapped, is tokenised without adding special tokens (the chat
    template has its own); otherwise special tokens are added.

    An example longer than ``max_length`` tokens is truncated, so that every example is
    trained on and scored, or dropped with ``drop_long`` (as SpaRTA does). Truncation keeps
    the end when ``keep_end`` (default: with a template), where a prompt's answer position
    and a decoder's last token are; else the start, longest-first for pairs (an encoder's
    first token is what its head reads). No padding here: :func:`batches` pads each batch to
    its own longest row. The result's ``pad_token_id`` attribute holds
    :func:`resolve_pad_token_id` (tokenizer) for :func:`batches`.
    """
    _check_input(data, max_length)
    pad_id = resolve_pad_token_id(tokenizer)
    if template is not None:
        texts, pairs = apply_template(data, template, tokenizer), [None] * len(data)
    else:
        texts, pairs = data.texts, data.text_pairs
    is_pair = any(p is not None for p in pairs)
    if is_pair and any(p is None for p in pairs):
        raise DataError(f"{data.source}: some examples have a text pair and some do not")
    keep_end = template is not None if keep_end is None else keep_end
    special = template is None or not template.chat
    kw: dict[str, Any] = {"add_special_tokens": special, "truncation": False}
    full = tokenizer(texts, pairs, **kw) if is_pair else tokenizer(texts, **kw)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in full]
    out = Encoded({k: [] for k in keys})
    out["labels"] = []
    out["index"] = []
    out.pad_token_id = pad_id
    long_idx = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    trunc = None
    if long_idx and not drop_long:
        kt: dict[str, Any] = {"add_special_tokens": special, "truncation": True,
                              "max_length": max_length}
        lt = [texts[i] for i in long_idx]
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "left" if keep_end else "right"
        try:
            trunc = (tokenizer(lt, [pairs[i] for i in long_idx], **kt) if is_pair
                     else tokenizer(lt, **kt))
        finally:
            tokenizer.truncation_side = side
        trunc_pos = {i: j for j, i in enumerate(long_idx)}
    long_set = set(long_idx)
    for i, ex in enumerate(data.examples):
        if i in long_set:
            if drop_long:
                continue
            src, j = trunc, trunc_pos[i]
        else:
            src, j = full, i
        for k in keys:
            out[k].append(list(src[k][j]))
        out["labels"].append(ex.label)
        out["index"].append(i)
    if "attention_mask" not in out:
        out["attention_mask"] = [[1] * len(ids) for ids in out["input_ids"]]
    return out, _long_counts(data, out, max_length, len(long_idx), drop_long)


def keeps_end(config: Any, template: PromptTemplate | None) -> bool:
    """``encode``'s ``keep_end`` for a model with this transformers ``config`` (or None):
    with a template (the answer position is last) or for a decoder, whose classification
    head reads the last token; an encoder's reads the first."""
    return template is not None or (config is not None and is_causal_lm_config(config))


def _check_input(data: LabeledData | LMData, max_length: int) -> None:
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    if not len(data):
        raise DataError(f"{data.source}: nothing to encode (0 examples)")


def _long_counts(data: LabeledData | LMData, out: Encoded, max_length: int, n_long: int,
                 drop_long: bool) -> LongCounts:
    """The counts ``encode`` / ``encode_lm`` return, once something is left to train on."""
    if not out["input_ids"]:
        raise DataError(f"{data.source}: every example is longer than max_length={max_length} "
                        f"tokens; raise max_length or pass drop_long=False to truncate")
    return LongCounts(0, n_long) if drop_long else LongCounts(n_long, 0)


def encode_lm(
    data: LMData,
    tokenizer: Any,
    max_length: int,
    drop_long: bool = False,
    *,
    chat: bool,
) -> tuple[Encoded, LongCounts]:
    """Tokenise conversations for the causal-LM objective; return (columns, long counts).

    Columns: ``input_ids``, ``attention_mask``, ``labels`` (one per token: the token itself on
    the assistant's turns, :data:`IGNORE_INDEX` on everything else, so the loss is on the
    response only; transformers' causal-LM models shift them) and ``index``. With ``chat`` the
    conversation is rendered in the tokenizer's chat template (:func:`chat_segments`; the
    answers include the end-of-turn tokens); without, the turns' texts are concatenated, the
    first tokenised with the tokenizer's special tokens (its BOS) and each answer followed by
    EOS, so the model learns to stop. An example longer than ``max_length`` keeps its last
    ``max_length`` tokens (the answer is last), or is dropped with ``drop_long``.
    """
    _check_input(data, max_length)
    eos = [] if chat or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    out = Encoded(input_ids=[], attention_mask=[], labels=[], index=[])
    out.pad_token_id = resolve_pad_token_id(tokenizer)
    n_long = 0
    for i, ex in enumerate(data.examples):
        pieces = (chat_segments(ex.messages, tokenizer) if chat
                  else [(m.content, m.role == "assistant") for m in ex.messages])
        ids: list[int] = []
        labels: list[int] = []
        for k, (text, is_answer) in enumerate(pieces):
            tokens = tokenizer(text, add_special_tokens=not chat and k == 0)["input_ids"]
            tokens = list(tokens) + (eos if is_answer else [])
            ids += tokens
            labels += tokens if is_answer else [IGNORE_INDEX] * len(tokens)
        if len(ids) > max_length:
            n_long += 1
            if drop_long:
                continue
            ids, labels = ids[-max_length:], labels[-max_length:]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        out["index"].append(i)
    return out, _long_counts(data, out, max_length, n_long, drop_long)


def encode_prompt(prompt: str, tokenizer: Any, *, chat: bool) -> list[int]:
    """A user prompt's token ids as :func:`encode_lm` tokenises a conversation's first turn,
    ending where the model answers: with ``chat`` rendered in the chat template with the
    assistant's generation prompt, else the text with the tokenizer's special tokens."""
    if chat:
        text = render_chat([Message("user", prompt)], tokenizer, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    """How many batches :func:`batches` yields per rank per epoch for ``n`` examples."""
    if n <= 0:
        return 0
    full = math.ceil(n / (batch_size * world_size))
    tail = n - (full - 1) * batch_size * world_size
    return full - 1 if (tail < world_size and full > 1) else full


def batches(
    encoded: Mapping[str, Sequence[Any]],
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    *,
    pad_token_id: int | None = None,
    with_index: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded ``torch.long`` batches of this rank's share of ``encoded``.

    Order: with ``shuffle`` a permutation seeded by ``(seed, epoch)`` (numpy PCG64, identical
    on every rank), else data order. The order is cut into *global* batches of
    ``batch_size * world_size`` examples and each global batch is dealt round-robin to the
    ranks (``global[rank::world_size]``). So every rank yields the same number of batches
    (:func:`num_batches`; DDP needs that), the ranks' examples are disjoint and together
    cover every example exactly once per epoch, and global step ``t`` sees the same examples
    whatever the ``world_size`` for a fixed ``batch_size * world_size``. If the last global
    batch has fewer than ``world_size`` examples it is merged into the previous one (so that
    no rank gets an empty batch; that batch can then hold up to ``batch_size + 1`` rows).

    Rows are right-padded to the batch's longest row: ``input_ids`` with ``pad_token_id``
    (default: ``encoded.pad_token_id`` as set by :func:`encode`, else 0), ``attention_mask``
    and ``token_type_ids`` with 0. ``labels`` is 1-D (a class id per example, from
    :func:`encode`), or per token like ``input_ids`` and padded with :data:`IGNORE_INDEX`
    (from :func:`encode_lm`). With ``with_index`` the batch also holds
    ``index`` (1-D: each row's position in the original data, from :func:`encode`) -- off by
    default so that ``model(**batch)`` works. Other columns are ignored.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
    if "input_ids" not in encoded or "labels" not in encoded:
        raise DataError("batches() needs the dict from encode() (input_ids, labels, ...)")
    n = len(encoded["input_ids"])
    if n < world_size:
        raise DataError(f"{n} examples cannot be shared among {world_size} processes")
    if pad_token_id is None:
        pad_token_id = getattr(encoded, "pad_token_id", 0)
    order = (np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n) if shuffle
             else np.arange(n))
    g = batch_size * world_size
    starts = list(range(0, n, g))
    if len(starts) > 1 and n - starts[-1] < world_size:
        starts.pop()
    bounds = list(zip(starts, starts[1:] + [n], strict=True))
    per_token = isinstance(encoded["labels"][0], (list, tuple))  # from encode_lm
    seq_keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    seq_keys += ["labels"] if per_token else []
    vec_keys = [] if per_token else ["labels"]
    fills = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    if with_index:
        if "index" not in encoded:
            raise DataError("with_index=True needs the 'index' column that encode() makes")
        vec_keys.append("index")
    for lo, hi in bounds:
        idx = order[lo:hi][rank::world_size]
        longest = max(len(encoded["input_ids"][i]) for i in idx)
        batch: dict[str, torch.Tensor] = {}
        for k in seq_keys:
            t = torch.full((len(idx), longest), fills.get(k, 0), dtype=torch.long)
            for r, i in enumerate(idx):
                row = encoded[k][i]
                t[r, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            batch[k] = t
        if "attention_mask" not in batch:
            m = torch.zeros((len(idx), longest), dtype=torch.long)
            for r, i in enumerate(idx):
                m[r, : len(encoded["input_ids"][i])] = 1
            batch["attention_mask"] = m
        for k in vec_keys:
            batch[k] = torch.as_tensor([int(encoded[k][i]) for i in idx], dtype=torch.long)
        yield batch
