"""What is fuzzed: each :class:`Target` ties a corpus builder, a mutation, writing a case to
disk, the reader under test, the checker and the digest together."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsemerge.adapter import SparseAdapter
from sparsemerge.formats import adapter_file
from sparsemerge.formats.adapter_file import load_adapter, save_adapter
from sparsemerge.formats.merged import read_merged

from .checks import adapter_digest, check_adapter, check_merged, merged_digest
from .corpus import build_corpus, build_merged_corpus
from .mutate_merged import mutate_merged
from .mutation import MUTATORS, mutate


@dataclass
class Target:
    """What is fuzzed: corpus, mutation, writing a case, loading, checking what was loaded."""

    name: str
    build: Callable[[Path], dict[str, Any]]
    mutate: Callable[[dict, int, int], tuple[str, list[str], Any, str]]
    write: Callable[[Any, Path], Path]
    load: Callable[[Path], Any]
    check: Callable[[Any], None]
    digest: Callable[[Any], str]
    resave: Callable[[Any, Path], Path] | None = None
    mutator_family: Callable[[str], str] = lambda name: MUTATORS.get(name, ("-",))[0]


def _write_adapter_case(blob: bytes, workdir: Path) -> Path:
    f = workdir / "case.safetensors"
    f.write_bytes(blob)
    return f


def _resave_adapter(a: SparseAdapter, folder: Path) -> Path:
    return save_adapter(a, folder, card="") / adapter_file.WEIGHTS_NAME


def write_merged_case(files: dict[str, Any], workdir: Path) -> Path:
    d = workdir / "case"
    shutil.rmtree(d, ignore_errors=True)
    links = []
    for rel, content in sorted(files.items()):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if content == "dir":
            p.mkdir(exist_ok=True)
        elif isinstance(content, tuple):
            links.append((p, d / content[1]))
        else:
            p.write_bytes(content)
    for p, to in links:
        with contextlib.suppress(OSError):
            if p.exists() or p.is_symlink():
                p.unlink()
            p.symlink_to(to)
    return d



TARGETS: dict[str, Target] = {
    "adapter": Target("adapter", build_corpus, mutate, _write_adapter_case, load_adapter,
                      check_adapter, adapter_digest, _resave_adapter),
    "merged": Target("merged", build_merged_corpus, mutate_merged, write_merged_case,
                     read_merged, check_merged, merged_digest,
                     mutator_family=lambda name: "merged"),
}
