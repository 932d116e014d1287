"""The one exception family sparsemerge raises for bad input."""

from __future__ import annotations

import importlib
from types import ModuleType


class SparseMergeError(Exception):
    """Anything wrong with user input: files, tensors, data rows, bases, options.

    Messages name the offending file / tensor / row and say how to fix it.
    """


class FormatError(SparseMergeError):
    """An adapter or merged-model file is malformed, corrupt or inconsistent."""


class BaseMismatchError(SparseMergeError):
    """An adapter is applied to (or merged on) a base it was not trained on."""


class DataError(SparseMergeError):
    """A data file has a malformed row, unknown label, empty text or missing column."""


class HubError(SparseMergeError):
    """A Hub operation failed (auth, missing repo/revision, offline cache miss)."""


def import_extra(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import an optional dependency, or raise :class:`SparseMergeError` naming the extra that
    installs it: a bare ``ModuleNotFoundError`` traceback does not say what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SparseMergeError(
            f"{needed_for} needs {module!r}, which is not installed or does not import ({exc}): "
            f"pip install 'sparsemerge[{extra}]'") from None
