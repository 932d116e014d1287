"""SmolLM2-135M-Instruct as an instruction model: prompted SST-2 and Textual MNIST as an LM task.

Issue #17's must-show runs, one process per run so that a GPU runs many at once
(``bench/lm_tasks_gpu.sh`` launches them all and prints the tables):

- ``--part sst2`` (A): SST-2 in sparsemerge's zero-shot chat prompt (``ZERO_SHOT_PROMPTS
  ["sst2"]``, the sentence in a user turn), head from the vocabulary rows of the answer tokens
  negative / positive.
  ``zero-shot``: dev accuracy of that head before any step. ``sparta`` / ``lora``: SpaRTA at
  exactly PEFT LoRA r=``--lora-rank``'s trainable count on the same targets (q_proj, v_proj),
  vs that LoRA; same data (the first ``--max-train-examples`` rows, 1 epoch), template, steps.
- ``--part mnist`` (B): Textual MNIST 14x14 as prompt/response in the chat format (the
  response is the digit), loss on the response only. ``rigsa`` / ``sparta`` / ``lora`` on
  every linear layer, SpaRTA at LoRA's count (RIGSA's final count follows from its pruning
  schedule, ``prune_keep ** rounds`` times its sign-consistent share: reported, not forced).
  Held-out exact match of greedy answers (``--eval-examples`` images from 8000 on), then
  forgetting (``sparsemerge.forgetting.lm_forgetting``): zero-shot SST-2 prompt accuracy and
  next-token loss on the shipped plain text, base vs base + adapter.

Runs are ``name[:key=value...]`` (``--runs``, comma-separated): a key that is a training option
(``lr``, ``density``, ``batch_size``...) sets it, any other is a method parameter
(``rounds``, ``prune_keep``...), as in bench/rigsa_mnist.py. Each process writes ``--out``
after every run; a run that raises, or is stopped by SIGTERM (``timeout``), is recorded with
its error and the last step reached, so other runs' results survive.

    python bench/lm_tasks.py --part sst2 --runs sparta --seed 1 --device cuda \\
        --data-dir ../shared/data --out /tmp/lm/sst2-sparta-1.json
    python bench/lm_tasks.py --table /tmp/lm/*.json      # README tables, means over seeds
                                                         # (--out U: their union in U)
    python bench/lm_tasks.py --part mnist --runs rigsa --quick --data-dir ../shared/data \\
        --out /tmp/lm/q.json                             # a few steps on CPU
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from rigsa_mnist import SMOLLM2_GGUF, parse_run, smollm2_dir  # noqa: E402

from sparsemerge.data.textual_mnist import SPLITS, write_jsonl  # noqa: E402
from sparsemerge.forgetting import ZERO_SHOT_PROMPTS  # noqa: E402
from sparsemerge.formats.atomic import atomic_write_bytes  # noqa: E402
from sparsemerge.train import loop  # noqa: E402
from sparsemerge.train.config import TrainConfig  # noqa: E402

START = time.monotonic()
PARTS = ("sst2", "mnist")
METHOD_ORDER = ("zero-shot", "rigsa", "sparta", "lora")
#: Targets: A follows the SpaRTA paper's LoRA baseline (query, value); B every linear layer.
TARGETS = {"sst2": r"\.(q_proj|v_proj)\.weight$", "mnist": None}
#: What --runs defaults to per part (the driver passes one run per process).
DEFAULT_RUNS = {"sst2": "zero-shot,sparta,lora", "mnist": "zero-shot,rigsa,sparta,lora"}
#: What a bare method name means per part (learning rates otherwise bench/rigsa_mnist.py's
#: PRESETS). RIGSA: lr and reset=zero as its MiniLM README run; pruning done by step 500 of
#: 1500, keeping 0.5 per round so its final count lands near LoRA r=8's (~2.3% of the
#: linear weights).
#: SST-2's SpaRTA trains at ``sparsemerge train``'s defaults (``--lr auto``, decay 1.0).
RUN_PRESETS = {"mnist": {"rigsa": "rigsa:lr=1e-2:round_steps=100:rounds=5:prune_keep=0.5:"
                                  "reset=zero"},
               "sst2": {"sparta": "sparta:lr=auto"}}
#: Defaults sized for one H200 running every run at once in about 5 minutes; forget_*:
#: None = the whole SST-2 dev split and the whole shipped plain text.
DEFAULTS = {"sst2": {"batch_size": 16, "max_train_examples": 8000, "max_steps": None,
                     "eval_examples": None, "max_length": 128},
            "mnist": {"batch_size": 16, "max_train_examples": 8000, "max_steps": 1500,
                      "eval_examples": 500, "max_length": 320}}
QUICK = {"max_train_examples": 48, "max_steps": 3, "eval_examples": 6, "batch_size": 4,
         "forget_examples": 6, "forget_texts": 8}
GENERATE_TOKENS = 2  # the digit and the end-of-turn token
EVAL_AT_END = 10**9  # eval_steps: no evaluation before the end (each costs generation time)


class Stopped(Exception):
    """SIGTERM (``timeout``) arrived: record the run as unfinished instead of dying."""


def _stop(signum: int, frame: object) -> None:
    raise Stopped(f"stopped by signal {signum} (timeout?)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def log_steps(every: int, progress: dict, deadline: float) -> None:
    """Log step, loss and seconds per step every ``every`` steps (the loop's rich bar shows
    nothing in a log file), and keep the last ones in ``progress`` for a crash record.
    Past ``deadline`` (``time.monotonic()``) end training after this step, so the run is
    still evaluated and saved within the driver's timeout."""
    inner = loop.train_step

    def step(run: loop.Run, batch: dict) -> tuple[float, int, int]:
        out = inner(run, batch)
        loss = out[0]
        progress.update(step=run.step, total=run.total_steps, loss=loss)
        if time.monotonic() > deadline and run.step < run.total_steps:
            log(f"deadline: training stops at step {run.step} of {run.total_steps}")
            progress["cut_from"] = run.total_steps
            run.total_steps = run.step  # the loop ends here, then evaluates and saves
        if run.step % every == 0 or run.step in (1, run.total_steps):
            rate = (time.perf_counter() - progress["t0"]) / run.step
            log(f"step {run.step}/{run.total_steps} loss {loss:.4f} ({rate:.3f} s/step)")
        return out

    loop.train_step = step


def lora_density(targets: str | None, rank: int) -> tuple[float, int]:
    """(SpaRTA density over ``targets``, LoRA count): the density at which SpaRTA trains as
    many entries as LoRA of ``rank`` on the same linear layers (model built on the meta
    device from the GGUF's config: no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsemerge.models import backbone_of, default_targets

    config = AutoConfig.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    with torch.device("meta"):
        backbone = backbone_of(AutoModelForCausalLM.from_config(config))
    names = default_targets(backbone, targets)
    shapes = [backbone.get_parameter(n).shape for n in names]
    lora = sum(rank * (out + inp) for out, inp in shapes)
    return lora / sum(out * inp for out, inp in shapes), lora


def sst2_dev_head(data_dir: str, n: int, work: Path) -> Path:
    """The first ``n`` SST-2 dev rows as a TSV (quick runs score a few examples only)."""
    lines = (Path(data_dir) / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()
    path = work / f"sst2-dev-{n}.tsv"
    atomic_write_bytes(path, ("\n".join(lines[:n + 1]) + "\n").encode())  # runs share it
    return path


def mnist_files(data_dir: str, n_train: int, n_eval: int, work: Path) -> tuple[Path, Path]:
    """Textual MNIST 14x14 prompt/response JSONL: train from image 0, held-out from 8000."""
    mnist = Path(data_dir) / "mnist"
    images, labels = mnist / "t10k-images-idx3-ubyte.gz", mnist / "t10k-labels-idx1-ubyte.gz"
    out = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        lo, hi = SPLITS[split]
        path = work / f"mnist14-{split}-{n}.jsonl"
        if not path.exists():  # identical content whoever writes it; the write is atomic
            write_jsonl(images, labels, path, size=14, start=lo, stop=min(hi, lo + n),
                        row_format="prompt-response")
        out.append(path)
    return out[0], out[1]


def make_config(args: argparse.Namespace, name: str, overrides: dict, params: dict,
                output: Path | None) -> TrainConfig:
    """The run's TrainConfig: the part's data, template and targets; the method's options."""
    work = Path(args.workdir)
    common = dict(base=smollm2_dir(), gguf_file=SMOLLM2_GGUF, device=args.device,
                  base_dtype=args.base_dtype, seed=args.seed, batch_size=args.batch_size,
                  max_length=args.max_length, max_steps=args.max_steps, epochs=1,
                  max_train_examples=args.max_train_examples, targets=TARGETS[args.part],
                  eval_steps=EVAL_AT_END, eval_batch_size=args.batch_size * 2, quiet=True,
                  output=None if output is None else str(output))
    if args.part == "sst2":
        template, answers = ZERO_SHOT_PROMPTS["sst2"]
        data = dict(task="sst2", data_dir=args.data_dir, template=template, chat_template=True,
                    label_tokens=list(answers))
        if args.eval_examples is not None:
            data["eval_file"] = str(sst2_dev_head(args.data_dir, args.eval_examples, work))
    else:
        train, dev = mnist_files(args.data_dir, args.max_train_examples, args.eval_examples,
                                 work)
        data = dict(objective="lm", train_file=str(train), eval_file=str(dev),
                    chat_template=True, eval_generate=GENERATE_TOKENS)
    if name == "sparta" and "density" not in overrides:
        overrides = {**overrides, "density": lora_density(TARGETS[args.part], args.lora_rank)[0]}
    if name == "lora":
        params = {"rank": str(args.lora_rank), **params}
    method = "sparta" if name == "zero-shot" else name  # zero-shot: evaluated at step 0
    return TrainConfig(method=method, method_params=params, **{**common, **data, **overrides})


def run_one(spec: str, args: argparse.Namespace, progress: dict) -> dict:
    """Train (or, for zero-shot, only set up) one run; the record says how far it got
    (``progress``: what :func:`log_steps` saw last)."""
    from sparsemerge.data.tasks import plain_text_sample
    from sparsemerge.forgetting import lm_forgetting

    label, spec = spec, RUN_PRESETS.get(args.part, {}).get(spec, spec)
    name, overrides, params = parse_run(spec)
    out = Path(args.workdir) / f"{args.part}-{spec.replace(':', '_').replace('=', '')}-s{args.seed}"
    rec: dict = {"part": args.part, "label": label, "spec": spec, "method": name,
                 "seed": args.seed, "config": {**overrides, **params}}
    progress.update(t0=time.perf_counter(), step=0, total=None, loss=None, cut_from=None)
    t0 = time.perf_counter()
    try:
        config = make_config(args, name, overrides, params, None if name == "zero-shot" else out)
        rec["density"] = config.density if name == "sparta" else None
        log(f"== {args.part} {spec} seed {args.seed}: loading")
        run = loop.setup(config)
        rec["data"] = run.data_info
        progress["t0"] = time.perf_counter()
        if name == "zero-shot":
            rec.update(metrics=loop.evaluate(run), trainable=0, steps=0)
        else:
            log(f"{name}: {run.method.num_trainable():,} trainable, {run.total_steps} steps")
            result = loop.train(config, run=run)
            rec.update(metrics=result.metrics, trainable=result.trainable,
                       head_params=result.head_params, steps=result.steps,
                       train_s=round(time.perf_counter() - progress["t0"], 1),
                       planned_steps=progress["cut_from"] or result.steps)
            training = result.adapter.extra.get("training", {})
            rec.update({k: training[k] for k in ("density", "prune_history") if k in training})
        log(f"{spec}: dev {rec['metrics']}")
        if args.part == "mnist" and name != "zero-shot" and not args.no_forgetting:
            t1 = time.perf_counter()
            rec["forgetting"] = lm_forgetting(
                out, texts=plain_text_sample()[:args.forget_texts], tasks=["sst2"],
                data_dir=args.data_dir, max_examples=args.forget_examples, batch_size=32,
                max_length=256, device=args.device)
            rec["forgetting_s"] = round(time.perf_counter() - t1, 1)
            log(f"{spec}: forgetting text loss {rec['forgetting']['base_loss']:.4f} -> "
                f"{rec['forgetting']['adapted_loss']:.4f}")
    except Exception as exc:  # recorded, so the other runs' results survive
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc()[-3000:]
        rec["reached"] = {k: progress[k] for k in ("step", "total", "loss")}
        log(f"{spec}: FAILED at step {progress['step']}: {rec['error']}")
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    return rec


# ----------------------------------------------------------------------------------- tables


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _group(runs: list[dict], part: str) -> dict[str, list[dict]]:
    """The part's runs by label, zero-shot first, then as METHOD_ORDER; seeds in order."""
    def key(r: dict) -> tuple:
        m = r["method"]
        return METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), r["label"], \
            r["seed"]

    groups: dict[str, list[dict]] = {}
    for r in sorted((r for r in runs if r["part"] == part), key=key):
        groups.setdefault(r["label"], []).append(r)
    return groups


def _steps(r: dict) -> str:
    planned = r.get("planned_steps", r["steps"])
    return str(r["steps"]) if r["steps"] == planned else f"{r['steps']} of {planned}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def sst2_table(runs: list[dict]) -> tuple[list[str], dict]:
    lines = ["| run | trainable | steps | dev accuracy per seed | mean | wall (s) |",
             "|---|---:|---:|---|---:|---:|"]
    summary = {}
    for label, rs in _group(runs, "sst2").items():
        ok = [r for r in rs if "error" not in r]
        accs = [r["metrics"]["accuracy"] for r in ok]
        per_seed = ", ".join(f"s{r['seed']} {_pct(r['metrics']['accuracy'])}" if "error" not in r
                             else f"s{r['seed']} error" for r in rs)
        trainable = ok[0]["trainable"] if ok else 0
        lines.append(f"| {label} | {trainable:,} | {_steps(ok[0]) if ok else '-'} | {per_seed}"
                     f" | {_pct(_mean(accs))} | {_mean([r['wall_s'] for r in rs]):.0f} |")
        summary[label] = {"mean_accuracy": _mean(accs), "seeds": [r["seed"] for r in ok],
                          "trainable": trainable}
    if {"sparta", "lora"} <= set(summary) and None not in (summary["sparta"]["mean_accuracy"],
                                                           summary["lora"]["mean_accuracy"]):
        diff = summary["sparta"]["mean_accuracy"] - summary["lora"]["mean_accuracy"]
        lines += ["", f"SpaRTA - LoRA: {100 * diff:+.2f} points (means over seeds)"]
    return lines, summary


def _forget_cells(r: dict) -> tuple[str, str]:
    f = r.get("forgetting")
    if not f:
        return "-", "-"
    z = f["zero_shot"]["sst2"]
    return (f"{_pct(z['base'])} -> {_pct(z['adapted'])}",
            f"{f['base_loss']:.3f} -> {f['adapted_loss']:.3f} ({f['forgetting']:+.3f})")


def mnist_table(runs: list[dict]) -> tuple[list[str], dict]:
    lines = ["| run | seed | trainable | steps | held-out exact match | SST-2 zero-shot before -> "
             "after | text loss before -> after (nats) | wall (s) |",
             "|---|---:|---:|---:|---:|---|---|---:|"]
    summary = {}
    for label, rs in _group(runs, "mnist").items():
        for r in rs:
            if "error" in r:
                lines.append(f"| {label} | {r['seed']} | - | {r['reached']['step']} (stopped) | "
                             f"error: {r['error'][:80]} | - | - | {r['wall_s']:.0f} |")
                continue
            sst2, text = _forget_cells(r)
            lines.append(f"| {label} | {r['seed']} | {r['trainable']:,} | {_steps(r)} | "
                         f"{_pct(r['metrics']['exact_match'])} | {sst2} | {text} | "
                         f"{r['wall_s']:.0f} |")
        ok = [r for r in rs if "error" not in r]
        summary[label] = {"mean_exact_match": _mean([r["metrics"]["exact_match"] for r in ok]),
                          "trainable": ok[0]["trainable"] if ok else 0,
                          "text_forgetting": _mean([r["forgetting"]["forgetting"] for r in ok
                                                    if "forgetting" in r]),
                          "sst2_forgetting": _mean([r["forgetting"]["zero_shot"]["sst2"]
                                                    ["forgetting"] for r in ok
                                                    if "forgetting" in r])}
    return lines, summary


def tables(paths: list[str], out_path: str | None = None) -> None:
    """Print the README tables of the runs in ``paths``; with ``out_path`` also write their
    union there, each run with the command line that produced it."""
    runs, setups = [], {}
    for p in paths:
        res = json.loads(Path(p).read_text())
        runs += [{"command": res["setup"]["command"], **r} for r in res["runs"]]
        setups.setdefault(res["setup"]["part"], res["setup"])
    out: dict = {"errors": [f"{r['part']} {r['label']} s{r['seed']}: {r['error']}"
                            for r in runs if "error" in r]}
    for part, make in (("sst2", sst2_table), ("mnist", mnist_table)):
        if part not in setups:
            continue
        s = setups[part]
        lines, out[part] = make(runs)
        print(f"\n{part} on SmolLM2-135M-Instruct ({s['base_dtype']} base, {s['device']}): "
              f"{s['max_train_examples']} train examples, batch {s['batch_size']}, "
              f"max steps {s['max_steps']}, eval examples {s['eval_examples'] or 'all'}\n")
        print("\n".join(lines))
        print(f"\ncommand (one run): {s['command']}")
    print(json.dumps(out))
    if out_path is not None:
        union = {"command": " ".join([sys.executable, *sys.argv]), "setups": setups,
                 "summary": out, "runs": runs}
        atomic_write_bytes(Path(out_path), (json.dumps(union, indent=1, default=str) + "\n")
                           .encode())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=PARTS)
    ap.add_argument("--runs", default=None, help="comma-separated run specs (default: the "
                    "part's whole set, see DEFAULT_RUNS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--base-dtype", default=None, help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared"
                                              / "data"))
    ap.add_argument("--max-train-examples", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--eval-examples", type=int, default=None,
                    help="dev / held-out examples scored (sst2 default: all 872)")
    ap.add_argument("--forget-examples", type=int, default=None,
                    help="SST-2 dev examples of the forgetting probe (default all)")
    ap.add_argument("--forget-texts", type=int, default=None,
                    help="plain-text sentences of the forgetting probe (default all ~300)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--no-forgetting", action="store_true")
    ap.add_argument("--deadline-s", type=float, default=None, help="seconds after the start "
                    "at which training ends early (then evaluation and forgetting run); the "
                    "table shows the steps done")
    ap.add_argument("--quick", action="store_true", help="a few steps and examples: the code "
                    "path only, in minutes on a CPU")
    ap.add_argument("--workdir", default="/tmp/sparsemerge-lm-tasks")
    ap.add_argument("--out", default=None, help="results JSON (with --table: the union of "
                    "the files, each run with its command)")
    ap.add_argument("--table", nargs="+", metavar="JSON")
    args = ap.parse_args(argv)
    if args.table:
        tables(args.table, args.out)
        return
    if args.part is None:
        ap.error("--part is required (or --table)")
    for key, value in {**DEFAULTS[args.part], **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.base_dtype = args.base_dtype or ("bf16" if args.device == "cuda" else "fp32")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _stop)
    setup = {k: getattr(args, k) for k in ("part", "seed", "device", "base_dtype", "data_dir",
                                           "max_train_examples", "max_steps", "eval_examples",
                                           "forget_examples", "forget_texts", "batch_size",
                                           "max_length",
                                           "lora_rank", "quick")}
    setup.update(command=" ".join([sys.executable, *sys.argv]), torch=torch.__version__,
                 gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
    results = {"setup": setup, "runs": []}
    out = Path(args.out) if args.out else None
    progress: dict = {}
    log_steps(args.log_every, progress, START + (args.deadline_s or math.inf))
    for spec in [s for s in (args.runs or DEFAULT_RUNS[args.part]).split(",") if s]:
        results["runs"].append(run_one(spec, args, progress))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(json.dumps([{k: r.get(k) for k in ("label", "seed", "trainable", "metrics", "error")}
                      for r in results["runs"]], default=str))


if __name__ == "__main__":
    main()
