"""Merge recipes: the options of ``sparsemerge merge`` as one validated object, from flags or YAML.

A recipe file (``sparsemerge merge --config recipe.yaml``), mergekit-style::

    method: ties                 # any registered operator (alias: merge_method)
    parameters:                  # validated against the operator's declared Params
      density: 0.5
      lambda: 1.0                # 'lambda' is accepted for 'lam'
    inputs:                      # alias: models; a plain string is a path with weight 1
      - path: runs/sst2          # alias: model; local dir, hf://owner/name[@rev], PEFT dir, or
        weight: 1.0              #   a fully fine-tuned model dir (weight also under parameters:)
      - runs/cola
      - path: runs/train-file    # task (alias: name): rename the input's head, e.g. when two
        task: news               #   adapters are both called "train"; as a string: news=PATH
    base: null                   # base model (default: the one the adapters were trained on)
    heads: true                  # true: merged multi-head model dir; false: merged adapter
    output: merged               # alias: out
    max_shard_size: 2GB
    input_density: 0.01          # full fine-tunes only: fraction of Δ kept
    sparsify: magnitude          # full fine-tunes only: magnitude | dare
    seed: 0                      # full fine-tunes only: DARE seed
    calibrate: 200               # choose weights (and density / lam) on 200 held-out training
                                 #   rows per task (sparsemerge.merge.calibrate); 0 = off
    learn_weights: 200           # learn a weight per input and block in 200 steps on the
                                 #   training rows (sparsemerge.merge.learn_weights); 0 = off
    refit_heads: 200             # then retrain each head 200 steps on the merged backbone

Relative ``inputs`` / ``output`` / ``base`` paths are resolved against the recipe file's
folder, so a recipe and its adapters can move together. Command-line flags given alongside
``--config`` override the file's values (inputs on the command line replace its inputs).
An input written ``NAME=PATH`` (command line or recipe) renames that input's one head to
``NAME`` (see :func:`split_input`); a task name may be any text a folder name can hold
(:func:`~sparsemerge.formats.merged.task_name_problem`).
:func:`run_recipe` executes a recipe; the CLI is a thin layer over it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsemerge.declare import Param
from sparsemerge.errors import SparseMergeError
from sparsemerge.formats.merged import DEFAULT_MAX_SHARD_SIZE, check_task_name, parse_size
from sparsemerge.merge.operators import get_operator

DEFAULT_METHOD = "sum"
DEFAULT_INPUT_DENSITY = 0.01
_KEYS = {
    "method": "method", "merge_method": "method",
    "parameters": "parameters", "params": "parameters",
    "inputs": "inputs", "models": "inputs", "adapters": "inputs",
    "base": "base", "base_model": "base",
    "base_dtype": "base_dtype",
    "heads": "heads",
    "output": "output", "out": "output",
    "max_shard_size": "max_shard_size",
    "input_density": "input_density",
    "sparsify": "sparsify",
    "seed": "seed",
    "calibrate": "calibrate",
    "learn_weights": "learn_weights",
    "refit_heads": "refit_heads",
}
_PARAM_ALIASES = {"lambda": "lam"}
_INPUT_DENSITY = Param("input_density", float, DEFAULT_INPUT_DENSITY,
                       "fraction of a full fine-tune's delta kept", low=0.0, high=1.0,
                       low_open=True)
_SPARSIFY = Param("sparsify", str, "magnitude", "how a full fine-tune's delta is sparsified",
                  choices=("magnitude", "dare"))
_SEED = Param("seed", int, 0, "seed of DARE sparsification of full fine-tunes", low=0)
_CALIBRATE = Param("calibrate", int, 0, "held-out training rows per task on which the merge "
                   "weights are chosen (0 = off)", low=0)
_LEARN = Param("learn_weights", int, 0, "steps of learning one weight per input and block on "
               "the inputs' training rows (0 = off)", low=0)
_REFIT = Param("refit_heads", int, 0, "steps each head is retrained on the merged backbone "
               "(0 = off)", low=0)


@dataclass
class RecipeInput:
    path: str
    weight: float = 1.0
    task: str | None = None  # the name its head gets in the merge (None: as the input has it)


_RENAME_HINT = "; write NAME=PATH with another name"


def split_input(text: str, root: Path | None = None) -> tuple[str | None, str]:
    """``"news=runs/a"`` -> ``("news", "runs/a")``: an input with its head renamed to
    ``news``; ``"runs/a"`` -> ``(None, "runs/a")``. A text that names an existing file or
    folder (relative to ``root`` when given) is a path; ``hf://`` URIs are paths. Otherwise
    it is split at the first ``=`` after which an existing path follows (so a name may hold
    ``=``: ``"a=b=runs/a"`` -> ``("a=b", "runs/a")``), else at the first ``=``."""

    def exists(value: str) -> bool:
        local = Path(value) if root is None or Path(value).is_absolute() else root / value
        try:
            return local.exists()
        except OSError:  # a name too long for the file system
            return False

    if "=" not in text or text.startswith("hf://") or exists(text):
        return None, text
    name, _, path = text.partition("=")
    for i, c in enumerate(text):
        if c == "=" and i and (exists(text[i + 1:]) or text[i + 1:].startswith("hf://")):
            name, path = text[:i], text[i + 1:]
            break
    if not name or not path:
        raise SparseMergeError(f"input {text!r}: write NAME=PATH (a head name, '=', the "
                               "adapter's path) or just PATH")
    return name, path


@dataclass
class MergeRecipe:
    """Everything one merge needs. ``parameters`` holds every declared operator parameter
    (defaults filled in) once :meth:`validate` has run."""

    method: str = DEFAULT_METHOD
    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: list[RecipeInput] = field(default_factory=list)
    base: str | None = None
    base_dtype: str = "auto"  # with heads: dtype of the written backbone ("auto": the base's)
    heads: bool = False
    output: str | None = None
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    input_density: float = DEFAULT_INPUT_DENSITY
    sparsify: str = "magnitude"
    seed: int = 0
    calibrate: int = 0  # held-out training rows per task to choose the weights on (0 = off)
    learn_weights: int = 0  # steps learning a weight per input and block (0 = off)
    refit_heads: int = 0  # steps each head is retrained on the merged backbone (0 = off)

    @property
    def weights(self) -> list[float]:
        return [i.weight for i in self.inputs]

    def validate(self, *, need_output: bool = True) -> MergeRecipe:
        op = get_operator(self.method)
        self.parameters = op.validate_params(
            {_PARAM_ALIASES.get(k, k): v for k, v in self.parameters.items()})
        if len(self.inputs) < 1:
            raise SparseMergeError("nothing to merge: give at least one input")
        if need_output and not self.output:
            raise SparseMergeError("no output: pass -o/--output (or 'output:' in the recipe)")
        self.max_shard_size = parse_size(self.max_shard_size)
        self.input_density = _INPUT_DENSITY.check(self.input_density, "recipe: ")
        self.sparsify = _SPARSIFY.check(self.sparsify, "recipe: ")
        self.seed = _SEED.check(self.seed, "recipe: ")
        self.calibrate = _CALIBRATE.check(self.calibrate, "recipe: ")
        self.learn_weights = _LEARN.check(self.learn_weights, "recipe: ")
        self.refit_heads = _REFIT.check(self.refit_heads, "recipe: ")
        if not isinstance(self.heads, bool):
            raise SparseMergeError(f"recipe: 'heads' must be true or false, got {self.heads!r}")
        from sparsemerge.models import BASE_DTYPES

        if self.base_dtype not in BASE_DTYPES:
            raise SparseMergeError(f"recipe: 'base_dtype' must be one of "
                                   f"{', '.join(BASE_DTYPES)}, got {self.base_dtype!r}")
        for inp in self.inputs:
            if inp.task is not None:
                check_task_name(inp.task, hint=f" (input {inp.path}){_RENAME_HINT}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SparseMergeError(f"{where}: weight must be a number, got {value!r}")
    return float(value)


def _path(value: str, root: Path | None, *, only_if_exists: bool = False) -> str:
    """``value`` relative to the recipe's folder (hf:// URIs and absolute paths unchanged).

    With ``only_if_exists`` (the base, which may be a Hub id) the value is kept as written
    unless it names something in the recipe's folder."""
    if root is None or value.startswith("hf://") or Path(value).is_absolute():
        return value
    candidate = root / value
    if only_if_exists and not candidate.exists():
        return value
    return str(candidate)


def recipe_from_dict(data: Any, *, where: str = "recipe", root: Path | None = None
                     ) -> MergeRecipe:
    """Build (not yet validate) a recipe from a parsed YAML mapping."""
    if not isinstance(data, Mapping):
        raise SparseMergeError(f"{where}: expected a mapping of options at the top level")
    opts: dict[str, Any] = {}
    for key, value in data.items():
        canon = _KEYS.get(str(key))
        if canon is None:
            raise SparseMergeError(f"{where}: unknown key {key!r}; known: "
                                   f"{', '.join(sorted(set(_KEYS.values())))}")
        if canon in opts:
            raise SparseMergeError(f"{where}: {canon!r} is given twice (through an alias)")
        opts[canon] = value
    r = MergeRecipe()
    if "method" in opts:
        if not isinstance(opts["method"], str):
            raise SparseMergeError(f"{where}: 'method' must be a string")
        r.method = opts["method"]
    params = opts.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise SparseMergeError(f"{where}: 'parameters' must be a mapping")
    r.parameters = {_PARAM_ALIASES.get(str(k), str(k)): v for k, v in params.items()}
    inputs = opts.get("inputs") or []
    if not isinstance(inputs, list):
        raise SparseMergeError(f"{where}: 'inputs' must be a list")
    for i, item in enumerate(inputs):
        w = f"{where}: inputs[{i}]"
        if isinstance(item, str):
            task, path = split_input(item, root)
            r.inputs.append(RecipeInput(_path(path, root), task=task))
            continue
        if not isinstance(item, Mapping):
            raise SparseMergeError(f"{w}: expected a path or a mapping with 'path'")
        unknown = set(item) - {"path", "model", "weight", "parameters", "task", "name"}
        if unknown:
            raise SparseMergeError(f"{w}: unknown key(s) {sorted(unknown)}")
        if "task" in item and "name" in item:
            raise SparseMergeError(f"{w}: give 'task' or its alias 'name', not both")
        task = item.get("task", item.get("name"))
        if task is not None and not isinstance(task, str):
            raise SparseMergeError(f"{w}: 'task' must be a string (the head's new name), got "
                                   f"{task!r}")
        path = item.get("path", item.get("model"))
        if not isinstance(path, str) or not path:
            raise SparseMergeError(f"{w}: 'path' must be a non-empty string")
        weight = item.get("weight")
        sub = item.get("parameters") or {}
        if not isinstance(sub, Mapping) or set(sub) - {"weight"}:
            raise SparseMergeError(f"{w}: per-input 'parameters' may only hold 'weight'")
        if weight is None:
            weight = sub.get("weight", 1.0)
        r.inputs.append(RecipeInput(_path(path, root), _weight(weight, w), task))
    for key in ("base", "output"):
        if opts.get(key) is not None:
            if not isinstance(opts[key], str):
                raise SparseMergeError(f"{where}: {key!r} must be a string")
            setattr(r, key, _path(opts[key], root, only_if_exists=key == "base"))
    if "heads" in opts:
        r.heads = opts["heads"]
    for key in ("max_shard_size", "input_density", "sparsify", "seed", "base_dtype",
                "calibrate", "learn_weights", "refit_heads"):
        if key in opts:
            setattr(r, key, opts[key])
    return r


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read and validate a YAML recipe file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SparseMergeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SparseMergeError(f"{path}: not a valid YAML recipe: {exc}") from None
    return recipe_from_dict(data, where=str(path), root=path.parent).validate(need_output=False)


def parse_weights(text: str | Sequence[float] | None) -> list[float] | None:
    if text is None:
        return None
    if not isinstance(text, str):
        return [float(x) for x in text]
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise SparseMergeError(f"--weights {text!r}: give numbers separated by commas, e.g. "
                               "1,0.5") from None


def parse_params(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SparseMergeError(f"--param {item!r}: expected NAME=VALUE, e.g. p=0.3")
        out[_PARAM_ALIASES.get(key.strip(), key.strip())] = value
    return out


def build_recipe(inputs: Sequence[str] | None = None, *, config: str | Path | None = None,
                 method: str | None = None, density: float | None = None,
                 lam: float | None = None, weights: str | Sequence[float] | None = None,
                 params: Sequence[str] | Mapping[str, Any] | None = None,
                 heads: bool | None = None, base: str | None = None,
                 output: str | None = None, max_shard_size: int | str | None = None,
                 input_density: float | None = None, sparsify: str | None = None,
                 seed: int | None = None, base_dtype: str | None = None,
                 calibrate: int | None = None, learn_weights: int | None = None,
                 refit_heads: int | None = None) -> MergeRecipe:
    """A validated recipe from command-line values (``None`` = not given), on top of
    ``config`` when given. Flags override the file; command-line inputs replace its inputs."""
    r = load_recipe(config) if config is not None else MergeRecipe()
    if method is not None:
        if config is not None and method != r.method:
            r.parameters = {}  # the file's parameters belong to its method
        r.method = method
    extra = dict(params) if isinstance(params, Mapping) else parse_params(params)
    if density is not None:
        extra["density"] = density
    if lam is not None:
        extra["lam"] = lam
    r.parameters = {**r.parameters, **extra}
    if inputs:
        r.inputs = []
        for item in inputs:
            task, path = split_input(str(item))
            r.inputs.append(RecipeInput(path, task=task))
    ws = parse_weights(weights)
    if ws is not None:
        if len(ws) != len(r.inputs):
            raise SparseMergeError(f"--weights gives {len(ws)} weights for {len(r.inputs)} "
                                   "inputs; give one per input")
        for inp, w in zip(r.inputs, ws, strict=True):
            inp.weight = w
    for key, value in (("heads", heads), ("base", base), ("output", output),
                       ("max_shard_size", max_shard_size), ("input_density", input_density),
                       ("sparsify", sparsify), ("seed", seed), ("base_dtype", base_dtype),
                       ("calibrate", calibrate), ("learn_weights", learn_weights),
                       ("refit_heads", refit_heads)):
        if value is not None:
            setattr(r, key, value)
    return r.validate()


# --------------------------------------------------------------------------------- running


def load_inputs(recipe: MergeRecipe, *, progress: Callable[[str, int, int], None] | None = None):
    """Load every input as a SparseAdapter; returns (adapters, base, gguf_file)."""
    from sparsemerge.hub import resolve_path
    from sparsemerge.merge.inputs import input_kind, load_merge_input, rename_head
    from sparsemerge.models import adapter_base

    kinds = []
    for inp in recipe.inputs:
        try:
            kinds.append(input_kind(resolve_path(inp.path)))
        except SparseMergeError as exc:
            if inp.task is None:
                raise
            raise SparseMergeError(f"input {inp.task}={inp.path} (head name {inp.task!r}, "
                                   f"path {inp.path!r}): {exc}") from None
    adapters: list[Any] = [None] * len(recipe.inputs)
    done = 0
    for i, inp in enumerate(recipe.inputs):  # own adapters first: they name the base
        if kinds[i] == "adapter":
            adapters[i] = load_merge_input(inp.path)
            done += 1
            if progress:
                progress("load", done, len(adapters))
    base: str | None = recipe.base
    gguf: str | None = None
    own = [a for a in adapters if a is not None]
    if base is None and own:
        base, gguf = adapter_base(own[0])
    for i, inp in enumerate(recipe.inputs):
        if adapters[i] is None:
            if kinds[i] == "full" and base is None and not own and recipe.base is None:
                raise SparseMergeError(f"{inp.path} is a fully fine-tuned model: pass --base "
                                       "with the model it was fine-tuned from")
            adapters[i] = load_merge_input(inp.path, base, recipe.input_density,
                                           sparsify=recipe.sparsify, seed=recipe.seed,
                                           gguf_file=gguf)
            done += 1
            if progress:
                progress("load", done, len(adapters))
    for inp, adapter in zip(recipe.inputs, adapters, strict=True):
        if inp.task is not None:
            rename_head(adapter, inp.task, inp.path)
    return adapters, base, gguf


def run_recipe(recipe: MergeRecipe, *, force: bool = False,
               progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Load the inputs, merge, write the output; return a report (JSON-able)."""
    from sparsemerge.formats.adapter_file import save_adapter
    from sparsemerge.merge.engine import merge_adapters
    from sparsemerge.merge.stream import save_merged_causal_lm, save_merged_model

    recipe.validate()
    t0 = time.perf_counter()
    adapters, base, gguf = load_inputs(recipe, progress=progress)
    tc = time.perf_counter()
    calibration = None
    if recipe.calibrate:
        from sparsemerge.merge.calibrate import calibrate

        found = calibrate(adapters, recipe.method, recipe.parameters, recipe.weights,
                          recipe.calibrate, base=recipe.base if recipe.base is not None else base,
                          gguf_file=gguf, progress=progress)
        recipe.parameters = found["parameters"]
        for inp, w in zip(recipe.inputs, found["weights"], strict=True):
            inp.weight = w
        calibration = found["record"]
    learned = None
    if recipe.learn_weights:
        from sparsemerge.merge.learn_weights import learn_weights

        found = learn_weights(adapters, recipe.method, recipe.parameters, recipe.weights,
                              recipe.learn_weights, rows=recipe.calibrate or None,
                              base=recipe.base if recipe.base is not None else base,
                              gguf_file=gguf, progress=progress)
        adapters, learned = found["adapters"], found["record"]
    t1 = time.perf_counter()
    merged = merge_adapters(adapters, recipe.method, recipe.parameters, recipe.weights,
                            progress=progress)
    refit = None
    if recipe.refit_heads:
        from sparsemerge.merge.calibrate import refit_heads

        refit = refit_heads(merged, adapters, recipe.refit_heads,
                            base=recipe.base if recipe.base is not None else base,
                            gguf_file=gguf, progress=progress)
    t2 = time.perf_counter()
    record = merged.extra["merge"]
    report: dict[str, Any] = {
        "output": str(recipe.output), "kind": "merged-model" if recipe.heads else "adapter",
        "method": recipe.method, "parameters": recipe.parameters, "weights": recipe.weights,
        "inputs": record["inputs"], "tasks": list(merged.heads), "targets": len(merged.targets),
        "nnz": sum(t.sparse.nnz for t in merged.targets.values() if t.sparse is not None),
    }
    extras = {k: v for k, v in (("calibration", calibration), ("learned_weights", learned),
                                ("refit_heads", refit)) if v is not None}
    report.update(extras)
    record.update(extras)  # a merged adapter's extra["merge"], as sparsemerge_recipe.json
    if recipe.heads and not merged.heads and all(
            a.hyperparameters.get("objective") == "lm" for a in adapters):
        report["kind"] = "causal-lm"
        report["model"] = save_merged_causal_lm(
            merged, recipe.output, base=recipe.base if recipe.base is not None else base,
            gguf_file=gguf, force=force, base_dtype=recipe.base_dtype)
    elif recipe.heads:
        body = {"method": recipe.method, "reference": record["reference"],
                "parameters": recipe.parameters, "weights": recipe.weights,
                "inputs": record["inputs"],
                "recipe": {k: v for k, v in recipe.to_dict().items() if k != "inputs"},
                **extras}
        report["backbone"] = save_merged_model(
            merged, recipe.output, base=recipe.base if recipe.base is not None else base,
            gguf_file=gguf, recipe=body, max_shard_size=recipe.max_shard_size, force=force,
            progress=progress, base_dtype=recipe.base_dtype)
    else:
        if recipe.base is not None:
            _check_base_now(merged, recipe.base, gguf, force)
        save_adapter(merged, recipe.output)
    t3 = time.perf_counter()
    report["seconds"] = {"load": round(tc - t0, 3), "calibrate": round(t1 - tc, 3),
                         "merge": round(t2 - t1, 3),
                         "write": round(t3 - t2, 3), "total": round(t3 - t0, 3)}
    return report


def _check_base_now(merged, base: str, gguf: str | None, force: bool) -> None:
    """With an explicit --base and no --heads, verify the merged deltas fit it."""
    from sparsemerge.checkpoint import BaseCheckpoint, check_targets
    from sparsemerge.models import check_base

    ckpt = BaseCheckpoint(base, gguf)
    check_targets(ckpt, merged.targets)
    check_base(merged.base, ckpt.tensors(), list(merged.targets), found_id=str(base),
               force=force)
    ckpt.close()


__all__ = ["MergeRecipe", "RecipeInput", "build_recipe", "load_recipe", "recipe_from_dict",
           "run_recipe"]
