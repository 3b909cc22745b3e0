"""The data-pipeline side of pairscore: ``pairscore score``, ``filter`` and ``report``.

* :mod:`~pairscore.pipeline.formats` - which format a file is in (JSONL, CSV/TSV, Parquet)
* :mod:`~pairscore.pipeline.row_reader` / :mod:`~pairscore.pipeline.line_writer` - rows in
  (a truncated or damaged file is an error, never fewer rows) and JSONL/CSV rows out
* :mod:`~pairscore.pipeline.storage` - where they live: local or fsspec URLs, globs and
  directories of shards
* :mod:`~pairscore.pipeline.compression` - gzip, zstd, bz2, xz: written one member per
  checkpoint, read with every member checked
* :mod:`~pairscore.pipeline.columns` - the score columns added to each row, the metrics
* :mod:`~pairscore.pipeline.row_batches` - a batch of table rows in, its score columns out
  (what :mod:`pairscore.hf` and :mod:`pairscore.ray` map over a dataset)
* :mod:`~pairscore.pipeline.selection` - thresholds and the exact top fraction;
  :mod:`~pairscore.pipeline.top_fraction` - its two passes over the scored file
* :mod:`~pairscore.pipeline.parts` / :mod:`~pairscore.pipeline.chunked_part` - outputs written
  beside their final path (or as chunk files, for Parquet, URLs and directories), then renamed
  or committed
* :mod:`~pairscore.pipeline.job` / :mod:`~pairscore.pipeline.runner` - one run, resumable
  (:mod:`~pairscore.pipeline.run_record`: whether it resumes, what it saves);
  :mod:`~pairscore.pipeline.state_file` - its checkpoint, and the record of a complete run
* :mod:`~pairscore.pipeline.progress`, :mod:`~pairscore.pipeline.stats`,
  :mod:`~pairscore.pipeline.summary` - what the user sees while and after it runs
* :mod:`~pairscore.pipeline.report` - the histogram PNG
* :mod:`~pairscore.pipeline.commands` - the argparse side of the three commands

Nothing here imports pyarrow or matplotlib until a Parquet file or a report
is asked for, nor a filesystem's package (s3fs...) until one of its URLs is.
"""
