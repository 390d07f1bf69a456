"""Recordings, reports, comparisons and bench tables: pandas over snapshots and raw events.

Layout (each module pure unless stated):
  tables     column layout of every recorded table; Snapshot / raw events -> rows -> DataFrames
  recorder   Recorder (writes a recording directory, Parquet or CSV)
  recording  read_recording / read_inputs (the readers: raw-event tables located, not loaded;
             directories of recordings searched; every recording verified by integrity)
  integrity  a recording checked against its manifest: longest consistent prefix, or refused
  rotation   directories of rotated recordings (record --rotate), read as one recording
  input_warnings  what an input's figures cannot be trusted for (Recording.warnings: codes,
             the warnings its own tables call for, exit status 4 "inputs carry warnings")
  engine     raw events through DuckDB out of core: value counts, exact percentiles (numpy's)
  report     recordings -> summary DataFrames (per op and VM, memslot updates, memslot-count
             breakdown, lost events) and the JSON document of ``kvmtrace report --json``
  compare    two sets of recordings -> one row per op (and scenario x slots) with ratios,
             confidence intervals, a significance test and a verdict
  bench      bench directory index, run plan, seed-style table
  export     spreadsheet-safe, exact CSV (integers as integers, full precision, ISO 8601 times,
             empty cells for not applicable), JSON
  html       self-contained HTML page with matplotlib (Agg) plots
  perfetto   one recording as a Perfetto trace (TracePacket protos of the perfetto package),
             raw events streamed from the engine in time order
  render     rich tables for the terminal (rich imported inside functions only)

Nothing here imports bcc; rich and matplotlib are imported lazily inside the functions that
render.
"""
