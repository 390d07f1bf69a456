"""Probe plan, BPF loading/attaching (bcc, imported lazily) and map reading. Produces immutable
snapshots (``snapshot.Snapshot``); imports no display code."""
