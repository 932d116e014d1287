"""Inspect adapters and measure how much they overlap, before you merge them.

Two sparse adapters interfere where they changed the same weights. This shows what each
adapter holds (method, base, heads, trainable entries, bits per stored entry), the overlap
of every pair (shared entries, Jaccard, sign agreement and cosine on the shared entries, the
sign conflicts TIES would resolve), and what a TIES merge keeps. Run ``train_and_merge.py``
first (its adapters are the default), or pass any adapter directories; the report goes to
``<out>/overlap.json``.

    python examples/inspect_and_overlap.py
    python examples/inspect_and_overlap.py runs/sst2 runs/cola hf://me/mrpc --per-layer --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import sparsemerge
from sparsemerge.formats.describe import describe_adapter
from sparsemerge.merge.engine import overlap_report

HERE = Path(__file__).resolve().parent


def fmt(x: float | None) -> str:
    """Figures are None where undefined (no shared entries): show a dash."""
    return "-" if x is None else f"{x:.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", nargs="*",
                   help="adapter directories or hf://owner/name (default: the sst2 and cola "
                        "adapters train_and_merge.py wrote to examples/out)")
    p.add_argument("--out", type=Path, default=HERE / "out",
                   help="folder for overlap.json (default: examples/out)")
    p.add_argument("--per-layer", action="store_true", help="also report each layer's overlap")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def summarize(path: str, adapter: sparsemerge.SparseAdapter) -> dict[str, Any]:
    """What an adapter holds (the object) and what it costs on disk (the file)."""
    info = {"path": path, "method": adapter.method, "base": adapter.base.model_id,
            "heads": {task: head.labels for task, head in adapter.heads.items()},
            "entries": adapter.trainable, "density": adapter.trainable / adapter.target_numel,
            "metrics": adapter.metrics}
    if not path.startswith("hf://"):  # `sparsemerge inspect` on the file: codecs, bits/entry
        disk = describe_adapter(path)
        info.update(file_bytes=disk["file_bytes"], codecs=disk["codecs"],
                    bits_per_entry=disk["index_bits_per_entry"] + disk["value_bits_per_entry"])
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    paths = args.adapters or [str(HERE / "out" / "sst2"), str(HERE / "out" / "cola")]
    missing = [p for p in paths if not p.startswith("hf://") and not Path(p).exists()]
    if missing:
        raise SystemExit(f"no adapter at {', '.join(missing)}: run train_and_merge.py first "
                         "or pass adapter directories")

    # Name each adapter after its task(s); overlap_report keys its pairs by these names.
    adapters: dict[str, sparsemerge.SparseAdapter] = {}
    for path in paths:
        adapter = sparsemerge.load_adapter(path)
        name = "+".join(adapter.tasks) or Path(path).name
        adapters[path if name in adapters else name] = adapter
    inspected = {name: summarize(path, a)
                 for path, (name, a) in zip(paths, adapters.items(), strict=True)}

    overlap = overlap_report(adapters, per_layer=args.per_layer)

    # What a merge keeps: shared entries collapse into one, so the merged adapter holds about
    # the union of the inputs' entries, far fewer than their sum when masks overlap.
    merged = sparsemerge.merge_adapters(list(adapters.values()), "ties", {"density": 1.0})
    report = {"adapters": inspected, "pairs": overlap["pairs"], "matrix": overlap["matrix"],
              "merged_entries": merged.trainable,
              "summed_entries": sum(a.trainable for a in adapters.values())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overlap.json").write_text(json.dumps(report, indent=1))

    if args.json:
        print(json.dumps(report))
        return report
    for name, info in inspected.items():
        print(f"{name}: {info['method']} on {info['base']}, {info['entries']:,} entries "
              f"({info['density']:.2%}), heads {info['heads']}"
              + (f", {info['bits_per_entry']:.1f} bits/entry" if "bits_per_entry" in info
                 else ""))
    for pair in overlap["pairs"]:
        s = pair["overall"]
        print(f"{pair['a']} vs {pair['b']}: {s['intersection']:,} shared of {s['union']:,} "
              f"(Jaccard {fmt(s['jaccard'])}), sign agreement {fmt(s['sign_agreement'])}, "
              f"cosine {fmt(s['cosine'])}, {s['ties_sign_conflicts']:,} TIES sign conflicts")
        for layer in pair.get("layers", []):
            print(f"  layer {layer['layer']}: Jaccard {fmt(layer['jaccard'])}")
    print(f"a TIES merge keeps {report['merged_entries']:,} entries "
          f"(the inputs hold {report['summed_entries']:,}); report: {args.out / 'overlap.json'}")
    return report


if __name__ == "__main__":
    main()
