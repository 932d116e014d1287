"""Textual MNIST: handwritten digits written as text, the RIGSA paper's task.

Each image is downsampled to ``size x size`` by area averaging, every pixel is quantised to
one digit ``floor(v * 10 / 256)`` of its (averaged) brightness ``v`` in 0..255 -- so 0 is
background and 9 is full ink -- and the image becomes ``size`` lines of ``size`` digits.
A model then answers which digit (label "0".."9") is drawn.

Split convention for the official 10k MNIST *test* file (``t10k-*``), the only MNIST data
shipped in ``../shared/data/mnist``: rows ``[0, 8000)`` are training data, rows
``[8000, 10000)`` evaluation data (:data:`SPLITS`). The official file is not sorted by
label, so both parts hold every digit.

Rows are JSON Lines (``index``: the image's position in the idx file), in one of
:data:`FORMATS`:

* ``text`` (classification): ``{"text": ..., "label": "7", "index": 1234}``, readable with
  ``read_table(path, text_column="text", label_column="label", labels=LABELS)``;
* ``prompt-response`` (causal LM): ``{"prompt": prompt(text), "response": "7", "index": ...}``,
  readable with ``read_lm(path)``;
* ``chat`` (causal LM): ``{"messages": [{"role": "user", "content": prompt(text)},
  {"role": "assistant", "content": "7"}], "index": ...}``, readable with
  ``read_lm(path, messages_column="messages")``.

The generative formats always carry the instruction (:func:`prompt`): the model answers it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparsemerge.data.readers import read_data_bytes
from sparsemerge.errors import DataError
from sparsemerge.formats.atomic import atomic_write_bytes

__all__ = [
    "FORMATS",
    "LABELS",
    "PROMPT_TEMPLATE",
    "SPLITS",
    "prompt",
    "read_idx",
    "to_text",
    "write_jsonl",
]

LABELS: tuple[str, ...] = tuple("0123456789")
FORMATS: tuple[str, ...] = ("text", "prompt-response", "chat")
SPLITS: dict[str, tuple[int, int | None]] = {"train": (0, 8000), "eval": (8000, 10000),
                                              "all": (0, None)}

PROMPT_TEMPLATE = (
    "Which digit (0-9) is drawn below? The image is {size}x{size} pixels, one line per row; "
    "each pixel is its brightness from 0 (background) to 9 (ink).\n\n"
    "{text}\n\n"
    "Answer with the digit only."
)

# idx type codes -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (MNIST's format; gzip recognised by its magic bytes).

    Validates the magic number (two zero bytes, a known type code, 1-4 dimensions), that
    the dimensions are non-zero and that the payload size matches them exactly; raises
    :class:`DataError` naming the file otherwise. Returns a native-endian array of shape
    ``dims`` (uint8 for MNIST: ``(n,)`` labels, ``(n, 28, 28)`` images).
    """
    path = Path(path)
    raw = read_data_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an idx file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise DataError(
            f"{path}: bad idx magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with type "
            f"TT in 08,09,0b,0c,0d,0e and 1-4 dims NN, e.g. 0x00000803 for MNIST images, "
            f"0x00000801 for labels); is this an MNIST idx file?"
        )
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated idx header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if any(d == 0 for d in dims):
        raise DataError(f"{path}: idx dimensions {dims} contain a zero")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - head != expected:
        raise DataError(
            f"{path}: idx header says {dims} x {dtype.itemsize} bytes = {expected} bytes of "
            f"data but the file holds {len(raw) - head}; the file is truncated or corrupt"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights: the share of each output cell covered by each input pixel."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    for o in range(n_out):
        lo, hi = o * scale, (o + 1) * scale
        for i in range(int(np.floor(lo)), min(n_in, int(np.ceil(hi)))):
            m[o, i] = max(0.0, min(hi, i + 1) - max(lo, i))
    return m / m.sum(axis=1, keepdims=True)


def to_text(image: np.ndarray, size: int = 14) -> str:
    """Write a grey-scale image (values 0..255, e.g. 28x28 uint8) as ``size`` lines of digits.

    Downsampling is an area average: each output pixel is the mean of the input area it
    covers (exact block means when ``size`` divides the image side, as 14, 7 and 4 do for 28;
    fractional overlaps otherwise). Each mean ``v`` becomes the digit ``floor(v * 10 / 256)``
    (0..9: 0-25 -> 0, 26-51 -> 1, ..., 231-255 -> 9), computed in exact integer arithmetic for
    block means. Lines are joined with ``\\n``, without a trailing newline.
    """
    a = np.asarray(image)
    if a.ndim != 2:
        raise DataError(f"to_text expects a 2-D image, got shape {a.shape}")
    h, w = a.shape
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or \
            not 1 <= size <= min(h, w):
        raise DataError(f"size must be an integer in 1..{min(h, w)}, got {size!r}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise DataError(f"pixel values must lie in 0..255, found {a.min()}..{a.max()}")
    if h % size == 0 and w % size == 0 and np.issubdtype(a.dtype, np.integer):
        bh, bw = h // size, w // size
        sums = a.astype(np.int64).reshape(size, bh, size, bw).sum(axis=(1, 3))
        digits = (sums * 10) // (256 * bh * bw)
    else:
        means = _area_matrix(h, size) @ a.astype(np.float64) @ _area_matrix(w, size).T
        digits = np.floor(means * 10 / 256 + 1e-9).astype(np.int64)
    digits = np.clip(digits, 0, 9)
    return "\n".join("".join(chr(48 + int(d)) for d in row) for row in digits)


def prompt(text: str) -> str:
    """Wrap an image's text in :data:`PROMPT_TEMPLATE` for an instruction-tuned model.

    The size in the instruction is the number of lines of ``text``. Apply the model's chat
    template on top of this if it has one.
    """
    size = len(text.splitlines())
    return PROMPT_TEMPLATE.format(size=size, text=text)


_prompt = prompt  # write_jsonl's ``prompt`` flag shadows the function's name


def _row(text: str, label: str, index: int, row_format: str, prompt: bool) -> dict:
    """One output row in ``row_format`` (see the module docstring)."""
    if row_format == "text":
        return {"text": _prompt(text) if prompt else text, "label": label, "index": index}
    if row_format == "prompt-response":
        return {"prompt": _prompt(text), "response": label, "index": index}
    return {"messages": [{"role": "user", "content": _prompt(text)},
                         {"role": "assistant", "content": label}], "index": index}


def write_jsonl(
    images_path: str | Path,
    labels_path: str | Path,
    out: str | Path,
    size: int = 14,
    start: int = 0,
    stop: int | None = None,
    prompt: bool = False,
    row_format: str = "text",
) -> int:
    """Convert MNIST idx images ``[start, stop)`` to Textual MNIST JSON Lines; return the count.

    ``row_format`` is one of :data:`FORMATS` (see the module docstring). In the ``text``
    format each row is ``{"text": to_text(image, size), "label": "<digit>", "index": i}``,
    the text wrapped by :func:`prompt` when ``prompt`` is true; the generative formats
    always wrap it. The output is written atomically
    (:mod:`sparsemerge.formats.atomic`: a full disk or a read-only folder is a
    :class:`SparseMergeError`, and no temp file stays). Raises :class:`DataError` if the files
    disagree in count, the images are not 3-D uint8, a label is outside 0..9 or the range is
    empty or out of bounds.
    """
    if row_format not in FORMATS:
        raise DataError(f"unknown Textual MNIST format {row_format!r}: use one of "
                        f"{', '.join(FORMATS)}")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected an idx3 uint8 image file, found "
                        f"{images.ndim}-D {images.dtype} (did you swap --images and --labels?)")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected an idx1 label file, found {labels.ndim}-D data "
                        f"(did you swap --images and --labels?)")
    n = len(images)
    if len(labels) != n:
        raise DataError(f"{images_path} holds {n} images but {labels_path} holds "
                        f"{len(labels)} labels")
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise DataError(f"range [{start}, {stop}) is empty or outside the {n} images; "
                        f"need 0 <= start < stop <= {n}")
    bad = np.flatnonzero((labels[start:stop] < 0) | (labels[start:stop] > 9))
    if bad.size:
        i = start + int(bad[0])
        raise DataError(f"{labels_path}: label {labels[i]} of image {i} is not a digit 0-9")
    lines = [json.dumps(_row(to_text(images[i], size), str(int(labels[i])), i, row_format,
                             prompt), ensure_ascii=False)
             for i in range(start, stop)]
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode("utf-8"))
    return len(lines)
