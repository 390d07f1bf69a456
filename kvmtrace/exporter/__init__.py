"""Prometheus exporter: serves the tracer's latest cumulative snapshot as metrics
(collector.py: the figures; server.py: --listen, binding, the serving loop). prometheus_client
is imported only when a scrape or the server needs it."""

from .collector import DEFAULT_GRACE_S, DEFAULT_MAX_VMS, DEFAULT_PORT, Exporter, VmGate, render

__all__ = ["Exporter", "VmGate", "render", "DEFAULT_PORT", "DEFAULT_MAX_VMS", "DEFAULT_GRACE_S"]
