"""Labelled text data: reading, task presets, tokenising and batching.

Four modules, each usable alone, in the order data flows through them:

* ``examples``: :class:`~.examples.Example` and :class:`~.examples.LabeledData`, what every
  reader returns.
* ``readers``: :func:`~.readers.read_table` reads a CSV / TSV / JSON-Lines file (optionally
  gzipped), validating every row; bad rows raise :class:`~sparsemerge.errors.DataError`
  naming ``file:line`` and the column, or are skipped and counted.
* ``tasks``: :data:`~.tasks.TASKS` / :func:`~.tasks.load_task`, presets for the GLUE layouts
  (SST-2, CoLA, MRPC) and the UCI SMS Spam Collection, and the small real subsets shipped in
  ``sparsemerge/datasets/`` (used without a ``data_dir``).
* ``batching``: :func:`~.batching.encode` tokenises and :func:`~.batching.batches` yields
  dynamically padded, rank-sharded, seeded batches for (DDP) training.

``textual_mnist`` builds the Textual MNIST task (images written as digit text).
"""
