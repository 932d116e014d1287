"""Many adapters over one resident base model: switch the active one in O(nnz).

Applying a sparse adapter writes ``W0 + delta`` at its indices and keeps ``W0`` there; undoing
writes ``W0`` back (bit-exact, see :mod:`sparsemerge.apply`). So switching from adapter ``a``
to ``b`` is ``undo(a)`` + ``apply(b)``: scatters over ``nnz(a) + nnz(b)`` entries, with no
reload and no copy of the base. PEFT's hot-swap covers LoRA only; this is the same service
for sparse deltas.

Each adapter's head is built once as its own module and swapped in by reference (with the
config's labels), so heads may have different label counts. The base fingerprint is checked
once per adapter, when it is added, not on every switch (the check hashes every target).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsemerge.adapter import SparseAdapter
from sparsemerge.apply import AppliedAdapter, add_deltas, pick_head, prefault_for_write
from sparsemerge.errors import SparseMergeError
from sparsemerge.models import backbone_of, check_base, head_module_name, named_base_tensors


def load_base(adapter: SparseAdapter, base: str | None = None, *, gguf_file: str | None = None,
              task: str | None = None, device: str | torch.device | None = None,
              base_dtype: str | torch.dtype = "auto") -> tuple[nn.Module, Any, str]:
    """(the task model ``adapter`` applies to, in eval mode, its tokenizer, the task of the
    head it gets): the adapter's base unless ``base``, loaded in ``base_dtype`` (``auto``: the
    checkpoint's) straight onto ``device``, with a head for the chosen head's labels."""
    from sparsemerge.models import (
        adapter_base,
        load_task_model,
        load_tokenizer,
        resolve_pad_token_id,
    )

    chosen = pick_head(adapter, task)
    if chosen is None:
        raise SparseMergeError("the adapter has no classification head; it cannot classify "
                               "(merge it with --heads, or evaluate the adapters it came from; "
                               "an --objective lm adapter answers with sparsemerge generate)")
    task_name, head = chosen
    base, gguf_file = adapter_base(adapter, base, gguf_file)
    tok = load_tokenizer(base, gguf_file)
    model = load_task_model(base, head.labels, gguf_file=gguf_file,
                            problem_type=head.problem_type, dtype=base_dtype, device=device,
                            pad_token_id=resolve_pad_token_id(tok))
    model.eval()
    return model, tok, task_name


@dataclass
class _Held:
    adapter: SparseAdapter
    task: str | None  # the head's task; None without a head (or on a bare backbone)
    head: nn.Module | None  # that head as a module of the resident model's head type


class AdapterSwitcher:
    """Holds adapters over one resident ``model`` (a backbone or a task model) and makes one
    of them active at a time.

    >>> switcher = AdapterSwitcher(model)
    >>> switcher.add("sst2", sst2_adapter); switcher.add("cola", cola_adapter)
    >>> switcher.activate("cola")    # undo the active adapter, apply cola, swap in its head
    >>> model(**batch).logits        # the model is cola's until the next switch
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, force: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer  # carried for callers that score texts (CLI, bench)
        self.force = force
        self._tensors = named_base_tensors(backbone_of(model))
        self._head_name = head_module_name(model)
        self._base_head = getattr(model, self._head_name) if self._head_name else None
        config = model.config
        self._base_meta = ([config.id2label[i] for i in sorted(config.id2label)],
                             config.problem_type)
        self._held: dict[str, _Held] = {}
        self._active: str | None = None
        self._applied: AppliedAdapter | None = None
        self._resident: set[str] = set()  # base tensors already faulted in for writing

    @classmethod
    def load(cls, adapters: Mapping[str, str | Path | SparseAdapter], base: str | None = None,
             *, gguf_file: str | None = None, task: str | None = None, force: bool = False,
             device: str | torch.device | None = None,
             base_dtype: str | torch.dtype = "auto") -> AdapterSwitcher:
        """Load the base once (the first adapter's, unless ``base``; see :func:`load_base`)
        and hold each adapter (a directory or a loaded one) under its name; ``task`` picks
        the head of multi-task adapters."""
        from sparsemerge.formats.adapter_file import load_adapter

        loaded = {name: a if isinstance(a, SparseAdapter) else load_adapter(a)
                  for name, a in adapters.items()}
        if not loaded:
            raise SparseMergeError("give at least one adapter")
        model, tok, _ = load_base(next(iter(loaded.values())), base, gguf_file=gguf_file,
                                  task=task, device=device, base_dtype=base_dtype)
        switcher = cls(model, tok, force=force)
        for name, adapter in loaded.items():
            switcher.add(name, adapter, task=task)
        return switcher

    @property
    def names(self) -> list[str]:
        return list(self._held)

    @property
    def active(self) -> str | None:
        return self._active

    def adapter(self, name: str) -> SparseAdapter:
        return self._get(name).adapter

    def task(self, name: str) -> str | None:
        """The task whose head ``name`` uses (None: no head)."""
        return self._get(name).task

    def labels(self, name: str) -> list[str] | None:
        held = self._get(name)
        return held.adapter.heads[held.task].labels if held.task is not None else None

    def add(self, name: str, adapter: SparseAdapter, *, task: str | None = None) -> None:
        """Hold ``adapter`` as ``name``: check it against the base (on the pristine base, so
        the active adapter is undone and re-applied around the check) and build its head."""
        if name in self._held:
            raise SparseMergeError(f"the switcher already holds an adapter named {name!r}")
        active = self._active
        self.deactivate()
        try:
            found = getattr(self.model.config, "_name_or_path", "") or "the resident model"
            check_base(adapter.base, self._tensors, list(adapter.targets), found_id=found,
                       force=self.force)
            chosen = pick_head(adapter, task) if self._head_name is not None else None
            if self._head_name is not None and chosen is None:
                raise SparseMergeError(f"{name} has no classification head, and the resident "
                                       f"model classifies with its {self._head_name}")
            head = self._build_head(name, chosen[1].params) if chosen is not None else None
            self._held[name] = _Held(adapter, chosen[0] if chosen else None, head)
            for target in adapter.targets:  # resident and private once, not on every switch
                if target not in self._resident:
                    prefault_for_write(self._tensors[target].data.view(-1))
                    self._resident.add(target)
        finally:
            if active is not None:
                self.activate(active)

    @torch.no_grad()
    def activate(self, name: str) -> None:
        """Make ``name`` the active adapter: undo the active one, apply this one (O(nnz)),
        swap in its head."""
        if name == self._active:
            return
        held = self._get(name)
        self.deactivate()
        self._applied = add_deltas(self._tensors, held.adapter, prefault=False)
        self._active = name
        if held.head is not None:
            head = held.adapter.heads[held.task]
            self._set_head(held.head, (head.labels, head.problem_type))

    @torch.no_grad()
    def deactivate(self) -> None:
        """Back to the bare base (and its own head)."""
        if self._applied is not None:
            self._applied.undo()
            self._applied = None
        if self._active is not None and self._base_head is not None:
            self._set_head(self._base_head, self._base_meta)
        self._active = None

    def _get(self, name: str) -> _Held:
        if name not in self._held:
            raise SparseMergeError(f"no adapter named {name!r}; held: "
                                   f"{', '.join(self._held) or 'none'}")
        return self._held[name]

    def _build_head(self, name: str, params: dict[str, torch.Tensor]) -> nn.Module:
        """A copy of the model's head module holding ``params`` (their shapes may differ from
        the base head's in the label dimension)."""
        head = copy.deepcopy(self._base_head)
        own = dict(head.named_parameters())
        for pname, value in params.items():
            if pname not in own or own[pname].dim() != value.dim():
                raise SparseMergeError(f"{name}: head parameter {pname} {tuple(value.shape)} "
                                       f"does not fit the model's {self._head_name}")
            owner, _, leaf = pname.rpartition(".")
            setattr(head.get_submodule(owner) if owner else head, leaf, nn.Parameter(
                value.to(own[pname].device, own[pname].dtype), requires_grad=False))
        return head

    def _set_head(self, head: nn.Module, meta: tuple[list[str], str | None]) -> None:
        """Swap ``head`` in, with its (label names, problem type) in the config."""
        names, problem_type = meta
        setattr(self.model, self._head_name, head)
        config = self.model.config
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
        config.problem_type = problem_type
        if hasattr(self.model, "num_labels"):  # the model's own copy (used for the loss)
            self.model.num_labels = len(names)


__all__ = ["AdapterSwitcher"]
