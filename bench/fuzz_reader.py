"""Fuzz the adapter reader: mutated files must load valid or raise FormatError, nothing else.

The command over :mod:`sparsemerge._testing.fuzz`, which holds the corpus (valid adapter
files covering every index codec, value dtype and storage feature; merged multi-head model
directories), the 38 adapter mutators (bytes, safetensors header, sparsemerge config, tensor
contents), the merged-model mutations, the independent checker and the harness. This file
parses the arguments, shows progress and prints the report.

Outcomes per case: ``loaded_ok`` (the reader accepted it *and* an independent checker
finds every invariant true *and* saving and re-loading it gives the same content; split
into ``identical`` to the unmutated file and ``changed``, e.g. a flipped mantissa bit:
the format has no checksum), ``rejected_clean`` (FormatError whose message names the
file), or a failure: ``other_exceptions`` (any other exception type, or a FormatError not
naming the file), ``invalid_loaded`` (accepted but an invariant fails), ``hangs`` (over the
per-case time limit), ``crashes`` (the worker process died), ``big_allocs`` (the case
raised the worker's peak RSS by more than ``--alloc-limit-mb``). Workers run under
``RLIMIT_AS`` (their start-up size + 3 GiB), so an allocation driven by a lying header
fails inside the case instead of swapping the machine. Every failure is printed with its
reproducer.

    python bench/fuzz_reader.py --cases 10000 --seed 0      # both targets, ~1 min each
    python bench/fuzz_reader.py --seed 0 --case 1234 -v     # replay one case, in process
    python bench/fuzz_reader.py --seed 0 --case 1234 --dump bad.safetensors

Targets: ``adapter`` (``load_adapter`` on ``adapter.safetensors``) and ``merged``
(``read_merged`` on merged multi-head model directories: JSON, safetensors and layout
mutations; its checker also parses every backbone shard it accepted). Per target: a table
of outcomes per mutator, the failures grouped by kind, and one JSON line with the totals.
Exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsemerge._testing.fuzz import TARGETS, Outcome, Runner, run_parallel
from sparsemerge.errors import FormatError


def signature(o: Outcome) -> str:
    """A failure's kind and exception type, e.g. 'other_exception RecursionError'."""
    head = o.detail.split(";", 1)[0].split(":", 1)[0].strip() if o.failed else ""
    return f"{o.kind} {head[:60]}".strip()


KINDS = ["loaded_identical", "loaded_changed", "rejected_clean", "other_exception",
         "invalid_loaded", "hang", "crash", "big_alloc", "harness_error"]


def summarize(target: str, outcomes: list[Outcome], seconds: float, seed: int,
              peak_parent_mb: float) -> dict[str, Any]:
    count = Counter(o.kind for o in outcomes)
    return {
        "target": target,
        "cases": len(outcomes),
        "seed": seed,
        "loaded_ok": count["loaded_identical"] + count["loaded_changed"],
        "loaded_identical": count["loaded_identical"],
        "loaded_changed": count["loaded_changed"],
        "rejected_clean": count["rejected_clean"],
        "other_exceptions": count["other_exception"],
        "invalid_loaded": count["invalid_loaded"],
        "hangs": count["hang"],
        "crashes": count["crash"],
        "big_allocs": count["big_alloc"],
        "harness_errors": count["harness_error"],
        "failures": sum(o.failed for o in outcomes),
        "max_rss_mb": round(max([o.peak_rss_mb for o in outcomes] + [peak_parent_mb]), 1),
        "max_case_rss_delta_mb": round(max([o.rss_delta_mb for o in outcomes] + [0.0]), 1),
        "seconds": round(seconds, 1),
    }


def print_table(outcomes: list[Outcome], family: Callable[[str], str]) -> None:
    """Outcomes per mutator (a case with several mutators counts in each of their rows)."""
    rows: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        for m in set(o.mutators) or {"(none)"}:
            rows[m][o.kind] += 1
        rows["ALL"][o.kind] += 1
    cols = ["cases", "ok", "changed", "rejected", "FAIL"]
    print(f"{'mutator':22s} {'family':10s} " + " ".join(f"{c:>8s}" for c in cols))
    for m in sorted(rows, key=lambda m: (m == "ALL", family(m), m)):
        r = rows[m]
        fails = sum(v for k, v in r.items() if k not in KINDS[:3])
        vals = [sum(r.values()), r["loaded_identical"], r["loaded_changed"],
                r["rejected_clean"], fails]
        fam = "" if m == "ALL" else family(m)
        print(f"{m:22s} {fam:10s} " + " ".join(f"{v:8d}" for v in vals))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first case number")
    ap.add_argument("--case", type=int, help="replay one case in this process")
    ap.add_argument("--dump", type=Path, help="with --case: write the mutated file here")
    ap.add_argument("--target", choices=sorted(TARGETS), action="append")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case")
    ap.add_argument("--alloc-limit-mb", type=float, default=512.0,
                    help="a case raising peak RSS by more than this fails")
    ap.add_argument("--as-limit-mb", type=float, default=3072.0,
                    help="RLIMIT_AS headroom of each worker (0: none)")
    ap.add_argument("--show", type=int, default=3,
                    help="print the first N failures of each kind in full")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every failure")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    targets = args.target or sorted(TARGETS)
    failed_any = False
    with tempfile.TemporaryDirectory(prefix="sm-fuzz-corpus-") as tmp:
        for tname in targets:
            target = TARGETS[tname]
            corpus = target.build(Path(tmp) / tname)
            if args.case is not None:
                work = Path(tmp) / f"{tname}-work"
                work.mkdir()
                runner = Runner(target, corpus, work, args.seed, args.timeout,
                                args.alloc_limit_mb)
                o = runner.run(args.case)
                if args.dump:
                    if runner.file.is_dir():
                        shutil.copytree(runner.file, args.dump, symlinks=True)
                    else:
                        shutil.copyfile(runner.file, args.dump)
                print(f"case {args.case} seed {args.seed}: {o.source} + "
                      f"{', '.join(o.mutators)}\n  -> {o.kind}: {o.detail}")
                if args.verbose and o.kind == "rejected_clean":
                    try:
                        target.load(runner.file)
                    except FormatError as exc:
                        print(f"  message: {ascii(str(exc))}")
                failed_any |= o.failed
                continue
            outcomes: list[Outcome] = []
            t0 = time.perf_counter()
            n = args.cases
            step = max(1, n // 20)

            shown: Counter = Counter()

            def on_result(o: Outcome, outcomes=outcomes, t0=t0, n=n, step=step,
                          tname=tname, shown=shown) -> None:
                outcomes.append(o)
                sig = signature(o)
                shown[sig] += 1
                if o.failed and (shown[sig] <= args.show or args.verbose):
                    print(f"FAIL case {o.case} ({o.kind}) {o.source} + "
                          f"{', '.join(o.mutators)}: {o.detail.strip()}\n"
                          f"  reproduce: python bench/fuzz_reader.py --target {tname} "
                          f"--seed {args.seed} --case {o.case} -v", flush=True)
                if len(outcomes) % step == 0 and args.verbose:
                    print(f"  {len(outcomes)}/{n} cases, {time.perf_counter() - t0:.0f} s",
                          file=sys.stderr, flush=True)

            run_parallel(tname, corpus, args.seed, range(args.start, args.start + n),
                         args.workers, args.timeout, args.alloc_limit_mb, args.as_limit_mb,
                         on_result)
            outcomes.sort(key=lambda o: o.case)
            seconds = time.perf_counter() - t0
            print(f"\n== target {tname}: {n} cases from {len(corpus)} corpus files, "
                  f"seed {args.seed} ==")
            print_table(outcomes, target.mutator_family)
            failures = [o for o in outcomes if o.failed]
            if failures:
                print("\nfailures by kind (first case of each):")
                first: dict[str, Outcome] = {}
                for o in failures:
                    first.setdefault(signature(o), o)
                for sig, count in Counter(signature(o) for o in failures).most_common():
                    print(f"  {count:6d}  {sig}  (e.g. --case {first[sig].case})")
            summary = summarize(tname, outcomes, seconds, args.seed,
                                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            failed_any |= summary["failures"] > 0
            print(json.dumps(summary))
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
