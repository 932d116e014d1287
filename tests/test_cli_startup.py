"""The CLI imports heavy libraries only where a command needs them.

Each command runs in a fresh interpreter (a ``-c`` wrapper that calls the CLI's ``main`` and
then reports which of torch / transformers ended up in ``sys.modules``):

- ``sparsemerge --help``, ``inspect ADAPTER``, and the help of every command but ``merge`` and
  ``train`` import neither torch nor transformers;
- ``merge --help`` and ``train --help`` list the merge operators / training methods, whose
  registries sit beside their torch kernels: they import torch, never transformers;
- ``overlap`` and ``merge`` without ``--heads`` import torch (they add tensors), never
  transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sparsemerge.cli import app
from sparsemerge.formats.adapter_file import save_adapter
from tests.test_format import make_adapter

# Commands whose help text is generated from a registry that imports torch.
HELP_NEEDS_TORCH = {"merge", "train"}

_PROBE = """
HEAVY = ("torch", "transformers")
import contextlib, io, json, sys
sys.argv = ["sparsemerge", *sys.argv[1:]]
out = io.StringIO()
code = 0
with contextlib.redirect_stdout(out):
    try:
        from sparsemerge.cli import main
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
print(json.dumps({"code": code, "stdout": out.getvalue(),
                  "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
"""


def probe(*args: str) -> dict:
    """Run ``sparsemerge ARGS`` in a fresh interpreter: exit code, stdout, heavy modules."""
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["code"] == 0, (args, r.stderr, result["stdout"])
    return result


def command_paths() -> list[str]:
    """Every command and sub-command of the app, e.g. ``inspect``, ``data check``."""
    paths: list[str] = []

    def walk(cmd, path: str) -> None:
        if path:
            paths.append(path)
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return paths


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("startup")
    a, b = make_adapter(), make_adapter()
    b.heads = {"cola": b.heads.pop("sst2")}  # heads are never merged: distinct task names
    return save_adapter(a, tmp / "a"), save_adapter(b, tmp / "b")


def test_top_level_help_imports_neither_torch_nor_transformers():
    r = probe("--help")
    assert r["heavy"] == [], r["heavy"]
    assert "inspect" in r["stdout"] and "merge" in r["stdout"]


@pytest.mark.parametrize("command", command_paths())
def test_command_help_imports_no_transformers(command):
    r = probe(*command.split(), "--help")
    assert "transformers" not in r["heavy"]
    if command.split()[0] not in HELP_NEEDS_TORCH:
        assert r["heavy"] == [], f"`sparsemerge {command} --help` imported {r['heavy']}"
    assert "Usage:" in r["stdout"]


def test_inspect_imports_neither_torch_nor_transformers(adapters):
    r = probe("inspect", str(adapters[0]), "--json")
    assert r["heavy"] == [], r["heavy"]
    assert json.loads(r["stdout"])["method"] == "sparta"


def test_overlap_and_plain_merge_import_no_transformers(adapters, tmp_path):
    a, b = map(str, adapters)
    r = probe("overlap", a, b, "--json")
    assert r["heavy"] == ["torch"] and json.loads(r["stdout"])["pairs"]
    r = probe("merge", a, b, "-m", "ties", "--density", "0.5", "-o", str(tmp_path / "m"),
              "--json")
    assert r["heavy"] == ["torch"] and json.loads(r["stdout"])["kind"] != "merged-model"


def test_help_still_lists_methods_and_unknown_method_is_named():
    """The registries are read lazily, but the help and the errors still come from them."""
    from sparsemerge.merge.operators import OPERATORS
    from sparsemerge.train.methods import METHODS

    runner = CliRunner()
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert all(name in r.stdout for name in METHODS) and "mask_seed" in r.stdout
    r = runner.invoke(app, ["merge", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and all(name in r.stdout for name in OPERATORS)
    r = runner.invoke(app, ["train", "--method", "nope", "--task", "sst2", "-o", "unused"])
    assert r.exit_code == 2
    assert "unknown training method 'nope'" in r.stderr
    assert all(name in r.stderr for name in METHODS)


def test_help_text_fits_an_80_column_terminal():
    """Typer keeps the docstrings' line breaks (after the first paragraph), so a source line
    longer than the terminal wraps raggedly: every line of every command's help, the
    generated merge-method list included, must fit 78 columns (the panel's margins)."""
    import inspect

    from rich.text import Text

    def lines(command, path):
        help_text = inspect.cleandoc(command.help or "").partition("\f")[0]
        first, _, rest = help_text.partition("\n\n")  # the first paragraph is reflowed
        for line in rest.splitlines():
            yield path, Text.from_markup(line).plain
        for name, sub in getattr(command, "commands", {}).items():
            yield from lines(sub, f"{path} {name}")

    from sparsemerge.cli.merge import methods_help  # appended to merge's help when shown

    root = typer.main.get_command(app)
    too_long = [(path, line) for path, line in lines(root, "sparsemerge") if len(line) > 78]
    too_long += [("merge methods", line) for line in methods_help().splitlines()
                 if len(Text.from_markup(line).plain) > 78]
    assert not too_long, too_long
