"""``merge --learn-weights STEPS``: one merge weight per input and transformer block, learned.

Why: a merged backbone serves every task, but each task's head reads features moved by the
other tasks' deltas, and how much that hurts differs from block to block (``--calibrate``'s
one weight per input, searched on a noisy headline metric, cannot say "keep task A's deltas in
the early blocks, damp them in the late ones"). AdaMerging (Yang et al., ICLR 2024,
arXiv:2310.02575) learns such task-and-layer coefficients by gradient descent, minimising the
entropy of the merged model's predictions on unlabelled test inputs. Here each input's own
adapter is at hand, so the objective distils: the sum over tasks of KL(own adapter || merged
model) of the task's head (frozen), on held-out rows of the task's training data that its
adapter did not train on (``--calibrate N``'s rows; ``HELD_OUT_ROWS`` when no N is given; the
metadata says where they are; no labels are used and a dev split is never read). Measured on
SST-2 + MRPC and CoLA + SMS spam (MiniLM-L6, README "Merging unrelated tasks"), both
alternatives lose: cross-entropy on the rows the adapters trained on amplified SST-2's deltas
(SST-2 -4.01), and KL on those rows is near zero from the start (0.013 for CoLA: an adapter
keeps its training rows under merging) while the dev split loses 9 points.

What is learned: for input ``i`` and block ``b`` (:func:`~sparsemerge.merge.stats.layer_of`:
``encoder.layer.3``, ``model.layers.12``; embeddings, poolers, ... share ``other``) a factor
``c[i, b] >= 0``, starting at 1, on top of the input's weight ``w_i``: the merged delta of a
tensor in block ``b`` is ``lam * sum_i w_i * c[i, b] * delta_i``. That is linear in the
deltas, so only the linear operators (``sum``, ``weighted``) take it; the output is that
operator's merge of the inputs scaled by ``c``. Cost per step, per task (batch 32): one
forward with the task's own deltas added in place and undone (the teacher), one forward and
backward on weights rebuilt by ``index_add`` from the sparse deltas (the merged model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sparsemerge.adapter import SparseAdapter, TargetDelta
from sparsemerge.errors import SparseMergeError
from sparsemerge.merge.calibrate import base_multihead, training_batches
from sparsemerge.merge.engine import input_label
from sparsemerge.merge.operators import Sum, get_operator
from sparsemerge.merge.stats import layer_of

LEARNING_RATE = 1e-2  # Adam on the factors: a factor moves by up to ~0.01 per step
HELD_OUT_ROWS = 300  # per task, when the recipe gives no --calibrate N


def learn_weights(adapters: Sequence[SparseAdapter], method: str, params: Mapping[str, Any],
                  weights: Sequence[float], steps: int, *, rows: int | None = None,
                  base: str | None = None,
                  gguf_file: str | None = None, device: str = "auto", batch_size: int = 32,
                  seed: int = 0, progress: Callable[[str, int, int], None] | None = None
                  ) -> dict[str, Any]:
    """``{"adapters": the inputs with every delta scaled by its learned factor, "record"}``
    (see the module doc), learned on ``rows`` held-out rows per task (None:
    ``HELD_OUT_ROWS``); merge the returned adapters with the same method and weights."""
    import torch
    import torch.nn.functional as F

    from sparsemerge.apply import add_deltas

    if steps < 1:
        raise SparseMergeError(f"--learn-weights {steps}: give a number of steps (>= 1)")
    if not issubclass(get_operator(method), Sum):
        raise SparseMergeError(f"--learn-weights learns factors of a linear merge: use method "
                               f"sum or weighted, not {method!r}")
    tasks: list[tuple[int, str]] = [(i, t) for i, a in enumerate(adapters) for t in a.heads]
    if not tasks:
        raise SparseMergeError("--learn-weights needs inputs with a task head each")
    heads = {t: adapters[i].heads[t] for i, t in tasks}
    model, tensors = base_multihead(heads, base, gguf_file, device)
    model.eval().requires_grad_(False)
    dev = next(model.parameters()).device
    names = sorted({n for a in adapters for n in a.targets})
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SparseMergeError(f"--learn-weights: the base has no tensor {missing[0]!r} that "
                               "an input changes")
    blocks = sorted({layer_of(n) for n in names})
    lam = float(get_operator(method).validate_params(dict(params))["lam"])
    # per target: every input's entries concatenated, with the row of c each one reads
    plan = []
    for name in names:
        idx, vals, owner = [], [], []
        for i, a in enumerate(adapters):
            if name in a.targets:
                d = a.targets[name].sparse_delta(name)
                idx.append(d.indices.long())
                vals.append(d.values.float() * (lam * float(weights[i])))
                owner.append(torch.full((d.nnz,), i, dtype=torch.long))
        plan.append((f"backbone.{name}", tensors[name], blocks.index(layer_of(name)),
                     torch.cat(idx).to(dev), torch.cat(vals).to(dev), torch.cat(owner).to(dev)))
    factors = torch.ones(len(adapters), len(blocks), device=dev, requires_grad=True)
    opt = torch.optim.Adam([factors], lr=LEARNING_RATE)
    streams = {t: training_batches(model, adapters[i], i, t, "--learn-weights",
                                   batch_size=batch_size, seed=seed,
                                   held_out=rows or HELD_OUT_ROWS) for i, t in tasks}
    losses: list[dict[str, float]] = []
    for step in range(steps):
        merged = {}
        for key, w0, block, idx, vals, owner in plan:
            flat = w0.detach().reshape(-1).float().index_add(0, idx, vals * factors[owner, block])
            merged[key] = flat.view(w0.shape).to(w0.dtype)
        step_losses = {}
        total = 0.0
        for i, task in tasks:
            batch = next(streams[task][0])
            with torch.no_grad():  # the teacher: the task's own adapter alone
                handle = add_deltas(tensors, adapters[i])
                try:
                    own = model(**batch, tasks=[task])[task].float()
                finally:
                    handle.undo()
            logits = torch.func.functional_call(model, merged, (), {**batch, "tasks": [task]})
            loss = F.kl_div(F.log_softmax(logits[task].float(), -1), F.log_softmax(own, -1),
                            log_target=True, reduction="batchmean")
            total = total + loss
            step_losses[task] = float(loss.detach())
        opt.zero_grad()
        total.backward()
        opt.step()
        with torch.no_grad():
            factors.clamp_(min=0.0)
        losses.append(step_losses)
        if progress:
            progress("learn", step + 1, steps)
    learned = factors.detach().cpu()
    scaled = [_scaled(a, {b: float(learned[i, j]) for j, b in enumerate(blocks)})
              for i, a in enumerate(adapters)]
    head_tail = losses[-10:]
    record = {
        "steps": steps, "lr": LEARNING_RATE, "batch_size": batch_size,
        "objective": "sum over tasks of KL(own adapter || merged model) of the task's head, "
                     "on held-out training rows",
        "rows": {t: streams[t][1] for _, t in tasks},
        "factors": {input_label(a, i): {b: round(float(learned[i, j]), 4)
                                        for j, b in enumerate(blocks)}
                    for i, a in enumerate(adapters)},
        "first_loss": losses[0],
        "last_loss": {t: round(sum(s[t] for s in head_tail) / len(head_tail), 4)
                      for _, t in tasks},
    }
    return {"adapters": scaled, "record": record}


def _scaled(adapter: SparseAdapter, factor: Mapping[str, float]) -> SparseAdapter:
    """``adapter`` with each target's effective delta multiplied by its block's factor."""
    targets = {}
    for name, t in adapter.targets.items():
        d = t.sparse_delta(name)
        targets[name] = TargetDelta(shape=t.shape, sparse=dataclasses.replace(
            d, values=d.values * factor[layer_of(name)]))
    return dataclasses.replace(adapter, targets=targets)


__all__ = ["learn_weights"]
