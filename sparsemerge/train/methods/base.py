"""What a training method is: one small class the one training loop drives.

A method declares, in one place (``name``, ``summary``, ``reference``, ``params``), what it
is and which options it takes; the CLI help, option validation and the adapter's metadata are
derived from that declaration. A method is driven by :class:`~sparsemerge.train.sparse_model.
SparseModel` (``get_sparse_model``), which the user's own loop or the CLI trainer
(``sparsemerge.train.loop``) trains; they own everything else: data, the optimizer and
schedule, evaluation, checkpoints.

Life of a method inside a ``SparseModel``::

    method = get_method(config.method)(config)       # params resolved + validated here
    method.check_schedule(epochs=..., max_steps=..., early_stopping=...)  # by the trainer
    groups = method.prepare(model, target_names, config, batches=...)  # make trainables
    # (or method.start_from(model, target_names, config, adapter.targets): from a saved one)
    for each step:
        loss.backward(); clip; optimizer.step(); scheduler.step()
        method.after_step()                           # e.g. re-sync merged weights
    at the end of each epoch: method.end_of_epoch(epoch)  # e.g. prune (RIGSA)
    targets = method.export()                         # {backbone weight name: TargetDelta}
    method.remove()                                   # model back to the base weights

Before ``prepare`` the ``SparseModel`` freezes every parameter of the task model and
unfreezes the classification head (trained and exported with the adapter). ``prepare``
makes the method's own parameters trainable and returns them as optimizer param groups
(dicts with ``params``, a ``name`` and optionally ``weight_decay`` / ``lr``;
``SparseModel.param_groups`` fills in the defaults). Trainable tensors must be registered on
the model as ``nn.Parameter`` (so ``model.named_parameters()`` finds them: checkpoints save
every trainable parameter by name, and DDP all-reduces their gradients).

Checkpoints: the loop saves every ``requires_grad`` parameter of the model by name, the
optimizer and scheduler state, RNG states and the position. A method with more state (a
mask that changes while training, a pruning round) returns it from ``state_dict`` and
restores it in ``load_state_dict``, which the loop calls *before* loading the parameter
values and before building the optimizer from ``param_groups()``. A method that changes
its set of trainable tensors (e.g. after pruning) says so in ``replaces_tensors`` and sets
``self.rebuild_optimizer = True`` when it did; ``SparseModel`` then puts the new tensors into
the optimizer's groups of the same names (learning-rate schedule kept).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from sparsemerge.declare import Declared
from sparsemerge.errors import SparseMergeError

if TYPE_CHECKING:
    from sparsemerge.adapter import TargetDelta
    from sparsemerge.train.config import SparseConfig


class Method(Declared):
    """Base class of training methods (SpaRTA, RIGSA, Partial-LoRA, baselines)."""

    kind = "method"
    #: Does the method train entries of the backbone's target tensors (``--targets``)?
    uses_targets: ClassVar[bool] = True
    _abstract = True

    def __init__(self, config: SparseConfig) -> None:
        self.config = config
        self.hparams: dict[str, Any] = self.resolve_params(config)
        self.rebuild_optimizer = False
        self._groups: list[dict[str, Any]] = []

    @classmethod
    def resolve_params(cls, config: SparseConfig) -> dict[str, Any]:
        """Each declared param from ``config.method_params``, else the config field of the
        same name (e.g. ``density``), else its default; converted and validated."""
        cls.reject_unknown(config.method_params)
        where = f"method '{cls.name}': "
        out = {}
        for p in cls.params:
            value = config.method_params.get(p.name, getattr(config, p.name, p.default))
            out[p.name] = value if value is None and p.default is None else p.check(value, where)
        return out

    # -- hooks ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, target_names: list[str], config: SparseConfig, *,
                batches: Callable[[], Iterator[dict]] | None = None) -> list[dict[str, Any]]:
        """Make the method's parameters trainable; return optimizer param groups.

        ``model`` is the task model (backbone + head), all frozen; ``target_names`` are
        backbone weight names (``backbone_of(model).get_parameter(name)``). ``batches``
        yields a few training batches, for methods that look at task data first.
        """
        raise NotImplementedError

    def start_from(self, model: nn.Module, target_names: list[str], config: SparseConfig,
                   targets: dict[str, TargetDelta]) -> list[dict[str, Any]]:
        """``prepare``, starting from a saved adapter's deltas ``targets`` (what ``export``
        gave) rather than the method's init (``SparseModel.from_pretrained(...,
        is_trainable=True)``). Default: refuse, as an adapter without the method's training
        state cannot continue its run."""
        raise SparseMergeError(
            f"method '{self.name}': a saved adapter does not hold its training state, so "
            "training cannot continue from it; resume the run from a checkpoint instead "
            "(Trainer.train(resume_from_checkpoint=...), sparsemerge train --resume), or load "
            "it with is_trainable=False to apply it frozen")

    def param_groups(self) -> list[dict[str, Any]]:
        """The current optimizer param groups (what ``prepare`` returned, by default)."""
        return self._groups

    def check_schedule(self, *, epochs: float, max_steps: int | None,
                       early_stopping: bool) -> None:
        """Raise SparseMergeError if the method cannot run on this schedule (default: any)."""

    def replaces_tensors(self) -> bool:
        """Will the method replace its trainable tensors while training (e.g. RIGSA's
        pruning)? Then the optimizer's groups must be named as ``param_groups()``'s."""
        return False

    def after_step(self) -> None:
        """Called after every optimizer step."""

    def end_of_epoch(self, epoch: int) -> None:
        """Called after each epoch's last step (before evaluation); ``epoch`` counts from 0."""

    def export(self) -> dict[str, TargetDelta]:
        """The trained change, per backbone weight name."""
        raise NotImplementedError

    def remove(self) -> None:
        """Detach from the model and restore the base weights exactly."""

    def round_values(self, dtype: str) -> None:
        """Round the trained values to the storage dtype in place (what the adapter keeps),
        so the final evaluation scores exactly what is saved. Default: nothing to round."""

    def num_trainable(self) -> int:
        """Trainable scalars of the method (the head not included)."""
        return sum(p.numel() for g in self.param_groups() for p in g["params"]
                   if p.requires_grad)

    def state_dict(self) -> dict[str, Any]:
        """Method state beyond the trainable parameters' values (for checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise SparseMergeError(f"method '{self.name}' has no checkpoint state to restore")

    def info(self) -> dict[str, Any]:
        """Extra facts for the adapter's metadata and the run summary."""
        return {}
