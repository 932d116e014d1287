"""sparsemerge.data: reading tables, task presets, shipped subsets, encoding and batching."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemerge.data.batching import batches, encode, num_batches
from sparsemerge.data.examples import Example, LabeledData, concat
from sparsemerge.data.readers import read_table
from sparsemerge.data.tasks import TASKS, load_task, make_subset, plain_text_sample, shipped_dir
from sparsemerge.errors import DataError, SparseMergeError
from sparsemerge.models import resolve_pad_token_id

SHARED = Path(os.environ.get("SPARSEMERGE_TEST_DATA")
              or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_shared = pytest.mark.skipif(
    not (SHARED / "glue").is_dir(),
    reason=f"real GLUE/UCI data not found at {SHARED} (set SPARSEMERGE_TEST_DATA; only the "
           f"project's own machines have it; the shipped subsets are tested without it)",
)


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return p


# ---------------------------------------------------------------------------------------------
# read_table: good files


def test_tsv_with_header_and_numeric_labels(tmp_path):
    p = write(tmp_path, "a.tsv", "sentence\tlabel\nfine film \t1\nbad \"quote\t0\nok\t10\n")
    d = read_table(p, text_column="sentence", label_column="label")
    assert d.labels == ["0", "1", "10"]  # numeric sort, not "0" < "1" < "10" by accident
    assert [e.label for e in d] == [1, 0, 2]
    assert d.examples[1].text == 'bad "quote'  # QUOTE_NONE: quotes are literal
    assert d.skipped == 0 and d.source == str(p)


def test_numeric_labels_sort_numerically(tmp_path):
    p = write(tmp_path, "a.tsv", "t\tl\na\t10\nb\t2\nc\t-1\nd\t2\n")
    assert read_table(p, text_column="t", label_column="l").labels == ["-1", "2", "10"]
    q = write(tmp_path, "b.tsv", "t\tl\na\t0.5\nb\t10\nc\t2.25\n")
    assert read_table(q, text_column="t", label_column="l").labels == ["0.5", "2.25", "10"]
    r = write(tmp_path, "c.tsv", "t\tl\na\tpos\nb\tneg\nc\t1\n")
    assert read_table(r, text_column="t", label_column="l").labels == ["1", "neg", "pos"]


def test_given_labels_by_name_or_id(tmp_path):
    p = write(tmp_path, "a.tsv", "t\tl\na\tpositive\nb\t0\nc\t1\n")
    d = read_table(p, text_column="t", label_column="l", labels=["negative", "positive"])
    assert d.labels == ["negative", "positive"]
    assert d.label_ids == [1, 0, 1]
    assert d.id2label == {0: "negative", 1: "positive"}
    # numeric class names match by name only: "0" is not an id here
    q = write(tmp_path, "b.tsv", "t\tl\na\t1\nb\t0\n")
    with pytest.raises(DataError, match=r"b.tsv:3: column 'l': unknown label '0'"):
        read_table(q, text_column="t", label_column="l", labels=["1", "2"])


def test_headerless_by_index_and_by_names(tmp_path):
    p = write(tmp_path, "a.tsv", "src\t1\t\tGood one.\nsrc\t0\t*\tBad one one.\n")
    d = read_table(p, text_column=3, label_column=1, has_header=False)
    assert d.texts == ["Good one.", "Bad one one."] and d.labels == ["0", "1"]
    e = read_table(p, text_column="s", label_column="l", has_header=False,
                   columns=["src", "l", "orig", "s"])
    assert e.texts == d.texts and e.label_ids == d.label_ids
    q = write(tmp_path, "b.tsv", "broken first row\nsrc\t1\t\tGood one.\n")
    f = read_table(q, text_column="s", label_column="l", has_header=False,
                   columns=["src", "l", "orig", "s"], skip_bad_rows=True)
    assert f.texts == ["Good one."] and f.skipped == 1
    with pytest.raises(DataError, match="names 3 columns but the file has 2"):
        read_table(write(tmp_path, "c.tsv", "a\tb\nx\ty\n"), text_column="a",
                   label_column="b", columns=["a", "b", "c"])


def test_csv_quoted_fields_and_multiline(tmp_path):
    p = write(tmp_path, "a.csv",
              'text,label\n"hello, world",pos\n"two\nlines ""quoted""",neg\nplain,pos\n')
    d = read_table(p, text_column="text", label_column="label")
    assert d.texts == ["hello, world", 'two\nlines "quoted"', "plain"]
    assert d.labels == ["neg", "pos"]


def test_jsonl_objects_arrays_and_scalars(tmp_path):
    rows = [{"text": "a", "pair": "b", "label": 1}, {"text": "c", "pair": "d", "label": 0},
            {"text": "e", "pair": "f", "label": True}]
    p = write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    d = read_table(p, text_column="text", text_pair_column="pair", label_column="label")
    assert d.labels == ["0", "1"] and d.label_ids == [1, 0, 1]
    assert d.text_pairs == ["b", "d", "f"] and d.is_pair
    q = write(tmp_path, "b.json", '["x", "yes"]\n["y", "no"]\n')
    e = read_table(q, text_column=0, label_column=1)
    assert e.labels == ["no", "yes"] and e.texts == ["x", "y"]


def test_gzip_bom_crlf(tmp_path):
    raw = "\ufeffsentence\tlabel\r\nnice\t1\r\nawful\t0\r\n".encode()
    p = write(tmp_path, "a.tsv.gz", gzip.compress(raw))
    d = read_table(p, text_column="sentence", label_column="label")
    assert d.texts == ["nice", "awful"] and d.label_ids == [1, 0]
    q = write(tmp_path, "b.jsonl.gz", gzip.compress(b'{"text": "x", "label": "a"}\n'))
    assert read_table(q, text_column="text", label_column="label").texts == ["x"]


def test_file_format_override_for_extensionless(tmp_path):
    p = write(tmp_path, "SMSCollection", "label\tsms\nham\thi there\nspam\tWIN\n")
    with pytest.raises(DataError, match="file_format"):
        read_table(p, text_column="sms", label_column="label")
    d = read_table(p, text_column="sms", label_column="label", file_format="tsv")
    assert d.labels == ["ham", "spam"]


# ---------------------------------------------------------------------------------------------
# read_table: every kind of bad row names file:line and the column


BAD_CASES = [
    # (name, content, kwargs, line, column text or None, phrase)
    ("count.tsv", "t\tl\nok\t1\ntoo\tmany\tfields\nok2\t0\n", {}, 3, None, "expected 2 fields"),
    ("empty.tsv", "t\tl\nok\t1\n   \t0\nok2\t0\n", {}, 3, "'t'", "empty"),
    ("unknown.tsv", "t\tl\nok\t1\nhm\tmaybe\nok2\t0\n", {"labels": ["0", "1"]}, 3, "'l'",
     "unknown label 'maybe'"),
    ("nolabel.tsv", "t\tl\nok\t1\nhm\t \nok2\t0\n", {}, 3, "'l'", "empty label"),
    ("bad.jsonl", '{"t": "a", "l": "x"}\n{"t": "b", "l": \n{"t": "c", "l": "y"}\n', {}, 2, None,
     "invalid JSON"),
    ("key.jsonl", '{"t": "a", "l": "x"}\n{"t": "b"}\n{"t": "c", "l": "y"}\n', {}, 2, "'l'",
     "key missing"),
    ("type.jsonl", '{"t": "a", "l": "x"}\n{"t": 5, "l": "x"}\n{"t": "c", "l": "y"}\n', {}, 2,
     "'t'", "expected a string"),
    ("quote.csv", 't,l\nok,1\n"a"b,1\nok2,0\n', {}, 3, None, "malformed CSV"),
    ("count.csv", "t,l\nok,1\nx,1,2\nok2,0\n", {}, 3, None, "expected 2 fields"),
]


@pytest.mark.parametrize("name,content,kwargs,line,column,phrase", BAD_CASES,
                         ids=[c[0] for c in BAD_CASES])
def test_bad_rows_raise_or_are_counted(tmp_path, name, content, kwargs, line, column, phrase):
    p = write(tmp_path, name, content)
    with pytest.raises(DataError) as ei:
        read_table(p, text_column="t", label_column="l", **kwargs)
    msg = str(ei.value)
    assert f"{p}:{line}" in msg
    if column:
        assert f"column {column}" in msg
    assert phrase in msg
    assert "--skip-bad-rows" in msg
    d = read_table(p, text_column="t", label_column="l", skip_bad_rows=True, **kwargs)
    assert d.skipped == 1 and len(d) == 2


def test_invalid_utf8_names_line_and_column(tmp_path):
    p = write(tmp_path, "u.tsv", b"t\tl\nok\t1\nbad \xff\xfe bytes\t0\nfine\t0\n")
    with pytest.raises(DataError, match=rf"{p}:3: column 't': invalid UTF-8"):
        read_table(p, text_column="t", label_column="l")
    d = read_table(p, text_column="t", label_column="l", skip_bad_rows=True)
    assert d.skipped == 1 and d.texts == ["ok", "fine"]
    q = write(tmp_path, "u.jsonl", b'{"t": "a", "l": "x"}\n{"t": "b\xff", "l": "x"}\n')
    with pytest.raises(DataError, match=rf"{q}:2: column 't': invalid UTF-8"):
        read_table(q, text_column="t", label_column="l")


def test_skip_counts_several_kinds(tmp_path):
    p = write(tmp_path, "m.tsv",
              "t\tl\na\tpos\n\tneg\nb\tneg\tx\nc\tweird\nd\tneg\n \t \ne\tpos\n")
    d = read_table(p, text_column="t", label_column="l", labels=["neg", "pos"],
                   skip_bad_rows=True)
    assert d.skipped == 4 and d.texts == ["a", "d", "e"] and d.label_ids == [1, 0, 1]


def test_missing_column_lists_existing(tmp_path):
    p = write(tmp_path, "a.tsv", "sentence\tlabel\nx\t1\n")
    with pytest.raises(DataError, match=r"no column 'text'.*0:'sentence', 1:'label'"):
        read_table(p, text_column="text", label_column="label")
    with pytest.raises(DataError, match="no column index 5"):
        read_table(p, text_column=5, label_column="label")
    q = write(tmp_path, "b.tsv", "a\t1\tx\n")
    with pytest.raises(DataError, match=r"no header and 3 columns \(0..2\)"):
        read_table(q, text_column="sentence", label_column=1, has_header=False)
    r = write(tmp_path, "c.jsonl", '{"sentence": "x", "label": 1}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: no column 'text'.*'sentence', 'label'"):
        read_table(r, text_column="text", label_column="label")
    # a typo is never "skipped": it raises even with skip_bad_rows
    with pytest.raises(DataError, match="no column"):
        read_table(p, text_column="text", label_column="label", skip_bad_rows=True)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_table(tmp_path / "nope.tsv", text_column="t", label_column="l")
    with pytest.raises(DataError, match="not gzip"):
        read_table(write(tmp_path, "x.tsv.gz", "t\tl\n"), text_column="t", label_column="l")
    with pytest.raises(DataError, match="empty"):
        read_table(write(tmp_path, "e.tsv", ""), text_column="t", label_column="l")
    with pytest.raises(DataError, match="no data rows"):
        read_table(write(tmp_path, "h.tsv", "t\tl\n"), text_column="t", label_column="l")
    with pytest.raises(DataError, match="all 2 rows were bad"):
        read_table(write(tmp_path, "b.tsv", "t\tl\n\t1\n \t0\n"), text_column="t",
                   label_column="l", skip_bad_rows=True)
    with pytest.raises(DataError, match="JSON array"):
        read_table(write(tmp_path, "arr.json", '[{"t": "a", "l": 1}]\n'), text_column="t",
                   label_column="l")
    with pytest.raises(DataError, match="corrupt"):
        read_table(write(tmp_path, "c.tsv.gz", b"\x1f\x8b\x08garbage"), text_column="t",
                   label_column="l")
    assert issubclass(DataError, SparseMergeError)


def test_concat_and_select():
    a = LabeledData([Example("x", None, 0)], ["n", "p"], "a", 1)
    b = LabeledData([Example("y", None, 1)], ["n", "p"], "b", 2)
    c = concat([a, b])
    assert c.texts == ["x", "y"] and c.skipped == 3 and c.source == "a + b"
    assert c.select([1]).texts == ["y"]
    with pytest.raises(DataError, match="cannot concatenate"):
        concat([a, LabeledData([], ["p", "n"], "c", 0)])


# ---------------------------------------------------------------------------------------------
# Presets and shipped subsets


def test_task_specs():
    assert set(TASKS) == {"sst2", "cola", "mrpc", "sms_spam"}
    assert TASKS["sst2"].labels == ("negative", "positive")
    assert TASKS["cola"].labels == ("unacceptable", "acceptable")
    assert TASKS["mrpc"].labels == ("not_equivalent", "equivalent")
    assert TASKS["sms_spam"].labels == ("ham", "spam")
    assert TASKS["sst2"].metric == "accuracy"
    assert TASKS["cola"].metric == "matthews"
    assert TASKS["mrpc"].metric == "f1+accuracy"
    from sparsemerge.metrics import METRICS
    for t in TASKS.values():
        assert all(m in METRICS for m in t.metrics)


def test_shipped_subsets_load_without_shared_data():
    sst_train = load_task("sst2", split="train")
    sst_dev = load_task("sst2", split="dev")
    cola_train = load_task("cola", split="train")
    cola_dev = load_task("cola", split="dev")
    assert (len(sst_train), len(sst_dev), len(cola_train), len(cola_dev)) == (
        4000, 872, 3000, 1043)
    for d in (sst_train, sst_dev, cola_train, cola_dev):
        assert d.skipped == 0
        counts = d.label_counts()
        assert min(counts.values()) > 0.2 * len(d)  # both classes well represented
    assert sst_dev.labels == ["negative", "positive"]
    assert cola_dev.labels == ["unacceptable", "acceptable"]
    assert cola_dev.label_counts() == {"unacceptable": 322, "acceptable": 721}
    assert sst_dev.label_counts() == {"negative": 428, "positive": 444}


def test_shipped_files_keep_the_original_layout_and_are_small():
    d = shipped_dir()
    assert (d / "README.md").is_file()
    assert (d / "sst2_train.tsv").read_text(encoding="utf-8").startswith("sentence\tlabel\n")
    first = (d / "cola_train.tsv").read_text(encoding="utf-8").splitlines()[0]
    assert len(first.split("\t")) == 4  # no header, 4 columns, as CoLA's originals
    total = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    assert total < 1_000_000


def test_shipped_not_available_for_other_tasks():
    with pytest.raises(DataError, match="not shipped.*data_dir"):
        load_task("mrpc")
    with pytest.raises(DataError, match="unknown task"):
        load_task("qqp")
    with pytest.raises(DataError, match="no split 'test'"):
        load_task("sst2", split="test")


def test_load_task_missing_dir(tmp_path):
    with pytest.raises(DataError, match="not found; tried"):
        load_task("sst2", tmp_path, "dev")


def test_plain_text_sample():
    s = plain_text_sample()
    assert len(s) == 300 and len(set(s)) == 300
    assert all(x.strip() == x and len(x.split()) >= 5 for x in s)


@needs_shared
@pytest.mark.parametrize("task,split,n,pair", [
    ("sst2", "dev", 872, False), ("sst2", "train", 67349, False),
    ("cola", "train", 8551, False), ("cola", "dev", 1043, False),
    ("mrpc", "dev", 408, True), ("mrpc", "train", 3668, True),
    ("sms_spam", "train", 4574, False), ("sms_spam", "dev", 1000, False),
])
def test_presets_on_real_data(task, split, n, pair):
    d = load_task(task, SHARED, split)
    assert len(d) == n and d.skipped == 0 and d.is_pair == pair
    assert d.labels == list(TASKS[task].labels)
    assert set(d.label_ids) == {0, 1}


@needs_shared
def test_preset_details_on_real_data():
    mrpc = load_task("mrpc", SHARED, "dev")
    assert mrpc[0].text.startswith("He said the foodservice pie business")
    assert mrpc[0].text_pair.startswith('"The foodservice pie business')
    assert mrpc[0].label == 1
    # the task folder itself also works as data_dir
    assert len(load_task("cola", SHARED / "glue" / "CoLA", "dev")) == 1043
    assert load_task("sst2", SHARED, "dev").texts == load_task("sst2", None, "dev").texts


@needs_shared
def test_shipped_subsets_are_reproducible(tmp_path):
    glue = SHARED / "glue"
    make_subset(glue / "SST-2" / "train.tsv", tmp_path / "s.tsv", 4000, seed=0)
    make_subset([glue / "CoLA" / "train_part1.tsv", glue / "CoLA" / "train_part2.tsv"],
                tmp_path / "c.tsv", 3000, seed=0, has_header=False)
    make_subset(glue / "CoLA" / "dev.tsv", tmp_path / "cd.tsv", None, has_header=False)
    d = shipped_dir()
    assert (tmp_path / "s.tsv").read_bytes() == (d / "sst2_train.tsv").read_bytes()
    assert (tmp_path / "c.tsv").read_bytes() == (d / "cola_train.tsv").read_bytes()
    assert (tmp_path / "cd.tsv").read_bytes() == (d / "cola_dev.tsv").read_bytes()
    assert (d / "sst2_dev.tsv").read_bytes() == (glue / "SST-2" / "dev.tsv").read_bytes()
    mrpc = load_task("mrpc", SHARED, "dev")
    assert plain_text_sample() == mrpc.texts[:300]


def test_make_subset_selection_is_stable(tmp_path):
    src = write(tmp_path, "src.tsv", "h\tl\n" + "".join(f"row{i}\t{i % 2}\n" for i in range(50)))
    make_subset(src, tmp_path / "a.tsv", 10, seed=3)
    make_subset(src, tmp_path / "b.tsv", 10, seed=3)
    make_subset(src, tmp_path / "c.tsv", 10, seed=4)
    a = (tmp_path / "a.tsv").read_text().splitlines()
    assert a == (tmp_path / "b.tsv").read_text().splitlines()
    assert a != (tmp_path / "c.tsv").read_text().splitlines()
    assert a[0] == "h\tl" and len(a) == 11
    idx = [int(r.split("\t")[0][3:]) for r in a[1:]]
    assert idx == sorted(idx)  # file order kept


# ---------------------------------------------------------------------------------------------
# encode


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def _data(texts, pairs=None, labels=None):
    pairs = pairs or [None] * len(texts)
    labels = labels or [i % 2 for i in range(len(texts))]
    return LabeledData([Example(t, p, y) for t, p, y in zip(texts, pairs, labels, strict=True)],
                       ["a", "b"], "mem")


def test_encode_truncates_or_drops_long_examples(tokenizer):
    texts = ["short one", "word " * 40, "another short text", "x " * 100]
    enc, long = encode(_data(texts), tokenizer, max_length=16)  # default: truncate, count
    assert long == (2, 0) and long.truncated == 2 and enc["index"] == [0, 1, 2, 3]
    assert [len(x) for x in enc["input_ids"]][1] == 16
    assert enc["input_ids"][1][-1] == tokenizer.sep_token_id
    enc2, long2 = encode(_data(texts), tokenizer, max_length=16, drop_long=True)
    assert long2 == (0, 2) and long2.dropped == 2
    assert enc2["index"] == [0, 2] and enc2["labels"] == [0, 0]
    assert all(len(ids) <= 16 for ids in enc2["input_ids"])
    assert enc2["input_ids"][0][0] == tokenizer.cls_token_id
    assert set(enc2) >= {"input_ids", "attention_mask", "token_type_ids", "labels"}
    with pytest.raises(DataError, match="every example is longer"):
        encode(_data(["word " * 40]), tokenizer, max_length=8, drop_long=True)


def test_encode_keep_end_truncates_the_start(tokenizer):
    enc, long = encode(_data(["one two three four five six"]), tokenizer, 5, keep_end=True)
    assert long.truncated == 1
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"][0]) == [
        "[CLS]", "four", "five", "six", "[SEP]"]  # special tokens kept
    assert tokenizer.truncation_side == "right"  # restored


def test_encode_exact_length_is_kept(tokenizer):
    n = len(tokenizer("hello world")["input_ids"])
    enc, long = encode(_data(["hello world", "hello world again"]), tokenizer, max_length=n,
                       drop_long=True)
    assert long.dropped == 1 and enc["index"] == [0] and len(enc["input_ids"][0]) == n


def test_encode_pairs(tokenizer):
    enc, _ = encode(_data(["first sentence", "a"], ["second one", "b"]), tokenizer, 32)
    tt = enc["token_type_ids"][0]
    assert tt[0] == 0 and tt[-1] == 1 and enc["input_ids"][0].count(tokenizer.sep_token_id) == 2


@needs_shared
def test_encode_real_sst2_dev(tokenizer):
    d = load_task("sst2", SHARED, "dev")
    enc, long = encode(d, tokenizer, 64)
    assert len(enc["labels"]) == 872 and long.truncated < 20 and long.dropped == 0


class _DecoderTok:
    """A decoder-style tokenizer without a pad token (like Llama's)."""

    pad_token_id = None
    eos_token_id = 2

    def __call__(self, texts, pairs=None, **kw):
        ids = [[1] + [10 + len(w) for w in t.split()] for t in texts]
        if kw.get("truncation"):
            ids = [x[: kw["max_length"]] for x in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}


def test_decoder_pad_falls_back_to_eos():
    tok = _DecoderTok()
    assert resolve_pad_token_id(tok) == 2
    enc, _ = encode(_data(["a bb ccc", "dd"]), tok, 16)
    assert "token_type_ids" not in enc and enc.pad_token_id == 2
    (b,) = list(batches(enc, 2, shuffle=False, seed=0))
    assert b["input_ids"].tolist() == [[1, 11, 12, 13], [1, 12, 2, 2]]  # right padding
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    tok.eos_token_id = None
    with pytest.raises(DataError, match="pad"):
        resolve_pad_token_id(tok)


# ---------------------------------------------------------------------------------------------
# batches


def _fake_encoded(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 9, (n,), generator=g).tolist()
    return {
        "input_ids": [[100 + i] * k for i, k in enumerate(lens)],
        "attention_mask": [[1] * k for k in lens],
        "labels": [i % 3 for i in range(n)],
        "index": list(range(n)),
    }


def _ids(batch):
    return batch["input_ids"][:, 0].sub(100).tolist()


def test_batches_padding_and_shapes():
    enc = _fake_encoded(10)
    out = list(batches(enc, 4, shuffle=False, seed=0, pad_token_id=7, with_index=True))
    assert [len(b["labels"]) for b in out] == [4, 4, 2]
    for b in out:
        lens = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == int(lens.max())
        for r, k in enumerate(lens.tolist()):
            assert (b["input_ids"][r, k:] == 7).all() and (b["input_ids"][r, :k] != 7).all()
        assert b["index"].tolist() == _ids(b)
        assert b["input_ids"].dtype == torch.long
    assert "index" not in next(batches(enc, 4, shuffle=False, seed=0))


def test_batches_deterministic_and_epoch_dependent():
    enc = _fake_encoded(50)
    a = [_ids(b) for b in batches(enc, 8, True, seed=1, epoch=0)]
    b = [_ids(b) for b in batches(enc, 8, True, seed=1, epoch=0)]
    c = [_ids(b) for b in batches(enc, 8, True, seed=1, epoch=1)]
    d = [_ids(b) for b in batches(enc, 8, True, seed=2, epoch=0)]
    assert a == b and a != c and a != d
    assert sorted(sum(a, [])) == list(range(50))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 60), bs=st.integers(1, 9), ws=st.integers(1, 4),
       shuffle=st.booleans(), seed=st.integers(0, 5), epoch=st.integers(0, 3))
def test_batches_shard_disjointly_and_cover(n, bs, ws, shuffle, seed, epoch):
    enc = _fake_encoded(n)
    if n < ws:
        with pytest.raises(DataError):
            list(batches(enc, bs, shuffle, seed, epoch, 0, ws))
        return
    per_rank = [[_ids(b) for b in batches(enc, bs, shuffle, seed, epoch, r, ws)]
                for r in range(ws)]
    counts = {len(x) for x in per_rank}
    assert counts == {num_batches(n, bs, ws)}  # same number of steps on every rank (DDP)
    flat = [i for rank in per_rank for b in rank for i in b]
    assert sorted(flat) == list(range(n))  # disjoint and covering
    for rank in per_rank:
        for b in rank:
            assert 1 <= len(b) <= bs + 1
    # global step t holds the same examples as a single process with batch bs * ws
    single = [_ids(b) for b in batches(enc, bs * ws, shuffle, seed, epoch, 0, 1)]
    if len(single) == counts.pop():
        for t, ref in enumerate(single):
            assert sorted(i for r in range(ws) for i in per_rank[r][t]) == sorted(ref)


def test_batches_argument_errors():
    enc = _fake_encoded(5)
    with pytest.raises(DataError, match="rank"):
        list(batches(enc, 2, False, 0, rank=2, world_size=2))
    with pytest.raises(DataError, match="batch_size"):
        list(batches(enc, 0, False, 0))
    with pytest.raises(DataError, match="encode"):
        list(batches({"x": [1]}, 2, False, 0))
