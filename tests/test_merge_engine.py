"""Merge engine, merged multi-head directories, MultiHeadModel, bring-your-own inputs, recipes.

Adapters are built by hand (random sparse deltas + heads on the tiny BERT / Llama fixtures),
so nothing here waits for a trainer.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from sparsemerge.adapter import Head, LowRank, SparseAdapter, SparseTensor, TargetDelta
from sparsemerge.checkpoint import BaseCheckpoint
from sparsemerge.errors import BaseMismatchError, FormatError, SparseMergeError
from sparsemerge.formats.adapter_file import load_adapter, save_adapter
from sparsemerge.formats.merged import INDEX_NAME, parse_size, read_merged
from sparsemerge.merge.engine import file_sha256, merge_adapters
from sparsemerge.merge.recipe import build_recipe, load_recipe, run_recipe
from sparsemerge.merge.stream import save_merged_model
from sparsemerge.models import base_info, default_targets
from sparsemerge.multihead import MultiHeadModel, evaluate_merged, predict_merged

# ------------------------------------------------------------------------------ helpers


@cache
def _backbone(base_dir: str):
    model = AutoModel.from_pretrained(base_dir)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_adapter(base_dir: Path, task: str | None, seed: int, *, labels=("negative", "positive"),
                 density: float = 0.05, gate: float = 1.0, names: list[str] | None = None,
                 lowrank: str | None = None, module: str | None = None) -> SparseAdapter:
    """Random sparse deltas on ``names`` (default: every linear weight) plus a random head."""
    model, sd = _backbone(str(base_dir))
    names = names or default_targets(model)
    g = torch.Generator().manual_seed(seed)
    targets = {}
    for n in names:
        shape = tuple(sd[n].shape)
        numel = sd[n].numel()
        k = max(1, int(numel * density))
        idx = torch.sort(torch.randperm(numel, generator=g)[:k]).values
        vals = torch.randn(k, generator=g) * 0.05
        targets[n] = TargetDelta(shape, SparseTensor(shape, idx, vals), gate=gate)
    if lowrank is not None:  # a Partial-LoRA style target: materialised by sparse_delta
        out_dim, in_dim = sd[lowrank].shape
        a = torch.randn(2, in_dim, generator=g) * 0.1
        b = torch.randn(out_dim, 2, generator=g) * 0.1
        targets[lowrank] = TargetDelta((out_dim, in_dim), lowrank=LowRank(
            SparseTensor.from_dense(a), SparseTensor.from_dense(b), scale=0.5), gate=gate)
    heads = {}
    if task is not None:
        hidden = model.config.hidden_size
        is_bert = model.config.model_type == "bert"
        module = module or ("classifier" if is_bert else "score")
        params = {"weight": torch.randn(len(labels), hidden, generator=g) * 0.3}
        if is_bert:
            params["bias"] = torch.randn(len(labels), generator=g) * 0.1
        heads[task] = Head(module, params, list(labels))
    return SparseAdapter(targets, base_info(model, str(base_dir), sorted(targets)), heads)


def read_weights(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(safetensors.torch.load_file(str(f)))
    return tensors


def _trim_count(density: float, n: int) -> int:
    x = density * n
    r = round(x)
    return r if abs(x - r) <= 1e-12 * max(1.0, x) else math.ceil(x)


def dense_reference(method: str, dense: list[torch.Tensor], weights: list[float],
                    params: dict) -> torch.Tensor:
    """The operators' definitions on dense float64 tensors (independent of the engine)."""
    d = torch.stack([x.double().reshape(-1) for x in dense])
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    lam = params.get("lam", 1.0)
    if method in ("sum", "weighted"):
        return lam * (w * d).sum(0)
    if method == "ties":
        trimmed = torch.zeros_like(d)
        for i in range(d.shape[0]):
            nz = torch.nonzero(d[i]).reshape(-1)
            k = _trim_count(params["density"], nz.numel())
            order = torch.argsort(d[i, nz].abs(), descending=True, stable=True)[:k]
            trimmed[i, nz[order]] = d[i, nz[order]]
        d = trimmed
    c = w * d
    sign = torch.where(c.sum(0) >= 0, 1.0, -1.0).double()
    agree = (c != 0) & (torch.sign(c) == sign)
    num = (c * agree).sum(0)
    if method == "sign_consensus" and params.get("reduce", "sum") == "sum":
        return lam * num
    den = (w.abs() * agree).sum(0)
    return lam * torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


# ------------------------------------------------------------------------------ engine


@pytest.mark.parametrize("method,params,weights", [
    ("sum", {}, None),
    ("weighted", {"lam": 0.7}, [1.0, 0.5, 2.0]),
    ("ties", {"density": 0.5}, None),
    ("ties", {"density": 0.3, "lam": 1.5}, [1.0, 2.0, 0.5]),
    ("sign_consensus", {"reduce": "mean"}, None),
])
def test_merged_backbone_equals_base_plus_dense_reference(tiny_bert_dir, tmp_path, method,
                                                          params, weights):
    model, sd = _backbone(str(tiny_bert_dir))
    names = default_targets(model)
    adapters = [
        make_adapter(tiny_bert_dir, "sst2", 1, density=0.2, gate=0.5),  # gate folded in
        make_adapter(tiny_bert_dir, "cola", 2, density=0.2, names=names[:5],
                     labels=("unacceptable", "acceptable")),
        make_adapter(tiny_bert_dir, "topic", 3, density=0.2, names=names[3:],
                     lowrank=names[0], labels=("a", "b", "c")),
    ]
    merged = merge_adapters(adapters, method, params, weights)
    report = save_merged_model(merged, tmp_path / "out")
    assert report["streamed"]
    out = read_weights(tmp_path / "out")
    full = {"density": 0.2, "lam": 1.0, **params}
    ws = weights or [1.0, 1.0, 1.0]
    for name, base in sd.items():
        if name not in out:  # non-persistent buffers are not saved
            continue
        deltas = [a.targets[name].dense_delta(name) if name in a.targets
                  else torch.zeros(base.shape) for a in adapters]
        if any(name in a.targets for a in adapters):
            ref = base.double().reshape(-1) + dense_reference(method, deltas, ws, full)
            torch.testing.assert_close(out[name].double().reshape(-1), ref, atol=2e-6, rtol=0)
        else:
            assert torch.equal(out[name], base), name
    assert set(merged.heads) == {"sst2", "cola", "topic"}
    for a in adapters:  # heads carried over untouched
        for task, h in a.heads.items():
            for p, v in h.params.items():
                assert torch.equal(merged.heads[task].params[p], v)


def test_merged_metadata_records_method_params_inputs(tiny_bert_dir, tmp_path):
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    b = make_adapter(tiny_bert_dir, "cola", 2, labels=("unacceptable", "acceptable"))
    save_adapter(a, tmp_path / "a")
    save_adapter(b, tmp_path / "b")
    from sparsemerge.merge.inputs import load_merge_input

    inputs = [load_merge_input(tmp_path / "a"), load_merge_input(tmp_path / "b")]
    merged = merge_adapters(inputs, "ties", {"density": 0.5}, [1.0, 0.5])
    rec = merged.extra["merge"]
    assert rec["method"] == "ties" and rec["parameters"] == {"density": 0.5, "lam": 1.0}
    assert rec["weights"] == [1.0, 0.5]
    assert [i["sha256"] for i in rec["inputs"]] == [
        file_sha256(tmp_path / "a" / "adapter.safetensors"),
        file_sha256(tmp_path / "b" / "adapter.safetensors")]
    assert [i["tasks"] for i in rec["inputs"]] == [["sst2"], ["cola"]]
    import sparsemerge

    assert rec["sparsemerge_version"] == sparsemerge.__version__
    assert merged.hyperparameters["merge_method"] == "ties"


def test_params_validated_by_declarations(tiny_bert_dir):
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    b = make_adapter(tiny_bert_dir, "cola", 2)
    with pytest.raises(SparseMergeError, match="has no parameter"):
        merge_adapters([a, b], "sum", {"density": 0.5})
    with pytest.raises(SparseMergeError, match="density"):
        merge_adapters([a, b], "ties", {"density": 1.5})
    with pytest.raises(SparseMergeError, match="unknown merge method"):
        merge_adapters([a, b], "nope", {})
    with pytest.raises(SparseMergeError, match="weights"):
        merge_adapters([a, b], "sum", {}, [1.0])


def test_mixed_bases_refused(tiny_bert_dir, tmp_path):
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    b = make_adapter(tiny_bert_dir, "cola", 2)
    other = dict(b.base.tensor_hashes)
    name = sorted(other)[0]
    other[name] = "0" * 16
    b.base.tensor_hashes = other
    b.base.fingerprint = "f" * 32
    b.base.model_id = "someone/else"
    with pytest.raises(SparseMergeError, match="different base models") as err:
        merge_adapters([a, b], "sum")
    msg = str(err.value)
    assert a.base.fingerprint in msg and "f" * 32 in msg and name in msg
    assert "someone/else" in msg


def test_mixed_bases_refused_on_fingerprint_alone(tiny_bert_dir):
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    b = make_adapter(tiny_bert_dir, "cola", 2)
    a.base.tensor_hashes, b.base.tensor_hashes = {}, {}
    b.base.fingerprint = "e" * 32
    with pytest.raises(SparseMergeError, match="e" * 32):
        merge_adapters([a, b], "sum")


def test_same_base_different_targets_accepted(tiny_bert_dir):
    model, _ = _backbone(str(tiny_bert_dir))
    names = default_targets(model)
    a = make_adapter(tiny_bert_dir, "sst2", 1, names=names[:3])
    b = make_adapter(tiny_bert_dir, "cola", 2, names=names[3:])
    assert a.base.fingerprint != b.base.fingerprint  # fingerprints cover own targets only
    merged = merge_adapters([a, b], "sum")
    assert set(merged.targets) == set(names)
    assert merged.base.tensor_hashes == {**a.base.tensor_hashes, **b.base.tensor_hashes}
    assert merged.base.fingerprint == base_info(model, "x", names).fingerprint


def test_duplicate_tasks_and_incompatible_heads_refused(tiny_bert_dir, tiny_llama_dir):
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    b = make_adapter(tiny_bert_dir, "sst2", 2)
    with pytest.raises(SparseMergeError, match="two inputs have a head for task 'sst2'"):
        merge_adapters([a, b], "sum")
    c = make_adapter(tiny_bert_dir, "cola", 3, module="score")
    with pytest.raises(SparseMergeError, match="incompatible heads"):
        merge_adapters([a, c], "sum")
    d = make_adapter(tiny_bert_dir, "cola", 3)
    d.heads["cola"].params["weight"] = torch.zeros(2, 16)
    with pytest.raises(SparseMergeError, match="hidden sizes"):
        merge_adapters([a, d], "sum")
    llama = make_adapter(tiny_llama_dir, "cola", 4)
    with pytest.raises(SparseMergeError, match="different base models"):
        merge_adapters([a, llama], "sum")


def test_incompatible_shapes_refused(tiny_bert_dir):
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    b = make_adapter(tiny_bert_dir, "cola", 2)
    b.base.tensor_hashes = {}
    name = next(iter(b.targets))
    b.targets[name] = TargetDelta((3, 3), SparseTensor((3, 3), torch.tensor([0]),
                                                       torch.tensor([1.0])))
    with pytest.raises(SparseMergeError, match=f"tensor {name} has shape"):
        merge_adapters([a, b], "sum")


def test_merged_adapter_round_trips_and_is_mergeable_and_applicable(tiny_bert_dir, tmp_path):
    from sparsemerge.apply import apply

    a = make_adapter(tiny_bert_dir, "sst2", 1)
    b = make_adapter(tiny_bert_dir, "cola", 2, labels=("unacceptable", "acceptable"))
    c = make_adapter(tiny_bert_dir, "topic", 3, labels=("x", "y", "z"))
    merged = merge_adapters([a, b], "ties", {"density": 0.5})
    save_adapter(merged, tmp_path / "ab")
    back = load_adapter(tmp_path / "ab")
    assert set(back.targets) == set(merged.targets)
    for n, t in merged.targets.items():
        assert torch.equal(back.targets[n].sparse.indices, t.sparse.indices)
        assert torch.equal(back.targets[n].sparse.values, t.sparse.values)
    assert back.heads.keys() == merged.heads.keys()
    assert back.base.fingerprint == merged.base.fingerprint
    assert back.extra["merge"]["method"] == "ties"
    # applicable: the base fingerprint check passes and the weights equal the merged dir's
    model = AutoModel.from_pretrained(tiny_bert_dir)
    apply(model, back, task="sst2")  # apply() asks for a task even on a bare backbone
    save_merged_model(back, tmp_path / "dir")
    out = read_weights(tmp_path / "dir")
    for n, v in model.state_dict().items():
        if n in out:
            assert torch.equal(out[n], v), n
    # mergeable again, with a third adapter
    abc = merge_adapters([back, c], "sum")
    assert set(abc.heads) == {"sst2", "cola", "topic"}


# ------------------------------------------------------------------------------ merged dir


@pytest.fixture(scope="module")
def bert_merged(tiny_bert_dir, tmp_path_factory):
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    b = make_adapter(tiny_bert_dir, "cola", 2, labels=("unacceptable", "acceptable"))
    c = make_adapter(tiny_bert_dir, "topic", 3, labels=("a", "b", "c"))
    merged = merge_adapters([a, b, c], "ties", {"density": 0.7})
    out = tmp_path_factory.mktemp("merged") / "bert"
    save_merged_model(merged, out)
    return out, merged


def test_merged_dir_loads_with_transformers_alone(bert_merged):
    out, merged = bert_merged
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "BertModel"
    sd = model.state_dict()
    for n, t in merged.targets.items():
        base = _backbone(str(merged.base.model_id))[1][n]
        expected = base.clone().reshape(-1)
        expected[t.sparse.indices] += t.sparse.values
        torch.testing.assert_close(sd[n].reshape(-1), expected, atol=1e-7, rtol=0)
    files = read_merged(out)
    assert files.tasks == ["sst2", "cola", "topic"]
    assert files.heads["topic"].config["id2label"] == {"0": "a", "1": "b", "2": "c"}
    assert files.heads["cola"].config["problem_type"] == "single_label_classification"
    assert files.heads["sst2"].config["hidden_size"] == 32
    recipe = json.loads((out / "sparsemerge_recipe.json").read_text())
    assert recipe["method"] == "ties" and recipe["parameters"]["density"] == 0.7
    assert recipe["base"]["fingerprint"] == merged.base.fingerprint
    assert "sparsemerge_version" in recipe
    card = (out / "README.md").read_text()
    assert "ties" in card and "sst2" in card


def test_read_merged_validates_and_names_the_file(bert_merged, tmp_path):
    import shutil

    out, _ = bert_merged
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = bad / "heads" / "cola" / "head_config.json"
    data = json.loads(cfg.read_text())
    data["labels"] = ["only-one"]
    cfg.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=str(cfg)):
        read_merged(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    w = bad / "heads" / "sst2" / "head.safetensors"
    w.write_bytes(w.read_bytes()[:-3])
    with pytest.raises(FormatError, match=str(w)):
        MultiHeadModel.from_pretrained(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    (bad / "sparsemerge_recipe.json").write_text("{nope")
    with pytest.raises(FormatError, match="sparsemerge_recipe.json"):
        read_merged(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(FormatError, match="truncated or corrupt"):
        read_merged(bad)


def _reference_logits(out: Path, head: Head, inputs: dict) -> torch.Tensor:
    ref = AutoModelForSequenceClassification.from_pretrained(out, num_labels=len(head.labels))
    ref.eval()
    getattr(ref, head.module).load_state_dict(head.params)
    with torch.no_grad():
        return ref(**inputs).logits


def test_multihead_logits_equal_single_task_models_bert(bert_merged, tiny_bert_dir):
    from sparsemerge.apply import apply
    from sparsemerge.models import load_task_model

    out, merged = bert_merged
    mh = MultiHeadModel.from_pretrained(out)
    texts = ["a short one", "a much longer sentence with several more words in it", "ok"]
    enc = dict(mh.tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        logits = mh(**enc)
    assert list(logits) == ["sst2", "cola", "topic"]
    for task, head in merged.heads.items():
        assert torch.equal(logits[task], _reference_logits(out, head, enc)), task
        # the base with the merged adapter applied (the in-memory route) agrees too
        model = load_task_model(str(tiny_bert_dir), head.labels).eval()
        apply(model, merged, task=task)
        with torch.no_grad():
            torch.testing.assert_close(model(**enc).logits, logits[task], atol=1e-6, rtol=0)
    preds = mh.predict(texts)
    assert set(preds) == {"sst2", "cola", "topic"}
    for task, rows in preds.items():
        probs = logits[task].softmax(-1)
        assert [r[0] for r in rows] == [merged.heads[task].labels[i]
                                        for i in probs.argmax(-1).tolist()]
        torch.testing.assert_close(torch.tensor([r[1] for r in rows]), probs.max(-1).values)
    assert predict_merged(out, texts, tasks=["cola"]) == {"cola": preds["cola"]}


def test_multihead_logits_equal_single_task_models_llama(tiny_llama_dir, tmp_path):
    a = make_adapter(tiny_llama_dir, "sst2", 1)
    b = make_adapter(tiny_llama_dir, "topic", 2, labels=("a", "b", "c"))
    merged = merge_adapters([a, b], "sum")
    out = tmp_path / "llama"
    save_merged_model(merged, out)
    mh = MultiHeadModel.from_pretrained(out)
    texts = ["short", "a much longer sentence so that the batch needs padding", "two words"]
    enc = mh.tokenizer(texts, padding=True, return_tensors="pt")
    assert int((enc["attention_mask"] == 0).sum()) > 0  # padding exercised
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        logits = mh(**dict(enc))  # token_type_ids is dropped for the decoder
    for task, head in merged.heads.items():
        assert torch.equal(logits[task], _reference_logits(out, head, inputs)), task
        for i, t in enumerate(texts):  # unpadded, one at a time: the last real token
            one = mh.tokenizer([t], return_tensors="pt")
            with torch.no_grad():
                single = mh(input_ids=one["input_ids"], attention_mask=one["attention_mask"],
                            tasks=[task])[task]
            torch.testing.assert_close(single[0], logits[task][i], atol=1e-5, rtol=1e-5)


def test_evaluate_merged_on_files_and_labeled_data(bert_merged, tmp_path):
    from sparsemerge.data.examples import Example, LabeledData
    from sparsemerge.scoring import evaluate_model

    out, merged = bert_merged
    sst = tmp_path / "sst2_dev.tsv"
    sst.write_text("sentence\tlabel\nfine film\t1\nawful\t0\nsuperb work\t1\nboring\t0\n")
    topic = tmp_path / "topic.csv"
    topic.write_text("text,label\nalpha,a\nbeta,b\ngamma,c\nalpha beta,a\n")
    cola = LabeledData([Example("the cat sat", None, 1), Example("cat the sat", None, 0),
                        Example("dogs bark", None, 1)], ["unacceptable", "acceptable"], "mem")
    res = evaluate_merged(out, {"sst2": sst, "topic": str(topic), "cola": cola})
    assert set(res) == {"sst2", "topic", "cola"}
    for r in res.values():
        assert {"accuracy", "matthews", "loss", "examples"} <= set(r)
    assert res["sst2"]["examples"] == 4 and res["cola"]["examples"] == 3
    # equals evaluating the single-task reference model
    from sparsemerge.data.batching import encode

    mh = MultiHeadModel.from_pretrained(out)
    enc, _ = encode(cola, mh.tokenizer, 128, drop_long=False)
    ref = AutoModelForSequenceClassification.from_pretrained(out, num_labels=2).eval()
    ref.classifier.load_state_dict(merged.heads["cola"].params)
    assert evaluate_model(ref, enc)["accuracy"] == res["cola"]["accuracy"]
    with pytest.raises(SparseMergeError, match="no head for task"):
        mh.evaluate({"mrpc": cola})


# ------------------------------------------------------------------------------ streaming


def test_streaming_writer_shards_and_index(tiny_bert_dir, tmp_path):
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    b = make_adapter(tiny_bert_dir, "cola", 2)
    merged = merge_adapters([a, b], "sum")
    out = tmp_path / "sharded"
    report = save_merged_model(merged, out, max_shard_size="200KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert report["streamed"] and report["shards"] == len(shards) >= 3
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == report["bytes"]
    for s in shards:  # each shard within the limit unless it is one oversized tensor
        tensors = safetensors.torch.load_file(str(s))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 200_000 or len(tensors) == 1
    single = tmp_path / "single"
    save_merged_model(merged, single)
    assert (single / "model.safetensors").is_file() and not (single / INDEX_NAME).exists()
    m1, m2 = AutoModel.from_pretrained(out), AutoModel.from_pretrained(single)
    for (n1, v1), (n2, v2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(v1, v2)


def test_stream_maps_task_model_checkpoints_and_drops_extra_keys(tiny_bert_dir, tmp_path):
    """A base saved as a task model (keys 'bert.*' plus a head) streams to backbone names."""
    task_base = tmp_path / "taskbase"
    m = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    m.save_pretrained(task_base)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (tiny_bert_dir / f).exists():
            (task_base / f).write_bytes((tiny_bert_dir / f).read_bytes())
    ckpt = BaseCheckpoint(str(task_base))
    assert ckpt.streamable and ckpt.prefix == "bert"
    assert any(k.startswith("classifier.") for k in ckpt.dropped)
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    out = tmp_path / "out"
    report = save_merged_model(merge_adapters([a], "sum"), out, base=str(task_base))
    assert report["streamed"] and report["dropped_keys"] >= 2
    ref = tmp_path / "ref"
    save_merged_model(merge_adapters([a], "sum"), ref)
    w1, w2 = read_weights(out), read_weights(ref)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


def test_fallback_without_safetensors_matches_streaming(tiny_bert_dir, tmp_path):
    binbase = tmp_path / "binbase"
    AutoModel.from_pretrained(tiny_bert_dir).save_pretrained(binbase)
    sd = safetensors.torch.load_file(str(binbase / "model.safetensors"))
    torch.save(sd, binbase / "pytorch_model.bin")
    (binbase / "model.safetensors").unlink()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (binbase / f).write_bytes((tiny_bert_dir / f).read_bytes())
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    merged = merge_adapters([a], "sum")
    r1 = save_merged_model(merged, tmp_path / "fb", base=str(binbase))
    assert not r1["streamed"] and "model.safetensors" in r1["reason"]
    save_merged_model(merged, tmp_path / "st")
    w1, w2 = read_weights(tmp_path / "fb"), read_weights(tmp_path / "st")
    for k in w2:
        assert torch.equal(w1[k], w2[k]), k


def test_wrong_base_refused_while_streaming(tiny_bert_dir, tmp_path):
    other = tmp_path / "other"
    model = AutoModel.from_pretrained(tiny_bert_dir)
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    name = sorted(a.targets)[-1]
    with torch.no_grad():
        model.state_dict()[name].add_(1.0)
    model.save_pretrained(other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).write_bytes((tiny_bert_dir / f).read_bytes())
    merged = merge_adapters([a], "sum")
    with pytest.raises(BaseMismatchError, match=name):
        save_merged_model(merged, tmp_path / "out", base=str(other))
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.warns(UserWarning, match="wrong base model"):
        save_merged_model(merged, tmp_path / "out", base=str(other), force=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1GiB") == 2**30
    assert parse_size("500kb") == 500_000
    assert parse_size(1234) == 1234
    with pytest.raises(SparseMergeError):
        parse_size("lots")
    with pytest.raises(SparseMergeError):
        parse_size(0)


def test_no_heads_refused_for_merged_model(tiny_bert_dir, tmp_path):
    a = make_adapter(tiny_bert_dir, None, 1)
    with pytest.raises(SparseMergeError, match="classification head"):
        save_merged_model(merge_adapters([a], "sum"), tmp_path / "x")


# ------------------------------------------------------------------------------ inputs


def _peft_lora(tiny_bert_dir: Path, out: Path, **cfg_kwargs):
    """Save a PEFT LoRA adapter with random factors; return PEFT's merged backbone weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value",
                                                                               "dense"],
                     **cfg_kwargs)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(out)
    merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.bert.state_dict().items()}, merged


@pytest.mark.parametrize("cfg", [{}, {"use_rslora": True, "rank_pattern": {"value": 2},
                                      "alpha_pattern": {"query": 3}}])
def test_peft_lora_input_equals_peft_merged_weights(tiny_bert_dir, tmp_path, cfg):
    from sparsemerge.apply import apply_to_tensors
    from sparsemerge.merge.inputs import load_merge_input

    peft_dir = tmp_path / "peft-sst2"
    expected, peft_model = _peft_lora(tiny_bert_dir, peft_dir, **cfg)
    adapter = load_merge_input(peft_dir, str(tiny_bert_dir))
    assert adapter.extra["source"]["kind"] == "peft-lora"
    assert adapter.extra["source"]["sha256"] == file_sha256(peft_dir /
                                                            "adapter_model.safetensors")
    assert any(n.endswith("attention.self.query.weight") for n in adapter.targets)
    assert any(n.endswith("output.dense.weight") for n in adapter.targets)
    _, sd = _backbone(str(tiny_bert_dir))
    tensors = {k: v.clone() for k, v in sd.items()}
    apply_to_tensors(tensors, adapter)
    for n in adapter.targets:
        torch.testing.assert_close(tensors[n], expected[n], atol=1e-6, rtol=1e-5)
    head = adapter.heads["peft-sst2"]
    assert head.module == "classifier" and head.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert torch.equal(head.params["weight"], peft_model.classifier.weight.detach())
    # and it merges with our own adapters on the same base
    mine = make_adapter(tiny_bert_dir, "sst2", 1)
    merged = merge_adapters([mine, adapter], "ties", {"density": 0.5})
    assert set(merged.heads) == {"sst2", "peft-sst2"}


def test_peft_unsupported_types_refused(tiny_bert_dir, tmp_path):
    from sparsemerge.merge.inputs import load_merge_input

    d = tmp_path / "ia3"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(SparseMergeError, match="IA3 is not supported"):
        load_merge_input(d, str(tiny_bert_dir))
    with pytest.raises(SparseMergeError, match="not a sparsemerge adapter"):
        load_merge_input(tmp_path, str(tiny_bert_dir))


def test_full_finetune_input(tiny_bert_dir, tmp_path):
    from sparsemerge.merge.inputs import load_merge_input

    torch.manual_seed(3)
    ft = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ft_dir = tmp_path / "my-ft"
    ft.save_pretrained(ft_dir)
    _, base = _backbone(str(tiny_bert_dir))
    ftsd = ft.bert.state_dict()
    exact = load_merge_input(ft_dir, str(tiny_bert_dir), density=1.0)
    assert exact.extra["source"]["kind"] == "full"
    model, _ = _backbone(str(tiny_bert_dir))
    assert set(exact.targets) == set(default_targets(model))
    for n, t in exact.targets.items():
        torch.testing.assert_close(t.dense_delta(n), ftsd[n] - base[n], atol=1e-7, rtol=0)
    head = exact.heads["my-ft"]
    assert head.labels == ["neg", "pos"] and torch.equal(head.params["weight"],
                                                         ft.classifier.weight.detach())
    sparse = load_merge_input(ft_dir, str(tiny_bert_dir), density=0.1)
    for n, t in sparse.targets.items():
        d = (ftsd[n] - base[n]).reshape(-1)
        k = _trim_count(0.1, d.numel())
        assert t.sparse.nnz == k
        kept = d.abs()[t.sparse.indices]
        assert kept.min() >= torch.topk(d.abs(), k).values.min()
    dare = load_merge_input(ft_dir, str(tiny_bert_dir), density=0.25, sparsify="dare", seed=1)
    n = next(iter(dare.targets))
    d = (ftsd[n] - base[n]).reshape(-1)
    st = dare.targets[n].sparse
    torch.testing.assert_close(st.values, d[st.indices] / 0.25)
    assert 0.15 < st.nnz / d.numel() < 0.35
    again = load_merge_input(ft_dir, str(tiny_bert_dir), density=0.25, sparsify="dare", seed=1)
    assert torch.equal(again.targets[n].sparse.indices, st.indices)


# ------------------------------------------------------------------------------ recipes


def test_recipe_yaml_equals_cli_flags(tiny_bert_dir, tmp_path):
    a = make_adapter(tiny_bert_dir, "sst2", 1)
    b = make_adapter(tiny_bert_dir, "cola", 2, labels=("unacceptable", "acceptable"))
    save_adapter(a, tmp_path / "a")
    save_adapter(b, tmp_path / "b")
    (tmp_path / "recipe.yaml").write_text(
        "merge_method: ties\n"
        "parameters: {density: 0.5, lambda: 0.8}\n"
        "models:\n"
        "  - model: a\n"
        "    parameters: {weight: 1.0}\n"
        "  - path: b\n"
        "    weight: 0.5\n"
        "heads: true\n"
        "output: out-yaml\n"
        "max_shard_size: 1MB\n")
    from_yaml = load_recipe(tmp_path / "recipe.yaml")
    from_cli = build_recipe([str(tmp_path / "a"), str(tmp_path / "b")], method="ties",
                            density=0.5, lam=0.8, weights="1,0.5", heads=True,
                            output=str(tmp_path / "out-yaml"), max_shard_size="1MB")
    assert from_yaml == from_cli
    assert from_cli.parameters == {"density": 0.5, "lam": 0.8}
    r1 = run_recipe(from_yaml)
    from_cli.output = str(tmp_path / "out-cli")
    r2 = run_recipe(from_cli)
    assert r1["inputs"] == r2["inputs"] and r1["nnz"] == r2["nnz"]
    w1, w2 = read_weights(tmp_path / "out-yaml"), read_weights(tmp_path / "out-cli")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    # flags override the file; a method change drops the file's parameters
    over = build_recipe(config=tmp_path / "recipe.yaml", method="sum", output=str(tmp_path / "o"))
    assert over.method == "sum" and over.parameters == {"lam": 1.0}
    assert over.weights == [1.0, 0.5]


@pytest.mark.parametrize("text,match", [
    ("method: ties\nparameters: {density: 2}\ninputs: [a]\n", "density"),
    ("method: ties\nparameters: {p: 0.1}\ninputs: [a]\n", "has no parameter"),
    ("method: nope\ninputs: [a]\n", "unknown merge method"),
    ("method: sum\ninputs: [a]\nfoo: 1\n", "unknown key 'foo'"),
    ("method: sum\ninputs: [{path: a, weight: x}]\n", "weight must be a number"),
    ("method: sum\ninputs: []\n", "nothing to merge"),
    ("- not a mapping\n", "mapping"),
    ("method: sum\ninputs: [a]\nheads: maybe\n", "heads"),
])
def test_recipe_validation_errors(tmp_path, text, match):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(SparseMergeError, match=match):
        load_recipe(f)


def test_merged_model_dir_is_a_merge_input(bert_merged, tiny_bert_dir, tmp_path):
    from sparsemerge.merge.inputs import input_kind, load_merge_input

    out, merged = bert_merged
    assert input_kind(out) == "merged-model"
    back = load_merge_input(out)
    assert back.extra["source"]["kind"] == "merged-model"
    assert set(back.heads) == set(merged.heads)
    assert set(back.targets) == set(merged.targets)
    for n, t in merged.targets.items():
        torch.testing.assert_close(back.targets[n].dense_delta(n), t.dense_delta(n),
                                   atol=1e-7, rtol=0)
    assert back.base.fingerprint == merged.base.fingerprint
    extra = make_adapter(tiny_bert_dir, "mrpc", 9)
    again = merge_adapters([back, extra], "sum")
    assert set(again.heads) == {"sst2", "cola", "topic", "mrpc"}
