"""Classification heads: find, initialise (as the SpaRTA paper does) and export.

Initialisation (``init_head``):
- base model: the output layer's weight ~ N(0, sigma^2) with sigma = 0.06 / sqrt(hidden), bias
  0. Logits then start near 0, so the first loss is close to log(#classes).
- instruction model with ``label_tokens`` (e.g. ["No", "Yes"] for labels [negative, positive]):
  row i of the head is a copy of the vocabulary (LM-head) row of token i, so the untrained
  model already scores the labels as the chat model would answer them. The head is a new
  tensor, never tied to the input embeddings. For a model with tied embeddings the LM head
  *is* the input embedding matrix; otherwise just those rows are read from the base's
  checkpoint (a safetensors slice or the GGUF ``output.weight`` tensor), never a second model.

The head trains in fp32 whatever the base dtype (:func:`fp32_head`): on a bf16 / fp16 base
its parameters are the fp32 master weights and its input is cast up (docs/NUMERICS.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sparsemerge.adapter import Head
from sparsemerge.errors import SparseMergeError
from sparsemerge.models import backbone_of, head_module_name

HEAD_SIGMA = 0.06


def head_of(model: nn.Module) -> tuple[str, nn.Module]:
    name = head_module_name(model)
    if name is None:
        raise SparseMergeError(f"{type(model).__name__} has no classification head "
                               "(classifier / score / classification_head)")
    return name, getattr(model, name)


def output_layer(head: nn.Module) -> nn.Linear:
    """The head's last linear layer (the one producing the logits)."""
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SparseMergeError(f"the head {type(head).__name__} has no linear layer")
    return linears[-1]


def label_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    ids = []
    for tok in tokens:
        enc = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            pieces = tokenizer.convert_ids_to_tokens(enc)
            raise SparseMergeError(
                f"--label-tokens: {tok!r} is {len(enc)} tokens for this tokenizer ({pieces}); "
                "each label token must be a single vocabulary entry (try another spelling, "
                "e.g. with a leading space)")
        ids.append(int(enc[0]))
    return ids


def _lm_head_rows(model: nn.Module, ids: list[int], base, gguf_file) -> torch.Tensor:
    cfg = model.config
    tied = getattr(cfg, "tie_word_embeddings", False)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    tied = tied or getattr(text_cfg, "tie_word_embeddings", False)
    if tied:
        emb = backbone_of(model).get_input_embeddings().weight
        return emb.detach()[ids].to(torch.float32).cpu()
    from sparsemerge.checkpoint import BaseCheckpoint

    ckpt = BaseCheckpoint(base, gguf_file)
    try:
        return ckpt.lm_head_rows(ids).to(torch.float32)
    finally:
        ckpt.close()


def _inputs_to_fp32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def fp32_head(model: nn.Module) -> None:
    """Keep the head in fp32 on a half-precision base: its parameters become the fp32 master
    weights the optimizer updates (AdamW on bf16 parameters would lose most small updates to
    rounding), and a pre-hook casts its input (the backbone's half-precision hidden states)
    up to match. A no-op on an fp32 head."""
    _, head = head_of(model)
    if all(p.dtype == torch.float32 for p in head.parameters()):
        return
    head.float()
    head.register_forward_pre_hook(_inputs_to_fp32)


@torch.no_grad()
def init_head(model: nn.Module, *, seed: int, label_tokens: list[str] | None = None,
              tokenizer=None, base=None, gguf_file: str | None = None) -> None:
    """Make the head fp32 (:func:`fp32_head`) and initialise its output layer in place (see
    the module docstring)."""
    fp32_head(model)
    _, head = head_of(model)
    layer = output_layer(head)
    n_out, hidden = layer.weight.shape
    if label_tokens is not None:
        if len(label_tokens) != n_out:
            raise SparseMergeError(f"--label-tokens gives {len(label_tokens)} tokens for "
                                   f"{n_out} labels; give one token per label, in label order")
        ids = label_token_ids(tokenizer, label_tokens)
        rows = _lm_head_rows(model, ids, base, gguf_file)
        if rows.shape != layer.weight.shape:
            raise SparseMergeError(f"--label-tokens: LM-head rows {tuple(rows.shape)} do not "
                                   f"fit the head {tuple(layer.weight.shape)}")
        layer.weight.copy_(rows.to(layer.weight.dtype))
    else:
        g = torch.Generator().manual_seed(int(seed))
        sigma = HEAD_SIGMA / math.sqrt(hidden)
        w = torch.randn(layer.weight.shape, generator=g, dtype=torch.float32) * sigma
        layer.weight.copy_(w.to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.zero_()


def head_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The classification head's parameters; none for a model without one (a causal LM
    trained with ``--objective lm``)."""
    if head_module_name(model) is None:
        return []
    _, head = head_of(model)
    return list(head.named_parameters())


def export_head(model: nn.Module, labels: list[str],
                problem_type: str = "single_label_classification", *,
                prompt: dict[str, Any] | None = None) -> Head:
    name, head = head_of(model)
    params = {p: t.detach().to(torch.float32).cpu().clone() for p, t in head.named_parameters()}
    return Head(module=name, params=params, labels=list(labels), problem_type=problem_type,
                prompt=prompt)
