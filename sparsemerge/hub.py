"""Push adapters / merged models to the Hugging Face Hub and pull them back.

- :func:`push` uploads a directory (:func:`push_adapter` an in-memory adapter) as **one**
  commit (``HfApi.create_commit``), creating the repo (and the branch, for a new
  ``revision``) first, or opening a pull request.
- :func:`pull` downloads a snapshot through the Hub cache and returns its path; with ``out``
  the files are also copied into ``out`` (plain files, no ``.cache/`` folder inside).
- :func:`resolve_path` turns ``hf://owner/name[@rev]`` into a local directory (through the
  cache; with ``HF_HUB_OFFLINE=1`` only from the cache) and returns local paths unchanged.

Every ``huggingface_hub`` failure is re-raised as :class:`sparsemerge.errors.HubError` with a
message that says what to do. Tokens are never printed, logged or written by this module.

Why ``create_commit`` and not ``upload_folder``: since huggingface_hub 1.x, ``upload_folder``
with ``hf_xet`` installed goes through a pipelined uploader that may split a folder into
several commits and retries a failed commit POST with back-off (up to ~25 s, and it can
create a duplicate commit when only the answer was lost). An adapter is a handful of files
that must land together, so one ``create_commit`` call is both atomic and fail-fast. Large
files still go through LFS/Xet exactly as ``upload_folder`` would send them (``create_commit``
pre-uploads them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sparsemerge.errors import HubError

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from sparsemerge.adapter import SparseAdapter

HF_SCHEME = "hf://"
DEFAULT_BRANCH = "main"
# Never uploaded (as upload_folder): `.git/` and huggingface_hub's `.cache/huggingface/`.
_LOGIN_HINT = (
    "Log in with `hf auth login`, or set the HF_TOKEN environment variable to an access token "
    "with write permission."
)
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class PushResult:
    """Where a push landed."""

    repo_id: str
    revision: str  # the branch, or "refs/pr/N" for a pull request
    commit_sha: str
    commit_url: str
    url: str  # the repo page, or the pull request page with create_pr
    pr_url: str | None = None
    files: int = 0  # files sent (unchanged files are skipped by the Hub client)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class PullResult:
    """What a pull fetched."""

    repo_id: str
    revision: str | None  # as asked (None = default branch)
    commit_sha: str | None  # the commit the files come from (None if it cannot be told)
    path: Path

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ---------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------
def is_hub_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith(HF_SCHEME)


def parse_hub_uri(uri: str) -> tuple[str, str | None]:
    """``"hf://owner/name@rev"`` -> ``("owner/name", "rev")``.

    The ``hf://`` prefix and the revision are optional (``"owner/name"`` -> ``(..., None)``);
    ``hf://models/owner/name`` is accepted. Everything after the first ``@`` is the revision,
    so branch names with slashes and ``refs/pr/N`` work; paths inside the repo are not
    supported. Dataset and Space repos are refused: adapters live in model repos.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise HubError(f"empty Hub repo reference {uri!r}: expected hf://owner/name[@revision]")
    body = uri.strip()
    if body.startswith(HF_SCHEME):
        body = body[len(HF_SCHEME):]
    repo_id, sep, revision = body.partition("@")
    repo_id = repo_id.strip("/")
    if repo_id.startswith("models/"):
        repo_id = repo_id[len("models/"):]
    if repo_id.split("/", 1)[0] in ("datasets", "spaces", "buckets", "kernels"):
        raise HubError(f"{uri}: only model repos are supported (got a {repo_id.split('/')[0]} URI)")
    if sep and not revision:
        raise HubError(f"{uri}: empty revision after '@'; expected hf://owner/name@revision")
    if repo_id.count("/") != 1 or not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo_id) or any(
        part.startswith(("-", ".")) or part.endswith(("-", ".")) or ".." in part or "--" in part
        for part in repo_id.split("/")
    ):
        raise HubError(
            f"{uri}: not a valid Hub repo id; expected hf://owner/name[@revision] "
            "(letters, digits, '-', '_', '.')"
        )
    return repo_id, (revision or None)


def _split_repo_rev(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    rid, rev = parse_hub_uri(repo_id)
    if rev is not None and revision is not None and rev != revision:
        raise HubError(
            f"{repo_id}: revision given twice ('@{rev}' and revision={revision!r}); keep one"
        )
    return rid, revision if revision is not None else rev


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport-level exception types of whichever HTTP stack huggingface_hub uses."""
    found: list[type[BaseException]] = []
    for mod, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                      ("requests", "ConnectionError"), ("requests", "Timeout")):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(__import__(mod), name))
    found.append(ConnectionError)
    return tuple(found)


def _endpoint_name(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _scrub(message: str, token: str | None) -> str:
    if token:
        message = message.replace(token, "***")
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", message)


def _server_message(err: BaseException) -> str:
    msg = getattr(err, "server_message", None)
    return f" (server said: {msg.strip()})" if isinstance(msg, str) and msg.strip() else ""


@contextlib.contextmanager
def _hub_errors(action: str, repo_id: str, revision: str | None, *, endpoint: str | None,
                token: str | None) -> Iterator[None]:
    """Re-raise huggingface_hub failures as HubError with an actionable message."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _endpoint_name(endpoint)
    rev = revision or DEFAULT_BRANCH
    try:
        yield
    except HubError:
        raise
    except LocalTokenNotFoundError as e:
        raise HubError(f"cannot {action} {repo_id}: you are not logged in. {_LOGIN_HINT}") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if _offline():
            msg = (f"cannot {action} {repo_id}@{rev}: it is not in the local Hub cache and "
                   "offline mode is on (HF_HUB_OFFLINE=1). Pull it once while online "
                   f"(`sparsemerge pull {repo_id}@{rev}`), or unset HF_HUB_OFFLINE.")
        else:
            msg = (f"cannot {action} {repo_id}@{rev}: the Hub at {where} could not be reached "
                   f"and no cached copy was found ({type(e).__name__}).")
        raise HubError(_scrub(msg, token)) from e
    except RevisionNotFoundError as e:
        raise HubError(
            f"cannot {action} {repo_id}: revision '{rev}' does not exist in that repo "
            "(check the branch name, tag, 'refs/pr/N' or commit sha)." + _server_message(e)
        ) from e
    except RemoteEntryNotFoundError as e:
        raise HubError(
            f"cannot {action} {repo_id}@{rev}: a file is missing on the Hub{_server_message(e)}"
        ) from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = _LOGIN_HINT if status == 401 or token is None else (
            "If it is private, check that your token can read it.")
        kind = "is gated (access must be requested on its page)" if isinstance(
            e, GatedRepoError) else f"was not found on {where}"
        raise HubError(f"cannot {action}: repo '{repo_id}' {kind}. {hint}") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        detail = _scrub(_server_message(e), token)
        if status == 401:
            msg = (f"cannot {action} {repo_id}: the Hub rejected your credentials (401)"
                   f"{detail}. {_LOGIN_HINT}")
        elif status == 403:
            msg = (f"cannot {action} {repo_id}: permission denied (403){detail}. Your token "
                   f"cannot write to the '{repo_id.split('/')[0]}' namespace: use a token with "
                   "write access to it (`hf auth login`, or HF_TOKEN), or push to a namespace "
                   "you own.")
        elif status == 412:
            msg = (f"cannot {action} {repo_id}@{rev}: the branch moved while pushing (412). "
                   "Run the push again.")
        elif status is not None and status >= 500:
            msg = (f"cannot {action} {repo_id}@{rev}: the Hub at {where} failed with HTTP "
                   f"{status}{detail}. Nothing was changed locally; run it again later "
                   "(a retried push that finds the files already there is a no-op).")
        else:
            msg = f"cannot {action} {repo_id}@{rev}: HTTP {status}{detail}"
        raise HubError(_scrub(msg, token)) from e
    except _network_errors() as e:
        raise HubError(_scrub(
            f"cannot {action} {repo_id}@{rev}: connection to the Hub at {where} failed "
            f"({type(e).__name__}: {e}). Nothing was changed locally; check the network "
            "(HF_ENDPOINT) and run it again.", token)) from e
    except ValueError as e:  # invalid repo ids, README metadata, argument combinations
        raise HubError(_scrub(f"cannot {action} {repo_id}: {e}", token)) from e


# ---------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------
def _collect(path: Path) -> list[tuple[str, Path]]:
    """(path in repo, local file) for every file to upload, sorted."""
    if path.is_file():
        return [(path.name, path)]
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        parts = rel.parts
        if ".git" in parts or any(
            parts[i:i + 2] == (".cache", "huggingface") for i in range(len(parts) - 1)
        ) or not p.is_file():
            continue
        out.append((rel.as_posix(), p))
    return out


def push(
    path: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload the files under ``path`` to ``repo_id`` as one commit.

    The repo is created if missing (``private`` only applies then). A ``revision`` that does
    not exist yet is created as a branch from the default branch. With ``create_pr`` the
    commit goes to a new pull request (``refs/pr/N``) against ``revision`` (default branch if
    None). ``token`` defaults to the logged-in token / ``HF_TOKEN``; ``endpoint`` to
    huggingface_hub's configured endpoint (``HF_ENDPOINT``). Local files are only read.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    src = Path(path)
    if not src.exists():
        raise HubError(f"{src}: no such file or directory; nothing to push")
    repo_id, revision = _split_repo_rev(repo_id, revision)
    files = _collect(src)
    if not files:
        raise HubError(f"{src}: no files to push (the directory is empty)")
    if _offline():
        raise HubError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1)")

    api = HfApi(endpoint=endpoint, token=token)
    resolved_token = token if token is not None else _stored_token()
    if resolved_token is None:
        raise HubError(f"cannot push to {repo_id}: you are not logged in. {_LOGIN_HINT}")
    if commit_message is None:
        from sparsemerge._version import __version__

        commit_message = f"Upload {src.name or 'files'} with sparsemerge {__version__}"

    with _hub_errors("push to", repo_id, revision, endpoint=endpoint, token=resolved_token):
        repo_id = _ensure_repo(api, repo_id, private)
        if revision not in (None, DEFAULT_BRANCH) and not api.revision_exists(repo_id, revision):
            if create_pr:
                raise HubError(
                    f"cannot open a pull request against '{revision}' in {repo_id}: that branch "
                    "does not exist. Drop --revision to target the default branch."
                )
            if revision.startswith("refs/"):
                raise HubError(f"cannot push to {repo_id}: ref '{revision}' does not exist")
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in files]
        info = api.create_commit(
            repo_id, operations=ops, commit_message=commit_message, revision=revision,
            create_pr=create_pr,
        )
    pr_url = getattr(info, "pr_url", None)
    base = _endpoint_name(endpoint)
    return PushResult(
        repo_id=repo_id,
        revision=getattr(info, "pr_revision", None) or revision or DEFAULT_BRANCH,
        commit_sha=info.oid,
        commit_url=info.commit_url,
        url=pr_url or f"{base}/{repo_id}",
        pr_url=pr_url,
        files=len(files),
    )


def push_adapter(adapter: SparseAdapter, repo_id: str, **kwargs) -> PushResult:
    """Write ``adapter`` to a temporary directory and upload it as one commit (see
    :func:`push` for ``kwargs``)."""
    from sparsemerge.formats.adapter_file import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        return push(save_adapter(adapter, Path(tmp) / "adapter"), repo_id, **kwargs)


def _ensure_repo(api: HfApi, repo_id: str, private: bool) -> str:
    """create_repo(exist_ok=True); returns the repo id the Hub reports (namespace filled in)."""
    try:
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    except ValueError as e:
        # huggingface_hub quirk: when the token may not create repos (401/402/403) but the repo
        # exists, create_repo(exist_ok=True) builds its RepoUrl without the custom endpoint and
        # raises HfUriError for any endpoint other than HF_ENDPOINT. The repo exists: go on;
        # the commit itself reports a missing write permission.
        if type(e).__name__ != "HfUriError":
            raise
        return repo_id
    return getattr(url, "repo_id", None) or repo_id


def _stored_token() -> str | None:
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # an unreadable token file counts as "not logged in"
        return None


# ---------------------------------------------------------------------------------------
# Pull
# ---------------------------------------------------------------------------------------
def _file_mode() -> int:
    """0o666 minus the process umask: the mode a plain ``open(..., "w")`` would give."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _copy_snapshot(snapshot: Path, out: Path) -> None:
    """Copy a cached snapshot's files (resolving the cache's symlinks) into ``out``; each file
    is written to a temporary name and renamed, so readers never see a half-written file."""
    out.mkdir(parents=True, exist_ok=True)
    mode = _file_mode()
    for src in sorted(snapshot.rglob("*")):
        if not src.is_file():
            continue
        dst = out / src.relative_to(snapshot)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, mode)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def pull_info(
    repo_id: str,
    revision: str | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PullResult:
    """Like :func:`pull`, also telling which commit the files come from."""
    from huggingface_hub import snapshot_download

    repo_id, revision = _split_repo_rev(repo_id, revision)
    offline = _offline()
    resolved_token = token if token is not None else _stored_token()
    with _hub_errors("pull", repo_id, revision, endpoint=endpoint, token=resolved_token):
        snapshot = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, token=token, endpoint=endpoint,
            local_files_only=offline,
        ))
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    path = snapshot
    if out is not None:
        path = Path(out)
        try:
            _copy_snapshot(snapshot, path)
        except OSError as e:
            raise HubError(f"cannot write the pulled files into {path}: {e}") from e
    return PullResult(repo_id=repo_id, revision=revision, commit_sha=commit, path=path)


def pull(
    repo_id: str,
    revision: str | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Download ``repo_id`` at ``revision`` and return the local directory.

    ``repo_id`` may carry the revision (``owner/name@rev`` or ``hf://owner/name@rev``). Files
    always go through the Hub cache (``cache_dir``, default ``HF_HUB_CACHE``), so they are
    available offline afterwards; the cached snapshot is returned unless ``out`` is given,
    in which case plain copies are written into ``out`` (existing files with the same names
    are replaced, others left alone) and ``out`` is returned. With ``HF_HUB_OFFLINE=1`` only
    the cache is used.
    """
    return pull_info(repo_id, revision, out, token=token, endpoint=endpoint,
                     cache_dir=cache_dir).path


def resolve_path(
    path_or_uri: str | os.PathLike[str],
    *,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A local path for ``path_or_uri``: local paths come back unchanged (as ``Path``);
    ``hf://owner/name[@rev]`` is downloaded through the Hub cache (only read from the cache
    when ``HF_HUB_OFFLINE=1``; a miss raises :class:`HubError` saying so)."""
    if not is_hub_uri(path_or_uri):
        return Path(path_or_uri)
    repo_id, revision = parse_hub_uri(str(path_or_uri))
    return pull(repo_id, revision, token=token, endpoint=endpoint, cache_dir=cache_dir)


__all__ = [
    "PullResult",
    "PushResult",
    "is_hub_uri",
    "parse_hub_uri",
    "pull",
    "pull_info",
    "push",
    "resolve_path",
]
