"""The installed version, read from the package metadata (``pyproject.toml`` is the one place
it is written). A module of its own at the bottom of the layering, so that writers of files
(adapters, merged models, Hub commits) can record it without importing the package root."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sparsemerge")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
