"""The one training loop, for every method.

Read it top to bottom: ``setup`` builds a run (tokenizer, data, task model and head, the
method's trainable parameters, optimizer), ``train_step`` is one optimizer step (the benchmark
times exactly this), and ``train`` runs epochs with evaluation, early stopping, checkpoints and
the final save. The method is attached, stepped and exported through the API users train
with in their own loops (``get_sparse_model``'s :class:`SparseModel`): one implementation.

Determinism. With the same config (seed) a run is a pure function of its inputs: the data
order of epoch ``e`` is a permutation seeded by ``(seed, e)`` (``data.batches``); the head
init has its own generator; the global torch RNG (dropout) is seeded just before the first
step. A checkpoint stores the trainable values, AdamW state, the step, the position in the
epoch, the torch RNG state and the early-stopping/history state, so ``resume`` continues
*bit-exactly* where the interrupted run was (the learning-rate schedule is a function of the
step alone).

Scale-out. Under ``torchrun`` / ``accelerate launch`` :func:`train` joins the launcher's
process group (``distributed.process_group``). ``rank`` / ``world_size`` shard every global
batch of ``batch_size * world_size`` examples across processes (``data.batches``) and the model
is wrapped in ``DistributedDataParallel``, which all-reduces (averages) the gradients of every
trainable parameter -- sparse delta values, RIGSA gates and the head alike, all registered
``nn.Parameter``s -- so every rank takes the same optimizer step. Each rank's loss is weighted
by its share of the global batch (the last batch of an epoch can be dealt unevenly), so the
step equals a one-process step on the whole global batch up to summation order. DDP is told to
ignore the frozen weights and buffers: each rank loaded them from the same files (checked by
all-gathering the base fingerprint), and broadcasting them would move the whole model at
start-up and again whenever RIGSA re-attaches (which re-wraps the model). The fast sparse path
writes ``orig + delta`` into the weight from scratch on every sync, never incrementally, so
nothing a broadcast or a re-wrap does can apply a delta twice. Every rank evaluates the whole
dev set (identical results, so early stopping agrees); the training loss/accuracy of the
history are summed over the ranks; only rank 0 writes files. A checkpoint holds every rank's
RNG state, so a resumed DDP run continues bit-exactly too (same number of processes).

Devices. ``config.device`` places the model (``cuda:LOCAL_RANK`` per rank) and
``config.dtype`` sets the autocast dtype of forward passes (see ``distributed``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsemerge.adapter import BaseInfo, SparseAdapter
from sparsemerge.data.batching import (
    IGNORE_INDEX,
    Encoded,
    LongCounts,
    batches,
    encode,
    encode_lm,
    keeps_end,
    num_batches,
)
from sparsemerge.data.examples import LabeledData, LMData
from sparsemerge.data.readers import read_lm, read_table
from sparsemerge.data.tasks import TASKS, load_task
from sparsemerge.errors import SparseMergeError
from sparsemerge.models import (
    DEMO_BASE_ID,
    load_causal_lm,
    load_task_model,
    load_tokenizer,
    resolve_pad_token_id,
)
from sparsemerge.scoring import evaluate_lm, evaluate_model, metric_names
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.distributed import (
    all_gather,
    all_sum,
    autocast,
    grad_scaler,
    process_group,
    resolve_device,
)
from sparsemerge.train.heads import head_parameters, init_head
from sparsemerge.train.methods import Method, get_method
from sparsemerge.train.sparse_model import SparseModel

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_VERSION = 2  # 2: one RNG state per rank and the world size (1: one process)


@dataclass
class Run:
    """Everything one training run holds (built by :func:`setup`)."""

    config: TrainConfig
    model: nn.Module  # the task model (backbone + head)
    forward: nn.Module  # what the step calls: the model, or DDP(model)
    tokenizer: Any
    sparse: SparseModel  # the method attached to ``model`` (``get_sparse_model``)
    task: str
    labels: list[str]
    train_data: dict  # encoded
    dev_data: dict | None  # encoded (truncated, never dropped)
    data_info: dict[str, Any]
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    rank: int = 0
    world_size: int = 1
    step: int = 0  # optimizer steps done
    device: torch.device = torch.device("cpu")
    scaler: torch.amp.GradScaler | None = None  # fp16 autocast only

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def method(self) -> Method:
        return self.sparse.require_method()

    @property
    def target_names(self) -> list[str]:
        return self.sparse.target_names

    @property
    def base(self) -> BaseInfo:
        return self.sparse.base

    def autocast(self) -> AbstractContextManager:
        """The forward's autocast context (``config.dtype``; nothing for fp32)."""
        return autocast(self.device, self.config.dtype)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def trainable(self) -> dict[str, nn.Parameter]:
        """Every trainable parameter of the model, by name (what checkpoints store)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


@dataclass
class TrainResult:
    adapter: SparseAdapter
    metrics: dict[str, Any]  # dev metrics of the saved adapter (empty without dev data)
    history: list[dict[str, Any]]
    steps: int
    wall_time: float
    output: Path | None
    trainable: int  # method's trainable scalars (head excluded)
    head_params: int
    stopped_early: bool = False
    data_info: dict[str, Any] = field(default_factory=dict)
    rank: int = 0  # this process's rank (only rank 0 wrote ``output``)


# ------------------------------------------------------------------------------------ data


def load_data(config: TrainConfig) -> tuple[LabeledData | LMData, LabeledData | LMData | None]:
    """(train, dev or None) as the config describes them: labelled examples, or for
    ``--objective lm`` conversations."""
    if config.objective == "lm":
        return _load_lm(config)
    train = load_train(config)
    dev = None
    if config.task is not None and config.eval_file is None and "dev" in TASKS[config.task].files:
        dev = load_task(config.task, config.data_dir, "dev", skip_bad_rows=config.skip_bad_rows)
    if config.eval_file is not None:
        dev = read_table(config.eval_file,
                         text_column=config.text_column or (TASKS[config.task].text_column
                                                            if config.task else None),
                         text_pair_column=config.text_pair_column,
                         label_column=config.label_column or (TASKS[config.task].label_column
                                                              if config.task else None),
                         labels=train.labels, skip_bad_rows=config.skip_bad_rows,
                         has_header=not config.no_header)
    if config.max_train_examples is not None:
        train = train.select(range(min(config.max_train_examples, len(train))))
    if len(train.labels) < 2:
        raise SparseMergeError(f"{train.source}: only one label ({train.labels[0]!r}) in the "
                               "training data; a classifier needs at least two")
    return train, dev


def load_train(config: TrainConfig) -> LabeledData:
    """The whole labelled training split (before ``max_train_examples``), never the dev
    split: ``merge --calibrate`` holds rows of it out through this same reader."""
    if config.task is None:
        return read_table(config.train_file, text_column=config.text_column,
                          text_pair_column=config.text_pair_column,
                          label_column=config.label_column, labels=config.labels,
                          skip_bad_rows=config.skip_bad_rows, has_header=not config.no_header)
    spec = TASKS.get(config.task)
    if spec is None:
        raise SparseMergeError(f"unknown task {config.task!r}; known: {', '.join(TASKS)}")
    return load_task(spec, config.data_dir, "train", skip_bad_rows=config.skip_bad_rows)


def _load_lm(config: TrainConfig) -> tuple[LMData, LMData | None]:
    def read(path: str) -> LMData:
        return read_lm(path, prompt_column=config.prompt_column or "prompt",
                       response_column=config.response_column or "response",
                       messages_column=config.messages_column,
                       skip_bad_rows=config.skip_bad_rows, has_header=not config.no_header)

    train = read(config.train_file)
    if config.max_train_examples is not None:
        train = LMData(train.examples[:config.max_train_examples], train.source, train.skipped)
    return train, None if config.eval_file is None else read(config.eval_file)


def _encode(config: TrainConfig, data: LabeledData | LMData, tokenizer: Any, max_length: int,
            drop_long: bool, keep_end: bool) -> tuple[Encoded, LongCounts]:
    """``data`` tokenised for the objective: conversations with the loss on the responses
    (chat-rendered with ``chat_template``), or labelled examples in the prompt template."""
    if config.objective == "lm":
        return encode_lm(data, tokenizer, max_length, drop_long, chat=config.chat_template)
    return encode(data, tokenizer, max_length, drop_long, template=config.prompt(),
                  keep_end=keep_end)


# ----------------------------------------------------------------------------------- setup


def _dist(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        r, w = dist.get_rank(), dist.get_world_size()
        if (rank is not None and rank != r) or (world_size is not None and world_size != w):
            raise SparseMergeError(f"rank/world_size {rank}/{world_size} disagree with the "
                                   f"process group ({r}/{w})")
        return r, w
    return (rank or 0), (world_size or 1)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then linear decay to 0 at ``total``.
    ``step`` counts the steps already taken (0 for the first update)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def build_optimizer(sparse: SparseModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``sparse.param_groups`` at the config's learning rates and weight decay;
    each group's ``initial_lr`` is what the schedule scales (``train_step``)."""
    groups = sparse.param_groups(config.learning_rate, head_lr=config.head_learning_rate,
                                 weight_decay=config.decay_rate)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.decay_rate)


def _settle(model: nn.Module, batch: dict[str, torch.Tensor],
            run_autocast: AbstractContextManager) -> None:
    """One training-mode forward (no backward; RNG state untouched) before the first step.

    Whatever the trainable layers decide on their first forward -- the fast sparse path picks
    memory layouts then, which changes summation order -- is decided before step 1, so every
    step computes the same way and a resumed run matches an uninterrupted one bit for bit.
    """
    with torch.random.fork_rng(devices=[]), run_autocast:
        model.train()
        model(**batch)


def _checkpoint_activations(model: nn.Module) -> None:
    """transformers' activation (gradient) checkpointing, non-reentrant: the frozen embeddings'
    output needs no gradient for the layers' trainable tensors to get one. The v5 name when
    present, else the v4 one."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` reducing only the trainable parameters (see the
    module docstring for why frozen weights and buffers are not broadcast)."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def _rewrap(run: Run) -> None:
    """After the method replaced its trainable tensors (``SparseModel.sync_optimizer`` put
    them in the optimizer): a new DDP wrapper, which reduces the new ones."""
    if run.world_size > 1:
        run.forward = _wrap(run.model, run.device)


def setup(config: TrainConfig, *, rank: int | None = None, world_size: int | None = None,
          method: Method | None = None) -> Run:
    """Build everything a run needs; nothing is trained yet.

    ``method`` overrides the registry lookup of ``config.method`` (an instance built on
    ``config.sparse()``), e.g. for a method defined outside the package. The method is
    attached, stepped and exported through ``get_sparse_model``'s :class:`SparseModel`.
    """
    rank, world_size = _dist(rank, world_size)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    sparse_config = config.sparse()
    if method is None:
        method = get_method(config.method)(sparse_config)  # validates its params first
    method.check_schedule(epochs=config.epochs, max_steps=config.max_steps,
                          early_stopping=config.patience is not None)

    # Data and tokenizer.
    tokenizer = load_tokenizer(config.base, config.gguf_file)
    train, dev = load_data(config)
    template = config.prompt()
    if template is not None:  # before the model is loaded: a typo should fail fast
        template.check_columns(train.columns, train.source)
    labels = [] if config.objective == "lm" else list(train.labels)

    # Task model with a fresh head (initialised as the SpaRTA paper does, or from label
    # tokens); the SparseModel freezes everything else and attaches the method.
    # Loaded in its own dtype (--base-dtype) straight onto the device: no fp32 copy anywhere.
    # --objective lm: the causal LM itself, its own LM head frozen (LM adapters carry no head).
    if config.objective == "lm":
        model = load_causal_lm(config.base, gguf_file=config.gguf_file, dtype=config.base_dtype,
                               device=device, pad_token_id=resolve_pad_token_id(tokenizer))
    else:
        model = load_task_model(config.base, labels, gguf_file=config.gguf_file,
                                dtype=config.base_dtype, device=device,
                                pad_token_id=resolve_pad_token_id(tokenizer))
        init_head(model, seed=config.seed, label_tokens=config.label_tokens,
                  tokenizer=tokenizer, base=config.base, gguf_file=config.gguf_file)
    model_id = DEMO_BASE_ID if config.base is None else str(config.base)

    # Examples wrapped in the prompt template (its last token is the answer position, where
    # --label-tokens heads read the answers' vocabulary rows); over-long ones truncated at
    # the end the head does not read (a decoder's head reads the last token).
    keep_end = keeps_end(model.config, template)
    train_enc, n_long = _encode(config, train, tokenizer, config.max_length, config.drop_long,
                                keep_end)
    dev_enc = None
    if dev is not None:
        limit = max(config.max_length, 512)
        limit = min(limit, getattr(tokenizer, "model_max_length", limit) or limit)
        dev_enc, _ = _encode(config, dev, tokenizer, limit, False, keep_end)
    if len(train_enc["labels"]) < world_size:
        raise SparseMergeError(f"only {len(train_enc['labels'])} training examples for "
                               f"{world_size} processes")
    data_info = {
        "train": {"source": train.source, "examples": len(train_enc["labels"]),
                  "skipped_bad_rows": train.skipped, "truncated_long": n_long.truncated,
                  "dropped_long": n_long.dropped,
                  **({} if config.objective == "lm" else
                     {"label_counts": train.label_counts()})},
        "labels": labels,
    }
    if dev is not None:
        data_info["dev"] = {"source": dev.source, "examples": len(dev),
                            "skipped_bad_rows": dev.skipped}

    def sample_batches() -> Iterator[dict]:
        for b in batches(train_enc, config.effective_batch_size, True, config.seed, 0, rank,
                         world_size):
            yield b if device.type == "cpu" else {k: v.to(device) for k, v in b.items()}

    sparse = SparseModel(model, sparse_config, method=method, batches=sample_batches(),
                         init_head=False, base_id=model_id)
    if config.gradient_checkpointing:
        _checkpoint_activations(model)
    _settle(model, micro_batches(next(sample_batches()), config.grad_accum)[0],
            autocast(device, config.dtype))

    forward: nn.Module = model
    if world_size > 1:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise SparseMergeError("world_size > 1 needs torch.distributed initialised "
                                   "(run under torchrun / accelerate launch)")
        prints = set(all_gather(sparse.base.fingerprint))
        if len(prints) > 1:
            raise SparseMergeError(f"the ranks loaded different weights for base {model_id} "
                                   f"(fingerprints {', '.join(sorted(prints))}): every process "
                                   "must read the same base")
        forward = _wrap(model, device)

    steps_per_epoch = num_batches(len(train_enc["labels"]), config.effective_batch_size,
                                  world_size)
    total = config.max_steps or config.epochs * steps_per_epoch
    run = Run(config=config, model=model, forward=forward, tokenizer=tokenizer, sparse=sparse,
              task=config.head_name()[0], labels=labels, train_data=train_enc,
              dev_data=dev_enc, data_info=data_info, optimizer=build_optimizer(sparse, config),
              steps_per_epoch=steps_per_epoch, total_steps=total,
              warmup_steps=round(config.warmup_ratio * total), rank=rank, world_size=world_size,
              device=device, scaler=grad_scaler(device, config.dtype))
    return run


# ------------------------------------------------------------------------------------ step


def micro_batches(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut into ``n`` consecutive slices of rows (``--grad-accum``; fewer when it
    has fewer rows), each padded as the whole batch was."""
    rows = int(batch["labels"].shape[0])
    k = min(n, rows)
    return [{key: v[i * rows // k:(i + 1) * rows // k] for key, v in batch.items()}
            for i in range(k)]


def _loss_items(part: dict[str, torch.Tensor], lm: bool) -> int:
    """What the model's mean loss on ``part`` averages over: its rows, or for the causal-LM
    objective its response tokens -- the labels the model keeps after shifting them one
    position (the first token is predicted by nothing)."""
    labels = part["labels"]
    return int((labels[:, 1:] != IGNORE_INDEX).sum()) if lm else int(labels.shape[0])


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> tuple[float, int, int]:
    """One optimizer step on ``batch`` (this rank's share of the global batch) in
    ``grad_accum`` micro-batches; returns (this rank's mean loss, the number of items it is
    the mean over -- rows, or response tokens for the causal-LM objective --, its number of
    correct predictions)."""
    cfg, opt, scaler = run.config, run.optimizer, run.scaler
    factor = lr_factor(run.step, run.total_steps, run.warmup_steps)
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * factor
    batch = run.to_device(batch)
    run.forward.train()
    parts = micro_batches(batch, cfg.grad_accum)
    items = [_loss_items(part, cfg.objective == "lm") for part in parts]
    n = sum(items)
    total = all_sum([float(n)], run.device)[0] if run.world_size > 1 else float(n)
    loss_sum, correct = 0.0, 0
    for i, (part, m) in enumerate(zip(parts, items, strict=True)):
        # DDP all-reduces gradients on the last micro-batch's backward only.
        last = i + 1 == len(parts) or run.world_size == 1
        with contextlib.nullcontext() if last else run.forward.no_sync():
            with run.autocast():
                out = run.forward(**part)
            # Each micro-batch weighs its share of the global batch's rows (LM: response
            # tokens; DDP averages over ranks), so the summed gradient is the whole batch's
            # mean-loss gradient. A part without response tokens has a NaN mean loss but
            # zero gradients, and weight 0.
            loss = out.loss * (m * run.world_size / max(total, 1.0))
            (loss if scaler is None else scaler.scale(loss)).backward()
        if m:
            loss_sum += float(out.loss.detach()) * m
        if run.config.objective != "lm":  # LM steps report their loss only
            correct += int((out.logits.detach().argmax(-1) == part["labels"]).sum())
    if cfg.grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad(set_to_none=True)
    if run.sparse.after_step(opt):  # e.g. RIGSA pruned after round_steps steps
        _rewrap(run)
    run.step += 1
    return loss_sum / max(n, 1), n, correct


def evaluate(run: Run) -> dict[str, float] | None:
    if run.dev_data is None:
        return None
    if run.config.objective == "lm":
        with run.autocast():
            return evaluate_lm(run.model, run.dev_data, run.config.eval_batch_size,
                               generate_tokens=run.config.eval_generate,
                               tokenizer=run.tokenizer)

    def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
        with run.autocast():
            return run.model(**run.to_device(inputs)).logits.float().cpu()

    return evaluate_model(run.model, run.dev_data, run.config.eval_batch_size,
                          num_labels=len(run.labels), logits=logits)


# ----------------------------------------------------------------------------- checkpoints


def _snapshot(run: Run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.trainable().items()}


@torch.no_grad()
def _restore(run: Run, values: dict[str, torch.Tensor]) -> None:
    params = run.trainable()
    if set(values) != set(params):
        missing = sorted(set(params) - set(values))[:3]
        extra = sorted(set(values) - set(params))[:3]
        raise SparseMergeError(f"checkpoint does not fit this run: missing {missing}, "
                               f"unexpected {extra}")
    for n, p in params.items():
        p.copy_(values[n])  # bumps the version counter: merged weights re-sync


def _rng_state(run: Run) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(run.device)
    return state


def save_checkpoint(run: Run, path: Path, position: dict, state: dict) -> None:
    """Called on every rank (it gathers their RNG states); rank 0 writes."""
    from sparsemerge.formats.atomic import atomic_directory

    rngs = all_gather(_rng_state(run))
    if not run.is_main:
        return
    blob = {
        "version": CHECKPOINT_VERSION,
        "config": run.config.to_dict(),
        "position": {**position, "world_size": run.world_size},
        "params": _snapshot(run),
        "optimizer": run.optimizer.state_dict(),
        "scaler": None if run.scaler is None else run.scaler.state_dict(),
        "method": run.method.state_dict(),
        "rng": rngs,
        "state": state,
    }
    with atomic_directory(path) as tmp:
        torch.save(blob, tmp / CHECKPOINT_FILE)


def load_checkpoint(run: Run, path: Path) -> tuple[dict, dict]:
    """Restore a run from ``path``; returns (position, loop state)."""
    file = path / CHECKPOINT_FILE
    if not file.is_file():
        raise SparseMergeError(f"--resume: no checkpoint at {file}; train without --resume "
                               "(with --checkpoint-steps N) first")
    try:
        blob = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises several types for a damaged file
        raise SparseMergeError(f"--resume: cannot read {file}: {exc}") from None
    version = blob.get("version")
    if version not in (1, CHECKPOINT_VERSION):
        raise SparseMergeError(f"{file}: checkpoint version {version} is not "
                               f"supported (expected {CHECKPOINT_VERSION})")
    if version == 1:  # one process, CPU RNG only
        blob["rng"], blob["scaler"] = [{"cpu": blob["rng"]}], None
    saved_world = int(blob["position"].get("world_size", 1))
    if saved_world != run.world_size:
        raise SparseMergeError(f"--resume: {file} was written by a run of {saved_world} "
                               f"process(es), this one has {run.world_size}; resume with the "
                               f"same number (torchrun --nproc-per-node {saved_world})")
    saved = TrainConfig.from_dict(blob["config"])
    diff = run.config.differences(saved)
    if diff:
        shown = ", ".join(f"{k} (checkpoint {getattr(saved, k)!r}, now "
                          f"{getattr(run.config, k)!r})" for k in diff[:4])
        raise SparseMergeError(f"--resume: the options differ from the checkpointed run's: "
                               f"{shown}; resume with the same options")
    run.method.load_state_dict(blob["method"])
    if run.sparse.sync_optimizer(run.optimizer):
        _rewrap(run)
    _restore(run, blob["params"])
    run.optimizer.load_state_dict(blob["optimizer"])
    for g in run.optimizer.param_groups:  # lr is recomputed from the step; keep initial_lr
        g.setdefault("initial_lr", g["lr"])
    if run.scaler is not None and blob["scaler"] is not None:
        run.scaler.load_state_dict(blob["scaler"])
    rng = blob["rng"][run.rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and run.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    run.step = int(blob["position"]["step"])
    return blob["position"], blob["state"]


# ------------------------------------------------------------------------------------ loop


class _Progress:
    """A rich progress bar on stderr, or nothing when quiet."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.bar = None
        self.console = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console)
        self.task = self.bar.add_task("training", total=total, completed=done, info="")
        self.bar.start()

    def update(self, description: str, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=description, info=info)

    def log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.console.print(msg, highlight=False)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")


def train(config: TrainConfig, *, rank: int | None = None, world_size: int | None = None,
          run: Run | None = None) -> TrainResult:
    """Train, evaluate, checkpoint, and save the adapter to ``config.output`` (rank 0).

    Started by ``torchrun`` / ``accelerate launch``, every process calls this: it joins the
    launcher's process group for the run (see ``distributed.process_group``)."""
    with process_group(config.device):
        return _train(config, rank, world_size, run)


def _train(config: TrainConfig, rank: int | None, world_size: int | None,
           run: Run | None) -> TrainResult:
    t0 = time.perf_counter()
    run = run or setup(config, rank=rank, world_size=world_size)
    cfg = run.config
    bar = _Progress(not cfg.quiet and run.is_main, run.total_steps, 0)
    info = run.data_info["train"]
    bar.log(f"{cfg.method}: {run.method.num_trainable():,} trainable entries in "
            f"{len(run.target_names)} tensors + head "
            f"{sum(p.numel() for _, p in head_parameters(run.model)):,}; "
            f"{info['examples']:,} training examples ({info['truncated_long']} truncated and "
            f"{info['dropped_long']} dropped for being longer than {cfg.max_length} tokens, "
            f"{info['skipped_bad_rows']} bad rows skipped); "
            f"{run.steps_per_epoch} steps/epoch, {run.total_steps} steps")

    # Loop state: everything a checkpoint must carry besides parameters and optimizer.
    state: dict[str, Any] = {"best_loss": math.inf, "bad_evals": 0, "best": None,
                             "history": [], "stopped": False, "window": [0.0, 0, 0]}
    epoch, skip = 0, 0
    ckpt = cfg.checkpoint_path
    if cfg.resume:
        position, state = load_checkpoint(run, ckpt)
        if not run.is_main:  # rank 0's checkpoint holds the ranks' summed loss window
            state["window"] = [0.0, 0, 0]
        epoch, skip = int(position["epoch"]), int(position["batch"])
        if bar.bar is not None:
            bar.bar.update(bar.task, completed=run.step)
        bar.log(f"resumed from {ckpt} at step {run.step} (epoch {epoch + 1}, batch {skip})")
    else:
        torch.manual_seed(cfg.seed)  # dropout stream starts here, independent of setup

    def do_eval() -> None:
        metrics = evaluate(run)
        total_loss, correct, seen = all_sum(state["window"], run.device)  # over the ranks
        correct, seen = int(correct), int(seen)
        entry = {"step": run.step, "epoch": epoch + 1,
                 "train_loss": total_loss / seen if seen else None,
                 "train_accuracy": (correct / seen if seen and cfg.objective != "lm"
                                    else None)}
        state["window"] = [0.0, 0, 0]
        if metrics is not None:
            entry["eval"] = metrics
            if metrics["loss"] < state["best_loss"]:
                state["best_loss"], state["bad_evals"] = metrics["loss"], 0
                if cfg.patience is not None:
                    state["best"] = _snapshot(run)
            else:
                state["bad_evals"] += 1
                if cfg.patience is not None and state["bad_evals"] >= cfg.patience:
                    state["stopped"] = True
        state["history"].append(entry)
        tl = entry["train_loss"]
        bar.log(f"step {run.step} epoch {epoch + 1}: train loss "
                f"{'-' if tl is None else f'{tl:.4f}'}"
                + (f" acc {entry['train_accuracy']:.4f}"
                   if entry["train_accuracy"] is not None else "")
                + (f" | dev {_fmt(metrics)}" if metrics else "")
                + (" | early stop" if state["stopped"] else ""))

    def checkpoint(batch_pos: int) -> None:
        if ckpt is not None and cfg.checkpoint_steps is not None:
            # The loss window is per rank: rank 0 takes the sum, so its checkpoint holds it.
            window = all_sum(state["window"], run.device)
            state["window"] = window if run.is_main else [0.0, 0, 0]
            save_checkpoint(run, ckpt, {"step": run.step, "epoch": epoch, "batch": batch_pos},
                            state)

    while run.step < run.total_steps and not state["stopped"]:
        for i, batch in enumerate(batches(run.train_data, cfg.effective_batch_size, True,
                                          cfg.seed, epoch, run.rank, run.world_size)):
            if i < skip:  # resuming inside this epoch: same order, skip what was done
                continue
            loss, n, correct = train_step(run, batch)
            total_loss, n_correct, seen = state["window"]  # n: rows, or LM response tokens
            state["window"] = [total_loss + loss * n, n_correct + correct, seen + n]
            bar.update(f"epoch {epoch + 1}", f"loss {loss:.4f}")
            if cfg.eval_steps is not None and run.step % cfg.eval_steps == 0:
                do_eval()
            last_batch = i + 1 == run.steps_per_epoch
            if state["stopped"] or (run.step >= run.total_steps and not last_batch):
                break
            # An epoch's last batch is checkpointed after the epoch-end work (pruning, eval),
            # so a resume never skips it.
            if (not last_batch and cfg.checkpoint_steps is not None
                    and run.step % cfg.checkpoint_steps == 0):
                checkpoint(i + 1)
        else:  # the epoch ran to its end
            if run.sparse.end_of_epoch(epoch, run.optimizer):
                _rewrap(run)
            if cfg.eval_steps is None:
                do_eval()
            epoch, skip = epoch + 1, 0
            if not state["stopped"] and run.step < run.total_steps:
                checkpoint(0)
            continue
        break  # stopped early, or max_steps reached inside the epoch
    bar.stop()

    # Keep the best evaluation's values when early stopping is on.
    if cfg.patience is not None and state["best"] is not None:
        _restore(run, state["best"])
    # Round to the stored dtype, so the reported metrics are those of the saved adapter.
    run.method.round_values(cfg.save_dtype)
    metrics = evaluate(run) or {}
    adapter = build_adapter(run, metrics, state, time.perf_counter() - t0)
    out = None
    if cfg.output is not None and run.is_main:
        from sparsemerge.formats.adapter_file import save_adapter

        out = save_adapter(adapter, cfg.output, value_dtype=cfg.save_dtype)
    return TrainResult(adapter=adapter, metrics=metrics, history=state["history"],
                       steps=run.step, wall_time=time.perf_counter() - t0, output=out,
                       trainable=run.method.num_trainable(),
                       head_params=sum(p.numel() for _, p in head_parameters(run.model)),
                       stopped_early=bool(state["stopped"]), data_info=run.data_info,
                       rank=run.rank)


def build_adapter(run: Run, metrics: dict[str, Any], state: dict, wall: float) -> SparseAdapter:
    cfg = run.config
    hp = {k: v for k, v in cfg.to_dict().items()
          if k not in ("output", "resume", "quiet", "checkpoint_dir", "checkpoint_steps",
                       "device")}
    hp["datasets"] = [cfg.task if cfg.task else str(cfg.train_file)]
    hp["head"] = run.task
    hp["lr"] = cfg.learning_rate  # resolved; lr_rule says whether --lr auto chose it
    hp["lr_rule"] = "auto" if cfg.lr == "auto" else "explicit"
    hp["head_lr"] = cfg.head_learning_rate
    hp["weight_decay"] = cfg.decay_rate  # resolved, as lr
    extra = {
        "training": {"steps": run.step, "epochs": run.step / run.steps_per_epoch,
                     "wall_time_s": round(wall, 2), "stopped_early": bool(state["stopped"]),
                     "world_size": run.world_size, **run.sparse.info()},
        "data": run.data_info,
        "history": state["history"],
    }
    dev_metrics = {k: v for k, v in metrics.items()}
    if dev_metrics and run.config.task in TASKS:
        dev_metrics["task_metric"] = TASKS[run.config.task].metrics[0]
    prompt = cfg.prompt()
    return run.sparse.export(metrics=dev_metrics, hyperparameters=hp, extra=extra,
                             prompt=None if prompt is None else prompt.to_dict())


__all__ = ["Run", "TrainResult", "build_adapter", "evaluate", "load_data", "load_train",
           "lr_factor", "metric_names", "setup", "train", "train_step"]
