"""A safetensors file as editable parts (:class:`Doc`), and the dtype tables mutators use."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sparsemerge.formats import adapter_file

ST_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16), "I64": (8, torch.int64), "I32": (4, torch.int32),
    "I16": (2, torch.int16), "I8": (1, torch.int8), "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool), "U16": (2, torch.uint16), "U32": (4, torch.uint32),
    "U64": (8, torch.uint64), "F8_E4M3": (1, torch.float8_e4m3fn),
    "F8_E5M2": (1, torch.float8_e5m2),
}
# Bit patterns (little-endian unsigned) of NaN / +Inf / -Inf / negative NaN / NaN payload.
NONFINITE = {
    "F32": [0x7FC00000, 0x7F800000, 0xFF800000, 0xFFC00000, 0x7F800001],
    "F16": [0x7E00, 0x7C00, 0xFC00, 0xFE00, 0x7C01],
    "BF16": [0x7FC0, 0x7F80, 0xFF80, 0xFFC0, 0x7F81],
    "F64": [0x7FF8000000000000, 0x7FF0000000000000, 0xFFF0000000000000],
}
UINT = {1: np.uint8, 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def st_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def st_name(dtype: torch.dtype) -> str:
    return next(k for k, (_, d) in ST_DTYPES.items() if d == dtype)


def st_decode(dt: str, shape: list[int], data: bytes) -> torch.Tensor:
    dtype = ST_DTYPES[dt][1]
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


class Doc:
    """A safetensors file as editable parts; :meth:`to_bytes` serialises it again.

    ``tensors`` maps name -> [dtype, shape, bytes]; ``config`` is the parsed sparsemerge
    JSON (``config_text`` replaces it verbatim when set). ``header_edits`` run on the header
    dict after offsets are laid out, ``post`` on the final bytes: mutators append to them.
    """

    def __init__(self, blob: bytes):
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + n])
        self.meta: Any = header.pop("__metadata__", {})
        key = adapter_file.METADATA_KEY
        self.config: Any = json.loads(self.meta[key]) if key in self.meta else None
        data = blob[8 + n :]
        self.tensors: dict[str, list] = {}
        for name, info in header.items():
            s, e = info["data_offsets"]
            self.tensors[name] = [info["dtype"], list(info["shape"]), bytes(data[s:e])]
        self.config_text: str | None = None
        self.header_edits: list[Callable[[dict], Any]] = []
        self.header_text_edits: list[Callable[[str], str]] = []
        self.post: list[Callable[[bytes], bytes]] = []

    def to_bytes(self) -> bytes:
        meta = self.meta
        if isinstance(meta, dict) and adapter_file.METADATA_KEY in meta and (
                self.config is not None or self.config_text is not None):
            meta = dict(meta)
            text = self.config_text
            if text is None:
                text = json.dumps(self.config, allow_nan=True)
            meta[adapter_file.METADATA_KEY] = text
        header: Any = {"__metadata__": meta}
        data = bytearray()
        for name, (dt, shape, b) in self.tensors.items():
            header[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data),
                                                                           len(data) + len(b)]}
            data += b
        for edit in self.header_edits:  # later edits may find earlier ones made them moot
            with contextlib.suppress(Exception):
                out = edit(header)
                header = header if out is None else out
        text = json.dumps(header, separators=(",", ":"), allow_nan=True)
        for text_edit in self.header_text_edits:
            text = text_edit(text)
        raw = text.encode("utf-8", "surrogatepass")
        raw += b" " * (-len(raw) % 8)
        blob = struct.pack("<Q", len(raw)) + raw + bytes(data)
        for edit in self.post:
            blob = edit(blob)
        return blob
