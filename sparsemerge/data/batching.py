"""Tokenising labelled data and cutting it into padded, rank-sharded, seeded batches."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sparsemerge.data.examples import LabeledData
from sparsemerge.errors import DataError
from sparsemerge.models import resolve_pad_token_id

__all__ = ["Encoded", "batches", "encode", "num_batches"]


class Encoded(dict):
    """``encode``'s result: a plain dict of per-example lists, plus ``pad_token_id``."""

    pad_token_id: int = 0


def encode(
    data: LabeledData,
    tokenizer: Any,
    max_length: int,
    drop_long: bool = True,
) -> tuple[Encoded, int]:
    """Tokenise ``data``; return (columns, number of examples dropped for length).

    The columns are lists with one entry per kept example, in data order: ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (only if the tokenizer makes them), ``labels``
    and ``index`` (the example's position in ``data``, to map predictions back). Special
    tokens are added. An example longer than ``max_length`` tokens is dropped when
    ``drop_long`` (as in SpaRTA, for training), else truncated (longest-first for pairs; use
    this for evaluation so every example is scored). No padding here: :func:`batches` pads
    each batch to its own longest row. The result's ``pad_token_id`` attribute holds
    :func:`resolve_pad_token_id` (tokenizer) for :func:`batches`.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    if not len(data):
        raise DataError(f"{data.source}: nothing to encode (0 examples)")
    pad_id = resolve_pad_token_id(tokenizer)
    texts = data.texts
    pairs = data.text_pairs
    is_pair = any(p is not None for p in pairs)
    if is_pair and any(p is None for p in pairs):
        raise DataError(f"{data.source}: some examples have a text pair and some do not")
    kw: dict[str, Any] = {"add_special_tokens": True, "truncation": False}
    full = tokenizer(texts, pairs, **kw) if is_pair else tokenizer(texts, **kw)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in full]
    out = Encoded({k: [] for k in keys})
    out["labels"] = []
    out["index"] = []
    out.pad_token_id = pad_id
    long_idx = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    trunc = None
    if long_idx and not drop_long:
        kt: dict[str, Any] = {"add_special_tokens": True, "truncation": True,
                              "max_length": max_length}
        lt = [texts[i] for i in long_idx]
        trunc = (tokenizer(lt, [pairs[i] for i in long_idx], **kt) if is_pair
                 else tokenizer(lt, **kt))
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
    n_dropped = len(long_idx) if drop_long else 0
    if not out["labels"]:
        raise DataError(f"{data.source}: every example is longer than max_length={max_length} "
                        f"tokens; raise max_length or pass drop_long=False to truncate")
    return out, n_dropped


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
    and ``token_type_ids`` with 0. ``labels`` is 1-D. With ``with_index`` the batch also holds
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
    seq_keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    vec_keys = ["labels"]
    if with_index:
        if "index" not in encoded:
            raise DataError("with_index=True needs the 'index' column that encode() makes")
        vec_keys.append("index")
    for lo, hi in bounds:
        idx = order[lo:hi][rank::world_size]
        longest = max(len(encoded["input_ids"][i]) for i in idx)
        batch: dict[str, torch.Tensor] = {}
        for k in seq_keys:
            fill = pad_token_id if k == "input_ids" else 0
            t = torch.full((len(idx), longest), fill, dtype=torch.long)
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
