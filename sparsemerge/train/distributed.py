"""Devices, compute dtypes and the process group a launcher describes.

``torchrun`` and ``accelerate launch`` start one process per rank and describe the job in
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`process_group` reads them, joins the group (``nccl`` on CUDA,
``gloo`` on CPU) for the duration of a run and leaves it afterwards, so ``sparsemerge train``
and :func:`sparsemerge.train.loop.train` need no distributed flag: the same command runs alone
or under a launcher. A group created by the caller is used as is and left alone.

``--dtype`` is an *autocast* dtype: trainable values and optimizer state stay fp32, the base
weights stay in ``--base-dtype`` (autocast rounds fp32 weights for the matmuls), activations
and matmuls run in bf16 / fp16 (docs/NUMERICS.md). fp16 adds a gradient scaler (its range
is too small for unscaled gradients); bf16 needs none.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

from sparsemerge.errors import SparseMergeError
from sparsemerge.formats.adapter_file import DTYPES
from sparsemerge.train.config import DEVICES

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """This process's place in a launched job."""

    rank: int
    world_size: int
    local_rank: int


def launch_env(env: dict[str, str] | None = None) -> Launch | None:
    """The job a launcher described in ``env`` (default ``os.environ``), or None when this
    process was not started by one (or by one with a single process)."""
    env = dict(os.environ) if env is None else env
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    missing = [v for v in _LAUNCH_VARS if not env.get(v)]
    if missing:
        raise SparseMergeError(f"distributed launch: {', '.join(missing)} not set (found "
                               f"{', '.join(v for v in _LAUNCH_VARS if env.get(v)) or 'none'}); "
                               "start with torchrun --nproc-per-node N or accelerate launch, "
                               "or unset RANK / WORLD_SIZE to train in one process")
    try:
        rank, world, local = (int(env[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise SparseMergeError("distributed launch: RANK, WORLD_SIZE and LOCAL_RANK must be "
                               f"integers, got {env['RANK']!r}, {env['WORLD_SIZE']!r}, "
                               f"{env['LOCAL_RANK']!r}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise SparseMergeError(f"distributed launch: RANK={rank} WORLD_SIZE={world} "
                               f"LOCAL_RANK={local} is not a valid rank")
    return Launch(rank, world, local) if world > 1 else None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available (and ``accelerate launch --cpu`` was not asked for),
    else CPU. Under a launcher each process takes the GPU numbered by its ``LOCAL_RANK``."""
    if name not in DEVICES:
        raise SparseMergeError(f"--device: must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        cpu_asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        name = "cuda" if torch.cuda.is_available() and not cpu_asked else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SparseMergeError("--device cuda: no CUDA device is visible to torch "
                               f"(torch {torch.__version__}); use --device cpu or auto")
    launch = launch_env()
    index = launch.local_rank if launch is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise SparseMergeError(f"LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA "
                               "devices: start at most one process per GPU")
    return torch.device("cuda", index)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``dtype`` on ``device`` (nothing at all for fp32)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def grad_scaler(device: torch.device, dtype: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 autocast; None otherwise (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type) if dtype == "fp16" else None


def group_active() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[None]:
    """Join the launcher's process group for the block (and leave it after); a no-op for a
    single process or when the caller already initialised a group."""
    launch = launch_env()
    if launch is None or group_active():
        yield
        return
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_available():
        raise SparseMergeError("this torch build has no torch.distributed; train in one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        torch.distributed.init_process_group(backend, init_method="env://", rank=launch.rank,
                                             world_size=launch.world_size,
                                             timeout=timedelta(minutes=30))
    except (RuntimeError, ValueError) as exc:
        raise SparseMergeError(f"cannot join the {backend} process group at "
                               f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} as "
                               f"rank {launch.rank}/{launch.world_size}: {exc}") from None
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks of the active group (as is without one)."""
    if not group_active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_gather(obj: object) -> list[object]:
    """``obj`` of every rank, in rank order ([obj] without a group)."""
    if not group_active():
        return [obj]
    out: list[object] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
