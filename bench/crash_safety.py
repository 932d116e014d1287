"""Crash safety: SIGKILL writers at random moments; outputs are never half-written.

Three writers are killed, each ``--kills`` times (default 50):

``save``
    ``save_adapter`` in a forked child that saves two ~3 MB adapters (A, B) alternately
    into one directory, reporting each completed save; the parent kills it after a random
    delay (uniform over ~2.5 saves). The directory must then hold exactly the last
    completed version or the one being written (absent only before the first completes).
``merge``
    the ``sparsemerge merge`` command (``sum`` and ``ties`` alternately) writing a merged
    adapter, and ``sparsemerge merge --heads`` writing a merged multi-head model directory
    (on MiniLM-L6 when the demo extra is installed, else a tiny random BERT), killed at a
    random moment of the run. The output must be absent, the previous complete output, or
    the new complete output (byte-identical to an uninterrupted run's), and readable.
``train``
    ``sparsemerge train --checkpoint-steps 2`` on a tiny random BERT, killed at random
    moments (mostly while training and checkpointing, some during start-up), then
    restarted with ``--resume`` (and killed again) until it completes. After every kill
    the checkpoint directory and the output adapter are absent or complete and loadable;
    the final adapter must equal an uninterrupted run's bit for bit (every tensor, and the
    config except ``extra.training.wall_time_s``).

After each kill, temp siblings (``.<name>.<pid>.<random>.tmp``) may remain beside the
output; the output path itself never is one, and the next write of that output removes
them (checked at the end of each writer's runs). The last line printed is one JSON object.

    python bench/crash_safety.py                    # all three, 50 kills each
    python bench/crash_safety.py --only save --kills 200
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch

from sparsemerge import masks
from sparsemerge.adapter import BaseInfo, Head, SparseAdapter, SparseTensor, TargetDelta
from sparsemerge.formats.adapter_file import WEIGHTS_NAME, load_adapter, save_adapter

# ----------------------------------------------------------------------------- helpers


def _digest(file: Path, root: Path) -> str:
    """sha256 of a file's content. Safetensors files are hashed by content (metadata sorted:
    the library writes a metadata dict in arbitrary order) and JSON files with the output
    path replaced by a placeholder (a recipe records where it was written)."""
    data = file.read_bytes()
    if file.suffix == ".safetensors":
        try:
            with safetensors.safe_open(file, "pt") as f:
                meta = json.dumps(f.metadata() or {}, sort_keys=True)
                h = hashlib.sha256(meta.encode())
                for key in sorted(f.keys()):
                    t = f.get_tensor(key)
                    h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
                    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel()
                             else b"")
            return h.hexdigest()
        except Exception:  # unreadable: hash the raw bytes (it will match nothing)
            pass
    elif file.suffix == ".json":
        data = data.replace(str(root).encode(), b"<OUT>")
    return hashlib.sha256(data).hexdigest()


def snapshot(path: Path) -> dict[str, str] | None:
    """relative path -> content digest of every file under ``path`` (None: absent)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": _digest(path, path)}
    return {str(p.relative_to(path)): _digest(p, path) for p in sorted(path.rglob("*"))
            if p.is_file()}


def temp_siblings(path: Path) -> list[str]:
    """Leftovers of interrupted writes beside ``path``: ``.<name>.[<pid>.]<8 chars>.tmp``
    and ``.<name>.old-*`` (the two-rename fallback off Linux)."""
    if not path.parent.exists():
        return []
    rx = re.compile(rf"\.{re.escape(path.name)}\.((\d+\.)?[a-z0-9_]{{8}}\.tmp|old-.*)")
    return sorted(p.name for p in path.parent.iterdir() if rx.fullmatch(p.name))


def temp_inside(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith(".") and ".old-" in p.name)


@dataclass
class Report:
    writer: str
    kills: int = 0
    states: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    temp_siblings_seen: int = 0
    temps_left_at_end: int = -1
    completed_runs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def violate(self, msg: str) -> None:
        self.violations.append(msg)
        print(f"  VIOLATION [{self.writer}] {msg}", flush=True)

    def summary(self) -> dict[str, Any]:
        return {"writer": self.writer, "kills": self.kills, "states": dict(self.states),
                "violations": len(self.violations), "completed_runs": self.completed_runs,
                "temp_siblings_seen_after_kills": self.temp_siblings_seen,
                "temps_left_after_next_write": self.temps_left_at_end,
                "seconds": round(self.seconds, 1), **self.extra}


def _kill(proc) -> None:
    """SIGKILL a process we started (a Popen or a multiprocessing Process)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- save


def _big_adapter(seed: int, n_targets: int = 12) -> SparseAdapter:
    shape = (384, 1536)
    numel = shape[0] * shape[1]
    targets = {}
    g = torch.Generator().manual_seed(seed)
    for i in range(n_targets):
        name = f"encoder.layer.{i}.intermediate.dense.weight"
        idx = masks.seeded_indices(seed * 100 + i, name, numel, numel // 20)
        if i % 2:  # an arbitrary (not seeded) mask: elias-fano
            idx = np.unique(np.random.default_rng(seed + i).integers(0, numel, numel // 20))
            mask_seed = None
        else:
            mask_seed = seed * 100 + i
        vals = torch.randn(idx.size, generator=g) * 0.01
        targets[name] = TargetDelta(shape, SparseTensor(shape, torch.from_numpy(idx), vals,
                                                        mask_seed))
    head = Head("classifier", {"weight": torch.randn(2, 384, generator=g),
                               "bias": torch.zeros(2)}, ["negative", "positive"])
    return SparseAdapter(targets, BaseInfo("org/base", None, "f" * 32), {"sst2": head},
                         "sparta", {"seed": seed})


def _save_loop(out: str, versions: list[SparseAdapter], first: int, conn) -> None:
    i = first
    while True:
        save_adapter(versions[i % 2], out)
        conn.send(i % 2)
        i += 1


def run_save(work: Path, kills: int, rng: random.Random) -> Report:
    rep = Report("save")
    versions = [_big_adapter(1), _big_adapter(2)]
    refs = []
    for k, v in enumerate(versions):
        t0 = time.perf_counter()
        save_adapter(v, work / f"ref{k}")
        refs.append(snapshot(work / f"ref{k}"))
        rep.extra.setdefault("save_seconds", []).append(round(time.perf_counter() - t0, 3))
    assert snapshot(work / "ref0") == refs[0] and refs[0] != refs[1]
    t_save = max(rep.extra["save_seconds"])
    out = work / "adapter"
    state = None  # index of the version at ``out`` (None: absent)
    ctx = mp.get_context("fork")
    t0 = time.perf_counter()
    while rep.kills < kills:
        parent, child = ctx.Pipe(duplex=False)
        first = 0 if state is None else 1 - state
        proc = ctx.Process(target=_save_loop, args=(str(out), versions, first, child))
        proc.start()
        child.close()
        time.sleep(rng.uniform(0, 2.5 * t_save))
        _kill(proc)
        proc.join()
        done = []
        while parent.poll():
            try:
                done.append(parent.recv())
            except EOFError:
                break
        parent.close()
        rep.kills += 1
        last = done[-1] if done else state
        writing = first if not done else 1 - done[-1]
        snap = snapshot(out)
        if snap is None:
            kind = "absent"
            if last is not None:
                rep.violate(f"kill {rep.kills}: {out} vanished (had version {last})")
        elif snap == refs[last if last is not None else writing] and last is not None:
            kind = "previous"
        elif snap == refs[writing]:
            kind = "new"
        else:
            kind = "corrupt"
            rep.violate(f"kill {rep.kills}: {out} holds neither the previous nor the new "
                        f"version: {sorted(snap)}")
        rep.states[kind] += 1
        if snap is not None:
            try:
                load_adapter(out)
            except Exception as exc:
                rep.violate(f"kill {rep.kills}: {out} does not load: {exc}")
            state = 0 if snap == refs[0] else 1
        if temp_inside(out):
            rep.violate(f"kill {rep.kills}: temp entries inside {out}: {temp_inside(out)}")
        rep.temp_siblings_seen += len(temp_siblings(out))
        rep.completed_runs += len(done)
    # the next write removes what killed writers left beside the output (those last
    # modified before it started: a rerun moments later, not within the same millisecond)
    time.sleep(0.1)
    proc = ctx.Process(target=save_adapter, args=(versions[0], str(out)))
    proc.start()
    proc.join()
    rep.temps_left_at_end = len(temp_siblings(out))
    rep.seconds = time.perf_counter() - t0
    return rep


# ----------------------------------------------------------------------------- subprocesses


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sparsemerge.cli", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM":
                "false", "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"})
    return env


def _run(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def tiny_bert(dst: Path) -> Path:
    """A 2-layer BERT (hidden 32) with random weights and MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    from sparsemerge.models import demo_base_path

    if (dst / "config.json").exists():
        return dst
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(dst)
    src = demo_base_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    return dst


def _proc_alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


# ----------------------------------------------------------------------------- merge


def _merge_inputs(work: Path, base: Path) -> list[Path]:
    from transformers import AutoModel

    from sparsemerge.models import base_info, default_targets

    backbone = AutoModel.from_pretrained(base)
    names = default_targets(backbone)
    params = dict(backbone.named_parameters())
    hidden = backbone.config.hidden_size
    out = []
    for k, task in enumerate(["sst2", "cola"]):
        g = torch.Generator().manual_seed(k)
        targets = {}
        for name in names:
            shape = tuple(params[name].shape)
            numel = math.prod(shape)
            nnz = masks.nnz_for_density(numel, 0.02)
            idx = masks.seeded_indices(k, name, numel, nnz)
            targets[name] = TargetDelta(shape, SparseTensor(
                shape, torch.from_numpy(idx), torch.randn(nnz, generator=g) * 0.01, k))
        head = Head("classifier", {"weight": torch.randn(2, hidden, generator=g),
                                   "bias": torch.zeros(2)}, ["negative", "positive"])
        a = SparseAdapter(targets, base_info(backbone, str(base), names), {task: head})
        out.append(save_adapter(a, work / f"in-{task}"))
    return out


def _check_merged(path: Path) -> None:
    from sparsemerge.formats.merged import read_merged

    m = read_merged(path)
    for f in m.weight_files:  # every shard parses completely
        with safetensors.safe_open(path / f, "pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                st.get_tensor(key)


def run_merge(work: Path, kills: int, rng: random.Random) -> Report:
    from sparsemerge.models import demo_base_path

    rep = Report("merge")
    try:
        base = demo_base_path()
        rep.extra["merge_base"] = "MiniLM-L6"
    except Exception:
        base = tiny_bert(work / "tiny-bert")
        rep.extra["merge_base"] = "tiny random BERT"
    inputs = [str(p) for p in _merge_inputs(work, base)]
    variants = {  # (output kind, method) -> command builder
        ("adapter", "sum"): lambda out: _cli("merge", *inputs, "-o", str(out), "-m", "sum"),
        ("adapter", "ties"): lambda out: _cli("merge", *inputs, "-o", str(out), "-m", "ties",
                                              "--density", "0.5"),
        ("heads", "sum"): lambda out: _cli("merge", *inputs, "-o", str(out), "-m", "sum",
                                           "--heads", "--base", str(base)),
        ("heads", "ties"): lambda out: _cli("merge", *inputs, "-o", str(out), "-m", "ties",
                                            "--density", "0.5", "--heads", "--base", str(base)),
    }
    refs: dict[tuple, dict] = {}
    durations: dict[tuple, float] = {}
    windows: dict[tuple, float] = {}  # from the output's temp sibling appearing to the end
    volatile: dict[str, set[str]] = {"adapter": set(), "heads": set()}
    for key, cmd in variants.items():
        snaps = []
        for rerun in range(2):  # twice: find files that differ between identical runs
            d = work / f"ref-{key[0]}-{key[1]}-{rerun}"
            started = time.perf_counter()
            proc = subprocess.Popen(cmd(d), cwd=work, env=_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            t_temp = None
            while proc.poll() is None:
                if t_temp is None and any(f".{proc.pid}." in n for n in temp_siblings(d)):
                    t_temp = time.perf_counter()
                time.sleep(0.005)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd(d))} failed ({proc.returncode})")
            durations[key] = time.perf_counter() - started
            windows[key] = time.perf_counter() - (t_temp or started)
            snaps.append(snapshot(d))
        refs[key] = snaps[0]
        volatile[key[0]] |= {f for f in snaps[0] if snaps[0][f] != snaps[1].get(f)}
    rep.extra["merge_seconds"] = {f"{k[0]}-{k[1]}": round(v, 2) for k, v in durations.items()}
    rep.extra["write_window_seconds"] = {f"{k[0]}-{k[1]}": round(v, 2)
                                         for k, v in windows.items()}
    rep.extra["files_differing_between_identical_runs"] = {k: sorted(v)
                                                          for k, v in volatile.items()}

    def same(snap: dict | None, ref: dict | None, kind: str) -> bool:
        if snap is None or ref is None or set(snap) != set(ref):
            return False
        return all(snap[f] == ref[f] for f in ref if f not in volatile[kind])

    t0 = time.perf_counter()
    state: dict[str, str | None] = {"adapter": None, "heads": None}
    outs = {"adapter": work / "merged-adapter", "heads": work / "merged-model"}
    while rep.kills < kills:
        kind = "heads" if rep.kills % 2 else "adapter"
        out = outs[kind]
        method = "ties" if state[kind] == "sum" else "sum"
        key = (kind, method)
        proc = subprocess.Popen(variants[key](out), cwd=work, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rng.random() < 0.3:  # any moment of the run
            time.sleep(rng.uniform(0.2, 1.1) * durations[key])
        else:  # once the output is being written (its temp sibling appeared): mid-write
            deadline = time.perf_counter() + 2 * durations[key]
            while _proc_alive(proc) and time.perf_counter() < deadline and not any(
                    f".{proc.pid}." in n for n in temp_siblings(out)):
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 1.0) * windows[key])
        killed = _proc_alive(proc)
        if killed:
            _kill(proc)
        proc.wait()
        if killed:
            rep.kills += 1
        else:
            rep.completed_runs += 1
        snap = snapshot(out)
        prev = refs[(kind, state[kind])] if state[kind] else None
        if snap is None:
            label = "absent"
            if prev is not None:
                rep.violate(f"{out} vanished")
        elif same(snap, refs[key], kind):
            label, state[kind] = "new", method
        elif same(snap, prev, kind):
            label = "previous"
        else:
            label = "corrupt"
            rep.violate(f"{out}: neither the previous nor the new output ({sorted(snap)[:8]})")
        if proc.returncode == 0 and label != "new":
            rep.violate(f"{out}: the merge finished but its output is {label}")
        if killed:
            rep.states[f"{kind}:{label}"] += 1
            print(f"  merge kill {rep.kills}: {kind} output {label}", flush=True)
        if snap is not None:
            try:
                load_adapter(out) if kind == "adapter" else _check_merged(out)
            except Exception as exc:
                rep.violate(f"{out} does not load: {exc}")
        if temp_inside(out):
            rep.violate(f"temp entries inside {out}: {temp_inside(out)}")
        rep.temp_siblings_seen += len(temp_siblings(out))
    for kind, out in outs.items():  # the next write cleans up what the kills left
        _run(variants[(kind, "sum")](out), work)
    rep.temps_left_at_end = sum(len(temp_siblings(o)) for o in outs.values())
    rep.seconds = time.perf_counter() - t0
    return rep


# ----------------------------------------------------------------------------- train


def _train_data(work: Path) -> tuple[Path, Path]:
    from sparsemerge.data.tasks import shipped_dir

    src = shipped_dir()
    train, dev = work / "train.tsv", work / "dev.tsv"
    train.write_text("\n".join((src / "sst2_train.tsv").read_text().splitlines()[:161]) + "\n")
    dev.write_text("\n".join((src / "sst2_dev.tsv").read_text().splitlines()[:49]) + "\n")
    return train, dev


def adapter_differences(a: Path, b: Path) -> list[str]:
    """What differs between two adapters: tensors bit-exact, config but the wall time."""
    diffs = []
    fa, fb = a / WEIGHTS_NAME, b / WEIGHTS_NAME
    ta, tb = safetensors.torch.load(fa.read_bytes()), safetensors.torch.load(fb.read_bytes())
    if set(ta) != set(tb):
        diffs.append(f"tensor names {sorted(set(ta) ^ set(tb))[:4]}")
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(
                x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            diffs.append(f"tensor {k}")
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (a, b))
    for c in (ca, cb):
        c.get("extra", {}).get("training", {}).pop("wall_time_s", None)
    if ca != cb:
        keys = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        diffs.append(f"config keys {keys}")
    return diffs


def _checkpoint_ok(ckpt: Path) -> str | None:
    """None when ``ckpt`` is absent or a complete checkpoint, else what is wrong."""
    if not ckpt.exists():
        return None
    files = sorted(p.name for p in ckpt.iterdir())
    if files != ["state.pt"]:
        return f"checkpoint holds {files}"
    try:
        blob = torch.load(ckpt / "state.pt", weights_only=True)
    except Exception as exc:
        return f"checkpoint does not load: {exc}"
    if not isinstance(blob, dict) or "params" not in blob or "position" not in blob:
        return "checkpoint lacks params/position"
    return None


def run_train(work: Path, kills: int, rng: random.Random) -> Report:
    rep = Report("train")
    base = tiny_bert(work / "tiny-bert")
    train, dev = _train_data(work)

    def cmd(out: Path, ckpt: Path, resume: bool) -> list[str]:
        return _cli("train", "--base", str(base), "--train-file", str(train), "--eval-file",
                    str(dev), "--text-column", "sentence", "--label-column", "label",
                    "--epochs", "2", "--batch-size", "16", "--density", "0.05", "--seed", "3",
                    "--checkpoint-steps", "2", "--checkpoint-dir", str(ckpt), "--quiet",
                    "--json", "-o", str(out), *(["--resume"] if resume else []))

    ref, ref_ckpt = work / "train-ref", work / "train-ref.ckpt"
    started = time.perf_counter()
    proc = subprocess.Popen(cmd(ref, ref_ckpt, False), cwd=work, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t_first = None
    while proc.poll() is None:
        if t_first is None and (ref_ckpt / "state.pt").exists():
            t_first = time.perf_counter() - started
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"uninterrupted training failed: {proc.stderr.read()[-3000:]}")
    t_ref = time.perf_counter() - started
    t_first = t_first or 0.5 * t_ref
    t_rest = t_ref - t_first  # training after the first checkpoint, evaluation, final save
    rep.extra["uninterrupted_seconds"] = round(t_ref, 1)
    rep.extra["startup_to_first_checkpoint_seconds"] = round(t_first, 1)
    chains, chain_kills, exact, resumes = 0, [], 0, 0
    t0 = time.perf_counter()
    while rep.kills < kills:
        chains += 1
        out, ckpt = work / f"train-{chains}", work / f"train-{chains}.ckpt"
        killed_here = 0
        while True:
            resume = (ckpt / "state.pt").exists()
            resumes += resume
            started = time.perf_counter()
            proc = subprocess.Popen(cmd(out, ckpt, resume), cwd=work, env=_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if rng.random() < 0.2 or rep.kills >= kills:  # some during start-up / resume
                deadline = started + rng.uniform(0, 1.0) * t_first
            else:  # most once this run has written a checkpoint: mid-training or mid-save
                seen = (ckpt / "state.pt").stat().st_mtime if (ckpt / "state.pt").exists() \
                    else 0.0
                while _proc_alive(proc) and time.perf_counter() - started < 2 * t_ref:
                    f = ckpt / "state.pt"
                    with contextlib.suppress(OSError):
                        if f.exists() and f.stat().st_mtime != seen:
                            break
                    time.sleep(0.05)
                deadline = time.perf_counter() + rng.uniform(0, 0.8) * t_rest
            while _proc_alive(proc) and time.perf_counter() < deadline:
                time.sleep(0.02)
            if rep.kills < kills and _proc_alive(proc):
                _kill(proc)
                proc.wait()
                rep.kills += 1
                killed_here += 1
                problem = _checkpoint_ok(ckpt)
                if problem:
                    rep.violate(f"kill {rep.kills}: {ckpt}: {problem}")
                rep.states["checkpoint:" + ("present" if ckpt.exists() else "absent")] += 1
                snap = snapshot(out)
                rep.states["output:" + ("complete" if snap else "absent")] += 1
                if snap is not None:
                    try:
                        load_adapter(out)
                    except Exception as exc:
                        rep.violate(f"kill {rep.kills}: {out} does not load: {exc}")
                for p in (out, ckpt):
                    if temp_inside(p):
                        rep.violate(f"temp entries inside {p}: {temp_inside(p)}")
                    rep.temp_siblings_seen += len(temp_siblings(p))
                print(f"  train kill {rep.kills}: checkpoint "
                      f"{'present' if ckpt.exists() else 'absent'}, output "
                      f"{'complete' if snap else 'absent'}", flush=True)
                if snap is not None:
                    break  # killed after the final save: the run is complete
                continue
            _, err = proc.communicate()
            if proc.returncode != 0:
                rep.violate(f"chain {chains}: train exited {proc.returncode}: {err[-2000:]}")
                break
            rep.completed_runs += 1
            break
        chain_kills.append(killed_here)
        if (out / WEIGHTS_NAME).exists():
            diffs = adapter_differences(ref, out)
            if diffs:
                rep.violate(f"chain {chains} ({killed_here} kills): resumed adapter differs "
                            f"from the uninterrupted run: {diffs[:5]}")
            else:
                exact += 1
        # the chain's later writes (resume, completion) removed what its kills left
        rep.temps_left_at_end = max(rep.temps_left_at_end, 0) + sum(
            len(temp_siblings(p)) for p in (out, ckpt))
    rep.extra.update({"chains": chains, "kills_per_chain": chain_kills, "resumes": resumes,
                      "resumed_adapters_bit_exact": exact})
    rep.seconds = time.perf_counter() - t0
    return rep


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=50, help="kills per writer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="save,merge,train",
                    help="comma-separated writers: save, merge, train")
    ap.add_argument("--workdir", type=Path, help="keep the files here (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    runners = {"save": run_save, "merge": run_merge, "train": run_train}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sm-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for name in [w.strip() for w in args.only.split(",") if w.strip()]:
            print(f"== {name}: {args.kills} kills ==", flush=True)
            d = work / name
            d.mkdir(exist_ok=True)
            rep = runners[name](d, args.kills, rng)
            results[name] = rep.summary()
            print(json.dumps(results[name]), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'writer':8s} {'kills':>6s} {'violations':>11s} {'completed':>10s} "
          f"{'temps seen':>11s} {'temps left':>11s}  states")
    for name, r in results.items():
        print(f"{name:8s} {r['kills']:6d} {r['violations']:11d} {r['completed_runs']:10d} "
              f"{r['temp_siblings_seen_after_kills']:11d} "
              f"{r['temps_left_after_next_write']:11d}  {r['states']}")
    total = {"kills": sum(r["kills"] for r in results.values()),
             "violations": sum(r["violations"] for r in results.values()),
             "writers": results}
    print(json.dumps(total))
    return 1 if total["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
