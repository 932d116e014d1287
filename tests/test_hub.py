"""Hub push / pull against a loopback Hub (tests/hub_server.py), with the real client.

In-process tests call sparsemerge.hub with ``endpoint=server.url``; CLI tests run the
commands in a subprocess with HF_ENDPOINT / HF_TOKEN / HF_HOME set, through ``run_cli``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsemerge.card import adapter_card, card_metadata, merged_card
from sparsemerge.errors import HubError
from sparsemerge.hub import parse_hub_uri, pull, pull_info, push, push_adapter, resolve_path
from tests.hub_server import (
    FORBIDDEN_NAMESPACE,
    READ_ONLY_TOKEN,
    TEST_TOKEN,
    HubServer,
    hub_server,
)

__all__ = ["hub_server"]  # the fixture, re-exported so pytest finds it here

# The CLI under test: the real entry point, in a fresh interpreter (the `sparsemerge` console
# script runs the same `sparsemerge.cli:main`).
CLI = [sys.executable, "-m", "sparsemerge.cli"]


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)


def run_cli_many(runs: list[tuple[list[str], dict[str, str]]]
                 ) -> list[subprocess.CompletedProcess[str]]:
    """Start independent CLI runs together; results in the same order."""
    procs = [(args, subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)) for args, env in runs]
    results = []
    for args, proc in procs:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def cli_env(server: HubServer, home: Path, token: str | None = TEST_TOKEN, **extra: str
            ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(home), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_UPDATE_CHECK="1", NO_COLOR="1", COLUMNS="200")
    if token is not None:
        env["HF_TOKEN"] = token
    env.update(extra)
    return env


def make_adapter_dir(root: Path, seed: int = 0, size: int = 300_000) -> Path:
    """An adapter-like directory: a binary blob, JSON config, a model card, a nested file."""
    d = root / f"adapter-{seed}"
    (d / "heads" / "sst2").mkdir(parents=True)
    (d / "adapter.safetensors").write_bytes(
        b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(size // 32))
        + bytes(range(256)) + b"\x00" * 7)
    (d / "adapter_config.json").write_text(json.dumps({"seed": seed, "method": "sparta"}))
    (d / "heads" / "sst2" / "head_config.json").write_text('{"id2label": {"0": "neg"}}')
    (d / "README.md").write_text(adapter_card({
        "base_model": "sentence-transformers/all-MiniLM-L6-v2", "method": "sparta",
        "task": "sst2", "labels": ["negative", "positive"], "density": 0.005,
        "trainable": 105_000 + seed, "nbytes": size, "metrics": {"accuracy": 0.9},
        "datasets": ["stanfordnlp/sst2"], "repo_id": "alice/sst2",
    }))
    return d


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes()
            for p in sorted(d.rglob("*")) if p.is_file()}


def digest_tree(d: Path) -> dict[str, tuple[str, int]]:
    return {rel: (hashlib.sha256(b).hexdigest(), (d / rel).stat().st_mtime_ns)
            for rel, b in tree_bytes(d).items()}


@pytest.fixture
def api_kw(hub_server: HubServer, tmp_path: Path) -> dict[str, str]:
    return {"endpoint": hub_server.url, "token": TEST_TOKEN}


# ---------------------------------------------------------------------------------------
# Python API, in process
# ---------------------------------------------------------------------------------------
def test_push_then_pull_is_bit_exact(hub_server, tmp_path, api_kw):
    src = make_adapter_dir(tmp_path)
    res = push(src, "alice/sst2", commit_message="first", **api_kw)
    assert res.repo_id == "alice/sst2" and res.revision == "main" and res.pr_url is None
    assert res.commit_sha == hub_server.head("alice/sst2") and len(res.commit_sha) == 40
    assert res.commit_url.endswith(res.commit_sha) and res.files == 4

    remote = hub_server.files("alice/sst2")
    assert set(remote) == set(tree_bytes(src)) | {".gitattributes"}

    snap = pull("alice/sst2", cache_dir=tmp_path / "cache", **api_kw)
    pulled = tree_bytes(snap)
    pulled.pop(".gitattributes")
    assert pulled == tree_bytes(src)
    assert snap.name == res.commit_sha

    out = pull("alice/sst2", out=tmp_path / "out", cache_dir=tmp_path / "cache", **api_kw)
    assert out == tmp_path / "out"
    got = tree_bytes(out)
    assert got.pop(".gitattributes") and got == tree_bytes(src)
    assert not (out / ".cache").exists() and not any(p.is_symlink() for p in out.rglob("*"))
    mask = os.umask(0o022)
    os.umask(mask)
    assert ((out / "adapter.safetensors").stat().st_mode & 0o777) == 0o666 & ~mask

    # the card's metadata reached the Hub's parser
    from huggingface_hub import HfApi

    info = HfApi(**api_kw).model_info("alice/sst2")
    assert info.card_data.library_name == "sparsemerge"
    assert info.card_data.base_model_relation == "adapter"


def test_second_push_is_new_revision_and_at_rev_pins(hub_server, tmp_path, api_kw):
    v1, v2 = make_adapter_dir(tmp_path, 1), make_adapter_dir(tmp_path, 2)
    first = push(v1, "alice/multi", **api_kw)
    v1_remote = hub_server.files("alice/multi", first.commit_sha)
    second = push(v2, "alice/multi", commit_message="v2", **api_kw)
    assert second.commit_sha != first.commit_sha
    assert hub_server.repo("alice/multi").commits[second.commit_sha].parent == first.commit_sha
    # the first snapshot is untouched
    assert hub_server.files("alice/multi", first.commit_sha) == v1_remote

    cache = tmp_path / "cache"
    latest = pull("alice/multi", cache_dir=cache, **api_kw)
    assert tree_bytes(latest)["adapter.safetensors"] == tree_bytes(v2)["adapter.safetensors"]
    pinned = pull(f"alice/multi@{first.commit_sha}", cache_dir=cache, **api_kw)
    assert tree_bytes(pinned) == {**tree_bytes(v1), ".gitattributes": v1_remote[".gitattributes"]}
    info = pull_info("hf://alice/multi", revision=first.commit_sha, cache_dir=cache, **api_kw)
    assert info.commit_sha == first.commit_sha and info.path == pinned

    # pushing identical content again creates no commit
    again = push(v2, "alice/multi", **api_kw)
    assert again.commit_sha == second.commit_sha


def test_push_to_new_branch_leaves_main_alone(hub_server, tmp_path, api_kw):
    v1, v2 = make_adapter_dir(tmp_path, 1), make_adapter_dir(tmp_path, 2)
    main = push(v1, "alice/branchy", private=True, **api_kw)
    assert hub_server.repo("alice/branchy").private
    dev = push(v2, "alice/branchy", revision="dev", **api_kw)
    assert dev.revision == "dev"
    assert hub_server.head("alice/branchy") == main.commit_sha
    assert hub_server.repo("alice/branchy").commits[dev.commit_sha].parent == main.commit_sha
    got = pull("alice/branchy@dev", cache_dir=tmp_path / "c", **api_kw)
    assert (got / "adapter_config.json").read_bytes() == (v2 / "adapter_config.json").read_bytes()


def test_create_pr(hub_server, tmp_path, api_kw):
    v1, v2 = make_adapter_dir(tmp_path, 1), make_adapter_dir(tmp_path, 2)
    main = push(v1, "alice/pr", **api_kw)
    pr = push(v2, "alice/pr", create_pr=True, commit_message="try v2", **api_kw)
    assert pr.revision == "refs/pr/1" and pr.pr_url and pr.pr_url.endswith("/discussions/1")
    assert pr.url == pr.pr_url
    assert hub_server.head("alice/pr") == main.commit_sha  # main unchanged
    assert hub_server.head("alice/pr", "refs/pr/1") == pr.commit_sha
    got = pull("alice/pr@refs/pr/1", cache_dir=tmp_path / "c", **api_kw)
    assert (got / "adapter.safetensors").read_bytes() == (v2 / "adapter.safetensors").read_bytes()
    with pytest.raises(HubError, match="branch does not exist"):
        push(v2, "alice/pr", create_pr=True, revision="nope", **api_kw)


@pytest.mark.parametrize("mode", ["error", "drop"])
def test_failure_mid_commit(hub_server, tmp_path, api_kw, mode):
    v1, v2 = make_adapter_dir(tmp_path, 1), make_adapter_dir(tmp_path, 2)
    first = push(v1, "alice/faulty", **api_kw)
    before = digest_tree(v2)
    hub_server.fail_next_commit(mode)
    with pytest.raises(HubError) as ei:
        push(v2, "alice/faulty", **api_kw)
    msg = str(ei.value)
    assert "alice/faulty" in msg and "run it again" in msg
    assert ("500" in msg) if mode == "error" else ("connection" in msg)
    assert TEST_TOKEN not in msg
    assert hub_server.head("alice/faulty") == first.commit_sha  # nothing half-committed
    assert digest_tree(v2) == before  # local files untouched
    # and the retry works
    assert push(v2, "alice/faulty", **api_kw).commit_sha != first.commit_sha


def test_error_messages(hub_server, tmp_path, api_kw):
    src = make_adapter_dir(tmp_path)
    push(src, "alice/exists", **api_kw)
    cache = tmp_path / "cache"
    with pytest.raises(HubError, match=r"repo 'alice/missing' was not found"):
        pull("alice/missing", cache_dir=cache, **api_kw)
    with pytest.raises(HubError, match=r"revision 'nope' does not exist"):
        pull("alice/exists@nope", cache_dir=cache, **api_kw)
    for bad in ("hf_wrong_token_value_123456", READ_ONLY_TOKEN):
        with pytest.raises(HubError) as ei:
            push(src, "alice/exists", endpoint=hub_server.url, token=bad)
        assert "hf auth login" in str(ei.value) and "HF_TOKEN" in str(ei.value)
        assert bad not in str(ei.value)
    with pytest.raises(HubError, match=r"permission denied \(403\)") as ei:
        push(src, f"{FORBIDDEN_NAMESPACE}/x", **api_kw)
    assert TEST_TOKEN not in str(ei.value)
    with pytest.raises(HubError, match="no such file"):
        push(tmp_path / "nothing-here", "alice/x", **api_kw)
    dead = "http://127.0.0.1:9"  # nothing listens there
    with pytest.raises(HubError, match="could not be reached and no cached copy"):
        pull("alice/exists", cache_dir=tmp_path / "empty-cache", endpoint=dead, token=TEST_TOKEN)
    with pytest.raises(HubError, match="connection to the Hub at http://127.0.0.1:9 failed"):
        push(src, "alice/exists", endpoint=dead, token=TEST_TOKEN)
    # invalid model-card metadata is refused before anything is uploaded
    bad_card = tmp_path / "badcard"
    bad_card.mkdir()
    (bad_card / "README.md").write_text("---\nbase_model_relation: cousin\n---\n")
    with pytest.raises(HubError, match="base_model_relation"):
        push(bad_card, "alice/badcard", **api_kw)


def test_resolve_path_and_offline(hub_server, tmp_path, api_kw, monkeypatch):
    src = make_adapter_dir(tmp_path)
    res = push(src, "alice/res", **api_kw)
    cache = tmp_path / "cache"
    assert resolve_path(str(src)) == src
    assert resolve_path(src) == src
    assert resolve_path("relative/dir") == Path("relative/dir")

    p = resolve_path(f"hf://alice/res@{res.commit_sha}", cache_dir=cache, **api_kw)
    assert (p / "adapter.safetensors").read_bytes() == (src / "adapter.safetensors").read_bytes()
    resolve_path("hf://alice/res", cache_dir=cache, **api_kw)  # caches refs/main too

    n = len(hub_server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for uri in ("hf://alice/res", f"hf://alice/res@{res.commit_sha}", "hf://alice/res@main"):
        assert resolve_path(uri, cache_dir=cache, **api_kw) == p
    assert len(hub_server.requests) == n, "offline mode must not talk to the Hub"
    with pytest.raises(HubError, match=r"not in the local Hub cache.*HF_HUB_OFFLINE") as ei:
        resolve_path("hf://alice/uncached", cache_dir=cache, **api_kw)
    assert "sparsemerge pull alice/uncached" in str(ei.value)
    with pytest.raises(HubError, match="offline"):
        push(src, "alice/res", **api_kw)


def test_adapter_push_to_hub_and_load_adapter_hf_uri(hub_server, tmp_path, api_kw):
    """The library's own entry points: push_adapter and load_adapter("hf://")."""
    from sparsemerge import load_adapter
    from tests.test_format import assert_same, make_adapter

    adapter = make_adapter()
    res = push_adapter(adapter, "alice/real", **api_kw)
    assert {"adapter.safetensors", "adapter_config.json", "README.md"} <= set(
        hub_server.files("alice/real"))
    card = hub_server.files("alice/real")["README.md"].decode()
    assert _front(card)["base_model"] == "org/base" and "sparta" in _front(card)["tags"]
    back = load_adapter(f"hf://alice/real@{res.commit_sha}", cache_dir=tmp_path / "c", **api_kw)
    assert_same(adapter, back)


@pytest.mark.parametrize(("uri", "expected"), [
    ("hf://owner/name@rev", ("owner/name", "rev")),
    ("hf://owner/name", ("owner/name", None)),
    ("owner/name@refs/pr/3", ("owner/name", "refs/pr/3")),
    ("hf://models/owner/my.model-v2@feature/x", ("owner/my.model-v2", "feature/x")),
    ("hf://o/n@" + "a" * 40, ("o/n", "a" * 40)),
])
def test_parse_hub_uri(uri, expected):
    assert parse_hub_uri(uri) == expected


@pytest.mark.parametrize("uri", [
    "hf://", "hf://name-only", "hf://a/b/c", "hf://owner/name@", "hf://datasets/o/n",
    "hf://o/-bad", "hf://o/a..b", "",
])
def test_parse_hub_uri_rejects(uri):
    with pytest.raises(HubError):
        parse_hub_uri(uri)


# ---------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------
def _front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_adapter_card():
    card = adapter_card({
        "base_model": "org/base", "method": "rigsa", "task": "mnist",
        "labels": [str(i) for i in range(10)], "density": 0.035, "trainable": 1234,
        "nbytes": 5678, "metrics": {"accuracy": 0.97}, "datasets": ["ylecun/mnist", "x.csv"],
        "hyperparameters": {"lr": 1e-3, "rounds": 5, "pattern": "a|b"}, "repo_id": "me/mnist",
    })
    meta = _front(card)
    assert meta["base_model"] == "org/base" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "sparsemerge"
    assert {"sparsemerge", "sparse-adapter", "rigsa"} <= set(meta["tags"])
    assert meta["datasets"] == ["ylecun/mnist"] and meta["metrics"] == ["accuracy"]
    for text in ("3.5 %", "1,234", "5.68 KB", "| mnist | accuracy | 0.97 |", "a\\|b",
                 "from sparsemerge import load_adapter", 'load_adapter("hf://me/mnist")',
                 "sparsemerge pull me/mnist"):
        assert text in card, text
    from huggingface_hub import ModelCard

    assert ModelCard(card).data.library_name == "sparsemerge"


def test_merged_card_and_local_base():
    card = merged_card({
        "base_model": "/home/me/models/base", "method": "ties", "tasks": ["sst2", "cola"],
        "labels": {"sst2": ["neg", "pos"], "cola": ["bad", "ok"]},
        "metrics": {"sst2": {"accuracy": 0.91}, "cola": {"mcc": 0.45}},
        "sources": [{"repo_id": "me/sst2", "task": "sst2", "weight": 1.0}, "./cola"],
        "parameters": {"density": 0.2},
    })
    meta = _front(card)
    assert "base_model" not in meta and "base_model_relation" not in meta  # not a Hub id
    assert {"sparsemerge", "merge", "ties"} <= set(meta["tags"])
    assert meta["metrics"] == ["accuracy", "mcc"]
    assert "`/home/me/models/base`" in card and "| cola | mcc | 0.45 |" in card
    assert "`me/sst2`" in card and "OWNER/NAME" in card
    assert card_metadata({"base_model": "org/base"}, "merge")["base_model_relation"] == "merge"


# ---------------------------------------------------------------------------------------
# CLI, in a subprocess. Each run pays an interpreter start plus `import sparsemerge` (torch):
# keep runs few, and start independent ones together (run_cli_many).
# ---------------------------------------------------------------------------------------
def test_cli_push_pull_roundtrip_and_offline(hub_server, tmp_path):
    src = make_adapter_dir(tmp_path)
    home = tmp_path / "home"
    env = cli_env(hub_server, home)

    r = run_cli(["push", str(src), "alice/cli", "--json", "--private", "--commit-message",
                 "hello"], env)
    assert r.returncode == 0, r.stderr
    pushed = json.loads(r.stdout)
    assert pushed["repo_id"] == "alice/cli" and pushed["revision"] == "main"
    assert pushed["commit_sha"] == hub_server.head("alice/cli")
    assert hub_server.repo("alice/cli").commits[pushed["commit_sha"]].title == "hello"
    assert hub_server.repo("alice/cli").private

    out = tmp_path / "pulled"
    r = run_cli(["pull", f"alice/cli@{pushed['commit_sha']}", "-o", str(out), "--json"], env)
    assert r.returncode == 0, r.stderr
    pulled = json.loads(r.stdout)
    assert pulled["commit_sha"] == pushed["commit_sha"] and Path(pulled["path"]) == out
    got = tree_bytes(out)
    assert got.pop(".gitattributes") and got == tree_bytes(src)

    # offline: the pull above filled HF_HOME's cache; the human output ends with the path
    n = len(hub_server.requests)
    r = run_cli(["pull", f"alice/cli@{pushed['commit_sha']}"],
                cli_env(hub_server, home, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    snapshot = Path(r.stdout.strip().splitlines()[-1])
    assert tree_bytes(snapshot)["adapter.safetensors"] == tree_bytes(src)["adapter.safetensors"]
    assert len(hub_server.requests) == n, "offline mode must not talk to the Hub"


def test_cli_failures_auth_and_create_pr(hub_server, tmp_path):
    src = make_adapter_dir(tmp_path)
    push(src, "alice/clipr", endpoint=hub_server.url, token=TEST_TOKEN)
    changed = make_adapter_dir(tmp_path, seed=5)
    before = digest_tree(changed)
    hub_server.fail_next_commit("drop", repo_id="alice/clifail")
    bad = "hf_this_is_a_wrong_token_0123456789"
    home = tmp_path / "home"
    pr, fail, anon, wrong, offline = run_cli_many([
        (["push", str(changed), "alice/clipr", "--create-pr"], cli_env(hub_server, home)),
        (["push", str(changed), "alice/clifail"], cli_env(hub_server, home)),
        (["push", str(changed), "alice/noauth"], cli_env(hub_server, home, token=None)),
        (["push", str(changed), "alice/noauth", "--json"], cli_env(hub_server, home, token=bad)),
        (["pull", "alice/never-pulled"], cli_env(hub_server, home, HF_HUB_OFFLINE="1")),
    ])
    # --create-pr: human output, PR ref holds the new files, main does not
    assert pr.returncode == 0, pr.stderr
    assert "pull request" in pr.stdout and "refs/pr/1" in pr.stdout
    assert hub_server.files("alice/clipr", "refs/pr/1")["adapter_config.json"] == (
        changed / "adapter_config.json").read_bytes()
    assert hub_server.files("alice/clipr")["adapter_config.json"] == (
        src / "adapter_config.json").read_bytes()
    # connection dropped mid-commit: exit 2, one clear line, nothing committed, files intact
    assert fail.returncode == 2, (fail.stdout, fail.stderr)
    assert fail.stderr.startswith("error: ") and "connection" in fail.stderr
    assert "Traceback" not in fail.stderr
    assert set(hub_server.files("alice/clifail")) == {".gitattributes"}  # repo made, no commit
    assert digest_tree(changed) == before
    # no token at all, then a wrong one: both say how to log in; the token never shows
    assert anon.returncode == 2 and "not logged in" in anon.stderr
    assert "hf auth login" in anon.stderr and "HF_TOKEN" in anon.stderr
    assert wrong.returncode == 2 and "401" in wrong.stderr and "hf auth login" in wrong.stderr
    assert wrong.stdout == ""
    assert ("model", "alice/noauth") not in hub_server.state.repos
    # offline and not cached
    assert offline.returncode == 2 and "HF_HUB_OFFLINE" in offline.stderr
    assert "sparsemerge pull alice/never-pulled" in offline.stderr
    for r in (pr, fail, anon, wrong, offline):
        assert TEST_TOKEN not in r.stdout + r.stderr and bad not in r.stdout + r.stderr
        assert "Traceback" not in r.stderr
