"""Labelled text data: reading, task presets, tokenising and batching.

Five modules, each usable alone, in the order data flows through them:

* ``examples``: :class:`~.examples.Example` and :class:`~.examples.LabeledData`, what every
  reader returns; :class:`~.examples.LMData` holds conversations for the causal-LM objective.
* ``readers``: :func:`~.readers.read_table` reads a CSV / TSV / JSON-Lines file (optionally
  gzipped), validating every row; bad rows raise :class:`~sparsemerge.errors.DataError`
  naming ``file:line`` and the column, or are skipped and counted. :func:`~.readers.read_lm`
  reads prompt/response rows or chat ``messages`` the same way.
* ``tasks``: :data:`~.tasks.TASKS` / :func:`~.tasks.load_task`, presets for the GLUE layouts
  (SST-2, CoLA, MRPC) and the UCI SMS Spam Collection, and the small real subsets shipped in
  ``sparsemerge/datasets/`` (used without a ``data_dir``).
* ``templates``: :class:`~.templates.PromptTemplate` turns a row into the prompt an
  instruction model answers (a format string over the columns, optionally a chat turn).
* ``batching``: :func:`~.batching.encode` (classification) and :func:`~.batching.encode_lm`
  (loss on the response only) tokenise, truncating long examples from the side away from
  the answer; :func:`~.batching.batches` yields dynamically padded, rank-sharded, seeded
  batches for (DDP) training.

``textual_mnist`` builds the Textual MNIST task (images written as digit text).
"""
