"""HTTP side of the exporter: --listen parsing, binding with one-line errors, and the loop that
feeds the tracer's snapshots to the collector until a signal stops it."""

from __future__ import annotations

import errno
import socket
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Callable, Optional, Tuple

from ..errors import KvmtraceError, UsageError
from .collector import DEFAULT_PORT, Exporter


def parse_listen(text: str) -> Tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (every IPv4 interface) -> (host, port)."""
    fix = f"--listen takes HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}, [::1]:{DEFAULT_PORT} or :{DEFAULT_PORT} (every IPv4 interface)"
    t = (text or "").strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UsageError(f"--listen {text!r}: not HOST:PORT", fix)
        port_s = rest[1:]
    else:
        host, sep, port_s = t.rpartition(":")
        if not sep or ":" in host:
            raise UsageError(f"--listen {text!r}: not HOST:PORT (write IPv6 addresses in brackets)", fix)
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise UsageError(f"--listen {text!r}: port must be 1-65535", fix)
    return host, int(port_s)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        """A scraper that hangs up early (its timeout) is normal; anything else is one line on
        stderr, never socketserver's traceback."""
        e = sys.exc_info()[1]
        if isinstance(e, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)):
            return
        print(f"kvmtrace exporter: request from {client_address[0]} failed: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


def bind(host: str, port: int, exporter: Exporter) -> ThreadingHTTPServer:
    """An HTTP server for ``exporter`` bound to host:port (not serving yet), or a KvmtraceError
    with the fix when the address cannot be used."""
    from prometheus_client import CollectorRegistry, ProcessCollector
    from prometheus_client.exposition import MetricsHandler

    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    ProcessCollector(registry=registry)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--listen {where}: cannot resolve {host!r} ({e.strerror})",
                         "give an IP address of this host, e.g. 127.0.0.1") from None
    fam = infos[0][0]
    cls = _Server6 if fam == socket.AF_INET6 else _Server
    addr = infos[0][4][:2] if host else (("::" if fam == socket.AF_INET6 else "0.0.0.0"), port)
    try:
        return cls(addr, MetricsHandler.factory(registry))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise KvmtraceError(f"port {port} is in use on {host or 'every IPv4 interface'}",
                                f"stop what listens there (ss -ltnp 'sport = :{port}') or pick another port: "
                                f"--listen {host or '127.0.0.1'}:PORT", exit_code=2) from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"--listen {where}: {host} is not an address of this host",
                             "use 127.0.0.1, or an address shown by `ip addr`") from None
        if e.errno == errno.EACCES:
            raise KvmtraceError(f"--listen {where}: not allowed to bind port {port}",
                                "use a port above 1023 or run with CAP_NET_BIND_SERVICE", exit_code=2) from None
        raise KvmtraceError(f"--listen {where}: {e.strerror}", "check the address and port", exit_code=2) from None


def serve(session, exporter: Exporter, server: ThreadingHTTPServer, stop: Callable[[], bool],
          on_snapshot: Optional[Callable] = None) -> int:
    """Serve scrapes from a thread while the tracer loop publishes a snapshot every interval,
    until ``stop()`` or a signal; returns the number of snapshots published. The server is
    shut down and its socket closed on every exit path."""
    exporter.update(session.snapshot())
    n = 1
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                         name="kvmtrace-exporter-http", daemon=True)
    t.start()
    try:
        for snap in session.snapshots(stop=stop):
            exporter.update(snap)
            n += 1
            if on_snapshot is not None:
                on_snapshot(snap)
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=5)
    return n
