"""Partial-LoRA: the density rule, exact seeded masks, storage, apply, PEFT export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import sparsemerge.train.loop as loop
from sparsemerge import masks
from sparsemerge.adapter import BaseInfo, SeededInit, SparseAdapter, SparseTensor, TargetDelta
from sparsemerge.data.batching import batches
from sparsemerge.errors import SparseMergeError
from sparsemerge.evaluate import load_adapted
from sparsemerge.export import export_peft
from sparsemerge.formats.adapter_file import read_adapter
from sparsemerge.models import backbone_of
from sparsemerge.train.config import TrainConfig
from sparsemerge.train.methods.partial_lora import allocate_densities, rank_for_energy

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "long", "short", "new", "old"]


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("pl-toy") / "toy.csv"
    lines = ["text,label"]
    for i in range(48):
        a, b, c = WORDS[i % 10], WORDS[(3 * i + 1) % 10], WORDS[(7 * i + 2) % 10]
        lines.append(f"the {a} film was {b} and {c},{int(a in WORDS[:3])}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(base, csv, **kw) -> TrainConfig:
    args = dict(base=str(base), train_file=str(csv), eval_file=str(csv), text_column="text",
                label_column="label", batch_size=8, quiet=True, method="partial-lora",
                lr=2e-2, warmup_ratio=0.0, device="cpu")  # run.model gets CPU tensors
    args.update(kw)
    return TrainConfig(**args)


# ------------------------------------------------------------------------ the rule, unit


def test_allocate_densities_hits_the_budget_and_keeps_proportions():
    need = {"a": 0.01, "b": 0.1, "c": 0.2, "d": 0.9}
    sizes = {"a": 1000, "b": 2000, "c": 1000, "d": 500}
    total = sum(sizes.values())
    dens, c = allocate_densities(need, sizes, budget=0.4, min_density=0.08)
    assert sum(dens[n] * sizes[n] for n in need) == pytest.approx(0.4 * total, rel=1e-9)
    assert dens["a"] == 0.08  # c * 0.01 below the floor
    assert dens["d"] == 1.0  # capped
    assert dens["b"] == pytest.approx(c * 0.1) and dens["c"] == pytest.approx(c * 0.2)
    assert dens["c"] == pytest.approx(2 * dens["b"])  # proportional to the need in between
    assert allocate_densities(need, sizes, 1.0, 0.08)[0] == dict.fromkeys(need, 1.0)
    # a budget below the floor everywhere: every layer at the floor
    assert allocate_densities(need, sizes, 0.05, 0.08)[0] == dict.fromkeys(need, 0.08)


def _k_by_svd(y: torch.Tensor, energy: float) -> int:
    """k from the singular values of the centred, per-feature standardised output rows."""
    y = y.double()
    y = y - y.mean(0)
    std = y.std(0, unbiased=False)
    y = y[:, std > 0] / std[std > 0]
    s2 = torch.linalg.svdvals(y) ** 2
    cum = torch.cumsum(s2, 0) / s2.sum()
    return int((cum < energy - 1e-12).sum()) + 1


def test_rank_for_energy_matches_the_svd_of_the_standardised_output():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 3, generator=g, dtype=torch.float64)
    mix = torch.randn(3, 12, generator=g, dtype=torch.float64)
    scales = torch.logspace(-2, 3, 12, dtype=torch.float64)  # outlier-sized features
    y = (z @ mix + 0.05 * torch.randn(500, 12, generator=g, dtype=torch.float64)) * scales
    yc = y - y.mean(0)
    cov = yc.t() @ yc / y.shape[0]
    for energy in (0.5, 0.9, 0.99, 0.9999):
        assert rank_for_energy(cov, energy) == _k_by_svd(y, energy)
    assert rank_for_energy(cov, 0.9) <= 3  # three latent factors, whatever the scales
    # standardisation: an uncorrelated, wildly scaled output needs every direction
    iso = torch.diag(torch.logspace(-3, 3, 10, dtype=torch.float64))
    assert rank_for_energy(iso, 0.9) == 9


# ------------------------------------------------------------------- the rule, in the loop


def test_masks_have_the_densities_the_rule_chose(tiny_bert_dir, toy_csv):
    config = _config(tiny_bert_dir, toy_csv, method_params={"budget": 0.3, "calib_batches": 3,
                                                             "rank": 4})
    run = loop.setup(config)
    method = run.method
    r, hp = 4, method.hparams

    # Independent calibration: the outputs of every target on the same 3 batches (padding
    # excluded) from a fresh copy of the base, then k from an SVD of the standardised rows.
    fresh = loop.load_task_model(str(tiny_bert_dir), run.labels)
    fresh.eval()
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in run.target_names}
    hooks, current = [], {}
    for name in run.target_names:
        mod = backbone_of(fresh).get_submodule(name[:-7])

        def hook(m, inp, out, name=name):
            y = out - m.bias
            mask = current["mask"]
            outs[name].append(y[mask] if y.shape[:-1] == mask.shape else y.reshape(-1,
                                                                                  y.shape[-1]))
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for i, b in enumerate(batches(run.train_data, config.batch_size, True, config.seed, 0)):
            if i == 3:
                break
            current["mask"] = b["attention_mask"].bool()
            fresh(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                  token_type_ids=b.get("token_type_ids"))
    need, sizes = {}, {}
    for name in run.target_names:
        out_f, in_f = backbone_of(fresh).get_parameter(name).shape
        k = _k_by_svd(torch.cat(outs[name]), hp["energy"])
        assert method.allocation[name]["k"] == k, name
        need[name] = k / min(out_f, in_f)
        sizes[name] = r * (out_f + in_f)
    dens, _ = allocate_densities(need, sizes, 0.3, hp["min_density"])
    assert len(set(round(d, 6) for d in dens.values())) > 1  # the layers really differ

    total = 0
    for name, layer in method.layers.items():
        al = method.allocation[name]
        assert al["density"] == pytest.approx(dens[name], rel=1e-9)
        out_f, in_f = layer.out_features, layer.in_features
        nnz_a = masks.nnz_for_density(r * in_f, dens[name])
        nnz_b = masks.nnz_for_density(out_f * r, dens[name])
        assert (al["nnz_a"], al["nnz_b"]) == (nnz_a, nnz_b)
        assert layer.a_values.numel() == nnz_a and layer.b_values.numel() == nnz_b
        assert torch.equal(layer.a_idx, torch.from_numpy(
            masks.seeded_indices(config.seed, f"{name}.a", r * in_f, nnz_a)))
        assert torch.equal(layer.b_idx, torch.from_numpy(
            masks.seeded_indices(config.seed, f"{name}.b", out_f * r, nnz_b)))
        total += nnz_a + nnz_b
    dense = sum(sizes.values())
    assert method.num_trainable() == total
    assert abs(total - 0.3 * dense) <= 2 * len(sizes)  # the budget, up to rounding per factor
    info = method.info()
    assert info["layers"][run.target_names[0]]["density"] == pytest.approx(
        dens[run.target_names[0]], abs=1e-6)
    assert info["share_of_dense_lora"] == pytest.approx(0.3, abs=0.01)


def test_checkpoint_state_restores_the_allocation(tiny_bert_dir, toy_csv):
    run = loop.setup(_config(tiny_bert_dir, toy_csv))
    method = run.method
    state = method.state_dict()
    name = run.target_names[0]
    state["allocation"][name] = dict(state["allocation"][name], nnz_a=3, nnz_b=2)
    method.load_state_dict(json.loads(json.dumps(state)))
    assert method.rebuild_optimizer
    assert method.layers[name].a_values.numel() == 3
    assert method.layers[name].b_values.numel() == 2


# ------------------------------------------------------------------ storage, apply, export


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, toy_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("pl-out") / "adapter"
    config = _config(tiny_bert_dir, toy_csv, max_steps=4, output=str(out))
    run = loop.setup(config)
    result = loop.train(config, run=run)
    return run, result


def _logits(model, tok) -> torch.Tensor:
    enc = tok(["the good film was long", "an awful and poor one"], padding=True,
              return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**enc).logits


def test_saved_with_seed_codec_and_applied_exactly(trained):
    run, result = trained
    adapter, storage, config = read_adapter(result.output)
    assert adapter.method == "partial-lora"
    layers = config["extra"]["training"]["layers"]
    assert set(layers) == set(adapter.targets)
    for name, t in adapter.targets.items():
        lr = t.lowrank
        assert lr is not None and t.sparse is None and lr.scale == pytest.approx(
            2.0 / layers[name]["density"], rel=1e-4)  # alpha / r / density (b_rescale)
        for part, nnz in (("a", layers[name]["nnz_a"]), ("b", layers[name]["nnz_b"])):
            st = storage[f"{name}.{part}"]
            assert st.nnz == nnz
            assert st.codec in ("seed", "dense") and st.index_bytes == 0
    assert adapter.trainable == result.trainable == run.method.num_trainable()
    assert any(t.lowrank.b.values.abs().sum() > 0 for t in adapter.targets.values())
    model, tok, _, _ = load_adapted(result.output)
    torch.testing.assert_close(_logits(model, tok), _logits(run.model, run.tokenizer),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["partial-lora", "lora"])
def test_export_to_peft_round_trips(method, trained, tiny_bert_dir, toy_csv, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    if method == "partial-lora":
        adapter_dir = trained[0].config.output
    else:
        config = _config(tiny_bert_dir, toy_csv, method="lora", max_steps=3,
                         output=str(tmp_path / "lora"), method_params={"rank": 4,
                                                                       "alpha": 8})
        adapter_dir = loop.train(config).output
    out = export_peft(adapter_dir, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(tiny_bert_dir)
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("lora_A.weight") for k in keys)
    assert any(k.startswith("base_model.model.classifier") for k in keys)

    ours, tok, adapter, _ = load_adapted(adapter_dir)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_logits(peft_model, tok), _logits(ours, tok), atol=1e-5,
                               rtol=1e-4)


def test_export_refuses_adapters_peft_cannot_hold(tmp_path):
    st = SparseTensor((4, 4), torch.tensor([1, 5]), torch.tensor([0.1, 0.2]))
    adapter = SparseAdapter({"w.weight": TargetDelta((4, 4), sparse=st, init=SeededInit(1, 0.1))},
                            BaseInfo("x"), method="rigsa")
    with pytest.raises(SparseMergeError, match="neither a pure low-rank"):
        export_peft(adapter, tmp_path / "out")


def test_cli_export(trained, tmp_path):
    from typer.testing import CliRunner

    from sparsemerge.cli import app

    out = tmp_path / "peft-cli"
    res = CliRunner().invoke(app, ["export", "--peft", trained[0].config.output, "-o", str(out),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["files"] == ["README.md", "adapter_config.json",
                                               "adapter_model.safetensors"]
    res = CliRunner().invoke(app, ["export", trained[0].config.output, "-o", str(out)])
    assert res.exit_code == 2 and "--peft" in res.output


def test_density_rule_is_documented():
    from sparsemerge.train.methods import partial_lora

    doc = partial_lora.__doc__
    for phrase in ("standardised", "energy", "min(out, in)", "budget", "seeded_indices"):
        assert phrase in doc
    assert math.isclose(partial_lora.PartialLoRA.params[2].default, 0.4)
