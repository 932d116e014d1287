"""``sparsemerge train | evaluate | predict | quickstart``: thin layers over the Python API
(``sparsemerge.train.loop.train``, ``sparsemerge.evaluate``)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from sparsemerge.cli.common import console, err_console, print_json, user_errors
from sparsemerge.cli.multihead import (
    TASK_HELP,
    evaluate_command,
    predict_command,
    refuse_adapter_options,
)
from sparsemerge.data.tasks import TASKS
from sparsemerge.errors import SparseMergeError
from sparsemerge.quickstart import SHIPPED_TASKS
from sparsemerge.train.config import (
    DEFAULT_LR,
    HEAD_LR_FACTOR,
    SPARTA_AUTO_HEAD_LR,
    SPARTA_AUTO_WEIGHT_DECAY,
    SPARTA_LR_MAX,
    SPARTA_LR_X_DENSITY,
    TrainConfig,
    sparta_auto_lr,
)

_D = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_LR_HELP = (f"Learning rate of the trainable backbone entries, or auto: SpaRTA "
            f"{SPARTA_LR_X_DENSITY:.2e} / density, at most {SPARTA_LR_MAX:g} "
            f"({sparta_auto_lr(_D['density']):g} at the default --density), other methods "
            f"{DEFAULT_LR:g}.")
_DECAY_HELP = (f"AdamW decoupled weight decay of the deltas (or factors) and the head weight, "
               f"or auto: {SPARTA_AUTO_WEIGHT_DECAY:g} for SpaRTA (pulls entries whose "
               f"gradient is noise back to the base: better on small data, and adapters that "
               f"merge), 0 for other methods (RIGSA: see its delta_decay).")
_HEAD_LR_HELP = (f"Learning rate of the head (default: {SPARTA_AUTO_HEAD_LR:g} for SpaRTA with "
                 f"--lr auto, else {HEAD_LR_FACTOR:g} x --lr).")
_TASKS = "|".join(TASKS)
# --method / --param help without the method list: TrainCommand adds it when help is shown
# (the registry lives beside the methods' torch code, so importing it imports torch).
_METHOD_HELP = "Training method; --list-methods shows each one's paper and parameters."
_PARAM_HELP = "Method parameter key=value (repeatable), e.g. -p mask_seed=7."
_DATA = "Data"
_OPT = "Optimisation"
_OUT = "Output and checkpoints"
_FORGET = "Forgetting"
_DEV = "Devices and scale-out"
_DEVICE_HELP = "cpu, cuda, or auto (CUDA when torch sees a GPU)."
_EVAL_DEVICE = "cpu"  # evaluate / predict: where scores have always been computed
_FILES = ("a CSV / TSV / JSONL file (.gz ok), or a Hugging Face dataset: a save_to_disk "
          "folder, a .parquet or .arrow file (pip install 'sparsemerge[datasets]')")
_NO_HEADER = ("CSV / TSV files have no header row: give columns as 0-based indexes, e.g. "
              "--text-column 1 --label-column 0.")
_BASE_DTYPE_HELP = ("dtype the base weights are loaded in: auto (the checkpoint's own), bf16, "
                    "fp16 or fp32.")


def _split_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise SparseMergeError(f"{value!r}: give a comma-separated list without empty items")
    return items


def _method_params(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SparseMergeError(f"--param {item!r}: write it as key=value, e.g. "
                                   "--param mask_seed=7")
        out[key.strip()] = value.strip()
    return out


def _one_preset(tasks: list[str] | None) -> str | None:
    """An adapter is scored on one preset task: ``--task NAME`` at most once, no ``=FILE``."""
    if not tasks:
        return None
    if len(tasks) > 1 or "=" in tasks[0]:
        raise SparseMergeError("--task NAME=FILE and repeated --task are for merged models "
                               "(merge --heads); for an adapter give one preset name, or "
                               "--data FILE with its columns")
    return tasks[0]


def _resolve(path: str) -> Path:
    from sparsemerge.hub import resolve_path

    return resolve_path(path)


def _summary_table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    t = Table(title=title, show_header=False, title_justify="left")
    for k, v in rows:
        t.add_row(k, v)
    return t


def _metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"dev {k}", f"{v:.4f}" if isinstance(v, float) else str(v))
            for k, v in metrics.items() if k != "task_metric"]


def _list_methods(value: bool) -> None:
    if value:
        from sparsemerge.train.methods import describe_methods

        console.print(describe_methods(), highlight=False, markup=False)
        raise typer.Exit()


class TrainCommand(TyperCommand):
    """The ``train`` command, whose --method and --param help list the registered training
    methods (:data:`sparsemerge.train.methods.METHODS`) only when the help is shown."""

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        from sparsemerge.train.methods import METHODS, params_help

        full = {"method": f"Training method: {', '.join(METHODS)}. --list-methods shows each "
                          "one's paper and parameters.",
                "param": f"{_PARAM_HELP} {params_help()}"}
        for p in self.params:
            if p.name in full:
                p.help = full[p.name]  # type: ignore[attr-defined]
        super().format_help(ctx, formatter)


def run_training(config: TrainConfig, json_out: bool) -> dict[str, Any]:
    from sparsemerge.train.loop import train as train_api

    result = train_api(config)
    if result.rank != 0:  # under torchrun / accelerate launch only rank 0 reports
        return {}
    heads = result.adapter.heads  # none for --objective lm
    task = config.head_name()[0]
    info = {
        "output": str(result.output) if result.output else None,
        "method": config.method,
        "objective": config.objective,
        "task": task,
        "labels": heads[task].labels if task in heads else [],
        "trainable": result.trainable,
        "head_params": result.head_params,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "wall_time_s": round(result.wall_time, 2),
        "metrics": result.metrics,
        "data": result.data_info,
    }
    if json_out:
        print_json(info)
    else:
        rows = [("adapter", info["output"] or "-"), ("method", config.method),
                ("task", info["task"] + (f" ({', '.join(info['labels'])})" if info["labels"]
                                         else " (causal LM)")),
                ("trainable entries", f"{result.trainable:,} (+ head {result.head_params:,})"),
                ("steps", f"{result.steps}" + (" (early stop)" if result.stopped_early else "")),
                ("wall time", f"{result.wall_time:.1f} s")] + _metric_rows(result.metrics)
        console.print(_summary_table("trained", rows))
    return info


def train(
    output: Annotated[Path, typer.Option("--output", "-o", help="Adapter directory to write.",
                                         rich_help_panel=_OUT)],
    method: Annotated[str, typer.Option(help=_METHOD_HELP)] = _D["method"],
    objective: Annotated[str, typer.Option(
        help="classification (a head over labels) or lm (a causal language model's own "
             "next-token loss on the response tokens; --prompt-column/--response-column or "
             "--messages-column; the adapter has no head).")] = _D["objective"],
    base: Annotated[str | None, typer.Option(
        help="Base model: Hugging Face id or local directory (default: MiniLM-L6 from the "
             "demo extra).")] = None,
    gguf_file: Annotated[str | None, typer.Option(
        help="A .gguf file inside --base, dequantised by transformers.")] = None,
    label_tokens: Annotated[str | None, typer.Option(
        help="Instruction models: initialise the head from these vocabulary rows, one token "
             "per label in label order, e.g. \"No,Yes\" (read at the answer position with "
             "--template).")] = None,
    template: Annotated[str | None, typer.Option(
        help="Prompt each example is wrapped in: a format string over the data's columns, "
             "e.g. \"{sentence} Is this positive? Respond Yes or No.\". Stored with the "
             "adapter; evaluate, predict and merged models use it.",
        rich_help_panel=_DATA)] = None,
    chat_template: Annotated[bool, typer.Option(
        help="Wrap the filled --template as a user turn in the tokenizer's chat template, "
             "ending at the assistant's answer position.", rich_help_panel=_DATA)] = False,
    task: Annotated[str | None, typer.Option(
        help=f"Preset task ({_TASKS}); without --data-dir the subset shipped with sparsemerge "
             "(sst2, cola).", rich_help_panel=_DATA)] = None,
    data_dir: Annotated[str | None, typer.Option(
        help="Folder holding the preset's files in their GLUE layout (e.g. holding "
             "glue/SST-2/).", rich_help_panel=_DATA)] = None,
    train_file: Annotated[str | None, typer.Option(
        "--train-file", "--dataset",
        help=f"Training data (instead of --task): {_FILES}.", rich_help_panel=_DATA)] = None,
    eval_file: Annotated[str | None, typer.Option(
        help="Dev data (same columns, same kinds of file); a preset's dev split is used by "
             "default.", rich_help_panel=_DATA)] = None,
    text_column: Annotated[str | None, typer.Option(help="Column holding the text.",
                                                    rich_help_panel=_DATA)] = None,
    text_pair_column: Annotated[str | None, typer.Option(
        help="Column holding the second text of pair tasks.", rich_help_panel=_DATA)] = None,
    label_column: Annotated[str | None, typer.Option(help="Column holding the label.",
                                                     rich_help_panel=_DATA)] = None,
    labels: Annotated[str | None, typer.Option(
        help="Class names in id order, comma-separated (default: sorted unique labels).",
        rich_help_panel=_DATA)] = None,
    task_name: Annotated[str | None, typer.Option(
        help="Name of the task's head (any text without '/' or '\\'; merge --heads names "
             "the head folders after it). Default: the preset, else the training file's name, "
             "or its folder's for generic names such as train.tsv.",
        rich_help_panel=_DATA)] = None,
    prompt_column: Annotated[str | None, typer.Option(
        help="--objective lm: the prompt column (default: prompt).",
        rich_help_panel=_DATA)] = None,
    response_column: Annotated[str | None, typer.Option(
        help="--objective lm: the response column, where the loss is (default: response).",
        rich_help_panel=_DATA)] = None,
    messages_column: Annotated[str | None, typer.Option(
        help="--objective lm: a JSONL column of chat messages instead (the loss on the "
             "assistant turns; use with --chat-template).", rich_help_panel=_DATA)] = None,
    skip_bad_rows: Annotated[bool, typer.Option(
        help="Skip (and count) malformed rows instead of failing with file:line.",
        rich_help_panel=_DATA)] = False,
    no_header: Annotated[bool, typer.Option(help=_NO_HEADER, rich_help_panel=_DATA)] = False,
    max_length: Annotated[int, typer.Option(
        help="Max tokens; longer training examples are truncated (and counted in the log).",
        rich_help_panel=_DATA)] = _D["max_length"],
    density: Annotated[float, typer.Option(
        help="Share of each target tensor's entries that is trainable.")] = _D["density"],
    targets: Annotated[str | None, typer.Option(
        help="Regex over backbone weight names (default: every linear layer), e.g. "
             "'attention'.")] = None,
    mask_exclude: Annotated[list[str] | None, typer.Option(
        "--mask-exclude", metavar="ADAPTER",
        help="SpaRTA: draw the random masks only from entries these adapters (made on the "
             "same base) leave untouched, so a later merge with them has no overlap "
             "(sparsemerge overlap: Jaccard 0). Repeatable; the same --seed and adapters give "
             "the same masks, stored with explicit indices.")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", help=_PARAM_HELP)] = None,
    list_methods: Annotated[bool, typer.Option(
        "--list-methods", is_eager=True, callback=_list_methods,
        help="List the training methods (paper, parameters, defaults) and exit.")] = False,
    epochs: Annotated[int, typer.Option(help="Passes over the training data.",
                                        rich_help_panel=_OPT)] = _D["epochs"],
    max_steps: Annotated[int | None, typer.Option(help="Stop after N steps (overrides "
                                                       "--epochs).", rich_help_panel=_OPT)
                         ] = None,
    lr: Annotated[str, typer.Option(help=_LR_HELP, metavar="<float|auto>",
                                    rich_help_panel=_OPT)] = _D["lr"],
    head_lr: Annotated[float | None, typer.Option(help=_HEAD_LR_HELP, rich_help_panel=_OPT)
                       ] = None,
    weight_decay: Annotated[str, typer.Option(help=_DECAY_HELP, metavar="<float|auto>",
                                              rich_help_panel=_OPT)] = _D["weight_decay"],
    warmup_ratio: Annotated[float, typer.Option(help="Share of steps for linear warmup.",
                                                rich_help_panel=_OPT)] = _D["warmup_ratio"],
    batch_size: Annotated[int, typer.Option(help="Examples per step (per process).",
                                            rich_help_panel=_OPT)] = _D["batch_size"],
    seed: Annotated[int, typer.Option(help="Seed of masks, head init, dropout, data order.",
                                      rich_help_panel=_OPT)] = _D["seed"],
    impl: Annotated[str, typer.Option(help="Sparse-delta implementation: fast (SDDMM, memory "
                                           "∝ trainable entries) or autograd (reference).",
                                      rich_help_panel=_OPT)] = _D["impl"],
    device: Annotated[str, typer.Option(
        help=_DEVICE_HELP + " Under torchrun / accelerate launch each process takes the GPU "
             "numbered by its LOCAL_RANK.",
        rich_help_panel=_DEV)] = _D["device"],
    dtype: Annotated[str, typer.Option(
        help="Compute dtype: fp32, or bf16 / fp16 autocast (matmuls and activations in half "
             "precision; trainable values and optimizer state stay fp32; fp16 adds "
             "gradient scaling). bf16 is the choice on recent GPUs.",
        rich_help_panel=_DEV)] = _D["dtype"],
    base_dtype: Annotated[str, typer.Option(
        help=_BASE_DTYPE_HELP + " Trainable values stay fp32 masters (docs/NUMERICS.md).",
        rich_help_panel=_DEV)] = _D["base_dtype"],
    grad_accum: Annotated[int, typer.Option(
        help="Micro-batches of --batch-size per optimizer step (gradient accumulation).",
        rich_help_panel=_OPT)] = _D["grad_accum"],
    gradient_checkpointing: Annotated[bool, typer.Option(
        help="Recompute each block's activations in the backward pass: less memory, one "
             "extra forward per step.",
        rich_help_panel=_DEV)] = _D["gradient_checkpointing"],
    eval_steps: Annotated[int | None, typer.Option(help="Evaluate every N steps (default: "
                                                        "each epoch).", rich_help_panel=_OPT)
                          ] = None,
    eval_generate: Annotated[int | None, typer.Option(
        help="--objective lm: also score greedy answers of up to N tokens against the dev "
             "responses (exact match; for short-answer tasks).", rich_help_panel=_OPT)] = None,
    patience: Annotated[int | None, typer.Option(help="Early stopping: stop after N "
                                                      "evaluations without a lower dev loss "
                                                      "and keep the best.",
                                                 rich_help_panel=_OPT)] = None,
    save_dtype: Annotated[str, typer.Option(help="dtype of the stored deltas: bf16, fp16, "
                                                 "fp32.", rich_help_panel=_OUT)
                          ] = _D["save_dtype"],
    checkpoint_steps: Annotated[int | None, typer.Option(
        help="Write a checkpoint every N steps (into --checkpoint-dir, default OUTPUT.ckpt).",
        rich_help_panel=_OUT)] = None,
    checkpoint_dir: Annotated[str | None, typer.Option(help="Checkpoint directory.",
                                                       rich_help_panel=_OUT)] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint; the result is "
                                              "bit-identical to an uninterrupted run.",
                                         rich_help_panel=_OUT)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.",
                                        rich_help_panel=_OUT)] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary (implies "
                                                          "--quiet).", rich_help_panel=_OUT)
                        ] = False,
) -> None:
    """Train a sparse adapter for a classification task (or, with --objective
    lm, a generative one) and save it.

    SpaRTA trains a seeded random subset of every linear layer's weights
    (--density) and a fresh classification head; token embeddings stay
    frozen. Each epoch is scored on the dev set (accuracy, F1, Matthews;
    for lm: response loss, perplexity, exact match with --eval-generate).
    The adapter directory (format v1) records the options and dev metrics.

    Examples:

    $ sparsemerge train --task sst2 --density 0.005 -o sst2

    $ sparsemerge train --task cola --data-dir data --epochs 3 -o cola

    $ sparsemerge train --task mrpc --data-dir data --mask-exclude cola -o mrpc

    $ sparsemerge train --train-file reviews.csv --text-column text
      --label-column stars --eval-file dev.csv -o reviews

    $ sparsemerge train --base ./smollm2 --gguf-file model.Q4_1.gguf
      --label-tokens "No,Yes" --task sst2 --max-steps 200 -o smol

    $ sparsemerge train --base ./smollm2 --task sst2 --label-tokens "No,Yes"
      --template "{sentence} Is this positive? Respond Yes or No."
      --chat-template -o smol

    $ sparsemerge train --base ./smollm2 --objective lm --train-file mnist.jsonl
      --messages-column messages --chat-template --eval-file mnist-dev.jsonl
      --eval-generate 2 -o smol-mnist

    Interrupted? Re-run the same command with --resume (needs
    --checkpoint-steps N); the result is bit-identical.

    Several processes (DistributedDataParallel; --batch-size is per
    process, gradients are averaged over all of them):

    $ torchrun --nproc-per-node 2 -m sparsemerge.cli train --task sst2 -o sst2
    """
    from sparsemerge.train.methods import get_method

    with user_errors():
        get_method(method)  # unknown: an error listing the known methods, before any loading
        config = TrainConfig(
            method=method, objective=objective, method_params=_method_params(param), base=base,
            gguf_file=gguf_file, label_tokens=_split_list(label_tokens), template=template,
            chat_template=chat_template, targets=targets, mask_exclude=mask_exclude or None,
            density=density, seed=seed, task=task, data_dir=data_dir, train_file=train_file,
            eval_file=eval_file, text_column=text_column, text_pair_column=text_pair_column,
            label_column=label_column, labels=_split_list(labels), task_name=task_name,
            prompt_column=prompt_column, response_column=response_column,
            messages_column=messages_column, eval_generate=eval_generate,
            skip_bad_rows=skip_bad_rows, no_header=no_header,
            max_length=max_length, lr=lr, head_lr=head_lr, weight_decay=weight_decay,
            warmup_ratio=warmup_ratio, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, impl=impl, device=device, dtype=dtype,
            base_dtype=base_dtype, grad_accum=grad_accum,
            gradient_checkpointing=gradient_checkpointing,
            eval_steps=eval_steps, patience=patience,
            output=str(output), save_dtype=save_dtype, checkpoint_steps=checkpoint_steps,
            checkpoint_dir=checkpoint_dir, resume=resume, quiet=quiet or json_out,
        )
        if task is None and task_name is None and not json_out:
            name, how = config.head_name()
            err_console.print(f"task name: {name} (from {how}; choose another with "
                              "--task-name)", markup=False, highlight=False)
        run_training(config, json_out)


def _forgetting(adapter: str, alongside: str | None, *, json_out: bool, **kw: Any) -> None:
    """``evaluate --forgetting``: a thin layer over ``sparsemerge.forgetting.forgetting``."""
    from sparsemerge.forgetting import forgetting

    with user_errors():
        if alongside is None:
            kw["batch_size"] = min(kw["batch_size"], 8)
        info = forgetting(_resolve(adapter), alongside=None if alongside is None
                          else _resolve(alongside), **kw)
    info = {"adapter": adapter, **({"alongside": alongside} if alongside else {}), **info}
    if json_out:
        print_json(info)
        return
    if info["kind"] == "lm":
        rows = [("adapter", adapter), ("plain text", f"{info['texts']} texts, "
                                                    f"{info['tokens']:,} tokens"),
                ("base loss / perplexity", f"{info['base_loss']:.4f} / "
                                           f"{info['base_perplexity']:.2f}"),
                ("adapted loss / perplexity", f"{info['adapted_loss']:.4f} / "
                                              f"{info['adapted_perplexity']:.2f}"),
                ("forgetting (loss increase)", f"{info['forgetting']:+.4f}")]
        rows += [(f"zero-shot {task} accuracy", f"{z['base']:.4f} → {z['adapted']:.4f} "
                                                f"({z['examples']} examples)")
                 for task, z in info["zero_shot"].items()]
    else:
        rows = [("adapter", adapter), ("alongside", f"{alongside} (head {info['head']})"),
                ("task", f"{info['task']} ({info['examples']} examples)"),
                ("accuracy alone", f"{info['alone']['accuracy']:.4f}"),
                ("accuracy merged", f"{info['merged']['accuracy']:.4f}"),
                ("forgetting (accuracy drop)", f"{info['forgetting']:+.4f}")]
    console.print(_summary_table("forgetting", rows))


def evaluate(
    adapters: Annotated[list[str], typer.Argument(
        metavar="ADAPTER...",
        help="Adapter directories or hf://owner/name (several: the base is loaded once and "
             "the adapters are switched on it), or one merged multi-head model directory "
             "(merge --heads).")],
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapter "
                                                  "was trained on).")] = None,
    gguf_file: Annotated[str | None, typer.Option(help="A .gguf file inside --base.")] = None,
    task: Annotated[list[str] | None, typer.Option(
        metavar="TASK[=FILE]", help=f"{TASK_HELP} Presets: {', '.join(TASKS)}.",
        rich_help_panel=_DATA)] = None,
    data_dir: Annotated[str | None, typer.Option(help="Folder with the preset's files "
                                                      "(default: the shipped subset).",
                                                 rich_help_panel=_DATA)] = None,
    split: Annotated[str, typer.Option(help="Preset split: dev or train.",
                                       rich_help_panel=_DATA)] = "dev",
    data: Annotated[str | None, typer.Option(
        "--data", "--dataset", help=f"Data to evaluate on: {_FILES}.",
        rich_help_panel=_DATA)] = None,
    text_column: Annotated[str | None, typer.Option(rich_help_panel=_DATA,
                                                    help="Text column of --data.")] = None,
    text_pair_column: Annotated[str | None, typer.Option(
        rich_help_panel=_DATA, help="Second text column of --data (pair tasks).")] = None,
    label_column: Annotated[str | None, typer.Option(rich_help_panel=_DATA,
                                                     help="Label column of --data.")] = None,
    skip_bad_rows: Annotated[bool, typer.Option(help="Skip malformed rows.",
                                                rich_help_panel=_DATA)] = False,
    no_header: Annotated[bool, typer.Option(help=_NO_HEADER, rich_help_panel=_DATA)] = False,
    head: Annotated[str | None, typer.Option(
        help="Which head of a multi-task adapter; of a merged model, the only one scored.")
                    ] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 64,
    max_length: Annotated[int, typer.Option(help="Longer examples are truncated.")] = 512,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = _EVAL_DEVICE,
    base_dtype: Annotated[str, typer.Option(help=_BASE_DTYPE_HELP)] = "auto",
    force: Annotated[bool, typer.Option(help="Apply even if the base fingerprint differs.")
                     ] = False,
    forgetting: Annotated[bool, typer.Option(
        "--forgetting", help="Measure forgetting instead: a decoder base's next-token loss on "
        "the shipped plain-text sample and its zero-shot accuracy on prompted SST-2 / CoLA "
        "(--task one of sst2, cola, mrpc; mrpc needs --data-dir) with and without the "
        "adapter; with --alongside, another task's dev accuracy alone and merged with this "
        "adapter.",
        rich_help_panel=_FORGET)] = False,
    alongside: Annotated[str | None, typer.Option(
        help="With --forgetting (encoders): another task's adapter (e.g. an SST-2 adapter), "
             "scored on its preset task alone and merged (sum) with ADAPTER.",
        rich_help_panel=_FORGET)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Score an adapter or a merged model on labelled data: accuracy, F1, Matthews, loss.

    Without --task / --data an adapter is scored on the dev split of the
    preset task it was trained on, a merged multi-head model on the dev
    split of each head named after a preset (sst2, cola, ...). With
    --forgetting it measures what the base could do before and after
    adaptation instead (see sparsemerge.forgetting). Several adapters
    are scored one after another on one loaded base, switched in O(nnz)
    (--json then prints a list, one object per adapter).

    A merged model takes --task once per head: HEAD=FILE scores that
    head on a CSV / TSV / JSONL file (read in the preset's GLUE layout
    when the head is named after one, else from the columns text and
    label, or --text-column / --label-column); HEAD=PRESET or just
    HEAD (named after a preset) on the preset's --split from --data-dir
    or, without it, the subset shipped with sparsemerge.

    Examples:

    $ sparsemerge evaluate sst2

    $ sparsemerge evaluate sst2-a sst2-b sst2-c --task sst2

    $ sparsemerge evaluate merged --task sst2=dev.tsv --task cola=cola_dev.tsv

    $ sparsemerge evaluate merged --task sst2 --task cola --data-dir data

    $ sparsemerge evaluate sst2 --task sst2 --data-dir ../shared/data

    $ sparsemerge evaluate reviews --data test.csv --text-column text
      --label-column stars

    $ sparsemerge evaluate smol-mnist --forgetting

    $ sparsemerge evaluate mnist --forgetting --alongside sst2
    """
    from sparsemerge.switcher import AdapterSwitcher
    from sparsemerge.train.distributed import resolve_device

    with user_errors():
        dev = resolve_device(device)
        paths = _adapter_paths(adapters)
        adapter = _merged_model(paths)
        if adapter is not None:
            refuse_adapter_options(adapter, base=base, gguf_file=gguf_file, force=force,
                                   forgetting=forgetting, alongside=alongside, data=data,
                                   base_dtype=base_dtype != "auto")
            evaluate_command(paths[adapter], adapter, tasks=task, head=head, batch_size=batch_size,
                             max_length=max_length, json_out=json_out, device=dev,
                             data_dir=data_dir, split=split, text_column=text_column,
                             text_pair_column=text_pair_column, label_column=label_column,
                             skip_bad_rows=skip_bad_rows, has_header=not no_header)
            return
        task = _one_preset(task)
        if (forgetting or alongside is not None) and len(paths) > 1:
            raise SparseMergeError("--forgetting measures one adapter at a time")
    if forgetting or alongside is not None:
        _forgetting(adapters[0], alongside, base=base, gguf_file=gguf_file, task=task,
                    data_dir=data_dir, split=split, batch_size=batch_size,
                    max_length=max_length, force=force, device=dev, base_dtype=base_dtype,
                    json_out=json_out)
        return
    with user_errors():
        if data is not None:
            if task is not None:
                raise SparseMergeError("pass either --task or --data, not both")
            if text_column is None or label_column is None:
                raise SparseMergeError("--data needs --text-column and --label-column")
        switcher = AdapterSwitcher.load(paths, base, gguf_file=gguf_file, task=head,
                                        force=force, device=dev, base_dtype=base_dtype)
        infos = []
        for name in switcher.names:
            switcher.activate(name)
            infos.append(_score_active(
                switcher, task=task, data=data, data_dir=data_dir, split=split,
                batch_size=batch_size, max_length=max_length,
                read_options={"text_column": text_column, "text_pair_column": text_pair_column,
                              "label_column": label_column, "skip_bad_rows": skip_bad_rows,
                              "has_header": not no_header}))
    if json_out:
        print_json(infos[0] if len(infos) == 1 else infos)
        return
    for info in infos:
        rows = [("adapter", info["adapter"]), ("head", info["head"]), ("data", info["data"])]
        rows += [(k, f"{v:.4f}" if isinstance(v, float) else str(v))
                 for k, v in info["metrics"].items()]
        console.print(_summary_table("evaluation", rows))


def _adapter_paths(adapters: list[str]) -> dict[str, Path]:
    """{adapter as given: local path}; the same adapter twice is an error."""
    paths: dict[str, Path] = {}
    for a in adapters:
        if a in paths:
            raise SparseMergeError(f"{a} is given twice")
        paths[a] = _resolve(a)
    return paths


def _merged_model(paths: dict[str, Path]) -> str | None:
    """The merged multi-head model among ``paths`` (then the only one), or None."""
    from sparsemerge.formats.merged import is_merged_dir

    merged = [a for a, p in paths.items() if is_merged_dir(p)]
    if merged and len(paths) > 1:
        raise SparseMergeError(f"{merged[0]} is a merged multi-head model directory: give it "
                               "alone (its heads answer together); several ADAPTERs are for "
                               "adapters switched on one base")
    return merged[0] if merged else None


def _score_active(switcher: Any, *, task: str | None, data: str | None, data_dir: str | None,
                  split: str, batch_size: int, max_length: int,
                  read_options: dict[str, Any]) -> dict[str, Any]:
    """``evaluate``'s result for the switcher's active adapter: on ``data`` (a file read with
    ``read_options``) or a preset ``task`` (default: the one it was trained on)."""
    from sparsemerge.data.readers import read_table
    from sparsemerge.data.tasks import load_task
    from sparsemerge.evaluate import head_template, trained_task
    from sparsemerge.scoring import evaluate_data

    name = switcher.active
    ad, head_name, labels = switcher.adapter(name), switcher.task(name), switcher.labels(name)
    if data is not None:
        ds = read_table(data, labels=labels, **read_options)
    else:
        if task is None:
            task, trained_dir = trained_task(ad)
            if task is None:
                raise SparseMergeError(f"{name} was not trained on a preset task: pass --task "
                                       "or --data with its columns")
            data_dir = data_dir if data_dir is not None else trained_dir
        ds = load_task(task, data_dir, split, skip_bad_rows=read_options["skip_bad_rows"])
        if list(ds.labels) != list(labels):
            raise SparseMergeError(f"task {task} has labels {ds.labels}, the head {head_name} "
                                   f"of {name} {labels}")
    t0 = time.perf_counter()
    metrics = evaluate_data(switcher.model, switcher.tokenizer, ds, batch_size=batch_size,
                            max_length=max_length, template=head_template(ad, head_name))
    return {"adapter": name, "head": head_name, "data": ds.source, "skipped_bad_rows":
            ds.skipped, "metrics": metrics, "wall_time_s": round(time.perf_counter() - t0, 2)}


def predict(
    adapter: Annotated[str, typer.Argument(
        help="Adapter directory, merged multi-head model directory (merge --heads), or "
             "hf://owner/name.")],
    texts: Annotated[list[str], typer.Argument(
        help="Texts to classify; leading ones that are directories or hf:// URIs are more "
             "adapters, switched on one loaded base.")],
    pair: Annotated[list[str] | None, typer.Option(
        "--pair", help="Second text of a pair task, once per text, in order.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapter "
                                                  "was trained on).")] = None,
    gguf_file: Annotated[str | None, typer.Option(help="A .gguf file inside --base.")] = None,
    head: Annotated[str | None, typer.Option(
        help="Which head of a multi-task adapter; of a merged model, show only this head.")
                    ] = None,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = _EVAL_DEVICE,
    base_dtype: Annotated[str, typer.Option(help=_BASE_DTYPE_HELP)] = "auto",
    force: Annotated[bool, typer.Option(help="Apply even if the base fingerprint differs.")
                     ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Classify texts: most likely label and probability.

    An adapter answers for its task; a merged multi-head model (merge
    --heads) answers for every task at once, from one backbone pass.
    Several adapters answer in turn, switched on one loaded base (O(nnz)
    per switch).

    Examples:

    $ sparsemerge predict sst2 "a gripping, beautiful film" "a total bore"

    $ sparsemerge predict sst2 cola "The film were great."

    $ sparsemerge predict mrpc "He left." --pair "He went away." --json

    $ sparsemerge predict merged "The film were great." --json
    """
    from sparsemerge.evaluate import head_template
    from sparsemerge.hub import is_hub_uri
    from sparsemerge.scoring import predict as predict_api
    from sparsemerge.switcher import AdapterSwitcher
    from sparsemerge.train.distributed import resolve_device

    n = next((i for i, t in enumerate(texts) if not (is_hub_uri(t) or Path(t).is_dir())),
             len(texts))
    adapters, texts = [adapter, *texts[:n]], texts[n:]
    with user_errors():
        if not texts:
            raise SparseMergeError("give the texts to classify after the adapters")
        dev = resolve_device(device)
        paths = _adapter_paths(adapters)
        merged = _merged_model(paths)
        if merged is not None:
            refuse_adapter_options(merged, base=base, gguf_file=gguf_file, force=force,
                                   base_dtype=base_dtype != "auto")
            predict_command(paths[merged], merged, texts, pair, head, json_out, dev)
            return
        if pair and len(pair) != len(texts):
            raise SparseMergeError(f"{len(texts)} texts but {len(pair)} --pair values; give "
                                   "one --pair per text")
        switcher = AdapterSwitcher.load(paths, base, gguf_file=gguf_file, task=head,
                                        force=force, device=dev, base_dtype=base_dtype)
        results = []
        for name in switcher.names:
            switcher.activate(name)
            preds = predict_api(switcher.model, switcher.tokenizer, texts, pair or None,
                                template=head_template(switcher.adapter(name),
                                                       switcher.task(name)))
            rows = [{"text": t, **({"pair": pair[i]} if pair else {}), "label": lab,
                     "probability": p}
                    for i, (t, (lab, p)) in enumerate(zip(texts, preds, strict=True))]
            results.append({"adapter": name, "head": switcher.task(name), "predictions": rows})
    if json_out:
        print_json(results[0] if len(results) == 1 else results)
        return
    from rich.table import Table

    for result in results:
        title = (f"{result['head']} predictions"
                 + (f" ({result['adapter']})" if len(results) > 1 else ""))
        table = Table(title=title, title_justify="left")
        for col in ("text", "label", "probability"):
            table.add_column(col, justify="right" if col == "probability" else "left")
        for r in result["predictions"]:
            text = r["text"] + (f"  ||  {r['pair']}" if "pair" in r else "")
            table.add_row(text, r["label"], f"{r['probability']:.3f}")
        console.print(table)


def generate(
    adapter: Annotated[str, typer.Argument(
        help="An --objective lm adapter directory or hf://owner/name.")],
    prompts: Annotated[list[str], typer.Argument(help="Prompts to answer.")],
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapter "
                                                  "was trained on).")] = None,
    gguf_file: Annotated[str | None, typer.Option(help="A .gguf file inside --base.")] = None,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = _EVAL_DEVICE,
    base_dtype: Annotated[str, typer.Option(help=_BASE_DTYPE_HELP)] = "auto",
    force: Annotated[bool, typer.Option(help="Apply even if the base fingerprint differs.")
                     ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Answer prompts with a generative (--objective lm) adapter: greedy decoding.

    Each prompt is wrapped as the adapter was trained: as a chat user turn
    when it was trained with --chat-template.

    Example:

    $ sparsemerge generate smol-mnist "What digit is this? ..."
    """
    from sparsemerge.evaluate import generate as generate_api
    from sparsemerge.train.distributed import resolve_device

    with user_errors():
        answers = generate_api(_resolve(adapter), prompts, base=base, gguf_file=gguf_file,
                               max_new_tokens=max_new_tokens, force=force,
                               device=resolve_device(device), base_dtype=base_dtype)
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
    if json_out:
        print_json({"adapter": adapter, "answers": rows})
        return
    for r in rows:
        console.print(r["answer"], markup=False, highlight=False)


def quickstart(
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Folder for the adapters and the merged model (with one task: "
                               "the adapter directory).")] = Path("sparsemerge-quickstart"),
    tasks: Annotated[str, typer.Option(
        help="Shipped tasks to train, comma-separated; two are merged, one just trains its "
             "adapter (the first quickstart: --tasks sst2).")] = ",".join(SHIPPED_TASKS),
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    base: Annotated[str | None, typer.Option(hidden=True, help="Another base (tests).")] = None,
    max_steps: Annotated[int | None, typer.Option(hidden=True, help="Stop each training run "
                                                                    "after N steps (tests).")
                         ] = None,
) -> None:
    r"""Run the main job on the embedded default: train, overlap, merge, evaluate.

    Trains a SpaRTA adapter for SST-2 (sentiment) and one for CoLA
    (grammatical acceptability) on MiniLM-L6 from the demo extra (pip
    install 'sparsemerge\[demo]'), on the subsets shipped with sparsemerge
    (4,000 SST-2 and 3,000 CoLA training sentences; the full GLUE dev sets,
    872 and 1,043 sentences): 5% density, a different random mask per task,
    3 epochs, batch 32, max 64 tokens. Then shows how much the two
    adapters overlap, merges them with TIES into one two-headed model (one
    backbone pass answers both tasks) and prints one table: each task's
    dev score (SST-2 accuracy, CoLA Matthews correlation) with its own
    adapter and with the merged model.

    OUTPUT receives sst2/ and cola/ (the adapters) and merged/ (the
    multi-head model). With one task (--tasks sst2) only its adapter is
    trained, into OUTPUT.

    Examples:

    $ sparsemerge quickstart

    $ sparsemerge quickstart -o my-first-run --json

    $ sparsemerge quickstart --tasks sst2 -o my-first-adapter

    Then:

    $ sparsemerge predict sparsemerge-quickstart/merged "an utterly charming film"

    $ sparsemerge evaluate sparsemerge-quickstart/merged
    """
    from sparsemerge.quickstart import parse_tasks, run_quickstart, task_config

    with user_errors():
        chosen = parse_tasks(tasks)
        if len(chosen) == 1:
            info = run_training(task_config(chosen[0], output, base=base, max_steps=max_steps,
                                            quiet=quiet or json_out), json_out)
        else:
            log = None if quiet or json_out else (
                lambda line: err_console.print(line, markup=False, highlight=False))
            summary = run_quickstart(output, chosen, base=base, max_steps=max_steps,
                                     quiet=quiet or json_out, log=log)
    if json_out:
        if len(chosen) > 1:
            print_json(summary)
        return
    if len(chosen) == 1:
        metric = TASKS[chosen[0]].metrics[0]
        value = info["metrics"].get(metric)
        shown = f"{value:.2%}" if metric == "accuracy" else f"{value:.4f}"
        console.print(f"dev {metric} {shown} in {info['wall_time_s']:.0f} s. Next: "
                      f"sparsemerge inspect {output}; sparsemerge predict {output} "
                      "\"an utterly charming film\"", highlight=False, markup=False)
        return
    console.print(_quickstart_table(summary))
    merged = summary["merge"]["output"]
    console.print(f"Next: sparsemerge predict {merged} \"an utterly charming film\"; "
                  f"sparsemerge evaluate {merged}; sparsemerge overlap "
                  + " ".join(t["adapter"] for t in summary["tasks"].values()) + " --per-layer",
                  highlight=False, markup=False)


def _quickstart_table(summary: dict[str, Any]):
    """The quickstart's one summary table: per task alone vs merged, overlap as caption."""
    from rich.markup import escape
    from rich.table import Table

    merge = summary["merge"]
    t = Table(title=f"quickstart: SpaRTA adapters alone and merged ({merge['method']}, "
                    "one backbone, one head per task)", title_justify="left",
              caption_justify="left")
    # Short headers: the table fits 80 columns, rich's width when stdout is not a terminal.
    for col in ("task", "dev metric", "alone", "merged", "points", "trainable", "steps",
                "train"):
        t.add_column(col, justify="left" if col in ("task", "dev metric") else "right")
    for task, r in summary["tasks"].items():
        m = r["metric"]
        t.add_row(escape(task), m, f"{r['alone'][m]:.4f}", f"{r['merged'][m]:.4f}",
                  f"{r['change_points']:+.2f}", f"{r['trainable']:,}", str(r["steps"]),
                  f"{r['train_time_s']:.0f} s")
    lines = [f"overlap {escape(p['a'])} ∩ {escape(p['b'])}: {p['intersection']:,} shared "
             f"entries (Jaccard {_ratio(p['jaccard'])}), sign agreement "
             f"{_ratio(p['sign_agreement'])}, cosine {_ratio(p['cosine'])}, "
             f"{p['ties_sign_conflicts']:,} sign conflicts for TIES"
             for p in summary["overlap"]]
    lines.append(f"merged model: {escape(merge['output'])} ({merge['nnz']:,} merged entries, "
                 f"{merge['seconds']:.1f} s; scored in {summary['merged_eval_s']:.0f} s); "
                 f"total {summary['wall_time_s']:.0f} s")
    t.caption = "\n".join(lines)
    return t


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
