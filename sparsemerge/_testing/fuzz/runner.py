"""Running cases: :class:`Runner` loads and classifies cases in the current process (under
a per-case time limit, measuring the peak RSS each adds); :func:`run_parallel` spreads them
over forked workers that run under ``RLIMIT_AS`` and are replaced when they die or stall."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import resource
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsemerge.errors import FormatError

from .targets import TARGETS, Target


class CaseTimeout(BaseException):
    """Raised by the per-case alarm; a BaseException so no ``except Exception`` eats it."""


def _on_alarm(signum, frame):
    raise CaseTimeout()


def _status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


@dataclass
class Outcome:
    case: int
    kind: str  # loaded_identical | loaded_changed | rejected_clean | other_exception |
    #            invalid_loaded | hang | crash | big_alloc | harness_error
    source: str = ""
    mutators: tuple[str, ...] = ()
    detail: str = ""
    rss_delta_mb: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def failed(self) -> bool:
        return self.kind not in ("loaded_identical", "loaded_changed", "rejected_clean")


class Runner:
    """Runs cases of one target in the current process (a worker, or a test)."""

    def __init__(self, target: Target, corpus: dict[str, Any], workdir: Path, seed: int,
                 timeout: float = 10.0, alloc_limit_mb: float = 512.0):
        self.target, self.corpus, self.seed = target, corpus, seed
        self.workdir = workdir
        self.timeout, self.alloc_limit_mb = timeout, alloc_limit_mb
        self.reference: dict[str, str] = {}
        for name, payload in corpus.items():
            self.file = target.write(payload, workdir)
            self.reference[name] = target.digest(target.load(self.file))
        self.can_reset = _reset_peak()

    def run(self, case: int) -> Outcome:
        """Mutate, write and load case ``case``; classify what happened."""
        try:
            source, chosen, payload, notes = self.target.mutate(self.corpus, self.seed, case)
        except Exception:  # a bug of this harness, not of the reader: still reported
            return Outcome(case, "harness_error", detail=traceback.format_exc(limit=-3))
        return self.check(payload, source, chosen, notes, case)

    def check(self, payload: Any, source: str, chosen: list[str] | tuple = (), notes: str = "",
              case: int = -1) -> Outcome:
        """Write ``payload`` (mutated from corpus entry ``source``), load it, classify."""
        try:
            self.file = self.target.write(payload, self.workdir)
        except Exception:
            return Outcome(case, "harness_error", detail=traceback.format_exc(limit=-3))
        out = Outcome(case, "", source, tuple(chosen), notes)
        before = _status_kb("VmRSS")
        self.can_reset = self.can_reset and _reset_peak()
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            loaded = self.target.load(self.file)
            try:
                self.target.check(loaded)
            except UnicodeError as exc:  # e.g. a lone surrogate: cannot even be printed
                raise AssertionError(f"loaded text is not valid Unicode: {exc}") from None
            digest = self.target.digest(loaded)
            if self.target.resave is not None:
                rt = self.workdir / "resaved"
                again = self.target.load(self.target.resave(loaded, rt))
                if self.target.digest(again) != digest:
                    raise AssertionError("saving and re-loading changed the content")
                shutil.rmtree(rt, ignore_errors=True)
            out.kind = "loaded_identical" if digest == self.reference[source] else \
                "loaded_changed"
        except CaseTimeout:
            out.kind, out.detail = "hang", f"over {self.timeout} s; {notes}"
        except AssertionError as exc:
            out.kind = "invalid_loaded"
            out.detail = f"{exc}; {notes}\n{traceback.format_exc(limit=-3)}"
        except FormatError as exc:
            if str(self.file) in str(exc):
                out.kind = "rejected_clean"
            else:
                out.kind = "other_exception"
                out.detail = f"FormatError not naming the file: {exc}; {notes}"
        except BaseException as exc:  # noqa: BLE001 - everything else is a finding
            out.kind = "other_exception"
            out.detail = (f"{type(exc).__name__}: {ascii(str(exc))[:300]}; {notes}\n"
                          f"{traceback.format_exc(limit=-4)}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        peak = _status_kb("VmHWM")
        out.peak_rss_mb = peak / 1024
        out.rss_delta_mb = max(0, peak - before) / 1024 if self.can_reset else 0.0
        if not out.failed and out.rss_delta_mb > self.alloc_limit_mb:
            out.kind = "big_alloc"
            out.detail = f"peak RSS +{out.rss_delta_mb:.0f} MB; {notes}"
        return out


def _worker(conn, target_name: str, corpus: dict[str, Any], seed: int, timeout: float,
            alloc_limit_mb: float, as_limit_mb: float) -> None:
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="sm-fuzz-"))
    try:
        runner = Runner(TARGETS[target_name], corpus, workdir, seed, timeout, alloc_limit_mb)
        runner.run(0)  # warm every code path before fixing the address-space limit
        if as_limit_mb > 0:
            vm = _status_kb("VmSize") * 1024
            limit = vm + int(as_limit_mb * 2**20)
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        conn.send(("ready", None))
        while True:
            case = conn.recv()
            if case is None:
                break
            conn.send(("done", runner.run(case)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_parallel(target_name: str, corpus: dict[str, Any], seed: int, cases: range,
                 workers: int, timeout: float, alloc_limit_mb: float, as_limit_mb: float,
                 on_result: Callable[[Outcome], None]) -> None:
    """Run ``cases`` in forked workers; a worker that dies or stalls is replaced."""
    ctx = mp.get_context("fork")
    todo = list(cases)[::-1]
    slots: list[dict] = []

    def start() -> dict:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, target_name, corpus, seed, timeout,
                                              alloc_limit_mb, as_limit_mb), daemon=True)
        p.start()
        child.close()
        kind, _ = parent.recv()
        assert kind == "ready"
        return {"proc": p, "conn": parent, "case": None, "since": 0.0}

    def feed(slot: dict) -> None:
        if todo:
            slot["case"] = todo.pop()
            slot["since"] = time.monotonic()
            slot["conn"].send(slot["case"])
        else:
            slot["case"] = None

    for _ in range(max(1, workers)):
        slots.append(start())
        feed(slots[-1])
    from multiprocessing.connection import wait

    while any(s["case"] is not None for s in slots):
        busy = {s["conn"]: s for s in slots if s["case"] is not None}
        ready = wait(list(busy), timeout=1.0)
        for conn in ready:
            slot = busy[conn]
            try:
                _, outcome = conn.recv()
            except (EOFError, OSError):
                slot["proc"].join(5)
                on_result(Outcome(slot["case"], "crash",
                                  detail=f"worker died (exit code {slot['proc'].exitcode})"))
                slots[slots.index(slot)] = slot = start()
                feed(slot)
                continue
            on_result(outcome)
            feed(slot)
        now = time.monotonic()
        for i, slot in enumerate(slots):
            if slot["case"] is not None and now - slot["since"] > timeout + 30:
                slot["proc"].kill()
                slot["proc"].join()
                on_result(Outcome(slot["case"], "hang", detail="worker stalled; killed"))
                slots[i] = start()
                feed(slots[i])
    for slot in slots:
        with contextlib.suppress(OSError):
            slot["conn"].send(None)
        slot["proc"].join(10)
