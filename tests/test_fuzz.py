"""Fuzzing the readers: a short run of the reader fuzzer plus hypothesis-driven mutations.

Every mutated file must either load as an adapter whose invariants an independent checker
confirms (and that survives save + load unchanged), or raise FormatError naming the file.
The corpus, mutators and harness are :mod:`sparsemerge._testing.fuzz`; the full run
(10,000+ cases per target) is ``python bench/fuzz_reader.py``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsemerge._testing import fuzz as fz
from sparsemerge.errors import FormatError
from sparsemerge.formats import codecs
from sparsemerge.formats.adapter_file import load_adapter

OK = ("loaded_identical", "loaded_changed", "rejected_clean")
HYP = settings(max_examples=60, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def adapter_runner(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-adapter")
    target = fz.TARGETS["adapter"]
    corpus = target.build(tmp / "corpus")
    work = tmp / "work"
    work.mkdir()
    return fz.Runner(target, corpus, work, seed=20240601, timeout=20.0)


def _explain(outcomes) -> str:
    return "\n".join(f"case {o.case} {o.kind} {o.source} {o.mutators}: {o.detail[:500]}"
                     for o in outcomes)


def test_corpus_covers_every_codec_and_dtype(adapter_runner):
    codecs_seen, dtypes_seen, features = set(), set(), set()
    for blob in adapter_runner.corpus.values():
        cfg = fz.Doc(blob).config
        for spec in cfg["targets"].values():
            features |= {k for k in ("init", "lowrank") if k in spec}
            features |= {"gate"} if spec["gate"] != 1.0 else set()
        for path, _ in fz.sparse_specs(cfg):
            s = fz.get_at(cfg, path)
            codecs_seen.add(s["codec"])
            dtypes_seen.add(s["value_dtype"])
        features |= {f"{len(cfg['heads'])}-heads"}
    assert codecs_seen == {"seed", "elias-fano", "raw", "dense"}
    assert dtypes_seen == {"bf16", "fp16", "fp32"}
    assert {"init", "lowrank", "gate", "1-heads", "2-heads"} <= features


def test_short_fuzz_adapter(adapter_runner):
    """400 seeded cases over every mutator: no exception but FormatError, no invalid load."""
    outcomes = [adapter_runner.run(case) for case in range(400)]
    bad = [o for o in outcomes if o.kind not in OK]
    assert not bad, _explain(bad)
    kinds = {o.kind for o in outcomes}
    assert {"rejected_clean", "loaded_changed"} <= kinds
    assert {m for o in outcomes for m in o.mutators} >= {"truncate", "bitflip", "cfg_nnz",
                                                         "st_offsets_lie", "nonfinite"}


def test_mutations_are_reproducible(adapter_runner):
    a = fz.mutate(adapter_runner.corpus, 7, 123)
    b = fz.mutate(adapter_runner.corpus, 7, 123)
    assert a == b


def _classify(runner, payload, source, what="") -> str:
    out = runner.check(payload, source, ("hypothesis",), what)
    assert out.kind in OK, f"{out.kind}: {out.detail}"
    return out.kind


# ----------------------------------------------------------------- hypothesis: config


json_leaves = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0xDFFF),
            max_size=8),
    st.sampled_from(["seed", "raw", "elias-fano", "dense", "bf16", "fp16", "fp32"]),
)
json_values = st.recursive(json_leaves, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                           max_leaves=8)


@HYP
@given(data=st.data())
def test_hypothesis_config_edits(adapter_runner, data):
    """Any node of the config deleted or replaced by any JSON value (lone surrogates,
    NaN, 70-bit integers, nested containers included)."""
    source = data.draw(st.sampled_from(sorted(adapter_runner.corpus)))
    doc = fz.Doc(adapter_runner.corpus[source])
    nodes = fz.config_nodes(doc.config)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(nodes))
        try:
            parent = fz.get_at(doc.config, path[:-1])
            if data.draw(st.booleans()):
                parent[path[-1]] = data.draw(json_values)
            else:
                del parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed or retyped this node
    _classify(adapter_runner, doc.to_bytes(), source)


@HYP
@given(data=st.data())
def test_hypothesis_byte_edits(adapter_runner, data):
    """Arbitrary bytes overwritten anywhere (header length, header JSON, tensor data),
    optionally truncated."""
    source = data.draw(st.sampled_from(sorted(adapter_runner.corpus)))
    blob = bytearray(adapter_runner.corpus[source])
    n = int.from_bytes(blob[:8], "little")
    for _ in range(data.draw(st.integers(1, 4))):
        lo, hi = data.draw(st.sampled_from([(0, 8), (8, 8 + n), (8 + n, len(blob)),
                                            (0, len(blob))]))
        pos = data.draw(st.integers(lo, hi - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del blob[data.draw(st.integers(0, len(blob))):]
    _classify(adapter_runner, bytes(blob), source)


# ----------------------------------------------------------------- hypothesis: exact oracles


def _doc_with(runner, codec: str):
    """(source, doc, tensor key prefix, sparse spec) of a corpus tensor stored with ``codec``."""
    for source in sorted(runner.corpus):
        doc = fz.Doc(runner.corpus[source])
        for path, key in fz.sparse_specs(doc.config):
            spec = fz.get_at(doc.config, path)
            if spec["codec"] == codec and spec["nnz"] >= 4 and math.prod(spec["shape"]) < 2**31:
                return source, doc, key, spec
    raise AssertionError(f"no {codec} tensor in the corpus")


@HYP
@given(data=st.data())
def test_hypothesis_raw_indices_exact(adapter_runner, data):
    """Raw indices load if and only if they are strictly increasing and in [0, numel)."""
    source, doc, key, spec = _doc_with(adapter_runner, "raw")
    numel = math.prod(spec["shape"])
    idx = data.draw(st.lists(st.one_of(st.integers(-3, numel + 3),
                                       st.integers(-(2**31), 2**31 - 1)),
                             min_size=spec["nnz"], max_size=spec["nnz"]))
    if data.draw(st.booleans()):  # most random lists are unsorted: often make it sorted
        idx = sorted(set(idx)) + [numel + 10 + i for i in range(len(idx) - len(set(idx)))]
    arr = np.array(idx, dtype="<i4")
    doc.tensors[f"{key}.indices"] = ["I32", [arr.size], arr.tobytes()]
    kind = _classify(adapter_runner, doc.to_bytes(), source)
    valid = all(0 <= i < numel for i in idx) and all(
        idx[i] < idx[i + 1] for i in range(len(idx) - 1))
    assert (kind != "rejected_clean") == valid, (idx, kind)


@HYP
@given(data=st.data())
def test_hypothesis_elias_fano_blob_exact(adapter_runner, data):
    """An elias-fano blob of the right size loads only when it is the canonical encoding
    of a valid mask: re-encoding what was decoded gives the same bytes back."""
    source, doc, key, spec = _doc_with(adapter_runner, "elias-fano")
    numel, nnz = math.prod(spec["shape"]), spec["nnz"]
    size = codecs.elias_fano_nbytes(numel, nnz)
    original = doc.tensors[f"{key}.indices"][2]
    if data.draw(st.booleans()):
        blob = bytearray(original)
        for _ in range(data.draw(st.integers(1, 3))):
            bit = data.draw(st.integers(0, size * 8 - 1))
            blob[bit // 8] ^= 1 << (bit % 8)
        blob = bytes(blob)
    else:
        blob = data.draw(st.binary(min_size=size, max_size=size))
    doc.tensors[f"{key}.indices"] = ["U8", [size], blob]
    kind = _classify(adapter_runner, doc.to_bytes(), source)
    try:
        decoded = codecs.elias_fano_decode(np.frombuffer(blob, np.uint8), numel, nnz)
    except FormatError:
        assert kind == "rejected_clean"
        return
    assert kind != "rejected_clean"
    assert codecs.elias_fano_encode(decoded, numel).tobytes() == blob


# ----------------------------------------------------------------- merged-model reader


@pytest.fixture(scope="module")
def merged_runner(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-merged")
    target = fz.TARGETS["merged"]
    corpus = target.build(tmp / "corpus")
    work = tmp / "work"
    work.mkdir()
    return fz.Runner(target, corpus, work, seed=20240601, timeout=20.0)


def _merged_case(runner, edit) -> str:
    source = "one-shard-two-heads"
    files = dict(runner.corpus[source])
    edit(files)
    return runner.check(files, source).kind


def _json_text(name: str, text: bytes):
    def edit(files):
        files[name] = text
    return edit


def _surrogate_field(name: str, key: str):
    def edit(files):
        obj = json.loads(files[name])
        obj[key] = "\ud800"
        files[name] = json.dumps(obj).encode()  # ensure_ascii: written as the \ud800 escape
    return edit


@pytest.mark.parametrize("name,key", [("sparsemerge_recipe.json", "method"),
                                      ("config.json", "model_type"),
                                      ("heads/sst2/head_config.json", "architecture")])
@pytest.mark.parametrize("kind", ["deep", "digits", "surrogate"])
def test_merged_reader_json_errors(merged_runner, name, key, kind):
    edit = {"deep": _json_text(name, b"[" * 100_000),
            "digits": _json_text(name, b'{"format": ' + b"9" * 5000 + b"}"),
            "surrogate": _surrogate_field(name, key)}[kind]
    assert _merged_case(merged_runner, edit) in OK


def test_merged_reader_long_shard_name(merged_runner):
    shard = "a" * 1000
    def edit(files):
        files["model.safetensors.index.json"] = json.dumps(
            {"weight_map": {"pooler.dense.weight": shard}}).encode()
    assert _merged_case(merged_runner, edit) in OK


def test_merged_reader_surrogate_labels(merged_runner):
    def edit(files):
        f = "heads/sst2/head_config.json"
        cfg = json.loads(files[f])
        cfg["labels"][0] = "\ud800"
        cfg["id2label"]["0"] = "\ud800"
        cfg["label2id"] = {"\ud800": 0, "positive": 1}
        files[f] = json.dumps(cfg).encode()
    assert _merged_case(merged_runner, edit) in OK


def test_merged_reader_duplicate_header_key(merged_runner):
    def edit(files):
        doc = fz.Doc(files["model.safetensors"])
        doc.header_text_edits.append(lambda t: t.replace("{", '{"__metadata__":{},', 1))
        files["model.safetensors"] = doc.to_bytes()
    assert _merged_case(merged_runner, edit) in OK


@pytest.mark.parametrize("lie", ["dtype", "shape"])
def test_merged_reader_shard_header_lies(merged_runner, lie):
    def edit(files):
        doc = fz.Doc(files["model.safetensors"])
        name = "pooler.dense.weight"
        if lie == "dtype":
            doc.tensors[name][0] = "F16"  # half the bytes the offsets hold
        else:
            doc.header_edits.append(lambda h: h[name].__setitem__("shape", [8, 9]))
        files["model.safetensors"] = doc.to_bytes()
    assert _merged_case(merged_runner, edit) in OK


def test_short_fuzz_merged(merged_runner):
    """150 cases: each loads a valid model or is rejected with FormatError."""
    outcomes = [merged_runner.run(case) for case in range(150)]
    bad = [o for o in outcomes if o.kind not in OK]
    assert not bad, _explain(bad)
    assert sum(o.kind == "rejected_clean" for o in outcomes) > 50


# ----------------------------------------------------------------- regressions found by fuzzing


def _seeded_doc(runner):
    return "sparta-seed-bf16", fz.Doc(runner.corpus["sparta-seed-bf16"])


def _set_text(text):
    def edit(doc):
        doc.config_text = text
    return edit


def _rename_first_target(new):
    def edit(doc):
        t = doc.config["targets"]
        t[new] = t.pop(next(iter(t)))
    return edit


def _huge_seeded_shape(doc):
    spec = next(iter(doc.config["targets"].values()))
    spec["shape"] = spec["sparse"]["shape"] = [2**32, 2**32]  # numel 2**64 > int64 indices


def _head_dtype_lie(doc):
    dt, shape, data = doc.tensors["heads.sst2.bias"]
    doc.tensors["heads.sst2.bias"] = ["I32", shape, data]  # config still says fp32


def _version_true(doc):
    doc.config["format_version"] = True


REGRESSIONS = {
    # metadata JSON the stdlib parser rejects with RecursionError / ValueError
    "deep nesting": (_set_text("[" * 100_000 + "]" * 100_000), "not valid JSON"),
    "5000-digit number": (_set_text('{"format": ' + "7" * 5000 + "}"), "not valid JSON"),
    # a \ud800 escape: a name that cannot be encoded (the seed codec hashed it: crash)
    "lone surrogate": (_rename_first_target("\ud800x"), "surrogate"),
    # numel beyond int64: masks raised a plain SparseMergeError, not FormatError
    "numel > 2**63": (_huge_seeded_shape, "shape"),
    # head tensors were never checked against the config's dtype (int heads loaded)
    "head dtype lie": (_head_dtype_lie, "head sst2"),
    "format_version true": (_version_true, "format_version"),
}


@pytest.mark.parametrize("case", sorted(REGRESSIONS))
def test_reader_regressions(adapter_runner, case):
    edit, needle = REGRESSIONS[case]
    source, doc = _seeded_doc(adapter_runner)
    edit(doc)
    f = adapter_runner.workdir / "regression.safetensors"
    f.write_bytes(doc.to_bytes())
    with pytest.raises(FormatError) as err:
        load_adapter(f)
    msg = str(err.value)
    assert str(f) in msg and needle in msg
    msg.encode("utf-8")  # printable: no lone surrogates in the message


def test_reader_unreadable_path_is_format_error(tmp_path):
    (tmp_path / "ad" / "adapter.safetensors").mkdir(parents=True)  # a directory, not a file
    with pytest.raises(FormatError, match="cannot read"):
        load_adapter(tmp_path / "ad")
