"""Test support for sparsemerge's own test suite and benchmarks -- not public API.

Nothing here is documented for users or kept stable between releases; library code never
imports it. :mod:`sparsemerge._testing.fuzz` is the reader fuzzer (corpus, mutators and the
harness) used by ``tests/test_fuzz.py`` and ``bench/fuzz_reader.py``.
"""
