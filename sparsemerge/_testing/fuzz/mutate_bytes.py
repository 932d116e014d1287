"""Byte-level mutators: truncation, bit flips, overwritten runs, inserted / deleted bytes,
garbage appended, a lying header length, tiny files, spliced files."""

from __future__ import annotations

import struct

from .mutation import Ctx, mutator


@mutator("bytes", 2.0)
def truncate(c: Ctx) -> None:
    def edit(b: bytes) -> bytes:
        n = int.from_bytes(b[:8], "little")
        where = c.rng.randrange(4)
        if where == 0:
            cut = c.rng.randrange(0, min(len(b), n + 16))
        elif where == 1:
            cut = max(0, len(b) - c.rng.randrange(1, 64))
        else:
            cut = c.rng.randrange(0, len(b))
        c.note(f"cut at {cut}/{len(b)}")
        return b[:cut]
    c.doc.post.append(edit)


@mutator("bytes", 3.0)
def bitflip(c: Ctx) -> None:
    def edit(b: bytes) -> bytes:
        if not b:
            return b
        n = int.from_bytes(b[:8], "little")
        out = bytearray(b)
        region = c.rng.choice(["header", "data", "any", "length"])
        lo, hi = {"header": (8, 8 + n), "data": (8 + n, len(b)), "any": (0, len(b)),
                  "length": (0, 8)}[region]
        lo, hi = min(lo, len(b)), min(hi, len(b))
        if hi <= lo:
            lo, hi = 0, len(b)
        for _ in range(c.rng.choice([1, 1, 1, 2, 3, 8])):
            bit = c.rng.randrange(lo * 8, hi * 8)
            out[bit // 8] ^= 1 << (bit % 8)
        c.note(f"flipped bits in {region}")
        return bytes(out)
    c.doc.post.append(edit)


@mutator("bytes")
def overwrite_run(c: Ctx) -> None:
    def edit(b: bytes) -> bytes:
        if not b:
            return b
        out = bytearray(b)
        start = c.rng.randrange(len(b))
        k = min(c.rng.randrange(1, 17), len(b) - start)
        fill = c.rng.choice(["rand", "zero", "ff", "quote", "brace"])
        for i in range(start, start + k):
            out[i] = {"rand": c.rng.randrange(256), "zero": 0, "ff": 255, "quote": 34,
                      "brace": 125}[fill]
        c.note(f"{fill} x{k} at {start}")
        return bytes(out)
    c.doc.post.append(edit)


@mutator("bytes", 2.0)
def header_length_lie(c: Ctx) -> None:
    def edit(b: bytes) -> bytes:
        n = int.from_bytes(b[:8], "little")
        value = c.rng.choice([0, 1, 2, n - 1, n + 1, n - 8, n + 8, len(b), len(b) - 8,
                              len(b) - 7, 2**26, 2**30, 2**31, 2**32, 2**40, 2**63,
                              2**64 - 1, c.rng.randrange(2**64)])
        value %= 2**64
        c.note(f"header length {n} -> {value}")
        return struct.pack("<Q", value) + b[8:]
    c.doc.post.append(edit)


@mutator("bytes")
def insert_delete(c: Ctx) -> None:
    def edit(b: bytes) -> bytes:
        pos = c.rng.randrange(len(b) + 1)
        if c.rng.random() < 0.5 and b:
            k = c.rng.randrange(1, 9)
            c.note(f"deleted {k} at {pos}")
            return b[:pos] + b[pos + k :]
        ins = bytes(c.rng.randrange(256) for _ in range(c.rng.randrange(1, 9)))
        c.note(f"inserted {len(ins)} at {pos}")
        return b[:pos] + ins + b[pos:]
    c.doc.post.append(edit)


@mutator("bytes", 0.5)
def append_garbage(c: Ctx) -> None:
    extra = bytes(c.rng.randrange(256) for _ in range(c.rng.choice([1, 7, 8, 100])))
    c.doc.post.append(lambda b: b + extra)


@mutator("bytes", 0.3)
def tiny_file(c: Ctx) -> None:
    blob = c.rng.choice([b"", b"\x00" * 8, b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
                         b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", b"not a safetensors file",
                         struct.pack("<Q", 2) + b"[]"])
    c.doc.post.append(lambda b: blob)


@mutator("bytes", 0.5)
def splice_files(c: Ctx) -> None:
    other = c.corpus[c.rng.choice(sorted(c.corpus))]

    def edit(b: bytes) -> bytes:
        n = int.from_bytes(b[:8], "little")
        m = int.from_bytes(other[:8], "little")
        if c.rng.random() < 0.5:  # our header, their data
            return b[: 8 + n] + other[8 + m :]
        cut = c.rng.randrange(len(b))
        return b[:cut] + other[cut:]
    c.doc.post.append(edit)
