"""Fuzz the readers: mutated files must load valid or raise FormatError, nothing else.

Test support, not public API (see :mod:`sparsemerge._testing`). The command is
``python bench/fuzz_reader.py``; ``tests/test_fuzz.py`` runs a short version.

A corpus of valid adapter files is written with ``save_adapter`` (:mod:`.corpus`: every
index codec: seed, elias-fano, raw (int32 and int64), dense; every value dtype: bf16, fp16,
fp32; gates, seeded inits, sparse low-rank factors, one or two heads, empty and 1-D / 3-D
tensors). Each case picks a corpus file and applies one to three of 38 mutators
(:mod:`.mutation` holds the registry and :func:`mutate`):

- bytes (:mod:`.mutate_bytes`): truncation, bit flips, overwritten runs, inserted / deleted
  bytes, garbage appended, a header length claiming anything from 0 to 2**64 - 1 bytes,
  spliced files;
- the safetensors header (:mod:`.mutate_header`): dtype and shape lies, ``data_offsets``
  overlapping / past the end / inverted / gapped / huge / negative / mistyped, missing and
  extra keys, dropped, renamed, duplicated and extra tensors, broken ``__metadata__``,
  non-object headers;
- the sparsemerge config, the JSON in ``__metadata__`` (:mod:`.mutate_config`): any node
  deleted or replaced by a value of another type (huge and negative numbers, NaN, lone
  surrogates, deep nesting), targeted lies about nnz, shapes, codecs, dtypes, seeds, gates,
  heads, format version, renamed / dropped targets, invalid JSON text (truncated,
  5000-digit numbers, 100k-deep);
- tensor contents (:mod:`.mutate_tensors`): indices out of range / duplicate / unsorted /
  wrong count / wrong dtype or rank, elias-fano blobs with flipped bits or wrong size, NaN /
  Inf / -Inf values, values and head parameters re-encoded in another dtype or shape.

Merged multi-head model directories are the second target (:mod:`.mutate_merged`: JSON,
safetensors and layout mutations). :mod:`.targets` ties each target's corpus, mutation,
reader and checker (:mod:`.checks`) together; :mod:`.runner` runs and classifies cases.

Outcomes per case: ``loaded_identical`` / ``loaded_changed`` (the reader accepted it *and*
the independent checker finds every invariant true *and* saving and re-loading it gives
the same content; ``changed`` e.g. for a flipped mantissa bit: the format has no checksum),
``rejected_clean`` (FormatError whose message names the file), or a failure:
``other_exception`` (any other exception type, or a FormatError not naming the file),
``invalid_loaded`` (accepted but an invariant fails), ``hang`` (over the per-case time
limit), ``crash`` (the worker process died), ``big_alloc`` (the case raised the peak RSS by
more than the allocation limit), ``harness_error`` (a bug of this package).
"""

from . import mutate_bytes, mutate_config, mutate_header, mutate_tensors  # registers mutators
from .checks import adapter_digest, check_adapter, check_merged, merged_digest
from .corpus import build_corpus, build_merged_corpus, corpus_adapters
from .json_tree import config_nodes, get_at, huge_ints, random_json, sparse_specs
from .mutate_merged import MERGED_OPS, merged_op, mutate_merged
from .mutation import MUTATORS, Ctx, apply_mutators, mutate, mutator
from .runner import CaseTimeout, Outcome, Runner, run_parallel
from .safetensors_doc import ST_DTYPES, Doc, st_bytes, st_decode, st_name
from .targets import TARGETS, Target, write_merged_case

__all__ = [
    "MERGED_OPS", "MUTATORS", "ST_DTYPES", "TARGETS", "CaseTimeout", "Ctx", "Doc", "Outcome",
    "Runner", "Target", "adapter_digest", "apply_mutators", "build_corpus",
    "build_merged_corpus", "check_adapter", "check_merged", "config_nodes", "corpus_adapters",
    "get_at", "huge_ints", "merged_digest", "merged_op", "mutate", "mutate_bytes",
    "mutate_config", "mutate_header", "mutate_merged", "mutate_tensors", "mutator",
    "random_json", "run_parallel", "sparse_specs", "st_bytes", "st_decode", "st_name",
    "write_merged_case",
]
