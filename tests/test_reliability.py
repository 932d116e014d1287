"""Reliability: crash-safe writes (SIGKILL, stale temps), disk full / read-only outputs,
wrong bases and bad data through the CLI. The long runs are bench/crash_safety.py and
bench/fuzz_reader.py; see docs/RELIABILITY.md."""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing as mp
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoModel
from typer.testing import CliRunner

from sparsemerge.adapter import BaseInfo, SparseAdapter, SparseTensor, TargetDelta
from sparsemerge.apply import apply, materialize
from sparsemerge.cli import app
from sparsemerge.errors import BaseMismatchError, SparseMergeError
from sparsemerge.formats import atomic
from sparsemerge.formats.adapter_file import WEIGHTS_NAME, load_adapter, save_adapter
from sparsemerge.formats.atomic import atomic_directory, atomic_write, atomic_write_bytes
from sparsemerge.models import backbone_of, base_info, default_targets, fingerprint
from tests.test_apply import random_adapter
from tests.test_format import make_adapter

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "crash_safety.py"


def _crash_bench():
    if "crash_safety" not in sys.modules:
        spec = importlib.util.spec_from_file_location("crash_safety", _BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["crash_safety"] = module
        spec.loader.exec_module(module)
    return sys.modules["crash_safety"]


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# ----------------------------------------------------------------------------- SIGKILL


def test_sigkill_during_save_leaves_previous_or_new(tmp_path):
    """12 kills of a child saving two ~3 MB adapters alternately, at random moments."""
    cs = _crash_bench()
    rep = cs.run_save(tmp_path, 12, random.Random(1))
    assert rep.kills == 12
    assert not rep.violations, rep.violations
    assert rep.temps_left_at_end == 0
    assert set(rep.states) <= {"absent", "previous", "new"}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_write_removes_stale_temp_siblings(tmp_path):
    out = tmp_path / "ad"
    save_adapter(make_adapter(), out)
    dead, live = _dead_pid(), os.getppid()
    old = time.time() - 3600
    made = {
        f".ad.{dead}.abcdefgh.tmp": True,  # a killed writer's temp directory: removed
        f".ad.{dead}.abcdefg1.tmp/": True,  # (trailing / = a directory with a file in it)
        ".ad.legacy00.tmp": True,  # no pid (older versions): removed when old
        f".ad.{live}.livewrtr.tmp": False,  # a live writer's: kept
        f".ad.{os.getpid()}.ourownn.tmp": False,  # this process's own: kept
        ".ad.x.12345678.tmp": False,  # belongs to an output named "ad.x"
        f".other.{dead}.abcdefgh.tmp": False,  # another output's
    }
    for name in made:
        p = tmp_path / name.rstrip("/")
        if name.endswith("/"):
            p.mkdir()
            (p / WEIGHTS_NAME).write_bytes(b"partial")
        else:
            p.write_bytes(b"partial")
        os.utime(p, (old, old))
    fresh = tmp_path / f".ad.{dead}.fresh000.tmp"  # modified after this process started
    fresh.write_bytes(b"x")
    save_adapter(make_adapter(nnz=60), out)
    left = set(siblings(out)) | {p.name for p in tmp_path.iterdir() if p.name.startswith(".o")}
    for name, removed in made.items():
        assert (name.rstrip("/") not in left) == removed, name
    assert fresh.name in left
    assert load_adapter(out).targets["layers.0.v.weight"].sparse.nnz == 60
    # the same for single files written with atomic_write
    f = tmp_path / "x.json"
    stale = tmp_path / f".x.json.{dead}.abcdefgh.tmp"
    stale.write_text("{")
    os.utime(stale, (old, old))
    atomic_write_bytes(f, b"{}")
    assert f.read_bytes() == b"{}" and not stale.exists()


def test_written_outputs_have_normal_permissions(tmp_path):
    umask = atomic._umask()
    out = save_adapter(make_adapter(), tmp_path / "ad")
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0o700
    assert stat.S_IMODE((out / WEIGHTS_NAME).stat().st_mode) == 0o666 & ~umask
    f = tmp_path / "new.bin"
    atomic_write_bytes(f, b"1")
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    os.chmod(f, 0o640)
    atomic_write_bytes(f, b"2")
    assert stat.S_IMODE(f.stat().st_mode) == 0o640  # a replaced file keeps its mode


def test_every_directory_is_fsynced_before_the_swap(tmp_path, monkeypatch):
    synced: list[Path] = []
    real = atomic._fsync_dir
    monkeypatch.setattr(atomic, "_fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "heads" / "sst2").mkdir(parents=True)
        (tmp / "heads" / "sst2" / "w.bin").write_bytes(b"w")
    assert {tmp, tmp / "heads", tmp / "heads" / "sst2", tmp_path} <= set(synced)


def test_output_that_is_a_file_fails_before_writing(tmp_path):
    blocker = tmp_path / "ad"
    blocker.write_text("keep me")
    with pytest.raises(SparseMergeError, match="not a directory"):
        save_adapter(make_adapter(), blocker)
    assert blocker.read_text() == "keep me" and siblings(blocker) == []


def _train_and_report(cfg_kwargs: dict, conn) -> None:
    from sparsemerge.train.config import TrainConfig
    from sparsemerge.train.loop import train

    torch.set_num_threads(1)
    conn.send("started")
    train(TrainConfig(**cfg_kwargs))
    conn.send("done")


def test_sigkill_during_training_then_resume_is_bit_exact(tiny_bert_dir, tmp_path):
    """Kill a checkpointing run (forked) at random moments after its first checkpoint,
    three times in a row, resuming each time; the adapter equals an uninterrupted run's."""
    from sparsemerge.train.config import TrainConfig
    from sparsemerge.train.loop import train
    from tests.test_train import write_synthetic

    torch.set_num_threads(1)
    data = write_synthetic(tmp_path / "train.csv", 96, 0), write_synthetic(tmp_path / "d.csv",
                                                                            32, 1)
    common = dict(base=str(tiny_bert_dir), train_file=str(data[0]), eval_file=str(data[1]),
                  text_column="text", label_column="label", density=0.1, lr=1e-2,
                  head_lr=5e-2, epochs=2, batch_size=16, max_length=32, quiet=True,
                  warmup_ratio=0.0, checkpoint_steps=1, save_dtype="fp32", seed=5)
    t0 = time.perf_counter()
    train(TrainConfig(output=str(tmp_path / "full"), **common))
    t_full = time.perf_counter() - t0
    out, ckpt = tmp_path / "killed", tmp_path / "killed.ckpt"
    rng = random.Random(3)
    ctx = mp.get_context("fork")
    kills = 0
    for attempt in range(8):
        resume = (ckpt / "state.pt").exists()
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_train_and_report,
                           args=(dict(common, output=str(out), resume=resume), child))
        proc.start()
        seen = (ckpt / "state.pt").stat().st_mtime_ns if resume else None
        deadline = time.perf_counter() + 4 * t_full + 30
        while proc.is_alive() and time.perf_counter() < deadline:
            with contextlib.suppress(OSError):
                if (ckpt / "state.pt").stat().st_mtime_ns != seen:
                    break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3) * t_full)
        if not proc.is_alive() or attempt >= 3:
            proc.join()
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        kills += 1
        assert proc.exitcode == -signal.SIGKILL
        torch.load(ckpt / "state.pt", weights_only=True)  # a complete checkpoint
        assert not out.exists() or load_adapter(out)
    assert kills >= 1 and proc.exitcode == 0
    a = safetensors.torch.load((tmp_path / "full" / WEIGHTS_NAME).read_bytes())
    b = safetensors.torch.load((out / WEIGHTS_NAME).read_bytes())
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


# ----------------------------------------------------------------------------- disk full


def _mount(target: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                       capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs (needs root and mount; skipped otherwise)."""
    d = tmp_path / "small"
    d.mkdir()
    if not _mount(d, "size=64k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def big_adapter() -> SparseAdapter:
    shape = (256, 256)
    idx = torch.arange(0, 65536, 2)  # 32k entries: ~260 KB, more than the 64 KiB tmpfs
    return SparseAdapter({"w": TargetDelta(shape, SparseTensor(shape, idx,
                                                                torch.randn(idx.numel())))},
                         BaseInfo("org/base"))


def small_adapter() -> SparseAdapter:
    shape = (16, 16)
    idx = torch.arange(0, 256, 8)
    return SparseAdapter({"w": TargetDelta(shape, SparseTensor(shape, idx, torch.ones(32)))},
                         BaseInfo("org/base"))


def test_disk_full_keeps_previous_version(small_fs):
    out = small_fs / "ad"
    save_adapter(small_adapter(), out, card="small")
    before = files_of(out)
    with pytest.raises(SparseMergeError, match="No space left on device") as err:
        save_adapter(big_adapter(), out)
    assert str(out) in str(err.value) and "nothing was changed" in str(err.value)
    assert files_of(out) == before and siblings(out) == []
    assert sorted(p.name for p in small_fs.iterdir()) == ["ad"]
    load_adapter(out)
    # a fresh output: nothing at all is left behind
    with pytest.raises(SparseMergeError, match="No space left"):
        save_adapter(big_adapter(), small_fs / "new")
    assert sorted(p.name for p in small_fs.iterdir()) == ["ad"]


@pytest.mark.parametrize("writer", ["torch.save", "safetensors", "atomic_write"])
def test_disk_full_any_writer_gives_a_clear_error(small_fs, writer):
    """torch.save (training checkpoints) and safetensors (save_pretrained) report a full
    disk as RuntimeError / SafetensorError; the atomic writers turn both into the one
    clear SparseMergeError."""
    t = {"x": torch.zeros(100_000)}
    with pytest.raises(SparseMergeError, match="No space left on device"):
        if writer == "atomic_write":
            atomic_write(small_fs / "f.pt", lambda f: torch.save(t, f))
        else:
            with atomic_directory(small_fs / "out") as d:
                if writer == "torch.save":
                    torch.save(t, d / "state.pt")
                else:
                    safetensors.torch.save_file(t, str(d / "model.safetensors"))
    assert list(small_fs.iterdir()) == []


def test_disk_full_materialize_and_train_checkpoint(small_fs, tiny_bert_dir, tmp_path):
    model = AutoModel.from_pretrained(tiny_bert_dir)
    adapter = random_adapter(model, str(tiny_bert_dir), with_head=False)
    with pytest.raises(SparseMergeError, match="No space left on device"):
        materialize(adapter, tiny_bert_dir, small_fs / "merged")
    assert list(small_fs.iterdir()) == []
    data = tmp_path / "t.csv"
    data.write_text("text,label\n" + "".join(f"good film {i},pos\nbad film {i},neg\n"
                                             for i in range(8)))
    r = _invoke("train", "--base", str(tiny_bert_dir), "--train-file", str(data),
                "--text-column", "text", "--label-column", "label", "--max-steps", "2",
                "--batch-size", "4", "--density", "0.5", "--checkpoint-steps", "1",
                "--checkpoint-dir",
                str(small_fs / "ckpt"), "-o", str(tmp_path / "out"), "--quiet")
    assert r.exit_code == 2, r.output
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and list(small_fs.iterdir()) == []


def test_read_only_output_keeps_previous_version(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    mounted = _mount(d, "size=1m")
    if not mounted and os.geteuid() == 0:
        pytest.skip("root ignores permissions and cannot mount a read-only tmpfs here")
    try:
        out = d / "ad"
        save_adapter(small_adapter(), out)
        before = files_of(out)
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        else:
            os.chmod(d, 0o555)
        with pytest.raises(SparseMergeError, match="Read-only file system|Permission denied"):
            save_adapter(make_adapter(), out)
        with pytest.raises(SparseMergeError, match="cannot write"):
            atomic_write_bytes(d / "x.json", b"{}")
        assert files_of(out) == before and sorted(p.name for p in d.iterdir()) == ["ad"]
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(d)], check=False)
        else:
            os.chmod(d, 0o755)


def test_disk_full_data_writers(small_fs, tmp_path):
    """``data textual-mnist`` (write_jsonl) and make_subset write through formats.atomic: a
    full disk is one SparseMergeError naming the output, the previous file stays, and no
    temp file is left."""
    import numpy as np

    from sparsemerge.data.tasks import make_subset
    from sparsemerge.data.textual_mnist import write_jsonl
    from tests.test_textual_mnist import idx_bytes

    n = 400  # ~100 KB of JSON Lines at 14x14: more than the 64 KiB tmpfs
    images, labels = tmp_path / "img.idx3", tmp_path / "lab.idx1"
    images.write_bytes(idx_bytes(np.random.default_rng(0).integers(0, 256, (n, 28, 28),
                                                                    dtype=np.uint8)))
    labels.write_bytes(idx_bytes(np.arange(n, dtype=np.uint8) % 10))
    out = small_fs / "mnist.jsonl"
    write_jsonl(images, labels, out, size=4, stop=10)
    before = out.read_bytes()
    with pytest.raises(SparseMergeError, match="No space left on device") as err:
        write_jsonl(images, labels, out)
    assert str(out) in str(err.value)
    assert out.read_bytes() == before and sorted(p.name for p in small_fs.iterdir()) == [
        "mnist.jsonl"]
    r = _invoke("data", "textual-mnist", "--images", str(images), "--labels", str(labels),
                "-o", str(small_fs / "cli.jsonl"))
    assert r.exit_code == 2 and "No space left on device" in r.stderr
    src = tmp_path / "rows.tsv"
    src.write_text("sentence\tlabel\n" + "".join(f"row {i} {'x' * 60}\t1\n"
                                                 for i in range(2000)))
    with pytest.raises(SparseMergeError, match="No space left on device"):
        make_subset(src, small_fs / "subset.tsv", 1500)
    assert sorted(p.name for p in small_fs.iterdir()) == ["mnist.jsonl"]


# ----------------------------------------------------------------------- merged model files


@pytest.fixture(scope="module")
def merged_pair(tiny_bert_dir, tmp_path_factory):
    """Two merged model directories written from the same inputs."""
    from sparsemerge.merge.engine import merge_adapters
    from sparsemerge.merge.stream import save_merged_model
    from tests.test_merge_engine import make_adapter as merge_input

    merged = merge_adapters([merge_input(tiny_bert_dir, "sst2", 1),
                             merge_input(tiny_bert_dir, "topic", 2, labels=("a", "b", "c"))],
                            "ties", {"density": 0.5})
    root = tmp_path_factory.mktemp("merged-files")
    for name in ("one", "two"):
        save_merged_model(merged, root / name)
    return root / "one", root / "two", merged


def test_merged_heads_are_byte_reproducible(merged_pair):
    """Same inputs, same bytes: safetensors.torch.save ordered the head's __metadata__ keys
    differently from one call to the next."""
    from sparsemerge.formats.merged import safetensors_bytes

    one, two, merged = merged_pair
    files = sorted(p.relative_to(one) for p in (one / "heads").rglob("*") if p.is_file())
    assert len(files) == 4
    for f in files + [Path("model.safetensors")]:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    params = merged.heads["topic"].params
    blobs = {safetensors_bytes(params, {"format": "pt", "task": "topic", "x": "y"})
             for _ in range(20)}
    assert len(blobs) == 1
    back = safetensors.torch.load(blobs.pop())
    assert back.keys() == params.keys() and all(torch.equal(back[k], params[k]) for k in back)


def _poison(file: Path, tensor: str, at_end: bool = False, value: float = float("nan")) -> None:
    """Overwrite one float32 element of ``tensor`` in a safetensors file, in place."""
    import json
    import struct

    raw = bytearray(file.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start, stop = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
    pos = 8 + n + (stop - 4 if at_end else start)
    raw[pos:pos + 4] = struct.pack("<f", value)
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["backbone", "backbone-last-block", "head"])
def test_merged_nan_inf_rejected_naming_file_and_tensor(merged_pair, tmp_path, where,
                                                        monkeypatch):
    from sparsemerge.errors import FormatError
    from sparsemerge.formats import merged as merged_format
    from sparsemerge.formats.merged import read_merged
    from sparsemerge.multihead import MultiHeadModel

    one, _, _ = merged_pair
    bad = tmp_path / "bad"
    shutil.copytree(one, bad)
    read_merged(bad)  # a clean copy reads
    if where == "head":
        file, tensor = bad / "heads" / "topic" / "head.safetensors", "weight"
        _poison(file, tensor, value=float("inf"))
    else:
        file, tensor = bad / "model.safetensors", "encoder.layer.1.output.dense.weight"
        if where == "backbone-last-block":  # 64-byte blocks; the NaN is in the tensor's last
            monkeypatch.setattr(merged_format, "FINITE_CHUNK_BYTES", 64)
        _poison(file, tensor, at_end=where == "backbone-last-block")
    for load in (read_merged, MultiHeadModel.from_pretrained):
        with pytest.raises(FormatError, match="NaN or Inf") as err:
            load(bad)
        assert str(file) in str(err.value) and f"tensor {tensor} " in str(err.value)


# ----------------------------------------------------------------------------- wrong base


def test_wrong_revision_or_weights_names_expected_and_found(tiny_bert_dir):
    bert = AutoModel.from_pretrained(tiny_bert_dir)
    names = default_targets(bert)
    adapter = random_adapter(bert, "org/tiny-bert", with_head=False)
    adapter.base = base_info(bert, "org/tiny-bert", names, revision="v1")
    other = AutoModel.from_pretrained(tiny_bert_dir)  # "revision v2": one layer retrained
    with torch.no_grad():
        other.encoder.layer[1].output.dense.weight.add_(1e-2)
    found_fp = fingerprint(dict(other.state_dict()), names)[0]
    with pytest.raises(BaseMismatchError) as err:
        apply(other, adapter)
    msg = str(err.value)
    assert "org/tiny-bert@v1" in msg and adapter.base.fingerprint in msg  # expected
    assert str(tiny_bert_dir) in msg and found_fp in msg  # found
    assert "encoder.layer.1.output.dense.weight" in msg and "--force" in msg
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply(other, adapter, force=True)
    assert any(found_fp in str(w.message) for w in caught)


def _adapter_dir(model, base_id: str, out: Path, seed: int) -> Path:
    a = random_adapter(backbone_of(model), base_id, seed=seed)
    return save_adapter(a, out)


def test_cli_evaluate_on_wrong_base(tiny_bert_dir, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    ad = _adapter_dir(model, str(tiny_bert_dir), tmp_path / "ad", 0)
    data = tmp_path / "dev.csv"
    data.write_text("text,label\ngood,positive\nbad,negative\nfine,positive\n")
    other = tmp_path / "other-bert"
    shutil.copytree(tiny_bert_dir, other)
    m = AutoModel.from_pretrained(other)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)
    m.save_pretrained(other)
    args = ["evaluate", str(ad), "--data", str(data), "--text-column", "text",
            "--label-column", "label"]
    r = _invoke(*args, "--base", str(other))
    assert r.exit_code == 2, r.output
    err = " ".join(r.stderr.split())
    assert "wrong base model" in err and str(tiny_bert_dir) in err and str(other) in err
    with pytest.warns(UserWarning, match="wrong base model"):
        r = _invoke(*args, "--base", str(other), "--force", "--json")
    assert r.exit_code == 0, r.output
    r = _invoke(*args, "--base", str(tiny_llama_dir), "--force")
    assert r.exit_code == 2 and "does not exist" in " ".join(r.stderr.split())


def test_cli_merge_refuses_mixed_bases(tiny_bert_dir, tmp_path):
    model = AutoModel.from_pretrained(tiny_bert_dir)
    a = _adapter_dir(model, str(tiny_bert_dir), tmp_path / "a", 0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    b = _adapter_dir(model, "org/other-base", tmp_path / "b", 1)
    r = _invoke("merge", str(a), str(b), "-o", str(tmp_path / "m"))
    assert r.exit_code == 2, r.output
    err = " ".join(r.stderr.split())
    assert "org/other-base" in err and str(tiny_bert_dir) in err
    assert not (tmp_path / "m").exists() and siblings(tmp_path / "m") == []


# ----------------------------------------------------------------------------- data


DATA_CASES = [
    # (file name, bytes, extra args, "file:line" or None, column or None, phrase)
    ("utf8.tsv", b"text\tlabel\nok\tpos\nbad \xff bytes\tneg\n", [], 3, "'text'",
     "invalid UTF-8"),
    ("unknown.tsv", b"text\tlabel\nok\tpos\nhm\tmaybe\n", ["--labels", "neg,pos"], 3,
     "'label'", "unknown label 'maybe'"),
    ("empty.csv", b"text,label\nok,pos\n  ,neg\n", [], 3, "'text'", "empty"),
    ("fields.csv", b"text,label\nok,pos\nx,neg,extra\n", [], 3, None, "expected 2 fields"),
    ("row.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", \n', [], 2, None,
     "invalid JSON"),
    ("column.tsv", b"sentence\tlabel\nok\tpos\n", [], None, None, "no column 'text'"),
]


@pytest.mark.parametrize("name,content,extra,line,column,phrase", DATA_CASES,
                         ids=[c[0] for c in DATA_CASES])
def test_cli_data_check_names_file_line_and_column(tmp_path, name, content, extra, line,
                                                    column, phrase):
    p = tmp_path / name
    p.write_bytes(content)
    r = _invoke("data", "check", str(p), *extra)
    assert r.exit_code == 2, r.output
    err = " ".join(r.stderr.split())
    assert phrase in err and str(p) in err
    if line is not None:
        assert f"{p}:{line}" in err
    if column is not None:
        assert f"column {column}" in err


@pytest.mark.parametrize("name,content,extra,line,column,phrase", DATA_CASES[:3],
                         ids=[c[0] for c in DATA_CASES[:3]])
def test_cli_train_on_bad_data_writes_nothing(tiny_bert_dir, tmp_path, name, content, extra,
                                             line, column, phrase):
    p = tmp_path / name
    p.write_bytes(content)
    out = tmp_path / "out"
    r = _invoke("train", "--base", str(tiny_bert_dir), "--train-file", str(p), "--text-column",
                "text", "--label-column", "label", "--max-steps", "1", "--checkpoint-steps",
                "1", "-o", str(out), "--quiet", *extra)
    assert r.exit_code == 2, r.output
    assert f"{p}:{line}" in " ".join(r.stderr.split())
    assert sorted(x.name for x in tmp_path.iterdir()) == [name]  # no output, no checkpoint


def test_cli_textual_mnist_bad_input_writes_nothing(tmp_path):
    images, labels = tmp_path / "img.idx3", tmp_path / "lab.idx1"
    images.write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)  # truncated idx3
    labels.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    out = tmp_path / "out.jsonl"
    r = _invoke("data", "textual-mnist", "--images", str(images), "--labels", str(labels),
                "-o", str(out))
    assert r.exit_code == 2, r.output
    assert str(images) in " ".join(r.stderr.split())
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "img.idx3", "lab.idx1"]


def test_kill_between_last_checkpoint_and_final_save(tiny_bert_dir, tmp_path, monkeypatch):
    from sparsemerge.formats import adapter_file
    from sparsemerge.train.config import TrainConfig
    from sparsemerge.train.loop import train
    from tests.test_train import write_synthetic

    torch.set_num_threads(1)
    data = write_synthetic(tmp_path / "t.csv", 64, 0), write_synthetic(tmp_path / "d.csv", 16, 1)
    common = dict(base=str(tiny_bert_dir), train_file=str(data[0]), eval_file=str(data[1]),
                  text_column="text", label_column="label", density=0.1, lr=1e-2,
                  epochs=2, batch_size=16, max_length=32, quiet=True, warmup_ratio=0.0,
                  checkpoint_steps=2, save_dtype="fp32")  # 4 steps/epoch: ckpt at step 8
    full = train(TrainConfig(output=str(tmp_path / "full"), **common))
    real_save = adapter_file.save_adapter

    def killed(*args, **kwargs):  # the process dies after its last checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_file, "save_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(output=str(tmp_path / "out"), **common))
    monkeypatch.setattr(adapter_file, "save_adapter", real_save)
    resumed = train(TrainConfig(output=str(tmp_path / "out"), resume=True, **common))
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    assert resumed.history == full.history
