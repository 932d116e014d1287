"""Fine-tune a causal LM on chat prompt/completion pairs with TRL's ``SFTTrainer`` through the
PEFT-style API.

``get_sparse_model`` makes a random 1% of the entries of the model's linear layers trainable
(its embeddings and LM head stay frozen); ``SFTTrainer`` trains the model as it would any
other, with its own defaults (loss on the completions only); ``save_pretrained`` writes a
sparsemerge adapter, which ``sparsemerge generate`` answers with in the chat format it was
trained in. The data: SST-2 asked as sparsemerge's zero-shot chat prompt, answered with one
word, negative or positive. With no arguments it trains SmolLM2-135M-Instruct (from the Hub)
on 1,000 rows of the SST-2 subset shipped with sparsemerge and writes ``examples/out/trl-sst2/``::

    pip install 'sparsemerge[trl]'
    python examples/trl_sft.py
    P='Is the sentiment of the following sentence positive or negative? Answer with one word.'
    sparsemerge generate examples/out/trl-sst2 "$(printf '%s\\n\\n%s' "$P" 'A charming film.')"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import sparsemerge
from sparsemerge.data.tasks import load_task
from sparsemerge.evaluate import generate
from sparsemerge.forgetting import ZERO_SHOT_PROMPTS
from sparsemerge.train.config import sparta_auto_lr

HERE = Path(__file__).resolve().parent
TEMPLATE, ANSWERS = ZERO_SHOT_PROMPTS["sst2"]  # one answer per label: negative, positive


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="causal LM directory or Hugging Face id (its tokenizer needs a chat "
                        "template)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding GLUE's SST-2/ (default: the subset shipped inside "
                        "sparsemerge)")
    p.add_argument("--out", type=Path, default=HERE / "out" / "trl-sst2",
                   help="adapter directory to write")
    p.add_argument("--density", type=float, default=0.01,
                   help="share of each linear layer's entries that is trainable")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: SpaRTA's --lr auto rule at --density)")
    p.add_argument("--max-train-examples", type=int, default=1000)
    p.add_argument("--eval-examples", type=int, default=50,
                   help="dev rows answered with `generate` from the saved adapter")
    p.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many steps (smoke tests)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    return p.parse_args(argv)


def chat_rows(split: str, data_dir: str | None, limit: int) -> list[dict[str, Any]]:
    """The SST-2 split as conversational prompt/completion rows, TRL's format."""
    data = load_task("sst2", data_dir, split)
    return [{"prompt": [{"role": "user", "content": TEMPLATE.format(sentence=ex.text)}],
             "completion": [{"role": "assistant", "content": ANSWERS[ex.label]}]}
            for ex in data.examples[:limit]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    training = SFTConfig(  # TRL's default mixed precision (bf16) needs a GPU
        output_dir=str(args.out) + ".trainer", num_train_epochs=1, max_steps=args.max_steps,
        per_device_train_batch_size=8, learning_rate=args.lr or sparta_auto_lr(args.density),
        bf16=torch.cuda.is_available(), save_strategy="no", report_to=[], logging_steps=10,
        disable_tqdm=args.json, seed=0)

    # 1. The user's model, on its device first (the adapter's index tensors live beside the
    #    weights), then made sparse: only the adapter's entries train.
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype="float32").to(training.device)
    model = sparsemerge.get_sparse_model(
        model, sparsemerge.SparseConfig(method="sparta", density=args.density))
    if not args.json:
        model.print_trainable_parameters()

    # 2. SFTTrainer as usual. SparseCallback re-writes the trained entries into the weights
    #    after each step (the default fused AdamW updates them where the forward cannot see).
    train = Dataset.from_list(chat_rows("train", args.data_dir, args.max_train_examples))
    trainer = SFTTrainer(model=model, args=training, train_dataset=train,
                         processing_class=tokenizer, callbacks=[sparsemerge.SparseCallback()])
    trainer.train()

    # 3. A sparsemerge adapter that knows its prompts were chat-rendered: `sparsemerge
    #    generate` wraps prompts the same way. It answers a few dev sentences.
    out = model.save_pretrained(args.out, hyperparameters={"objective": "lm",
                                                           "chat_template": True})
    dev = chat_rows("dev", args.data_dir, args.eval_examples)
    answers = generate(out, [r["prompt"][0]["content"] for r in dev], max_new_tokens=3,
                       device=training.device)
    want = [r["completion"][0]["content"] for r in dev]
    correct = sum(a.startswith(w) for a, w in zip(answers, want, strict=True))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {"adapter": str(out), "steps": trainer.state.global_step,
               "trainable": model.get_nb_trainable_parameters()[0], "losses": losses,
               "dev_exact_match": correct / len(dev), "dev_examples": len(dev)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"dev exact match {summary['dev_exact_match']:.3f} on {len(dev)} sentences; "
              f"adapter in {out}")
    return summary


if __name__ == "__main__":
    main()
