"""The live view of ``kvmtrace top`` (also used by ``kvmtrace demo``).

- ``model``: per-VM rows computed from snapshots (pure, no rich)
- ``view``: ``render(cum, delta, meta, plan, opts, width)`` -> rich renderable (pure)
- ``plain``: --once table, --log lines, --csv rows (pure formatters + a CSV sink)
- ``live``: ``run_live(session, ...)`` drives a TraceSession; ``terminal``: key input
"""
