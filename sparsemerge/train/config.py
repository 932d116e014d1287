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
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sparsemerge.errors import DataError, SparseMergeError

if TYPE_CHECKING:
    from sparsemerge.data.templates import PromptTemplate

SAVE_DTYPES = ("bf16", "fp16", "fp32")
IMPLS = ("fast", "autograd")
DEVICES = ("auto", "cpu", "cuda")
COMPUTE_DTYPES = ("fp32", "bf16", "fp16")
BASE_DTYPES = ("auto", *COMPUTE_DTYPES)  # auto: the checkpoint's own dtype
OBJECTIVES = ("classification", "lm")

HEAD_LR_FACTOR = 5.0  # the head's default learning rate, in multiples of the method's
DEFAULT_LR = 2e-3  # ``--lr auto`` for every method but SpaRTA (their former fixed default)
SPARTA_LR_X_DENSITY = 1.57e-4  # SpaRTA's ``--lr auto`` is this / density (see sparta_auto_lr)
SPARTA_LR_MAX = 2e-2  # ... capped here: the best rate measured at 0.5%; tiny densities diverge
SPARTA_AUTO_HEAD_LR = 5e-3  # SpaRTA's head with ``--lr auto``: fixed, since the head is dense
SPARTA_AUTO_WEIGHT_DECAY = 1.0  # SpaRTA's ``--weight-decay auto`` (see sparta_auto_lr); others 0


def sparta_auto_lr(density: float) -> float:
    """SpaRTA's default learning rate: ``1.57e-4 / density``, at most ``SPARTA_LR_MAX``.

    Adam moves every trainable entry by about ``lr`` per step whatever the density, while the
    number of trainable entries per weight row scales with the density; so a step changes a
    layer's output by about ``lr x density``, and keeping that product fixed keeps training
    equally fast at every density. The constant is the best rate measured at LoRA r=8's count
    (issue 19, MiniLM-L6, 3 epochs, decay 1.0, 3 seeds: at 3.14% lr 5e-3 gave MRPC 80.80 and
    CoLA 25.12 against 79.90 / 25.27 at 3.19e-3, MRPC 79.66 at 7e-3; 1e-3 and 1.6e-3 fell
    below 79 on seed 0); the cap is the rate measured at 0.5% (MRPC 79.33, against 73.04 at the
    former fixed 2e-3). At 5% it gives 3.14e-3.

    Such a rate moves every entry, the ones whose gradient is mostly noise included, by ``lr``
    per step: left alone they random-walk to 4-7x a typical weight (0.27 at 0.5%, lr 2e-2),
    which costs accuracy on small data and ruins merges. SpaRTA's default decoupled weight
    decay (``SPARTA_AUTO_WEIGHT_DECAY``, as RIGSA's ``delta_decay``) pulls them back: with
    ``lr x decay`` = 2% per step the noise stays near 0.06 while consistent gradients still
    move their entries (issues 19/20, 0.5%: CoLA alone 7.8 -> 21.9 Matthews, a SST-2+CoLA
    merge loses 1.8 points instead of 14.7).
    """
    return min(SPARTA_LR_MAX, SPARTA_LR_X_DENSITY / float(density))


def auto_weight_decay(method: str) -> float:
    """``--weight-decay auto``: ``SPARTA_AUTO_WEIGHT_DECAY`` for SpaRTA, 0 for the others."""
    return SPARTA_AUTO_WEIGHT_DECAY if method == "sparta" else 0.0


def check_method_options(config: SparseConfig | TrainConfig) -> None:
    """The checks of the options :class:`SparseConfig` and :class:`TrainConfig` share."""
    if not 0.0 < float(config.density) <= 1.0:
        raise SparseMergeError(f"--density: must be in (0, 1], got {config.density}")
    if config.impl not in IMPLS:
        raise SparseMergeError(f"--impl: must be one of {', '.join(IMPLS)}, "
                               f"got {config.impl!r}")
    if not 0 <= config.seed < 2**63:
        raise SparseMergeError(f"--seed: must be in [0, 2**63), got {config.seed}")
    if config.mask_exclude and config.method != "sparta":
        raise SparseMergeError(f"--mask-exclude: is for --method sparta (random masks); "
                               f"{config.method} chooses its entries itself")


@dataclass
class SparseConfig:
    """What an adapter trains: the method and its options (``get_sparse_model``'s config).

    The CLI trainer builds it from its :class:`TrainConfig` (``TrainConfig.sparse()``).
    Options of one method go in ``method_params`` (``-p`` on the CLI), checked against the
    method's declaration when the method is built.
    """

    method: str = "sparta"  # sparta, rigsa, partial-lora, lora, full, head
    density: float = 0.005  # share of each target's entries that is trainable (sparse methods)
    targets: str | None = None  # regex over backbone weight names; None = every linear layer
    seed: int = 0  # masks, seeded inits and the head's init
    method_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"rounds": 3}
    task_name: str = "task"  # the head's name in the saved adapter (merge --heads uses it)
    impl: str = "fast"  # sparse-delta implementation: fast (SDDMM) or autograd (oracle)
    quiet: bool = False  # no log lines (RIGSA's pruning rounds)
    # SpaRTA: adapters (paths, hf://) whose entries the random masks avoid (disjoint masks)
    mask_exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from sparsemerge.formats.merged import check_task_name

        check_method_options(self)
        check_task_name(self.task_name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that may differ between a run and its resumption (they do not change the result;
# ``device`` only its rounding: a run moved to another device resumes, not bit-exactly).
RESUME_FREE = frozenset({"resume", "quiet", "checkpoint_steps", "checkpoint_dir", "output",
                         "eval_batch_size", "device"})
# Fields that ``sparsemerge train`` has no flag for (Python API only): errors name them as
# ``TrainConfig.<field>``, every other field as its ``--flag`` (checked by a test).
API_ONLY = frozenset({"drop_long", "max_train_examples", "grad_clip", "eval_batch_size"})


@dataclass
class TrainConfig:
    """One training run. ``None`` means "not set" / "derive it" where noted."""

    # -- what to train ----------------------------------------------------------------------
    method: str = "sparta"
    objective: str = "classification"  # or "lm": causal-LM loss on the response tokens only
    method_params: dict[str, Any] = field(default_factory=dict)  # per-method extras
    base: str | None = None  # HF id or local dir; None = MiniLM-L6 from the demo extra
    gguf_file: str | None = None  # a .gguf file inside ``base`` (dequantised by transformers)
    label_tokens: list[str] | None = None  # instruction models: head rows from these tokens
    template: str | None = None  # prompt: a format string over the data's columns
    chat_template: bool = False  # wrap the filled template (lm: each conversation) as chat
    targets: str | None = None  # regex over backbone weight names; None = every linear layer
    density: float = 0.005  # share of each target's entries that is trainable (sparse methods)
    seed: int = 0  # mask, head init, dropout and data order
    mask_exclude: list[str] | None = None  # SpaRTA: adapters whose entries the masks avoid

    # -- data -------------------------------------------------------------------------------
    task: str | None = None  # preset (sst2, cola, mrpc, sms_spam); None = train_file
    data_dir: str | None = None  # preset files' folder; None = the subset shipped with us
    train_file: str | None = None
    eval_file: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    labels: list[str] | None = None  # class names in id order; None = sorted unique labels
    task_name: str | None = None  # name of the head; default: see head_name()
    prompt_column: str | None = None  # lm: the prompt column (default "prompt")
    response_column: str | None = None  # lm: the response column (default "response")
    messages_column: str | None = None  # lm: a column of chat messages instead
    skip_bad_rows: bool = False
    no_header: bool = False  # CSV/TSV files have no header row: columns are 0-based indexes
    max_length: int = 128  # tokens; longer training examples are truncated, end kept
    drop_long: bool = False  # True: drop them instead (evaluation always truncates)
    max_train_examples: int | None = None  # use only the first N training rows

    # -- optimisation -----------------------------------------------------------------------
    lr: float | str = "auto"  # trainable backbone entries (deltas, factors); see learning_rate
    head_lr: float | None = None  # None = 5 * lr (SpaRTA with lr "auto": SPARTA_AUTO_HEAD_LR)
    weight_decay: float | str = "auto"  # deltas/factors and head weight; see decay_rate
    warmup_ratio: float = 0.06
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 32
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    impl: str = "fast"  # sparse-delta implementation: fast (SDDMM) or autograd (oracle)
    device: str = "auto"  # cpu, cuda or auto (CUDA when available); per rank: cuda:LOCAL_RANK
    dtype: str = "fp32"  # compute dtype: bf16 / fp16 autocast (see docs/NUMERICS.md)
    base_dtype: str = "auto"  # dtype the frozen base is loaded in; auto = the checkpoint's
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)

    # -- evaluation and stopping ------------------------------------------------------------
    eval_steps: int | None = None  # evaluate every N steps; None = at the end of each epoch
    eval_batch_size: int = 64
    eval_generate: int | None = None  # lm: greedy answers of up to N tokens, exact match
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
    def learning_rate(self) -> float:
        """``lr`` as a number: ``"auto"`` is :func:`sparta_auto_lr` of the density for
        SpaRTA, ``DEFAULT_LR`` for the other methods."""
        if self.lr != "auto":
            return float(self.lr)
        if self.method == "sparta":
            return sparta_auto_lr(self.method_params.get("density", self.density))
        return DEFAULT_LR

    @property
    def head_learning_rate(self) -> float:
        if self.head_lr is not None:
            return self.head_lr
        if self.lr == "auto" and self.method == "sparta":
            return SPARTA_AUTO_HEAD_LR
        return HEAD_LR_FACTOR * self.learning_rate

    @property
    def decay_rate(self) -> float:
        """``weight_decay`` as a number: ``"auto"`` is ``SPARTA_AUTO_WEIGHT_DECAY`` for SpaRTA
        (on its deltas and the head weight), 0 for the other methods (RIGSA decays its
        deltas by its own ``delta_decay``)."""
        if self.weight_decay != "auto":
            return float(self.weight_decay)
        return auto_weight_decay(self.method)

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimizer step and process: ``grad_accum`` micro-batches of
        ``batch_size``."""
        return self.batch_size * self.grad_accum

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
            name = f"TrainConfig.{opt}" if opt in API_ONLY else f"--{opt.replace('_', '-')}"
            return SparseMergeError(f"{name}: {msg}")

        check_method_options(self)
        for opt, bound, ok in (("lr", "positive", lambda v: v > 0),
                               ("weight_decay", ">= 0", lambda v: v >= 0)):
            value = getattr(self, opt)
            if isinstance(value, str) and value != "auto":  # the CLI passes text
                try:
                    value = float(value)
                except ValueError:
                    raise bad(opt, f"must be a number ({bound}) or 'auto', got {value!r}"
                              ) from None
                setattr(self, opt, value)
            if value != "auto" and not ok(value):
                raise bad(opt, f"must be {bound}, got {value}")
        for opt in ("batch_size", "max_length", "eval_batch_size", "grad_accum"):
            if not getattr(self, opt) > 0:
                raise bad(opt, f"must be positive, got {getattr(self, opt)}")
        if self.head_lr is not None and self.head_lr < 0:
            raise bad("head_lr", f"must be >= 0, got {self.head_lr}")
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
        if self.device not in DEVICES:
            raise bad("device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in COMPUTE_DTYPES:
            raise bad("dtype", f"must be one of {', '.join(COMPUTE_DTYPES)}, "
                               f"got {self.dtype!r}")
        if self.base_dtype not in BASE_DTYPES:
            raise bad("base_dtype", f"must be one of {', '.join(BASE_DTYPES)}, "
                                    f"got {self.base_dtype!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise bad("save_dtype", f"must be one of {', '.join(SAVE_DTYPES)}, "
                                    f"got {self.save_dtype!r}")
        if self.task is None and self.train_file is None:
            raise SparseMergeError("no training data: pass --task (sst2, cola, mrpc, ...) or "
                                   "--train-file with --text-column and --label-column")
        if self.task is not None and self.train_file is not None:
            raise SparseMergeError("pass either --task or --train-file, not both")
        if self.objective not in OBJECTIVES:
            raise bad("objective", f"must be one of {', '.join(OBJECTIVES)}, "
                                   f"got {self.objective!r}")
        lm_only = {"prompt_column": self.prompt_column, "response_column": self.response_column,
                   "messages_column": self.messages_column, "eval_generate": self.eval_generate}
        if self.objective == "lm":
            not_lm = {"task": self.task, "label_tokens": self.label_tokens,
                      "template": self.template, "labels": self.labels,
                      "text_column": self.text_column, "label_column": self.label_column}
            for opt, v in not_lm.items():
                if v is not None:
                    raise bad(opt, "is for classification; --objective lm reads prompt/response "
                                   "(or messages) columns from --train-file")
            if self.method == "head":
                raise bad("method", "head trains the classification head alone, and an "
                                    "--objective lm model has none; pick another method")
            if self.eval_generate is not None and self.eval_generate < 1:
                raise bad("eval_generate", f"must be >= 1, got {self.eval_generate}")
        else:
            for opt, v in lm_only.items():
                if v is not None:
                    raise bad(opt, "goes with --objective lm")
            if self.train_file is not None and (self.text_column is None
                                                or self.label_column is None):
                raise SparseMergeError("--train-file needs --text-column and --label-column")
        if self.task is None and self.data_dir is not None:
            raise SparseMergeError("--data-dir goes with --task (a preset); with --train-file "
                                   "give the file's path")
        if self.task_name is not None:
            from sparsemerge.formats.merged import check_task_name

            try:
                check_task_name(self.task_name)
            except SparseMergeError as exc:
                raise bad("task_name", str(exc)) from None
        if self.label_tokens is not None and not all(t for t in self.label_tokens):
            raise bad("label_tokens", "must be non-empty tokens, e.g. 'No,Yes'")
        if self.chat_template and self.template is None and self.objective != "lm":
            raise bad("chat_template", "wraps the prompt --template in the chat format; give "
                                       "--template too, e.g. --template '{sentence}'")
        if self.template is not None:
            try:
                self.prompt()
            except DataError as exc:
                raise bad("template", str(exc)) from None
        if self.resume and self.checkpoint_path is None:
            raise bad("resume", "needs --checkpoint-dir or an output (-o) to find the "
                                "checkpoint in")

    def sparse(self) -> SparseConfig:
        """The run's adapter options: what the trainer passes to ``get_sparse_model``."""
        return SparseConfig(method=self.method, density=self.density, targets=self.targets,
                            seed=self.seed, method_params=self.method_params,
                            task_name=self.head_name()[0], impl=self.impl, quiet=self.quiet,
                            mask_exclude=list(self.mask_exclude or []))

    def prompt(self) -> PromptTemplate | None:
        """The prompt template examples are wrapped in (``template``, ``chat_template``)."""
        from sparsemerge.data.templates import PromptTemplate

        return None if self.template is None else PromptTemplate(self.template,
                                                                 self.chat_template)

    def head_name(self) -> tuple[str, str]:
        """(the task's head name, where it comes from): ``task_name`` when set, else the
        preset ``task``, else :func:`file_task_name` of ``train_file``."""
        if self.task_name is not None:
            return self.task_name, "--task-name"
        if self.task is not None:
            return self.task, "the preset task"
        return file_task_name(str(self.train_file))

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


# Stems that say which split or what kind of file, not which task: a file called like this
# is named after its folder (``news/train.tsv`` -> ``news``), as are these folders' files.
GENERIC_NAMES = frozenset({
    "train", "training", "dev", "development", "test", "testing", "valid", "validation",
    "val", "eval", "evaluation", "data", "dataset", "datasets", "all", "full", "sample",
    "samples", "example", "examples", "split", "splits", "raw", "processed", "clean", "input",
    "inputs", "file", "files", "text", "texts", "tmp", "temp", "out", "output",
})
_SPLIT_SUFFIX = re.compile(r"([a-z]+)(?:[-_. ]?\d+(?:[-_]of[-_]\d+)?)?")


def is_generic_name(name: str) -> bool:
    """``train``, ``dev``, ``data``, ``test_2``, ``train-00000-of-00001``...: names that say
    nothing about the task (see :data:`GENERIC_NAMES`)."""
    m = _SPLIT_SUFFIX.fullmatch(name.strip().lower())
    return m is not None and m.group(1) in GENERIC_NAMES


def file_task_name(train_file: str) -> tuple[str, str]:
    """(task name, where it comes from) for a training file: the file's stem (the name up
    to its first dot), unless that is generic (``train.tsv``), then the nearest folder above
    it whose name is not (``news/data/train.tsv`` -> ``news``; for ``hf://owner/repo/...``
    the repository counts as a folder)."""
    from sparsemerge.formats.merged import task_name_problem

    def usable(name: str) -> bool:
        return bool(name) and not is_generic_name(name) and task_name_problem(name) is None

    hub = train_file.startswith("hf://")
    path = PurePosixPath(train_file[len("hf://"):]) if hub else Path(train_file).resolve()
    stem = path.name.split(".")[0]
    if usable(stem):
        return stem, f"the name of {path.name}"
    for folder in path.parents:
        name = folder.name.split("@")[0] if hub else folder.name
        if usable(name):
            return name, f"the folder {name} ({path.name} is a generic file name)"
    fallback = stem if task_name_problem(stem) is None else "task"
    return fallback, f"the name of {path.name}"
