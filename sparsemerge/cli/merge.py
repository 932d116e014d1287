"""``sparsemerge merge`` and ``sparsemerge overlap``: thin layers over :mod:`sparsemerge.merge`.

The methods and their parameters shown in ``merge --help`` are generated from the operator
registry (:data:`sparsemerge.merge.operators.OPERATORS`), never restated here. Nothing from
:mod:`sparsemerge.merge` (hence torch) is imported when this module loads: the registry is
read only when the help text is actually shown (:class:`MergeCommand`) or a command runs, so
``sparsemerge --help`` and other commands stay fast. Register with
``app.command(cls=MergeCommand)(merge)`` and ``app.command()(overlap)``.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand

from sparsemerge.cli.common import console, err_console, print_json, user_errors

DEFAULT_METHOD = "sum"  # the same defaults as sparsemerge.merge.recipe (checked by a test)
DEFAULT_INPUT_DENSITY = 0.01
HELP_WIDTH = 76  # the generated method list fits an 80-column terminal


def methods_help() -> str:
    """One block per registered operator: summary, reference, parameters (from declarations)."""
    from sparsemerge.merge.operators import OPERATORS

    def wrap(text: str, indent: str, hang: str = "") -> list[str]:
        return textwrap.wrap(text, HELP_WIDTH, initial_indent=indent,
                             subsequent_indent=indent + hang, break_on_hyphens=False)

    blocks = []
    for op in OPERATORS.values():
        head = wrap(f"{op.name}: {op.summary}", "", "    ")
        lines = [f"[bold]{op.name}[/]{escape(head[0][len(op.name):])}"]
        lines += [escape(line) for line in head[1:]]
        lines += [f"[dim]{escape(line)}[/]" for line in wrap(op.reference, "    ")]
        lines += [escape(line) for p in op.params for line in wrap(f"- {p.describe()}",
                                                                    "    ", "  ")]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


_MERGE_DOC = """Merge sparse adapters into one adapter, or (--heads) into a multi-head model.

Inputs are sparsemerge adapter directories, hf://owner/name[@rev], PEFT LoRA
directories (ΔW = scale·BA) or fully fine-tuned model directories
(Δ = θ − θ0, sparsified to --input-density). Per target tensor the inputs'
deltas (gates folded in) are combined by the method; heads are never merged:
each task keeps its own. With --heads, OUT is a standard Hugging Face model
directory for the merged backbone (the base streamed tensor by tensor into
shards of at most --max-shard-size) plus heads/<task>/,
sparsemerge_recipe.json and a model card; without, OUT is a merged adapter
(format v1, mergeable and applicable). An input written NAME=PATH has its
head renamed to NAME: heads are never merged, so task names must differ
(merge --heads news=runs/a/ topics=runs/b/ -o both).

Methods and their parameters (-p NAME=VALUE; --density and --lambda are
shortcuts):

"""


def merge(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Adapters to merge (two or more; optional with --config). NAME=PATH gives "
             "that input's head the name NAME (e.g. two adapters whose heads are both "
             "called train).",
        show_default=False)] = None,
    output: Annotated[str | None, typer.Option(
        "-o", "--output", help="Output directory.", show_default=False)] = None,
    method: Annotated[str | None, typer.Option(
        "--method", "-m", metavar="METHOD",
        help=f"Merge method, one of those listed above (default {DEFAULT_METHOD}).",
        show_default=False)] = None,
    density: Annotated[float | None, typer.Option(
        "--density", help="Shortcut for -p density=... (ties, dare with then=ties).",
        show_default=False)] = None,
    lam: Annotated[float | None, typer.Option(
        "--lambda", help="Shortcut for -p lam=... (every method).", show_default=False)] = None,
    weights: Annotated[str | None, typer.Option(
        "--weights", metavar="W1,W2,...",
        help="One weight per input, comma-separated (default 1 each).",
        show_default=False)] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", metavar="NAME=VALUE",
        help="Any parameter of the method (repeatable), e.g. -p p=0.3 -p then=ties.",
        show_default=False)] = None,
    heads: Annotated[bool | None, typer.Option(
        "--heads/--no-heads",
        help="Write a merged model directory instead of a merged adapter: multi-head, or "
             "for --objective lm adapters a standard causal-LM directory.",
        show_default=False)] = None,
    base: Annotated[str | None, typer.Option(
        "--base", help="Base model (default: the one the adapters were trained on).",
        show_default=False)] = None,
    max_shard_size: Annotated[str | None, typer.Option(
        "--max-shard-size", metavar="SIZE",
        help="Largest backbone shard with --heads, e.g. 2GB, 500MB, 1GiB (default 2GB).",
        show_default=False)] = None,
    base_dtype: Annotated[str | None, typer.Option(
        "--base-dtype", metavar="auto|bf16|fp16|fp32",
        help="dtype of the backbone written with --heads (default auto: the base's own).",
        show_default=False)] = None,
    input_density: Annotated[float | None, typer.Option(
        "--input-density",
        help=f"Fully fine-tuned inputs: fraction of Δ kept (default {DEFAULT_INPUT_DENSITY}).",
        show_default=False)] = None,
    sparsify: Annotated[str | None, typer.Option(
        "--sparsify", metavar="magnitude|dare",
        help="Fully fine-tuned inputs: keep the largest |Δ| or a DARE sample (default "
             "magnitude).", show_default=False)] = None,
    calibrate: Annotated[int | None, typer.Option(
        "--calibrate", metavar="N",
        help="Choose the weights (and density / lambda) on N held-out rows of each input's own "
             "training data, read from where its metadata says it trained (never a dev "
             "split): the merge whose worst task stays closest to its own adapter on the "
             "task's headline metric (a preset's, e.g. CoLA's Matthews; else accuracy).",
        show_default=False)] = None,
    learn_weights: Annotated[int | None, typer.Option(
        "--learn-weights", metavar="STEPS",
        help="Learn one weight per input and transformer block in STEPS gradient steps "
             "(AdaMerging-style): each task's merged predictions distilled toward its own "
             "adapter's on held-out training rows (--calibrate N of them, else 300; never a "
             "dev split). Methods sum and weighted.", show_default=False)] = None,
    refit_heads: Annotated[int | None, typer.Option(
        "--refit-heads", metavar="STEPS",
        help="Then retrain each task's head STEPS steps on the merged backbone (kept frozen), "
             "on the training rows its adapter trained on.", show_default=False)] = None,
    config: Annotated[str | None, typer.Option(
        "--config", metavar="RECIPE.yaml",
        help="YAML recipe with the same options (flags given here override it).",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Write even if the base's fingerprint differs (with a warning).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
) -> None:
    from sparsemerge.merge.recipe import build_recipe, run_recipe

    with user_errors():
        recipe = build_recipe(inputs, config=config, method=method, density=density, lam=lam,
                              weights=weights, params=param, heads=heads, base=base,
                              output=output, max_shard_size=max_shard_size,
                              input_density=input_density, sparsify=sparsify,
                              base_dtype=base_dtype, calibrate=calibrate,
                              learn_weights=learn_weights, refit_heads=refit_heads)
        with _progress(enabled=not json_out) as progress:
            report = run_recipe(recipe, force=force, progress=progress)
    if json_out:
        print_json(report)
        return
    _print_merge(report)


merge.__doc__ = escape(_MERGE_DOC)


class MergeCommand(TyperCommand):
    """The ``merge`` command, whose help appends the operator registry only when shown."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.short_help:
            self.short_help = (self._base_help or "").split("\n\n")[0].replace("\n", " ")

    @property
    def help(self) -> str:  # read by the help formatter only
        return (self._base_help or "").rstrip() + "\n\n" + methods_help()

    @help.setter
    def help(self, value: str | None) -> None:
        self._base_help = value


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A rich progress bar per phase (load / merge / write) on stderr, when it is a terminal."""
    if not enabled or not err_console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    names = {"load": "loading inputs", "calibrate": "calibrating weights",
             "learn": "learning block weights",
             "merge": "merging tensors", "refit": "refitting heads",
             "write": "writing backbone"}
    bars: dict[str, Any] = {}
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True) as prog:

        def update(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = prog.add_task(names.get(phase, phase), total=total)
            prog.update(bars[phase], completed=done, total=total)

        yield update


def _print_merge(r: dict[str, Any]) -> None:
    t = Table(title=f"merged → {escape(r['output'])}", show_header=False, title_justify="left")
    kinds = {"merged-model": "multi-head model directory", "adapter": "merged adapter (format v1)",
             "causal-lm": "causal-LM directory (AutoModelForCausalLM, loaded whole)"}
    t.add_row("output", kinds[r["kind"]])
    t.add_row("method", r["method"])
    t.add_row("parameters", escape(", ".join(f"{k}={v}" for k, v in r["parameters"].items())))
    t.add_row("tasks", ", ".join(r["tasks"]) or "-")
    t.add_row("merged entries", f"{r['nnz']:,} in {r['targets']} tensors")
    bb = r.get("backbone")
    if bb:
        how = "streamed tensor by tensor" if bb["streamed"] else \
            f"loaded whole ({escape(str(bb.get('reason')))})"
        t.add_row("backbone", f"{bb['shards']} shard(s), {bb['bytes']:,} bytes, {how}")
    s = r["seconds"]
    t.add_row("time", f"{s['total']:.2f} s (load {s['load']:.2f}, merge {s['merge']:.2f}, "
                      f"write {s['write']:.2f})")
    console.print(t)
    it = Table(title="inputs", title_justify="left")
    for col in ("input", "kind", "tasks", "weight", "nnz", "sha256"):
        it.add_column(col, justify="right" if col in ("weight", "nnz") else "left")
    for i in r["inputs"]:
        it.add_row(escape(str(i.get("path"))), str(i.get("kind", "")),
                   ", ".join(i.get("tasks", [])) or "-", f"{i['weight']:g}", f"{i['nnz']:,}",
                   str(i.get("sha256", ""))[:12])
    console.print(it)


# --------------------------------------------------------------------------------- overlap

_STAT_COLUMNS = (("intersection", "shared"), ("jaccard", "Jaccard"),
                 ("sign_agreement", "sign="), ("cosine", "cosine"),
                 ("magnitude_correlation", "|Δ| corr"), ("ties_sign_conflicts", "conflicts"))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}"


def _names(adapters: list[Any], paths: list[str]) -> list[str]:
    from pathlib import Path

    names = []
    for a, p in zip(adapters, paths, strict=True):
        name = "+".join(a.heads) if a.heads else Path(p.rstrip("/")).name or p
        names.append(name)
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if names.count(n) > 1:
            seen[n] = seen.get(n, 0) + 1
            n = f"{n}#{seen[n]}"
        out.append(n)
    return out


def overlap(
    inputs: Annotated[list[str], typer.Argument(
        help="Two or more adapters (directories, hf://owner/name[@rev], PEFT or full "
             "fine-tunes).", show_default=False)],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    per_layer: Annotated[bool, typer.Option(
        "--per-layer", help="Add a per-layer table (and per-layer figures in --json).")] = False,
    base: Annotated[str | None, typer.Option(
        "--base", help="Base model for PEFT / fully fine-tuned inputs.",
        show_default=False)] = None,
    input_density: Annotated[float, typer.Option(
        "--input-density", help="Fully fine-tuned inputs: fraction of Δ kept.")]
        = DEFAULT_INPUT_DENSITY,
) -> None:
    """How much adapters overlap: shared entries, Jaccard, sign agreement and cosine on the
    shared entries, magnitude correlation, and how many entries TIES would drop for sign
    conflict, per pair and overall (exactly pooled over tensors, never averaged).

    Columns: shared = entries stored by both; sign= = share of shared entries
    with equal signs; cosine and |Δ| corr (Pearson correlation of magnitudes) on
    the shared entries; conflicts = shared entries of opposite sign (TIES's
    election drops one side of each)."""
    from sparsemerge.merge.engine import overlap_report
    from sparsemerge.merge.recipe import MergeRecipe, RecipeInput, load_inputs

    with user_errors():
        if len(inputs) < 2:
            from sparsemerge.errors import SparseMergeError

            raise SparseMergeError("overlap needs at least two adapters")
        recipe = MergeRecipe(inputs=[RecipeInput(p) for p in inputs], base=base,
                             input_density=input_density)
        adapters, _, _ = load_inputs(recipe)
        names = _names(adapters, inputs)
        report = overlap_report(dict(zip(names, adapters, strict=True)), per_layer=per_layer)
    if json_out:
        print_json(report)
        return
    at = Table(title="adapters", title_justify="left")
    for col in ("name", "path", "method", "tensors", "entries"):
        at.add_column(col, justify="right" if col in ("tensors", "entries") else "left")
    for a in report["adapters"]:
        at.add_row(escape(a["name"]), escape(str(a["path"])), a["method"], str(a["targets"]),
                   f"{a['nnz']:,}")
    console.print(at)
    pt = Table(title="overlap per pair (all tensors)", title_justify="left")
    pt.add_column("pair", no_wrap=True)
    for _, label in _STAT_COLUMNS:
        pt.add_column(label, justify="right")
    for p in report["pairs"]:
        pt.add_row(escape(f"{p['a']} ∩ {p['b']}"), *[_fmt(p["overall"][k]) for k, _ in
                                                     _STAT_COLUMNS])
    console.print(pt)
    if len(names) > 2:
        console.print(_heatmap(report["matrix"]["names"], report["matrix"]["jaccard"]))
    if per_layer:
        for p in report["pairs"]:
            lt = Table(title=f"per layer: {escape(p['a'])} ∩ {escape(p['b'])}",
                       title_justify="left")
            lt.add_column("layer", no_wrap=True)
            for _, label in _STAT_COLUMNS:
                lt.add_column(label, justify="right")
            for row in p["layers"]:
                lt.add_row(escape(row["layer"]), *[_fmt(row[k]) for k, _ in _STAT_COLUMNS])
            console.print(lt)


def _heatmap(names: list[str], matrix: list[list[float | None]]) -> Table:
    """Pairwise Jaccard as a table whose cells are shaded by value (relative to the max)."""
    off = [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j and v]
    top = max(off) if off else 1.0
    t = Table(title="pairwise index Jaccard (shaded relative to the largest)",
              title_justify="left")
    t.add_column("")
    for n in names:
        t.add_column(escape(n), justify="right")
    for i, row in enumerate(matrix):
        cells = []
        for j, v in enumerate(row):
            if i == j or v is None:
                cells.append(Text("—" if i == j else "-", style="dim"))
                continue
            x = min(1.0, v / top) if top > 0 else 0.0
            r, g, b = int(255 - 200 * x), int(255 - 120 * x), 255
            fg = "black" if x < 0.6 else "white"
            cells.append(Text(f"{v:.4f}", style=f"{fg} on rgb({r},{g},{b})"))
        t.add_row(escape(names[i]), *cells)
    return t
