"""The PEFT-style API (``get_sparse_model``, ``SparseModel``, ``SparseCallback``) under a real
``transformers.Trainer`` and a plain loop, and its adapters through the CLI."""
# ruff: noqa: F811 (test_train's fixtures, imported, are parameters here)

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)
from typer.testing import CliRunner

import sparsemerge
from sparsemerge import SparseCallback, SparseConfig, SparseModel, get_sparse_model
from sparsemerge.cli import app
from sparsemerge.data.batching import batches, encode
from sparsemerge.data.readers import read_table
from sparsemerge.errors import SparseMergeError
from sparsemerge.evaluate import load_adapted
from sparsemerge.formats.adapter_file import load_adapter
from sparsemerge.models import load_tokenizer
from sparsemerge.train.loop import lr_factor, train
from sparsemerge.train.sparse_model import STATE_KEY
from tests.test_train import cfg, learnable_bert_dir, one_thread, synth  # noqa: F401 (fixtures)

LABELS = ["neg", "pos"]


def task_model(base: Path) -> torch.nn.Module:
    """What a user loads: a sequence classifier with named labels."""
    return AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)})


def rows(base: Path, csv: Path) -> list[dict[str, Any]]:
    """A user's tokenised dataset: one dict per example (padding left to the collator)."""
    data = read_table(str(csv), text_column="text", label_column="label", labels=LABELS)
    enc = load_tokenizer(base)(data.texts, truncation=True, max_length=32)
    return [{**{k: v[i] for k, v in enc.items()}, "labels": ex.label}
            for i, ex in enumerate(data.examples)]


def args(tmp_path: Path, **kw: Any) -> TrainingArguments:
    opts = dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=16,
                save_strategy="no", report_to=[], logging_steps=1, use_cpu=True, seed=0,
                disable_tqdm=True)
    return TrainingArguments(**{**opts, **kw})


def cli(*argv: object) -> dict[str, Any]:
    r = CliRunner().invoke(app, [str(a) for a in argv])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def train_losses(model, out, epochs: int, bert_dir, synth) -> list[float]:
    """``Trainer`` + ``SparseCallback`` on the synthetic task's training rows (AdamW over
    ``model.param_groups`` at 1e-2); the logged losses."""
    trainer = Trainer(model=model, args=args(out, num_train_epochs=epochs),
                      train_dataset=rows(bert_dir, synth[0]),
                      data_collator=DataCollatorWithPadding(load_tokenizer(bert_dir)),
                      optimizers=(torch.optim.AdamW(model.param_groups(1e-2)), None),
                      callbacks=[SparseCallback()])
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.fixture(scope="module")
def trained(learnable_bert_dir, synth, tmp_path_factory) -> dict[str, Any]:
    """A SpaRTA adapter trained by ``transformers.Trainer`` through ``get_sparse_model``."""
    tmp = tmp_path_factory.mktemp("api")
    model = get_sparse_model(task_model(learnable_bert_dir),
                             SparseConfig(density=0.1, task_name="synth"))
    losses = train_losses(model, tmp, 6, learnable_bert_dir, synth)
    out = model.save_pretrained(tmp / "adapter", metrics={"note": 1.0})
    return {"model": model, "losses": losses, "out": out, "tmp": tmp}


def test_trainer_learns_and_the_cli_reads_its_adapter(trained, learnable_bert_dir,
                                                      synth, tmp_path):
    losses, out = trained["losses"], trained["out"]
    assert len(losses) == 36  # 6 epochs of 6 steps
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.2
    adapter = load_adapter(out)
    assert adapter.method == "sparta" and adapter.tasks == ["synth"]
    assert adapter.heads["synth"].labels == LABELS
    assert adapter.base.model_id == str(learnable_bert_dir)
    assert adapter.hyperparameters["method_params"]["density"] == 0.1
    assert adapter.metrics == {"note": 1.0}

    info = cli("inspect", out, "--json")
    assert info["method"] == "sparta" and "synth" in json.dumps(info["heads"])
    scores = cli("evaluate", out, "--data", synth[1], "--text-column", "text",
                 "--label-column", "label", "--json")
    assert scores["head"] == "synth" and scores["metrics"]["accuracy"] >= 0.6
    # ... and merges with a CLI-trained adapter into a two-headed model
    other = train(cfg(learnable_bert_dir, synth, max_steps=2, task_name="other",
                      output=str(tmp_path / "other"))).output
    merged = cli("merge", out, other, "-m", "ties", "--heads", "-o", tmp_path / "merged",
                 "--json")
    assert sorted(merged["tasks"]) == ["other", "synth"]


def test_trainer_adapter_equals_the_cli_trainers(learnable_bert_dir, synth,
                                                 tmp_path):
    """Where the loops match, a Trainer run through ``get_sparse_model`` gives the CLI
    trainer's adapter bit for bit: the same seed (masks, head init), the same batches in the
    same order and padding (``data.batches``, fed to the Trainer one prepared batch per
    item, sequentially), the same AdamW groups (``param_groups``) and learning-rate schedule
    (``loop.lr_factor``), gradient clipping at 1.0, no dropout in this model, and one
    training-mode forward before the first step (the CLI's setup does one, so that the fast
    sparse path picks its memory layout before step 1). Compared: every target's indices and
    fp32 values, and the head's parameters."""
    config = cfg(learnable_bert_dir, synth, eval_file=None, epochs=2, save_dtype="fp32")
    expected = train(config).adapter

    enc, _ = encode(read_table(str(synth[0]), text_column="text", label_column="label",
                               labels=LABELS), load_tokenizer(learnable_bert_dir), 32)
    steps = [b for epoch in range(2) for b in batches(enc, 16, True, 0, epoch)]
    model = get_sparse_model(task_model(learnable_bert_dir),
                             SparseConfig(density=0.1, task_name=config.head_name()[0]))
    model.train()(**steps[0])
    optimizer = torch.optim.AdamW(model.param_groups(1e-2, head_lr=5e-2))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda s: lr_factor(s, len(steps), 0))
    Trainer(model=model, args=args(tmp_path, per_device_train_batch_size=1,
                                   train_sampling_strategy="sequential", num_train_epochs=1),
            train_dataset=steps, data_collator=lambda items: items[0],
            optimizers=(optimizer, schedule), callbacks=[SparseCallback()]).train()
    got = model.export()

    assert got.targets.keys() == expected.targets.keys()
    for name, t in expected.targets.items():
        assert torch.equal(got.targets[name].sparse.indices, t.sparse.indices), name
        assert torch.equal(got.targets[name].sparse.values, t.sparse.values), name
    (task,) = expected.heads
    for k, v in expected.heads[task].params.items():
        assert torch.equal(got.heads[task].params[k], v), k


def test_from_pretrained_and_merge_and_unload(trained, learnable_bert_dir, synth):
    out = trained["out"]
    batch = DataCollatorWithPadding(load_tokenizer(learnable_bert_dir))(
        [{k: v for k, v in r.items() if k != "labels"} for r in rows(learnable_bert_dir,
                                                                       synth[1])[:8]])

    def logits(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m.eval()(**batch).logits

    applied, *_ = load_adapted(out)
    loaded = SparseModel.from_pretrained(task_model(learnable_bert_dir), out)
    assert torch.equal(logits(loaded), logits(applied))
    merged = loaded.merge_and_unload()
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert torch.equal(logits(merged), logits(applied))

    base = task_model(learnable_bert_dir)
    before = {k: v.clone() for k, v in base.bert.state_dict().items()}
    SparseModel.from_pretrained(base, out).unload()
    assert all(torch.equal(v, base.bert.state_dict()[k]) for k, v in before.items())

    # the trained model itself: merging writes the deltas in, the function is unchanged
    live = trained["model"]
    expected = logits(live)
    assert torch.allclose(logits(live.merge_and_unload()), expected, atol=1e-6)


def test_rigsa_callback_prunes(tiny_bert_dir, synth, tmp_path):
    data = rows(tiny_bert_dir, synth[0])[:32]  # 2 steps per epoch

    def rigsa() -> SparseModel:
        return get_sparse_model(task_model(tiny_bert_dir), SparseConfig(
            method="rigsa", method_params={"rounds": 2, "reset": "zero", "sparse_below": 1.0}))

    def trainer(model: SparseModel, epochs: int, optimizer=None) -> Trainer:
        return Trainer(model=model, args=args(tmp_path, num_train_epochs=epochs),
                       train_dataset=data,
                       data_collator=DataCollatorWithPadding(load_tokenizer(tiny_bert_dir)),
                       optimizers=(optimizer, None), callbacks=[SparseCallback()])

    model = rigsa()
    optimizer = torch.optim.AdamW(model.param_groups(1e-2))
    trainer(model, 3, optimizer).train()
    method = model.method
    assert method.round == 2 and method.density() < 0.8**2 + 1e-3
    # the optimizer trains the pruned tensors: the ones the method holds now
    (dw,) = [g for g in optimizer.param_groups if g["name"] == "rigsa_dW"]
    assert sum(p.numel() for p in dw["params"]) == method.trainable_entries()
    ids = {id(p) for p in dw["params"]}
    assert all(id(p) in ids for p in method.param_groups()[0]["params"])
    adapter = load_adapter(model.save_pretrained(tmp_path / "rigsa"))
    assert adapter.trainable == method.trainable_entries() < adapter.target_numel * 0.65

    with pytest.raises(SparseMergeError, match="--epochs >= 3"):
        trainer(rigsa(), 2, torch.optim.AdamW(model.param_groups(1e-2))).train()
    with pytest.raises(SparseMergeError, match="param_groups"):
        trainer(rigsa(), 3).train()  # the Trainer's own optimizer cannot take new tensors


def test_plain_loop_hook_swaps_the_tensors_into_the_optimizer(tiny_bert_dir, synth):
    model = get_sparse_model(task_model(tiny_bert_dir), SparseConfig(
        method="rigsa", method_params={"rounds": 1, "round_steps": 2, "reset": "zero"}))
    optimizer = torch.optim.AdamW(model.param_groups(1e-2))
    collate = DataCollatorWithPadding(load_tokenizer(tiny_bert_dir))
    data = rows(tiny_bert_dir, synth[0])
    replaced = []
    for i in range(3):
        model(**collate(data[8 * i:8 * i + 8])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        replaced.append(model.after_step(optimizer))
    assert replaced == [False, True, False]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for g in model.method.param_groups() for p in g["params"])
    assert all(p in held for p in map(id, optimizer.state))  # no state of dropped tensors


def test_every_method_attaches_and_reports(tiny_bert_dir, synth, capsys):
    data = rows(tiny_bert_dir, synth[0])[:8]
    batch = DataCollatorWithPadding(load_tokenizer(tiny_bert_dir))(data)
    for method in ("sparta", "rigsa", "partial-lora", "lora", "full", "head"):
        model = get_sparse_model(task_model(tiny_bert_dir), SparseConfig(method=method),
                                 batches=[batch])
        trainable, total = model.get_nb_trainable_parameters()
        head = sum(p.numel() for p in model.classifier.parameters())
        assert trainable == model.method.num_trainable() + head, method
        assert {n for n, p in model.named_parameters() if p.requires_grad} >= {
            "model.classifier.weight", "model.classifier.bias"}
        assert model(**batch).loss.requires_grad
        assert model.config is model.model.config  # attributes come from the user's model
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: "
                                       f"{total:,d} || trainable%: "
                                       f"{100 * trainable / total:.4f}\n")
    sparta = get_sparse_model(task_model(tiny_bert_dir), SparseConfig())
    with pytest.raises(SparseMergeError, match="before get_sparse_model"):
        sparta.to("meta")
    with pytest.raises(SparseMergeError, match="density"):
        SparseConfig(density=0.0)
    assert sparsemerge.get_sparse_model is get_sparse_model


def assert_same_adapter(got: sparsemerge.SparseAdapter, want: sparsemerge.SparseAdapter) -> None:
    assert got.targets.keys() == want.targets.keys()
    for name, t in want.targets.items():
        assert got.targets[name].trainable == t.trainable, name
        assert torch.equal(got.targets[name].dense_delta(name), t.dense_delta(name)), name
    for task, head in want.heads.items():
        for k, v in head.params.items():
            assert torch.equal(got.heads[task].params[k], v), k


@pytest.mark.parametrize("method,params", [
    ("sparta", {}),
    ("rigsa", {"rounds": 2, "sparse_below": 1.0}),  # prunes after epochs 1 and 2
    ("partial-lora", {}),
])
def test_trainer_checkpoints_hold_the_adapter_and_resume_bit_exactly(method, params,
                                                                     tiny_bert_dir, synth,
                                                                     tmp_path):
    """save_steps writes the adapter's tensors and the method's state, no frozen tensor;
    resuming a fresh model from the checkpoint after RIGSA's first round (its tensors then
    have other shapes than a fresh model's) ends on the uninterrupted run's adapter, bit for
    bit (dropout on: the Trainer restores the RNG)."""
    data = rows(tiny_bert_dir, synth[0])[:32]  # 2 steps per epoch
    collate = DataCollatorWithPadding(load_tokenizer(tiny_bert_dir))

    def run(out: str, resume: Path | None = None, late_callback: bool = False) -> SparseModel:
        model = get_sparse_model(task_model(tiny_bert_dir), SparseConfig(
            method=method, density=0.1, method_params=params), batches=[collate(data[:16])])
        trainer = Trainer(model=model, args=args(tmp_path / out, num_train_epochs=4,
                                                 save_strategy="steps", save_steps=2),
                          train_dataset=data, data_collator=collate,
                          optimizers=(torch.optim.AdamW(model.param_groups(1e-2)), None),
                          callbacks=[] if late_callback else [SparseCallback()])
        if late_callback:
            trainer.add_callback(SparseCallback())
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        return model

    full = run("full")
    checkpoint = tmp_path / "full" / "trainer" / "checkpoint-2"
    saved = load_file(checkpoint / "model.safetensors")
    frozen = set(torch.nn.Module.state_dict(full)) - set(full.adapter_keys())
    assert "model.bert.embeddings.word_embeddings.weight" in frozen
    assert not frozen & set(saved)
    assert {k for k in saved if not k.startswith(STATE_KEY)} == set(full.adapter_keys())

    resumed = run("resumed", checkpoint)
    assert_same_adapter(resumed.export(), full.export())
    if method == "rigsa":
        assert resumed.method.round == 2
        with pytest.raises(SparseMergeError, match="bind_optimizer"):
            run("late", checkpoint, late_callback=True)


def test_plain_state_dicts_resume_a_pruned_rigsa_run(learnable_bert_dir, synth):
    """torch.save(model.state_dict()) and the optimizer's: loaded (strictly) into a fresh
    model whose optimizer is bound, the run goes on as if never stopped."""
    collate = DataCollatorWithPadding(load_tokenizer(learnable_bert_dir))
    data = rows(learnable_bert_dir, synth[0])
    config = SparseConfig(method="rigsa", method_params={"rounds": 1, "round_steps": 2})

    def fresh() -> tuple[SparseModel, torch.optim.Optimizer]:
        model = get_sparse_model(task_model(learnable_bert_dir), config)
        return model, model.bind_optimizer(torch.optim.AdamW(model.param_groups(1e-2)))

    def steps(model: SparseModel, optimizer: torch.optim.Optimizer, first: int, last: int):
        for i in range(first, last):
            model(**collate(data[8 * i:8 * i + 8])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            model.after_step(optimizer)

    model, optimizer = fresh()
    steps(model, optimizer, 0, 3)  # pruned after step 2
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, blob)
    steps(model, optimizer, 3, 5)

    blob.seek(0)
    state = torch.load(blob, weights_only=True)
    resumed, optimizer = fresh()
    resumed.load_state_dict(state["model"])  # strict: the frozen base is not missing
    optimizer.load_state_dict(state["optimizer"])
    steps(resumed, optimizer, 3, 5)
    assert resumed.method.round == 1
    assert_same_adapter(resumed.export(), model.export())


def test_from_pretrained_trainable_continues_from_the_adapter(trained, learnable_bert_dir,
                                                              synth, tmp_path, capsys):
    out = trained["out"]
    model = SparseModel.from_pretrained(task_model(learnable_bert_dir), out, is_trainable=True)
    assert model.method.name == "sparta" and model.sparse_config.task_name == "synth"
    # as many trainable parameters as when it was trained (its model is merged by now)
    first = get_sparse_model(task_model(learnable_bert_dir), SparseConfig(density=0.1))
    assert model.get_nb_trainable_parameters() == first.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    first.print_trainable_parameters()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == printed[1]
    # it starts where the adapter ends: the same function as the adapter applied frozen
    frozen = SparseModel.from_pretrained(task_model(learnable_bert_dir), out)
    batch = DataCollatorWithPadding(load_tokenizer(learnable_bert_dir))(
        [{k: v for k, v in r.items() if k != "labels"}
         for r in rows(learnable_bert_dir, synth[1])[:8]])
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, frozen.eval()(**batch).logits)
    start = load_adapter(out)
    # ... and trains on
    losses = train_losses(model.train(), tmp_path, 2, learnable_bert_dir, synth)
    assert sum(losses) / len(losses) < trained["losses"][0] - 0.1  # not back at the start
    again = load_adapter(model.save_pretrained(tmp_path / "again"))
    assert again.tasks == ["synth"] and again.trainable == start.trainable
    name = next(iter(start.targets))
    assert torch.equal(again.targets[name].sparse.indices, start.targets[name].sparse.indices)
    assert not torch.equal(again.targets[name].sparse.values, start.targets[name].sparse.values)


def test_from_pretrained_trainable_refuses_a_rigsa_adapter(tiny_bert_dir, tmp_path):
    model = get_sparse_model(task_model(tiny_bert_dir), SparseConfig(
        method="rigsa", method_params={"rounds": 0}))
    out = model.save_pretrained(tmp_path / "rigsa")
    with pytest.raises(SparseMergeError, match="resume_from_checkpoint"):
        SparseModel.from_pretrained(task_model(tiny_bert_dir), out, is_trainable=True)
