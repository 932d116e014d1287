"""sparsemerge.textual_mnist and the `data` CLI sub-app."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sparsemerge.cli.data import app
from sparsemerge.data.readers import read_lm, read_table
from sparsemerge.data.textual_mnist import (
    LABELS,
    SPLITS,
    prompt,
    read_idx,
    to_text,
    write_jsonl,
)
from sparsemerge.errors import DataError

MNIST = Path(os.environ.get("SPARSEMERGE_TEST_DATA")
             or Path(__file__).resolve().parents[2] / "shared" / "data") / "mnist"
IMAGES = MNIST / "t10k-images-idx3-ubyte.gz"
LABELS_FILE = MNIST / "t10k-labels-idx1-ubyte.gz"
needs_mnist = pytest.mark.skipif(
    not IMAGES.is_file(),
    reason=f"MNIST t10k files not found in {MNIST} (only on the project's own machines)",
)


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    head = bytes([0, 0, type_code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


@pytest.fixture
def small_mnist(tmp_path):
    """Twelve random 28x28 uint8 'images' with labels 0..9, 0, 1 as idx files (images gzipped)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = (np.arange(12) % 10).astype(np.uint8)
    ip, lp = tmp_path / "img.idx3.gz", tmp_path / "lab.idx1"
    ip.write_bytes(gzip.compress(idx_bytes(images)))
    lp.write_bytes(idx_bytes(labels))
    return ip, lp, images, labels


# ---------------------------------------------------------------------------------------------
# read_idx


def test_read_idx_roundtrip(small_mnist):
    ip, lp, images, labels = small_mnist
    a, b = read_idx(ip), read_idx(lp)
    assert a.shape == (12, 28, 28) and a.dtype == np.uint8 and np.array_equal(a, images)
    assert np.array_equal(b, labels)


def test_read_idx_other_dtypes(tmp_path):
    x = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    p = tmp_path / "x.idx"
    p.write_bytes(idx_bytes(x, 0x0C))
    y = read_idx(p)
    assert y.dtype == np.int32 and np.array_equal(y, x)


@pytest.mark.parametrize("raw,phrase", [
    (b"\x00\x00", "too short"),
    (b"\x08\x03\x00\x00" + b"\x00" * 20, "bad idx magic"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "bad idx magic"),  # unknown type code
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated idx header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated or corrupt"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x00", "zero"),
])
def test_read_idx_validation(tmp_path, raw, phrase):
    p = tmp_path / "bad.idx"
    p.write_bytes(raw)
    with pytest.raises(DataError, match=phrase) as ei:
        read_idx(p)
    assert str(p) in str(ei.value)


def test_read_idx_missing_and_bad_gzip(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "none.gz")
    p = tmp_path / "x.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00junk")
    with pytest.raises(DataError, match="gzip"):
        read_idx(p)


@needs_mnist
def test_read_real_mnist():
    images, labels = read_idx(IMAGES), read_idx(LABELS_FILE)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels[:5].tolist() == [7, 2, 1, 0, 4]
    for lo, hi in (SPLITS["train"], SPLITS["eval"]):
        assert set(labels[lo:hi].tolist()) == set(range(10))  # every digit in both parts


# ---------------------------------------------------------------------------------------------
# to_text / prompt


def test_to_text_shape_and_digits():
    img = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    for size in (14, 7, 28, 10, 5):
        lines = to_text(img, size).split("\n")
        assert len(lines) == size and all(len(r) == size and r.isdigit() for r in lines)


def test_quantisation_rule():
    # constant images: digit = floor(v * 10 / 256)
    for v, d in [(0, 0), (25, 0), (26, 1), (51, 1), (52, 2), (128, 5), (230, 8), (231, 9),
                 (255, 9)]:
        img = np.full((28, 28), v, dtype=np.uint8)
        assert to_text(img, 14) == "\n".join([str(d) * 14] * 14), v
        assert to_text(img, 10) == "\n".join([str(d) * 10] * 10), v  # fractional path


def test_area_average_blocks():
    img = np.zeros((28, 28), dtype=np.uint8)
    img[0, 0] = img[0, 1] = img[1, 0] = 255  # block mean 191.25 -> 7
    img[0, 2] = 255  # block mean 63.75 -> 2
    img[2:4, 2:4] = [[26, 25], [26, 26]]  # mean 25.75 -> floor(257.5 / 256) = 1
    rows = to_text(img, 14).split("\n")
    assert rows[0][:2] == "72" and rows[1][1] == "1" and rows[1][0] == "0"
    assert set("".join(rows)) <= {"0", "1", "2", "7"}


def test_to_text_errors():
    with pytest.raises(DataError, match="2-D"):
        to_text(np.zeros((2, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match="size"):
        to_text(np.zeros((28, 28), dtype=np.uint8), 0)
    with pytest.raises(DataError, match="size"):
        to_text(np.zeros((28, 28), dtype=np.uint8), 29)
    with pytest.raises(DataError, match="0..255"):
        to_text(np.full((28, 28), 300))


def test_prompt():
    text = to_text(np.zeros((28, 28), dtype=np.uint8), 7)
    p = prompt(text)
    assert p.startswith("Which digit (0-9) is drawn below?") and "7x7" in p
    assert text in p and p.rstrip().endswith("Answer with the digit only.")


# ---------------------------------------------------------------------------------------------
# write_jsonl


def test_write_jsonl(small_mnist, tmp_path):
    ip, lp, images, labels = small_mnist
    out = tmp_path / "out" / "tm.jsonl"
    out.parent.mkdir()
    n = write_jsonl(ip, lp, out, size=7, start=2, stop=9)
    assert n == 7
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(2, 9))
    assert [r["label"] for r in rows] == [str(labels[i]) for i in range(2, 9)]
    assert rows[0]["text"] == to_text(images[2], 7)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tm.jsonl"]  # no temp left
    d = read_table(out, text_column="text", label_column="label", labels=LABELS)
    assert len(d) == 7 and d.labels == list("0123456789")
    assert d.label_ids == [int(labels[i]) for i in range(2, 9)]
    # prompt mode, overwriting atomically
    assert write_jsonl(ip, lp, out, size=14, prompt=True) == 12
    first = json.loads(out.read_text().splitlines()[0])
    assert first["text"] == prompt(to_text(images[0], 14))


def test_write_jsonl_lm_formats(small_mnist, tmp_path):
    """The generative formats read back as conversations whose answer is the digit."""
    ip, lp, images, labels = small_mnist
    out = tmp_path / "pr.jsonl"
    write_jsonl(ip, lp, out, size=7, stop=3, row_format="prompt-response")
    d = read_lm(out)
    assert [ex.messages[-1] for ex in d] == [("assistant", str(labels[i])) for i in range(3)]
    assert d[0].messages[0] == ("user", prompt(to_text(images[0], 7)))
    runner = CliRunner()
    res = runner.invoke(app, ["textual-mnist", "--images", str(ip), "--labels", str(lp),
                              "--format", "chat", "--stop", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "index" in json.loads(out.read_text().splitlines()[0])
    c = read_lm(out, messages_column="messages")
    assert c[1].messages == (("user", prompt(to_text(images[1], 14))),
                             ("assistant", str(labels[1])))
    with pytest.raises(DataError, match="unknown Textual MNIST format 'csv'"):
        write_jsonl(ip, lp, out, row_format="csv")


def test_write_jsonl_errors(small_mnist, tmp_path):
    ip, lp, _, _ = small_mnist
    out = tmp_path / "x.jsonl"
    with pytest.raises(DataError, match="empty or outside"):
        write_jsonl(ip, lp, out, start=5, stop=5)
    with pytest.raises(DataError, match="empty or outside"):
        write_jsonl(ip, lp, out, stop=13)
    with pytest.raises(DataError, match="swap"):
        write_jsonl(lp, ip, out)
    other = tmp_path / "l3.idx"
    other.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DataError, match="12 images but .* 3 labels"):
        write_jsonl(ip, other, out)
    bad = tmp_path / "l12.idx"
    bad.write_bytes(idx_bytes(np.full(12, 11, dtype=np.uint8)))
    with pytest.raises(DataError, match="not a digit"):
        write_jsonl(ip, bad, out)
    assert not out.exists()
    assert write_jsonl(ip, lp, tmp_path / "new" / "x.jsonl") == 12  # folders made, as -o does


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_textual_mnist(small_mnist, tmp_path):
    ip, lp, _, labels = small_mnist
    out = tmp_path / "cli.jsonl"
    runner = CliRunner()
    res = runner.invoke(app, ["textual-mnist", "--images", str(ip), "--labels", str(lp),
                              "--size", "7", "--start", "1", "--stop", "4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote 3 rows" in res.stdout
    assert len(out.read_text().splitlines()) == 3
    res = runner.invoke(app, ["textual-mnist", "--images", str(ip), "--labels", str(lp),
                              "--prompt", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info == {"rows": 12, "output": str(out), "size": 14, "start": 0, "stop": 12,
                    "prompt": True, "format": "text"}


def test_cli_errors_exit_2(small_mnist, tmp_path):
    ip, lp, _, _ = small_mnist
    runner = CliRunner()
    res = runner.invoke(app, ["textual-mnist", "--images", str(tmp_path / "nope"), "--labels",
                              str(lp), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "error:" in res.stderr and "no such file" in res.stderr
    assert res.stdout == ""
    res = runner.invoke(app, ["textual-mnist", "--images", str(ip), "--labels", str(lp),
                              "--split", "eval", "--start", "3", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not both" in res.stderr
    res = runner.invoke(app, ["textual-mnist", "--images", str(ip), "--labels", str(lp),
                              "--split", "eval", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "outside the 12 images" in res.stderr


def test_cli_tasks_and_check(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["tasks", "--json"])
    assert res.exit_code == 0
    assert {r["task"] for r in json.loads(res.stdout)} == {"sst2", "cola", "mrpc", "sms_spam"}
    res = runner.invoke(app, ["check", "--task", "sst2", "--split", "dev", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"] == 872
    p = tmp_path / "a.tsv"
    p.write_text("text\tlabel\nok\tpos\n\tneg\nfine\tneg\n")
    res = runner.invoke(app, ["check", str(p)])
    assert res.exit_code == 2 and f"{p}:3" in res.stderr and "--skip-bad-rows" in res.stderr
    res = runner.invoke(app, ["check", str(p), "--skip-bad-rows"])
    assert res.exit_code == 0 and "2 rows" in res.stdout and "skipped 1" in res.stdout
    res = runner.invoke(app, ["check"])
    assert res.exit_code == 2


@needs_mnist
def test_cli_on_real_mnist_slice(tmp_path):
    out = tmp_path / "eval.jsonl"
    res = CliRunner().invoke(app, ["textual-mnist", "--images", str(IMAGES), "--labels",
                                   str(LABELS_FILE), "--start", "8000", "--stop", "8050",
                                   "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"] == 50
    d = read_table(out, text_column="text", label_column="label", labels=LABELS)
    assert len(d) == 50 and len(set(d.label_ids)) > 5
    rows = d.texts[0].split("\n")
    assert len(rows) == 14 and all(len(r) == 14 for r in rows)
    assert any(c in "789" for c in d.texts[0])  # strokes are present
