"""``merge --calibrate N``: merge weights chosen on held-out rows of each task's training data.

Why: merging adds every task's delta to one backbone, so each head reads features moved by
the other tasks' deltas, and tasks differ in how much they tolerate; uniform weights can
sacrifice one task for the others. Calibration searches the per-input weights (and the
operator's ``density`` / ``lam`` when it declares them) for the merge whose *worst* task
stays closest to its own adapter.

Data: each input records its training data in its metadata (``hyperparameters``: the preset
``task`` and ``data_dir``, or ``train_file`` with its columns and labels, and
``max_train_examples``), read again through the training loop's own reader
(:func:`sparsemerge.train.loop.load_train`), which never opens a dev split. The slice is the
``N`` training rows right after those the adapter trained on (``max_train_examples``); when
it trained on every row, the last ``N`` rows (recorded as ``seen_in_training``).

Objective: on its slice, a task's score is the merged model's headline metric minus its own
adapter's (the preset's first metric, e.g. CoLA's Matthews and MRPC's F1, which can fall while
accuracy does not; accuracy for other data); a candidate's score is its worst task's, ties
broken by the worst increase in loss. Search: coordinate ascent from the given weights and
parameters over small grids, taking a move only when it improves the score, so the result is
never worse on the slices than what it started from (uniform weights, by default). A slice of a
few hundred rows is noisy (one row of 300 is 0.33 points): the bench measures whether the
choice carries over to the dev splits.

``merge --refit-heads STEPS`` (:func:`refit_heads`) retrains each head, backbone frozen, on
the merged backbone's features of the rows its adapter trained on.

Related work: per-task merge coefficients searched for the merged model (task arithmetic's
scaling on validation data, Ilharco et al., ICLR 2023, arXiv:2212.04089; learned per task
and layer in AdaMerging, Yang et al., ICLR 2024, arXiv:2310.02575); refitting the task heads
on the merged representation corrects the representation bias that Representation Surgery
(Yang et al., ICML 2024, arXiv:2402.02705) fixes with an extra module.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sparsemerge.adapter import Head, SparseAdapter
from sparsemerge.errors import SparseMergeError
from sparsemerge.merge.engine import input_label, merge_adapters
from sparsemerge.merge.operators import get_operator

WEIGHT_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
PARAM_GRIDS = {"density": (0.2, 0.5, 0.8, 1.0), "lam": (0.75, 1.0, 1.25, 1.5)}
ROUNDS = 2
Score = tuple[float, float]


def training_data(adapter: SparseAdapter, where: str, option: str):
    """(the adapter's whole training split, its TrainConfig), as its metadata records them."""
    from sparsemerge.train.config import TrainConfig
    from sparsemerge.train.loop import load_train

    hp = adapter.hyperparameters
    if hp.get("objective", "classification") != "classification" or not (
            hp.get("task") or hp.get("train_file")):
        raise SparseMergeError(f"{where}: its metadata records no classification training "
                               f"data (task or train_file); {option} needs adapters trained "
                               "by sparsemerge train")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig.from_dict({k: v for k, v in hp.items() if k in known})
    try:
        return load_train(cfg), cfg
    except SparseMergeError as exc:
        raise SparseMergeError(f"{where}: cannot read its training data for {option} "
                               f"(run merge from the folder it was trained in): {exc}") from None


def headline_metric(adapter: SparseAdapter) -> str:
    """The metric calibration compares for ``adapter``'s task: its preset's first, else
    accuracy."""
    from sparsemerge.data.tasks import TASKS

    task = adapter.hyperparameters.get("task")
    return TASKS[task].metrics[0] if task in TASKS else "accuracy"


def holdout(adapter: SparseAdapter, n: int, where: str):
    """(``n`` held-out training rows of ``adapter``'s task, a record of which rows)."""
    rows, record, _ = _rows(adapter, n, where, "--calibrate")
    return rows, record


def _rows(adapter: SparseAdapter, n: int | None, where: str, option: str):
    """(rows, a record of which, the adapter's TrainConfig): ``n`` None = the rows the
    adapter trained on; else ``n`` rows right after them (the last ``n`` when it trained on
    every row, recorded as ``seen_in_training``)."""
    full, cfg = training_data(adapter, where, option)
    used = min(cfg.max_train_examples or len(full), len(full))
    if n is None:
        return full.select(range(used)), {"source": full.source, "rows": [0, used]}, cfg
    seen = len(full) - used < n
    start = max(0, len(full) - n) if seen else used
    stop = min(start + n, len(full))
    return full.select(range(start, stop)), {"source": full.source, "rows": [start, stop],
                                              "seen_in_training": seen}, cfg


def base_multihead(heads: Mapping[str, Head], base: str | None, gguf_file: str | None,
                   device: str):
    """(the base backbone with ``heads`` as a MultiHeadModel on ``device``, its tensors by
    name, for deltas applied in place)."""
    from sparsemerge.formats.merged import head_config
    from sparsemerge.models import (
        load_backbone,
        load_tokenizer,
        named_base_tensors,
        resolve_pad_token_id,
    )
    from sparsemerge.multihead import MultiHeadModel
    from sparsemerge.task_heads import head_model
    from sparsemerge.train.distributed import resolve_device

    backbone = load_backbone(base, gguf_file)
    tok = load_tokenizer(base, gguf_file)
    pad = resolve_pad_token_id(tok)
    models, cfgs = {}, {}
    for task, head in heads.items():
        cfgs[task] = head_config(task, module=head.module, labels=head.labels,
                                 problem_type=head.problem_type, hidden_size=None,
                                 architecture="", pad_token_id=pad, prompt=head.prompt)
        models[task] = head_model(backbone.config, cfgs[task], head.params,
                                  next(backbone.parameters()).dtype)
    model = MultiHeadModel(backbone, models, tok, cfgs).to(resolve_device(device))
    return model, named_base_tensors(model.backbone)


class _SliceScorer:
    """The base backbone with every input's head, scoring merged deltas applied in place."""

    def __init__(self, adapters: Sequence[SparseAdapter], data: Mapping[str, Any],
                 base: str | None, gguf_file: str | None, device: str):
        heads = {t: h for a in adapters for t, h in a.heads.items()}
        self.model, self.tensors = base_multihead(heads, base, gguf_file, device)
        self.data = data

    def score(self, adapter: SparseAdapter, tasks: Sequence[str], *, check: bool = False
              ) -> dict[str, dict[str, float]]:
        from sparsemerge.apply import add_deltas, apply_to_tensors

        handle = (apply_to_tensors(self.tensors, adapter) if check
                  else add_deltas(self.tensors, adapter))
        try:
            return self.model.evaluate({t: self.data[t] for t in tasks})
        finally:
            handle.undo()


def calibrate(adapters: Sequence[SparseAdapter], method: str, params: Mapping[str, Any],
              weights: Sequence[float], n: int, *, base: str | None = None,
              gguf_file: str | None = None, device: str = "auto",
              progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """``{"weights", "parameters", "record"}``: the best merge found on ``n`` held-out training
    rows per task (see the module doc); ``record`` says which rows and every score."""
    if n < 1:
        raise SparseMergeError(f"--calibrate {n}: give a number of examples per task (>= 1)")
    tasks: list[str] = []
    for i, a in enumerate(adapters):
        if len(a.heads) != 1:
            raise SparseMergeError(f"{input_label(a, i)} has {len(a.heads)} heads; --calibrate "
                                   "needs inputs with exactly one head each")
        tasks.append(next(iter(a.heads)))
    data, slices = {}, {}
    for i, (task, a) in enumerate(zip(tasks, adapters, strict=True)):
        data[task], slices[task] = holdout(a, n, input_label(a, i))
    scorer = _SliceScorer(adapters, data, base, gguf_file, device)
    single = {t: scorer.score(a, [t], check=True)[t] for t, a in zip(tasks, adapters, strict=True)}
    metric = {t: headline_metric(a) for t, a in zip(tasks, adapters, strict=True)}
    op_params = {p.name for p in get_operator(method).params}
    coords: list[tuple[str, int | None, tuple]] = [("weight", i, WEIGHT_GRID)
                                                   for i in range(len(adapters))]
    coords += [(p, None, grid) for p, grid in PARAM_GRIDS.items() if p in op_params]
    budget = 1 + ROUNDS * sum(len(grid) for _, _, grid in coords)  # at most; memo saves some
    memo: dict[tuple, tuple[Score, dict[str, float]]] = {}

    def evaluate(ws: tuple[float, ...], ps: tuple[tuple[str, Any], ...]) -> Score:
        if (ws, ps) not in memo:
            merged = merge_adapters(adapters, method, dict(ps), list(ws))
            m = scorer.score(merged, tasks)
            gaps = {t: 100 * (m[t][metric[t]] - single[t][metric[t]]) for t in tasks}
            worst_loss = max(m[t]["loss"] - single[t]["loss"] for t in tasks)
            memo[ws, ps] = (min(gaps.values()), -worst_loss), gaps
            if progress:
                progress("calibrate", len(memo), budget)
        return memo[ws, ps][0]

    start = (tuple(float(w) for w in weights), tuple(sorted(params.items())))
    best, best_score = start, evaluate(*start)
    for _ in range(ROUNDS):
        moved = False
        for name, i, grid in coords:
            for value in grid:
                ws, ps = best
                if i is not None:
                    ws = ws[:i] + (float(value),) + ws[i + 1:]
                else:
                    ps = tuple(sorted({**dict(ps), name: value}.items()))
                score = evaluate(ws, ps)
                if score > best_score:
                    best, best_score, moved = (ws, ps), score, True
        if not moved:
            break
    record = {
        "examples_per_task": n, "slices": slices,
        "objective": "max of the worst task's (merged - own adapter) headline metric on its "
                     "slice, ties broken by the worst loss increase",
        "metric": metric,
        "single": {t: round(100 * s[metric[t]], 2) for t, s in single.items()},
        "start": {"weights": list(start[0]), "parameters": dict(start[1]),
                  "change": {t: round(v, 2) for t, v in memo[start][1].items()}},
        "chosen": {"weights": list(best[0]), "parameters": dict(best[1]),
                   "change": {t: round(v, 2) for t, v in memo[best][1].items()}},
        "candidates": len(memo),
    }
    return {"weights": list(best[0]), "parameters": dict(best[1]), "record": record}


def training_batches(model, adapter: SparseAdapter, index: int, task: str, option: str, *,
                     batch_size: int, seed: int, held_out: int | None = None
                     ) -> tuple[Iterator[dict], dict[str, Any], Any]:
    """(endless shuffled batches, on ``model``'s device, of the training rows ``adapter``
    trained on for its head ``task`` -- or, with ``held_out`` N, of N rows it did not train
    on (as :func:`holdout`); a record of which rows; the adapter's TrainConfig), for the
    merge-time steps that fit something to the merged backbone (``option`` names them)."""
    from sparsemerge.data.batching import batches
    from sparsemerge.multihead import task_data
    from sparsemerge.scoring import encode_for, on_model_device

    head = adapter.heads[task]
    if head.problem_type != "single_label_classification":
        raise SparseMergeError(f"head {task}: {option} fits single-label classification heads, "
                               f"not {head.problem_type}")
    rows, record, cfg = _rows(adapter, held_out, input_label(adapter, index), option)
    data = task_data(task, rows, head.labels)
    encoded = encode_for(model.backbone, model.tokenizer, data, cfg.max_length,
                         model.template(task))

    def endless() -> Iterator[dict]:
        for epoch in itertools.count():
            for batch in batches(encoded, batch_size, True, seed, epoch):
                yield on_model_device(model, batch)

    return endless(), record, cfg


def refit_heads(merged: SparseAdapter, adapters: Sequence[SparseAdapter], steps: int, *,
                base: str | None = None, gguf_file: str | None = None, device: str = "auto",
                batch_size: int = 32, seed: int = 0,
                progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Retrain every head of ``merged`` for ``steps`` steps on its merged backbone (frozen),
    on the training rows its input adapter trained on; the new heads replace
    ``merged.heads`` (the inputs' heads are not touched). Returns ``{task: record}``.

    Why: each head was fitted to features of the base plus its own delta only; on the merged
    backbone the features move, and a head is small enough to refit in seconds."""
    import torch
    import torch.nn.functional as F

    from sparsemerge.apply import apply_to_tensors

    if steps < 1:
        raise SparseMergeError(f"--refit-heads {steps}: give a number of steps (>= 1)")
    model, tensors = base_multihead(merged.heads, base, gguf_file, device)
    model.eval().requires_grad_(False)
    handle = apply_to_tensors(tensors, merged)
    record: dict[str, Any] = {}
    try:
        for i, a in enumerate(adapters):
            for task in a.heads:
                head = merged.heads[task]
                rows, rows_record, cfg = training_batches(
                    model, a, i, task, "--refit-heads", batch_size=batch_size, seed=seed)
                module = getattr(model.heads[task], head.module)
                module.requires_grad_(True)
                opt = torch.optim.AdamW(module.parameters(), lr=cfg.head_learning_rate,
                                        weight_decay=cfg.decay_rate)
                losses: list[float] = []
                for batch in itertools.islice(rows, steps):
                    logits = model(**batch, tasks=[task])[task].float()
                    loss = F.cross_entropy(logits, batch["labels"])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                module.requires_grad_(False)
                params = {n: p.detach().cpu().to(head.params[n].dtype)
                          for n, p in module.named_parameters()}
                merged.heads[task] = dataclasses.replace(head, params=params)
                tail = losses[-10:]
                record[task] = {"steps": steps, **rows_record, "lr": cfg.head_learning_rate,
                                "first_loss": round(losses[0], 4),
                                "last_loss": round(sum(tail) / len(tail), 4)}
                if progress:
                    progress("refit", len(record), len(merged.heads))
    finally:
        handle.undo()
    return record


__all__ = ["base_multihead", "calibrate", "holdout", "refit_heads", "training_batches",
           "training_data"]
