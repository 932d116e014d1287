"""Merges that keep every task: MiniLM-L6 SpaRTA adapters for SST-2, CoLA, MRPC and SMS spam.

One configuration for every task: ``sparsemerge train``'s defaults for SpaRTA (density 0.5 %,
``--lr auto``, ``--weight-decay auto``, 3 epochs, batch 32, max length 128; ``--lr X`` sets a
fixed rate and ``--weight-decay X`` a decay), with a mask seed of its own per task and seed
(``10 * task index + seed``: adapters meant to be merged should not share one mask) and the
last ``--holdout`` training rows left out of training (``max_train_examples``), so that ``merge
--calibrate`` has training rows no adapter saw (``--max-train N``: at most the first N rows of
each task; SST-2's 67k would take most of the time). Each task is scored on its dev split
alone, then merged two at a time (all 6 pairs) and all 4 at once with every ``--merges`` spec
(``METHOD[:k=v;...]``; ``calibrate=N`` runs ``merge --calibrate N``, ``learn_weights=S``
``merge --learn-weights S``, ``refit_heads=S`` ``merge --refit-heads S``), scored through the
written multi-head model (``--no-pairs``: only the merge of all ``--tasks``).
Metrics ×100: SST-2 accuracy, CoLA Matthews, MRPC F1, SMS spam F1 (each task's preset
headline). Reported per merge: each task's change and the worst one. ``--base-model smollm2``
runs the same on SmolLM2-135M-Instruct (bf16 base), each task asked in the chat format with a
label-token head (the SpaRTA paper's setting; ``--epochs`` / ``--batch-size`` as ``train``'s).
CoLA and MRPC are trained per ``--seeds``; SST-2 and SMS spam once (``--base-seed``).

Phases, each its own process so several run at once on one GPU:

    python bench/merge_tasks.py --train-only --tasks sst2 --seeds 1 --device cuda \\
        --data-dir ../shared/data --workdir runs/merge-tasks            # one per task & seed
    python bench/merge_tasks.py --merge --seeds 1 --device cuda --data-dir ../shared/data \\
        --workdir runs/merge-tasks --out bench/results/merge-tasks-s1.json   # one per seed
    python bench/merge_tasks.py --table bench/results/merge-tasks-s*.json \\
        --out bench/results/merge-tasks.json                           # mean over the seeds

Without ``--train-only`` / ``--merge`` / ``--table`` every phase runs in one process (missing
adapters are trained), or with ``--jobs N`` as the commands above, N at a time. ``--quick``:
64 training rows, 4 steps, 32 dev rows, one pair and the 4-way merge, calibration on 16 rows:
the same code path in a few minutes on a CPU. Progress goes to stderr; the last stdout line
is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from statistics import fmean

from merge_accuracy import parse_merges
from rigsa_mnist import SMOLLM2_GGUF, smollm2_dir

TASK_ORDER = ("sst2", "cola", "mrpc", "sms_spam")
MERGES = ("sum,ties:density=1.0,sum:calibrate=300,ties:density=1.0;calibrate=300,"
          "sum:refit_heads=300,sum:calibrate=300;refit_heads=300")
QUICK_MERGES = "sum,ties:density=1.0,sum:calibrate=16;refit_heads=8"
TARGET = {2: -1.0, 4: -2.0}  # the bar: worst change within 1 point (pairs), 2 (4-way)
SMS_PROMPT = ("Is the following text message spam? Respond Yes or No.\n\n{sms_message}",
              ("No", "Yes"))  # ham, spam


def base_options(task: str, base_model: str) -> dict:
    """TrainConfig fields of ``--base-model``: MiniLM-L6 (sparsemerge's default base, a fresh
    classification head) or SmolLM2-135M-Instruct (bf16 base; each task asked in the chat
    format through ``ZERO_SHOT_PROMPTS``' prompt, its head started from the answers' vocabulary
    rows, as the SpaRTA paper does)."""
    if base_model == "minilm":
        return {}
    from sparsemerge.forgetting import ZERO_SHOT_PROMPTS

    template, answers = {**ZERO_SHOT_PROMPTS, "sms_spam": SMS_PROMPT}[task]
    return dict(base=smollm2_dir(), gguf_file=SMOLLM2_GGUF, base_dtype="bf16",
                template=template, chat_template=True, label_tokens=list(answers))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def phase_progress(prefix: str, every: int = 50):
    """A ``run_recipe`` progress callback that logs the learning / refitting phases' steps."""
    def report(phase: str, done: int, total: int) -> None:
        if phase in ("learn", "calibrate") and (done % every == 0 or done == total):
            log(f"{prefix}: {phase} {done}/{total}")
    return report


def adapter_dir(work: Path, task: str, seed: int) -> Path:
    return work / f"{task}-s{seed}"


def task_seed(task: str, seed: int, args: argparse.Namespace) -> int:
    return seed if task in args.seeded_tasks else args.base_seed


def train_one(task: str, seed: int, args: argparse.Namespace) -> Path:
    """Train (unless present) the adapter of ``task`` for run ``seed``; returns its folder."""
    from sparsemerge.data.tasks import load_task
    from sparsemerge.train.config import TrainConfig
    from sparsemerge.train.loop import train

    out = adapter_dir(Path(args.workdir), task, seed)
    if (out / "adapter.safetensors").exists():
        return out
    rows = len(load_task(task, args.data_dir, "train"))
    kept = min(64 if args.quick else args.max_train or rows, rows - args.holdout)
    cfg = TrainConfig(task=task, data_dir=str(Path(args.data_dir).resolve()), seed=seed,
                      method_params={"mask_seed": 10 * TASK_ORDER.index(task) + seed},
                      lr=args.lr, weight_decay=args.weight_decay, targets=args.targets,
                      density=args.density, epochs=args.epochs, batch_size=args.batch_size,
                      **base_options(task, args.base_model), max_train_examples=kept,
                      max_steps=4 if args.quick else None,
                      eval_steps=5 if args.quick else None,  # quick: the final dev pass only
                      device=args.device, quiet=True, output=str(out))
    t0 = time.perf_counter()
    train(cfg)
    log(f"trained {task} seed {seed} on {kept} of {rows} rows in "
        f"{time.perf_counter() - t0:.0f} s -> {out}")
    return out


def dev_data(task: str, args: argparse.Namespace):
    from sparsemerge.data.tasks import load_task

    data = load_task(task, args.data_dir, "dev")
    return data.select(range(min(args.max_dev, len(data)))) if args.max_dev else data


def headline(task: str, metrics: dict[str, float]) -> float:
    from sparsemerge.data.tasks import TASKS

    return round(100 * metrics[TASKS[task].metrics[0]], 2)


def merge_seed(seed: int, args: argparse.Namespace) -> dict:
    """Every task alone and every merge of the run ``seed``'s adapters, on the dev splits."""
    from sparsemerge.evaluate import head_template, load_adapted
    from sparsemerge.merge.recipe import build_recipe, run_recipe
    from sparsemerge.multihead import MultiHeadModel
    from sparsemerge.scoring import evaluate_data

    work = Path(args.workdir)
    paths = {t: train_one(t, task_seed(t, seed, args), args) for t in args.tasks}
    dev = {t: dev_data(t, args) for t in args.tasks}
    single = {}
    for t, p in paths.items():
        model, tok, adapter, name = load_adapted(str(p), device=args.device)
        single[t] = headline(t, evaluate_data(model, tok, dev[t],  # as the merged heads do
                                              template=head_template(adapter, name)))
        log(f"seed {seed} {t} alone: {single[t]:.2f}")
    combos = [list(c) for c in itertools.combinations(args.tasks, 2)] if args.pairs else []
    if len(args.tasks) > 2 or not combos:
        combos.append(list(args.tasks))
    if args.quick:  # the code path of both merge sizes, not every pair
        combos = combos[:1] + combos[len(args.tasks) * (len(args.tasks) - 1) // 2:]
    merges: dict[str, dict] = {}
    for combo in combos:
        key = "+".join(combo)
        merges[key] = {}
        for label, method, params in parse_merges(args.merges):
            params = dict(params)
            calibrate = int(params.pop("calibrate", 0))
            refit = int(params.pop("refit_heads", 0))
            learn = int(params.pop("learn_weights", 0))
            tag = label.replace(":", "-").replace(";", "-").replace("=", "")
            out = work / "merged" / f"s{seed}-{key}-{tag}"
            recipe = build_recipe([str(paths[t]) for t in combo], method=method, params=params,
                                  heads=True, calibrate=calibrate, learn_weights=learn,
                                  refit_heads=refit, output=str(out))
            rep = run_recipe(recipe, progress=phase_progress(f"seed {seed} {key} {label}"))
            model = MultiHeadModel.from_pretrained(out, device=args.device)
            metrics = model.evaluate({t: dev[t] for t in combo})
            shutil.rmtree(out)
            scores = {t: headline(t, metrics[t]) for t in combo}
            change = {t: round(scores[t] - single[t], 2) for t in combo}
            entry = {"scores": scores, "change": change, "worst": min(change.values()),
                     "weights": rep["weights"], "parameters": rep["parameters"],
                     "seconds": rep["seconds"]}
            entry.update({k: rep[k] for k in ("calibration", "learned_weights", "refit_heads")
                          if k in rep})
            merges[key][label] = entry
            log(f"seed {seed} {key} {label}: " + ", ".join(
                f"{t} {scores[t]:.2f} ({change[t]:+.2f})" for t in combo)
                + f"; weights {rep['weights']}")
    return {"single": single, "merges": merges,
            "mean_abs_delta": {t: mean_abs_delta(p) for t, p in paths.items()},
            "adapters": {t: str(p) for t, p in paths.items()}}


def mean_abs_delta(path: Path) -> float:
    """Mean |delta| over the adapter's trained entries: how far training moved each one (the
    size that decides how much a merge disturbs the other tasks)."""
    from sparsemerge.formats.adapter_file import load_adapter

    values = [t.sparse.values.float().abs() for t in load_adapter(path).targets.values()]
    return round(float(sum(v.sum() for v in values) / sum(v.numel() for v in values)), 4)


def table(runs: dict[str, dict]) -> dict:
    """Per merge and method, the mean over the seeds that ran it of every score, its change
    against the same seeds' own adapters, and the worst change (a merge run on seed 1 only is
    compared with seed 1's adapters)."""
    tasks = list(dict.fromkeys(t for r in runs.values() for t in r["single"]))
    single = {t: round(fmean(r["single"][t] for r in runs.values() if t in r["single"]), 2)
              for t in tasks}
    merges: dict[str, dict] = {}
    for key in dict.fromkeys(k for r in runs.values() for k in r["merges"]):
        merges[key] = {}
        for label in dict.fromkeys(lb for r in runs.values() for lb in r["merges"].get(key, {})):
            have = {s: r for s, r in runs.items() if label in r["merges"].get(key, {})}
            merged = next(iter(have.values()))["merges"][key][label]["scores"]
            scores = {t: round(fmean(r["merges"][key][label]["scores"][t]
                                     for r in have.values()), 2) for t in merged}
            change = {t: round(scores[t] - fmean(r["single"][t] for r in have.values()), 2)
                      for t in scores}
            merges[key][label] = {"scores": scores, "change": change,
                                  "worst": min(change.values()), "seeds": sorted(have)}
    labels = list(dict.fromkeys(label for m in merges.values() for label in m))
    verdict = {}
    for label in labels:  # a method run on some merges only is judged on those, never passed
        worst = {size: min((m[label]["worst"] for k, m in merges.items()
                            if len(k.split("+")) == size and label in m), default=None)
                 for size in TARGET}
        run = sum(label in m for m in merges.values())
        verdict[label] = {"worst_pair": worst[2], "worst_4way": worst[4], "merges_run": run,
                          "meets_target": run == len(merges) and all(
                              w is None or w >= TARGET[s] for s, w in worst.items())}
    lines = ["| merge | method | seeds | " + " | ".join(tasks) + " | worst |",
             "|---|---|---|" + "---|" * (len(tasks) + 1),
             f"| alone | - | {','.join(sorted(runs))} | "
             + " | ".join(f"{single[t]:.2f}" for t in tasks) + " | |"]
    for key, by_label in merges.items():
        for label, m in by_label.items():
            cells = [f"{m['scores'][t]:.2f} ({m['change'][t]:+.2f})" if t in m["scores"] else ""
                     for t in tasks]
            lines.append(f"| {key} | {label} | {','.join(m['seeds'])} | " + " | ".join(cells)
                         + f" | {m['worst']:+.2f} |")
    return {"mean_over_seeds": sorted(runs), "single": single, "merges": merges, "verdict": verdict,
            "markdown": "\n".join(lines)}


def run_parallel(seeds: list[int], args: argparse.Namespace) -> list[str]:
    """Every training run, then (unless ``--train-only``) every seed's merges, as ``--jobs``
    processes at a time (logs in WORKDIR/logs); returns the per-seed result files."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    work = Path(args.workdir)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    common = ["--data-dir", args.data_dir, "--workdir", args.workdir, "--device", args.device,
              "--lr", str(args.lr), "--weight-decay", str(args.weight_decay),
              "--density", str(args.density), "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size), "--base-model", args.base_model,
              *(["--targets", args.targets] if args.targets else []),
              "--holdout", str(args.holdout), "--merges", args.merges, "--base-seed",
              str(args.base_seed), "--seeded-tasks", ",".join(args.seeded_tasks),
              *(["--max-dev", str(args.max_dev)] if args.max_dev else []),
              *(["--max-train", str(args.max_train)] if args.max_train else []),
              *(["--quick"] if args.quick else [])]

    def launch(name: str, extra: list[str]) -> None:
        cmd = [sys.executable, __file__, *extra, *common]
        log(f"$ {shlex.join(cmd)}")
        with open(work / "logs" / f"{name}.log", "w") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"{name} failed: see {work / 'logs' / f'{name}.log'}")

    runs = sorted({(t, task_seed(t, s, args)) for s in seeds for t in args.tasks})
    outs = [str(work / f"merge-s{s}.json") for s in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda r: launch(f"train-{r[0]}-s{r[1]}", [
            "--train-only", "--tasks", r[0], "--seeds", str(r[1])]), runs))
        if args.train_only:
            return []
        list(pool.map(lambda so: launch(f"merge-s{so[0]}", [
            "--merge", "--tasks", ",".join(args.tasks), "--seeds", str(so[0]), "--out", so[1]]),
            zip(seeds, outs, strict=True)))
    return outs


def main() -> None:
    from sparsemerge.train.config import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--workdir", default="runs/merge-tasks")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--tasks", default=",".join(TASK_ORDER))
    ap.add_argument("--seeds", default="1", help="comma-separated runs of the --seeded-tasks")
    ap.add_argument("--seeded-tasks", default="cola,mrpc",
                    help="tasks trained once per seed; the others once, with --base-seed")
    ap.add_argument("--base-seed", type=int, default=1)
    ap.add_argument("--holdout", type=int, default=300,
                    help="last training rows of each task left out of training (calibration)")
    ap.add_argument("--merges", default=None, help="comma-separated METHOD[:k=v;...] specs "
                    f"(default {MERGES}; --quick: {QUICK_MERGES})")
    ap.add_argument("--no-pairs", dest="pairs", action="store_false",
                    help="merge all --tasks at once only, not two at a time")
    ap.add_argument("--max-dev", type=int, default=None, help="score only the first N dev rows")
    ap.add_argument("--max-train", type=int, default=None,
                    help="train on at most the first N rows of each task (SST-2 has 67k)")
    ap.add_argument("--lr", default="auto",
                    help="the adapters' learning rate (default auto: train's SpaRTA rule)")
    ap.add_argument("--weight-decay", default="auto",
                    help="the adapters' decoupled weight decay (default auto: SpaRTA's 1.0)")
    ap.add_argument("--targets", default=None, help="the adapters' --targets regex "
                    "(default: every linear layer)")
    ap.add_argument("--density", type=float, default=TrainConfig.density,
                    help="the adapters' SpaRTA density (default: sparsemerge train's)")
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--base-model", choices=("minilm", "smollm2"), default="minilm",
                    help="minilm: MiniLM-L6 with a new head per task; smollm2: "
                    "SmolLM2-135M-Instruct (bf16), each task prompted in the chat format with "
                    "label-token heads")
    ap.add_argument("--quick", action="store_true")
    phase = ap.add_mutually_exclusive_group()
    phase.add_argument("--train-only", action="store_true")
    phase.add_argument("--merge", action="store_true")
    phase.add_argument("--table", nargs="+", metavar="FILE", help="per-seed --out files")
    ap.add_argument("--jobs", type=int, default=1, help="all phases as this many processes "
                    "at a time (one per training run, then one per seed; with --train-only the "
                    "training runs only)")
    ap.add_argument("--out", help="results JSON (default: printed only)")
    args = ap.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.seeded_tasks = [t for t in args.seeded_tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick:
        args.max_dev = args.max_dev or 32
        args.holdout = min(args.holdout, 16)
    args.merges = args.merges or (QUICK_MERGES if args.quick else MERGES)
    setup = {k: v for k, v in vars(args).items() if k != "table"}
    setup["command"] = " ".join(["python", *sys.argv])

    if args.train_only:
        if args.jobs > 1:
            run_parallel(seeds, args)
        else:
            for seed in seeds:
                for t in args.tasks:
                    train_one(t, task_seed(t, seed, args), args)
        print(json.dumps({"trained": [str(adapter_dir(Path(args.workdir), t,
                                                       task_seed(t, s, args)))
                                      for s in seeds for t in args.tasks]}))
        return
    if args.jobs > 1 and not (args.merge or args.table):
        args.table = run_parallel(seeds, args)
    if args.table:
        runs: dict[str, dict] = {}
        for f in args.table:  # several files of one seed (more merges run later): union
            part = json.loads(Path(f).read_text())
            for seed, run in part["seeds"].items():
                if seed not in runs:
                    runs[seed] = run
                    continue
                have = runs[seed]["single"]
                if any(have.get(t, v) != v for t, v in run["single"].items()):
                    raise SystemExit(f"{f}: seed {seed} scored other adapters than before")
                have.update(run["single"])
                for key, by_label in run["merges"].items():
                    runs[seed]["merges"].setdefault(key, {}).update(by_label)
            setup.setdefault("seed_commands", []).extend(  # a union file: its own list
                part["setup"].get("seed_commands") or [part["setup"]["command"]])
        result = {"setup": setup, "seeds": runs, **table(runs)}
    else:
        runs = {str(s): merge_seed(s, args) for s in seeds}
        result = {"setup": setup, "seeds": runs, **({} if args.merge else table(runs))}
    if "markdown" in result:
        print(result["markdown"], file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"verdict": result.get("verdict"), "single": result.get("single"),
                      "out": args.out}))


if __name__ == "__main__":
    main()
