"""``sparsemerge export`` and ``apply``: thin layers over ``sparsemerge.export`` and
``sparsemerge.apply.materialize``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sparsemerge.cli.common import console, print_json, user_errors
from sparsemerge.errors import SparseMergeError


def export(
    adapter: Annotated[str, typer.Argument(help="Adapter directory (or hf://owner/name).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write.")],
    peft: Annotated[bool, typer.Option(
        "--peft", help="Write a PEFT adapter directory (adapter_config.json + "
                       "adapter_model.safetensors) for PeftModel.from_pretrained: LoRA for "
                       "lora / partial-lora, SHiRA for sparse adapters (sparta, rigsa).")
    ] = False,
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapter "
                                                  "was trained on).")] = None,
    gguf_file: Annotated[str | None, typer.Option(help="A .gguf file inside --base.")] = None,
    head: Annotated[str | None, typer.Option(help="Which head of a multi-task adapter.")
                    ] = None,
    force: Annotated[bool, typer.Option(help="Export even if the base fingerprint differs.")
                     ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Export an adapter to another tool's format (needs the peft extra).

    --peft writes a PEFT adapter directory whose keys and config are PEFT's
    own; its logits match the adapter applied by sparsemerge. Low-rank
    adapters (lora, partial-lora) become LoRA (sparse factors written
    densely); sparse ones (sparta, rigsa with reset=zero, merge results)
    become SHiRA with our mask, padded with zero-valued entries to SHiRA's
    r * (in + out) per layer.

    Examples:

    $ sparsemerge export --peft sst2-lora -o sst2-peft

    $ sparsemerge export --peft sst2 -o sst2-shira

    Then, in Python: PeftModel.from_pretrained(base_model, "sst2-peft")
    """
    from sparsemerge.export import export_peft
    from sparsemerge.hub import resolve_path

    with user_errors():
        if not peft:
            raise SparseMergeError("choose the format to export to: --peft (the only one so far)")
        out = export_peft(resolve_path(adapter), output, base=base, gguf_file=gguf_file,
                          task=head, force=force)
    files = sorted(p.name for p in out.iterdir())
    peft_type = json.loads((out / "adapter_config.json").read_text())["peft_type"]
    if json_out:
        print_json({"adapter": adapter, "format": "peft", "peft_type": peft_type,
                    "output": str(out), "files": files})
        return
    console.print(f"wrote PEFT {peft_type} adapter {out} ({', '.join(files)})",
                  highlight=False)


def apply(
    adapter: Annotated[str, typer.Argument(help="Adapter directory (or hf://owner/name).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model directory to write.")],
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapter "
                                                  "was trained on).")] = None,
    gguf_file: Annotated[str | None, typer.Option(help="A .gguf file inside --base.")] = None,
    head: Annotated[str | None, typer.Option(help="Which head of a multi-task adapter.")
                    ] = None,
    force: Annotated[bool, typer.Option(help="Apply even if the base fingerprint differs.")
                     ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Write base + adapter as a full transformers model directory.

    The directory (config, weights, tokenizer) loads with transformers
    alone: AutoModelForSequenceClassification with the adapter's task head
    and labels (config.id2label), or the bare backbone for a head-less
    adapter. The adapter is merged into the weights (materialized).

    Examples:

    $ sparsemerge apply sst2 -o sst2-model

    Then, in Python:
    AutoModelForSequenceClassification.from_pretrained("sst2-model")
    """
    from sparsemerge.apply import materialize
    from sparsemerge.formats.adapter_file import load_adapter
    from sparsemerge.hub import resolve_path

    with user_errors():
        loaded = load_adapter(resolve_path(adapter))
        out = materialize(loaded, base, output, task=head, gguf_file=gguf_file, force=force)
    files = sorted(p.name for p in out.iterdir())
    if json_out:
        print_json({"adapter": adapter, "output": str(out), "files": files})
        return
    console.print(f"wrote model {out} ({', '.join(files)})", highlight=False)
