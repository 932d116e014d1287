"""``SparseCallback``: a :class:`~sparsemerge.train.sparse_model.SparseModel`'s step and
epoch hooks inside transformers' ``Trainer`` -- RIGSA's pruning rounds among them::

    model = get_sparse_model(model, SparseConfig(method="rigsa", method_params={...}))
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2))
    Trainer(model=model, args=args, train_dataset=..., callbacks=[SparseCallback()],
            optimizers=(optimizer, None)).train()

Any method runs with the callback; RIGSA needs it (without it no pruning round runs) and an
optimizer from ``model.param_groups``, whose named groups take the tensors each round
creates (the stepping rule: ``sparse_model``'s module docstring).

Checkpoints (``save_steps``) hold the adapter's tensors and the method's state only, and
``trainer.train(resume_from_checkpoint=...)`` on a fresh ``get_sparse_model`` continues the
run bit-exactly, RIGSA's after a pruning round too (the rule: ``sparse_model``'s docstring).
For that the callback binds the optimizer (``SparseModel.bind_optimizer``), so pass it in
``Trainer(callbacks=[...])`` rather than ``add_callback``; and it runs the epoch-end work (a
pruning round) in the epoch's last step, before that step's checkpoint is written.

Multi-process (``torchrun``): DDP all-reduces the sparse values like any parameter and every
rank re-syncs its weights after each step, so a 2-process run equals one process with the
same global batch. The callback refuses a launched job the Trainer does not join (on CPUs
that needs ``TrainingArguments(use_cpu=True)``) and RIGSA, whose new tensors the DDP wrapper
would not see.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from sparsemerge.errors import SparseMergeError
from sparsemerge.train.distributed import launch_env
from sparsemerge.train.sparse_model import SparseModel


def _sparse(model: Any) -> SparseModel:
    if not isinstance(model, SparseModel):
        raise SparseMergeError(f"SparseCallback drives a SparseModel, the Trainer's model is a "
                               f"{type(model).__name__}: pass get_sparse_model(...)'s result")
    return model


class SparseCallback(TrainerCallback):
    """Calls ``after_step`` after every optimizer step and ``end_of_epoch`` after every full
    epoch, handing the Trainer's optimizer over (see the module docstring)."""

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is not None:  # else the Trainer builds it after loading a checkpoint
            _sparse(model).bind_optimizer(optimizer)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        sparse = _sparse(model)
        method = sparse.require_method()
        if (method.rebuild_optimizer and optimizer is not None and optimizer.state
                and not sparse.holds(optimizer)):
            raise SparseMergeError(
                f"the checkpoint replaced {method.name}'s trainable tensors, but the optimizer "
                "state was loaded onto the old ones: pass SparseCallback() in "
                "Trainer(callbacks=[...]) (not add_callback), or call "
                "model.bind_optimizer(optimizer) before train(resume_from_checkpoint=...)")
        sparse.sync_optimizer(optimizer)
        launch = launch_env()
        if launch is not None and args.world_size == 1:
            raise SparseMergeError(
                f"started as {launch.world_size} processes (torchrun / accelerate launch), but "
                "the Trainer runs each alone (TrainingArguments.world_size is 1): each would "
                "train on all the data and write the same files. On CPUs pass "
                "TrainingArguments(use_cpu=True), which joins the processes with gloo")
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
        sparse = _sparse(model)
        sparse.after_step(optimizer)
        # A whole epoch is done (state.epoch is set before this call): its work runs now,
        # before the Trainer checkpoints this step, not in on_epoch_end after it, which a
        # run resumed from that checkpoint would skip. An epoch cut short by max_steps is
        # not a whole one (the CLI trainer's rule too).
        if state.epoch is not None and float(state.epoch).is_integer():
            sparse.end_of_epoch(int(state.epoch) - 1, optimizer)


__all__ = ["SparseCallback"]
