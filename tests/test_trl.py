"""TRL's ``SFTTrainer`` trains a causal-LM SpaRTA adapter through ``get_sparse_model`` with its
own defaults (fused AdamW among them), and sparsemerge reads, applies and generates with it."""
# ruff: noqa: F811 (test_lm_objective's fixture, imported, is a parameter here)

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModel, LlamaForCausalLM
from typer.testing import CliRunner

from sparsemerge import SparseCallback, SparseConfig, SparseModel, get_sparse_model
from sparsemerge.apply import apply
from sparsemerge.cli import app
from sparsemerge.data.batching import encode_prompt
from sparsemerge.evaluate import generate
from sparsemerge.formats.adapter_file import load_adapter
from sparsemerge.models import load_tokenizer
from tests.test_lm_objective import PAIRS, causal_llama  # noqa: F401 (fixture)

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                               reason="trl not installed: pip install -e '.[trl]'")


def test_fused_adamw_steps_reach_the_forward(tiny_llama_dir):
    """Fused AdamW (Trainer's and SFTTrainer's default optimizer) updates the values in place
    without bumping their version counters: ``after_step`` must still write them into the
    weights the fast path keeps merged, so the next forward is the adapted model's."""
    model = get_sparse_model(AutoModel.from_pretrained(tiny_llama_dir),
                             SparseConfig(method="sparta", density=0.1))
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2), fused=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids).last_hidden_state.square().sum().backward()
    optimizer.step()
    model.after_step(optimizer)
    fresh = AutoModel.from_pretrained(tiny_llama_dir)
    apply(fresh, model.export())
    with torch.no_grad():
        got, want = (m(input_ids=ids).last_hidden_state for m in (model, fresh))
    assert torch.equal(got, want)
    assert not torch.equal(want, AutoModel.from_pretrained(tiny_llama_dir)(
        input_ids=ids).last_hidden_state)


@needs_trl
def test_sft_trainer_trains_an_lm_adapter(causal_llama, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(str(causal_llama))
    base = LlamaForCausalLM.from_pretrained(causal_llama).state_dict()
    model = get_sparse_model(LlamaForCausalLM.from_pretrained(causal_llama),
                             SparseConfig(method="sparta", density=0.2))
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": f"digit of {w}"}],
                               "completion": [{"role": "assistant", "content": d}]}
                              for w, d in PAIRS * 4])
    # TRL's defaults otherwise: fused AdamW, gradient checkpointing, completion-only loss
    trainer = SFTTrainer(
        model=model, train_dataset=rows, processing_class=tok,
        args=SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=12,
                       per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                       save_strategy="no", report_to=[], use_cpu=True, seed=0,
                       disable_tqdm=True),
        callbacks=[SparseCallback()])
    # TRL trains on the chat-rendered prompt sparsemerge generates from, loss on the answer
    first, prompt = trainer.train_dataset[0], encode_prompt("digit of one", tok, chat=True)
    assert first["input_ids"][:len(prompt)] == prompt
    assert set(first["labels"][:len(prompt)]) == {-100} and first["labels"][len(prompt)] != -100
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.1

    path = model.save_pretrained(tmp_path / "adapter", save_dtype="fp32",
                                 hyperparameters={"objective": "lm", "chat_template": True})
    merged = model.merge_and_unload().state_dict()
    adapter = load_adapter(path)
    assert adapter.method == "sparta" and adapter.heads == {}
    # only the adapter's entries changed (LM head, embeddings and norms kept)
    changed = 0
    for name, w0 in base.items():
        target = adapter.targets.get(name.removeprefix("model."))
        diff = (merged[name] != w0).reshape(-1).nonzero().squeeze(1)
        if target is None:
            assert diff.numel() == 0, name
        else:
            assert set(diff.tolist()) <= set(target.sparse.indices.tolist()), name
            changed += diff.numel()
    assert changed > 0

    # sparsemerge applies the adapter to a fresh base exactly, and generates with it
    loaded = SparseModel.from_pretrained(LlamaForCausalLM.from_pretrained(causal_llama), path)
    assert all(torch.equal(w, merged[n]) for n, w in loaded.model.state_dict().items())
    ids = torch.tensor([prompt])
    out = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                          do_sample=False, pad_token_id=tok.pad_token_id)
    want = tok.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
    assert generate(path, ["digit of one"], max_new_tokens=3) == [want]
    r = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["method"] == "sparta"
