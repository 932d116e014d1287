"""Every option of a training run, with its default, in one dataclass.

``TrainConfig`` is what the CLI fills, what a checkpoint records (a resumed run must match it),
and what the adapter's ``hyperparameters`` metadata stores (``to_dict``). Method-specific
options that are not common to several methods go in ``method_params`` and are validated
against the method's own declaration (``sparsemerge.train.methods``).

Defaults are tuned for the quickstart (MiniLM-L6, SST-2 subset, 2 CPU cores); see
``sparsemerge quickstart --help`` for what they reach.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsemerge.errors import SparseMergeError

SAVE_DTYPES = ("bf16", "fp16", "fp32")
IMPLS = ("fast", "autograd")
DEVICES = ("auto", "cpu", "cuda")
COMPUTE_DTYPES = ("fp32", "bf16", "fp16")

# Options that may differ between a run and its resumption (they do not change the result;
# ``device`` only its rounding: a run moved to another device resumes, not bit-exactly).
RESUME_FREE = frozenset({"resume", "quiet", "checkpoint_steps", "checkpoint_dir", "output",
                         "eval_batch_size", "device"})


@dataclass
class TrainConfig:
    """One training run. ``None`` means "not set" / "derive it" where noted."""

    # -- what to train ----------------------------------------------------------------------
    method: str = "sparta"
    method_params: dict[str, Any] = field(default_factory=dict)  # per-method extras
    base: str | None = None  # HF id or local dir; None = MiniLM-L6 from the demo extra
    gguf_file: str | None = None  # a .gguf file inside ``base`` (dequantised by transformers)
    label_tokens: list[str] | None = None  # instruction models: head rows from these tokens
    targets: str | None = None  # regex over backbone weight names; None = every linear layer
    density: float = 0.005  # share of each target's entries that is trainable (sparse methods)
    seed: int = 0  # mask, head init, dropout and data order

    # -- data -------------------------------------------------------------------------------
    task: str | None = None  # preset (sst2, cola, mrpc, sms_spam); None = train_file
    data_dir: str | None = None  # preset files' folder; None = the subset shipped with us
    train_file: str | None = None
    eval_file: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    labels: list[str] | None = None  # class names in id order; None = sorted unique labels
    task_name: str | None = None  # name of the head; default: task or the train file's stem
    skip_bad_rows: bool = False
    max_length: int = 128  # tokens; longer training examples are dropped (drop_long)
    drop_long: bool = True  # False: truncate instead (evaluation always truncates)
    max_train_examples: int | None = None  # use only the first N training rows

    # -- optimisation -----------------------------------------------------------------------
    lr: float = 2e-3  # trainable backbone entries (deltas, factors)
    head_lr: float | None = None  # None = 5 * lr
    weight_decay: float = 0.0  # on the method's parameters and the head weight (not biases)
    warmup_ratio: float = 0.06
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 32
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    impl: str = "fast"  # sparse-delta implementation: fast (SDDMM) or autograd (oracle)
    device: str = "auto"  # cpu, cuda or auto (CUDA when available); per rank: cuda:LOCAL_RANK
    dtype: str = "fp32"  # compute dtype: bf16 / fp16 autocast; weights and values stay fp32

    # -- evaluation and stopping ------------------------------------------------------------
    eval_steps: int | None = None  # evaluate every N steps; None = at the end of each epoch
    eval_batch_size: int = 64
    patience: int | None = None  # stop after N evaluations without a lower validation loss

    # -- output -----------------------------------------------------------------------------
    output: str | None = None  # adapter directory written at the end (rank 0 only)
    save_dtype: str = "bf16"  # dtype of the stored delta values
    checkpoint_steps: int | None = None  # write a checkpoint every N optimizer steps
    checkpoint_dir: str | None = None  # default: ``<output>.ckpt``
    resume: bool = False  # continue from the checkpoint (bit-exact with an uninterrupted run)
    quiet: bool = False  # no progress bar / log lines

    def __post_init__(self) -> None:
        self.validate()

    # -- derived ----------------------------------------------------------------------------
    @property
    def head_learning_rate(self) -> float:
        return self.head_lr if self.head_lr is not None else 5.0 * self.lr

    @property
    def checkpoint_path(self) -> Path | None:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        if self.output is not None:
            out = Path(self.output)
            return out.with_name(out.name + ".ckpt")
        return None

    def validate(self) -> None:
        """Raise SparseMergeError naming the first invalid option."""
        def bad(opt: str, msg: str) -> SparseMergeError:
            return SparseMergeError(f"--{opt.replace('_', '-')}: {msg}")

        if not 0.0 < float(self.density) <= 1.0:
            raise bad("density", f"must be in (0, 1], got {self.density}")
        for opt in ("lr", "batch_size", "max_length", "eval_batch_size"):
            if not getattr(self, opt) > 0:
                raise bad(opt, f"must be positive, got {getattr(self, opt)}")
        if self.head_lr is not None and self.head_lr < 0:
            raise bad("head_lr", f"must be >= 0, got {self.head_lr}")
        if self.weight_decay < 0:
            raise bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.epochs < 1:
            raise bad("epochs", f"must be >= 1, got {self.epochs}")
        for opt in ("max_steps", "eval_steps", "patience", "checkpoint_steps",
                    "max_train_examples"):
            v = getattr(self, opt)
            if v is not None and v < 1:
                raise bad(opt, f"must be >= 1, got {v}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise bad("grad_clip", f"must be > 0 (or unset), got {self.grad_clip}")
        if self.impl not in IMPLS:
            raise bad("impl", f"must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if self.device not in DEVICES:
            raise bad("device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in COMPUTE_DTYPES:
            raise bad("dtype", f"must be one of {', '.join(COMPUTE_DTYPES)}, "
                               f"got {self.dtype!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise bad("save_dtype", f"must be one of {', '.join(SAVE_DTYPES)}, "
                                    f"got {self.save_dtype!r}")
        if not 0 <= self.seed < 2**63:
            raise bad("seed", f"must be in [0, 2**63), got {self.seed}")
        if self.task is None and self.train_file is None:
            raise SparseMergeError("no training data: pass --task (sst2, cola, mrpc, ...) or "
                                   "--train-file with --text-column and --label-column")
        if self.task is not None and self.train_file is not None:
            raise SparseMergeError("pass either --task or --train-file, not both")
        if self.train_file is not None and (self.text_column is None
                                            or self.label_column is None):
            raise SparseMergeError("--train-file needs --text-column and --label-column")
        if self.task is None and self.data_dir is not None:
            raise SparseMergeError("--data-dir goes with --task (a preset); with --train-file "
                                   "give the file's path")
        if self.label_tokens is not None and not all(t for t in self.label_tokens):
            raise bad("label_tokens", "must be non-empty tokens, e.g. 'No,Yes'")
        if self.resume and self.checkpoint_path is None:
            raise bad("resume", "needs --checkpoint-dir or an output (-o) to find the "
                                "checkpoint in")

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SparseMergeError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def differences(self, other: TrainConfig) -> list[str]:
        """Options (other than RESUME_FREE ones) whose values differ."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in RESUME_FREE and a[k] != b[k]]
