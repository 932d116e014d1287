"""``SparseCallback``: a :class:`~sparsemerge.train.sparse_model.SparseModel`'s step and
epoch hooks inside transformers' ``Trainer`` -- RIGSA's pruning rounds among them::

    model = get_sparse_model(model, SparseConfig(method="rigsa", method_params={...}))
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2))
    Trainer(model=model, args=args, train_dataset=..., callbacks=[SparseCallback()],
            optimizers=(optimizer, None)).train()

Any method runs with the callback; RIGSA needs it (without it no pruning round runs) and an
optimizer from ``model.param_groups``, whose named groups take the tensors each round
creates (the stepping rule: ``sparse_model``'s module docstring).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from sparsemerge.errors import SparseMergeError
from sparsemerge.train.sparse_model import SparseModel


def _sparse(model: Any) -> SparseModel:
    if not isinstance(model, SparseModel):
        raise SparseMergeError(f"SparseCallback drives a SparseModel, the Trainer's model is a "
                               f"{type(model).__name__}: pass get_sparse_model(...)'s result")
    return model


class SparseCallback(TrainerCallback):
    """Calls ``after_step`` after every optimizer step and ``end_of_epoch`` after every full
    epoch, handing the Trainer's optimizer over (see the module docstring)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        sparse = _sparse(model)
        method = sparse.require_method()
        method.check_schedule(epochs=args.num_train_epochs,
                              max_steps=args.max_steps if args.max_steps > 0 else None,
                              early_stopping=False)
        if method.replaces_tensors() and args.world_size > 1:
            raise SparseMergeError(
                f"method '{method.name}' replaces its trainable tensors while training, which "
                "a multi-process Trainer cannot follow (its DDP wrapper keeps the old ones): "
                "train it with `sparsemerge train` under torchrun")
        sparse.check_optimizer(optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    optimizer: Any = None, **kwargs: Any) -> None:
        _sparse(model).after_step(optimizer)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     optimizer: Any = None, **kwargs: Any) -> None:
        # The Trainer also ends an epoch cut short by max_steps; like the CLI trainer, the
        # epoch hooks (RIGSA's pruning) run after full epochs only.
        if state.epoch is not None and float(state.epoch).is_integer():
            _sparse(model).end_of_epoch(int(state.epoch) - 1, optimizer)


__all__ = ["SparseCallback"]
