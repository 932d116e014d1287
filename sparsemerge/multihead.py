"""One backbone, one head per task: a merged model that answers every task in one forward.

Each head runs inside its single-task model class on the shared backbone output (see
:mod:`sparsemerge.task_heads`), so its logits equal the single-task model's. Heads are held
by task name in a plain mapping (``model.heads``), never as module attributes, so any string
is a valid task name (``train``, ``to``, ``a.b c``...); their parameters are registered
through ``model.head_modules`` so ``.to()`` and ``state_dict()`` see them. A head trained on
prompted inputs (``train --template``) keeps its template (``prompt`` in its head config) and
is scored on inputs wrapped in it; heads with different prompts cannot share a backbone pass,
so texts take one pass per distinct prompt (:meth:`MultiHeadModel.prompt_groups`).

Python API: :meth:`MultiHeadModel.from_pretrained`, ``model(**batch) -> {task: logits}``,
:meth:`MultiHeadModel.predict`, :meth:`MultiHeadModel.evaluate`, and the one-call helpers
:func:`predict_merged` / :func:`evaluate_merged` that the CLI's ``predict`` / ``evaluate`` use
for a merged directory.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsemerge.data.batching import batches
from sparsemerge.errors import SparseMergeError
from sparsemerge.task_heads import head_model

if TYPE_CHECKING:
    from sparsemerge.data.templates import PromptTemplate

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class MultiHeadModel(nn.Module):
    """A merged backbone plus one classification head per task (see the module doc)."""

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module], tokenizer: Any = None,
                 head_configs: Mapping[str, Mapping[str, Any]] | None = None,
                 recipe: Mapping[str, Any] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head_modules = nn.ModuleList(heads.values())
        self.heads: dict[str, nn.Module] = dict(zip(heads, self.head_modules, strict=True))
        self.tokenizer = tokenizer
        self.head_configs = {t: dict(c) for t, c in (head_configs or {}).items()}
        self.recipe = dict(recipe or {})
        params = inspect.signature(backbone.forward).parameters
        self._accepts = {k for k in _INPUT_KEYS if k in params}

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device | None = None, **hub_kwargs: Any
                        ) -> MultiHeadModel:
        """Load a merged directory (or ``hf://owner/name[@rev]``) written by ``merge --heads``."""
        from transformers import AutoModel

        from sparsemerge.formats.merged import read_merged
        from sparsemerge.hub import resolve_path
        from sparsemerge.models import load_tokenizer, quiet_transformers

        local = resolve_path(path, **hub_kwargs)
        files = read_merged(local)
        try:
            with quiet_transformers():
                backbone = AutoModel.from_pretrained(local, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise SparseMergeError(f"{local}: cannot load the merged backbone: {exc}") from None
        backbone.eval()
        heads = {}
        for task, h in files.heads.items():
            try:
                heads[task] = head_model(backbone.config, h.config, h.params, dtype)
            except SparseMergeError as exc:
                raise SparseMergeError(f"{h.path}: {exc}") from None
        try:
            tok = load_tokenizer(local)
        except SparseMergeError:
            tok = None
        model = cls(backbone, heads, tok, {t: h.config for t, h in files.heads.items()},
                    files.recipe)
        if device is not None:
            model.to(device)
        return model.eval()

    # -- running -----------------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def labels(self, task: str) -> list[str]:
        cfg = self.head_configs.get(task)
        if cfg is not None:
            return list(cfg["labels"])
        id2label = self.heads[task].config.id2label
        return [id2label[i] for i in range(len(id2label))]

    def template(self, task: str) -> PromptTemplate | None:
        """The prompt template head ``task`` was trained with (None: it reads raw text)."""
        from sparsemerge.data.templates import stored_template

        return stored_template(self.head_configs.get(task, {}).get("prompt"))

    def prompt_groups(self, tasks: Sequence[str] | None = None
                      ) -> list[tuple[PromptTemplate | None, list[str]]]:
        """``tasks`` (default: all) grouped by the prompt their heads need, in first-seen
        order: each group is one backbone pass over the texts wrapped in its prompt."""
        groups: dict[PromptTemplate | None, list[str]] = {}
        for task in (self.tasks if tasks is None else tasks):
            groups.setdefault(self.template(task), []).append(task)
        return list(groups.items())

    def _inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k in self._accepts and v is not None}

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, tasks: Sequence[str] | None = None,
                **kwargs: Any) -> dict[str, torch.Tensor]:
        """One backbone forward; ``{task: logits}`` for every task (or those in ``tasks``).

        Inputs the backbone does not take (``labels``, ``index``, and ``token_type_ids`` for
        decoders) are ignored.
        """
        inputs = self._inputs({"input_ids": input_ids, "attention_mask": attention_mask,
                               **kwargs})
        chosen = list(tasks) if tasks is not None else self.tasks
        unknown = [t for t in chosen if t not in self.heads]
        if unknown:
            raise SparseMergeError(f"no head for task(s) {unknown}; this model has "
                                   f"{', '.join(self.tasks)}")
        out = self.backbone(**inputs)
        result = {}
        for task in chosen:
            model = self.heads[task]
            shared = getattr(model, model.base_model_prefix)
            shared.output = out
            try:
                result[task] = model(**inputs).logits
            finally:
                shared.output = None
        return result

    def _tokenizer(self):
        if self.tokenizer is None:
            raise SparseMergeError("this MultiHeadModel has no tokenizer; pass tokenizer=...")
        return self.tokenizer

    @torch.no_grad()
    def predict(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
                batch_size: int = 32, max_length: int = 512, tasks: Sequence[str] | None = None
                ) -> dict[str, list[tuple[str, float]]]:
        """``{task: [(label, probability), ...]}``, one entry per text (or text pair).

        Single-label heads: softmax and the most likely label. Multi-label heads: sigmoid and
        the most likely label. Regression heads: ``("score", value)``. Each head sees the texts
        in its own prompt template (filled as ``data.templates.texts_data`` says); heads that
        share a prompt share one backbone pass (:meth:`prompt_groups`). Inputs go to the
        model's device.
        """
        from sparsemerge.data.templates import texts_data
        from sparsemerge.scoring import encode_for, on_model_device

        if isinstance(texts, str):
            texts = [texts]
        tok = self._tokenizer()
        chosen = list(tasks) if tasks is not None else self.tasks
        out: dict[str, list[tuple[str, float]]] = {t: [] for t in chosen}
        was_training = self.training
        self.eval()
        try:
            for template, group in self.prompt_groups(chosen):
                encoded = encode_for(self.backbone, tok, texts_data(texts, pairs, template),
                                     max_length, template)
                for batch in batches(encoded, batch_size, shuffle=False, seed=0):
                    logits = self(**on_model_device(self, batch), tasks=group)
                    for task, lg in logits.items():
                        out[task].extend(self._decode(task, lg.float()))
        finally:
            self.train(was_training)
        return out

    def _decode(self, task: str, logits: torch.Tensor) -> list[tuple[str, float]]:
        cfg = self.head_configs.get(task, {})
        kind = cfg.get("problem_type", "single_label_classification")
        labels = self.labels(task)
        if kind == "regression":
            return [("score", float(v)) for v in logits.reshape(len(logits), -1)[:, 0]]
        probs = logits.sigmoid() if kind == "multi_label_classification" else logits.softmax(-1)
        p, i = probs.max(-1)
        return [(labels[j] if j < len(labels) else str(j), float(q))
                for q, j in zip(p.tolist(), i.tolist(), strict=True)]

    @torch.no_grad()
    def evaluate(self, data: Mapping[str, Any], *, batch_size: int = 64, max_length: int = 512,
                 **options: Any) -> dict[str, dict[str, float]]:
        """``{task: metrics}`` for each task's labelled data (see :func:`task_data` for what a
        value may be and for ``options``).

        Metrics are those of :func:`sparsemerge.scoring.evaluate_model` (accuracy, F1,
        Matthews correlation, loss, examples), which also moves each batch to this model's
        device. Over-long examples are truncated, not dropped.
        """
        from sparsemerge.scoring import encode_for, evaluate_model

        tok = self._tokenizer()
        results: dict[str, dict[str, float]] = {}
        for task, source in data.items():
            if task not in self.heads:
                raise SparseMergeError(f"no head for task {task!r}; this model has "
                                       f"{', '.join(self.tasks)}")
            labeled = task_data(task, source, self.labels(task), **options)
            encoded = encode_for(self.backbone, tok, labeled, max_length, self.template(task))

            def fn(batch: dict[str, torch.Tensor], task: str = task) -> torch.Tensor:
                return self(**batch, tasks=[task])[task]

            results[task] = evaluate_model(self, encoded, batch_size,
                                           num_labels=len(self.labels(task)), logits=fn)
        return results


def task_data(task: str, source: Any, labels: Sequence[str], *, data_dir: str | Path | None = None,
              split: str = "dev", text_column: str | None = None,
              text_pair_column: str | None = None, label_column: str | None = None,
              skip_bad_rows: bool = False, has_header: bool = True):
    """The labelled data a head ``task`` is scored on, with label ids indexing ``labels``.

    ``source`` is one of:

    * a ``LabeledData`` (its labels are matched to the head's by name);
    * ``None``: the preset task named ``task`` (``sst2``, ``cola``, ...), its ``split`` from
      ``data_dir`` or, without one, the subset shipped with sparsemerge;
    * a preset name that is not an existing path: that preset, as above (for a head named
      otherwise, e.g. ``sentiment`` scored on ``sst2``);
    * a CSV / TSV / JSONL file (or ``hf://`` path). For a head named after a preset it is
      read in the preset's layout (e.g. GLUE's ``dev.tsv``) unless columns are given; other
      files need ``text`` / ``label`` columns or ``text_column`` / ``label_column``.
    """
    from sparsemerge.data.examples import LabeledData
    from sparsemerge.data.readers import read_table
    from sparsemerge.data.tasks import TASKS, load_task

    labels = list(labels)
    if source is None or (isinstance(source, str) and source in TASKS
                          and not Path(source).exists()):
        preset = task if source is None else source
        if preset not in TASKS:
            raise SparseMergeError(f"head {task!r} is not a preset task ({', '.join(TASKS)}): "
                                   f"give its data as {task}=FILE")
        source = load_task(preset, data_dir, split, skip_bad_rows=skip_bad_rows)
    if isinstance(source, LabeledData):
        if source.labels == labels:
            return source
        unknown = sorted(set(source.labels) - set(labels))
        if unknown:
            raise SparseMergeError(f"task {task}: {source.source} has labels {unknown} that the "
                                   f"head does not know ({', '.join(labels)})")
        remap = {i: labels.index(n) for i, n in enumerate(source.labels)}
        return LabeledData([dataclasses.replace(e, label=remap[e.label]) for e in source],
                           labels, source.source, source.skipped)
    from sparsemerge.hub import resolve_path

    path = resolve_path(source) if isinstance(source, str) else Path(source)
    spec = TASKS.get(task)
    if spec is not None and text_column is None and label_column is None:
        return read_table(path, text_column=spec.text_column,
                          text_pair_column=spec.text_pair_column, label_column=spec.label_column,
                          labels=labels, has_header=spec.has_header, columns=spec.columns,
                          file_format=spec.file_format, skip_bad_rows=skip_bad_rows)
    return read_table(path, text_column=text_column or "text", text_pair_column=text_pair_column,
                      label_column=label_column or "label", labels=labels,
                      skip_bad_rows=skip_bad_rows, has_header=has_header)


def predict_merged(path: str | Path, texts: Sequence[str], pairs: Sequence[str] | None = None,
                   *, tasks: Sequence[str] | None = None, batch_size: int = 32,
                   model: MultiHeadModel | None = None) -> dict[str, list[tuple[str, float]]]:
    """Load the merged model at ``path`` and return ``{task: [(label, prob)]}`` for ``texts``."""
    model = model or MultiHeadModel.from_pretrained(path)
    return model.predict(texts, pairs, tasks=tasks, batch_size=batch_size)


def evaluate_merged(path: str | Path, data: Mapping[str, Any], *, batch_size: int = 64,
                    model: MultiHeadModel | None = None, **options: Any
                    ) -> dict[str, dict[str, float]]:
    """Load the merged model at ``path`` and return ``{task: metrics}`` for ``{task: data}``
    (values and ``options`` as :func:`task_data` takes them)."""
    model = model or MultiHeadModel.from_pretrained(path)
    return model.evaluate(data, batch_size=batch_size, **options)


__all__ = ["MultiHeadModel", "evaluate_merged", "predict_merged",
           "task_data"]
