"""HTTP side of the exporter: --listen parsing, binding with one-line errors, the server that
survives its network, and the loop that feeds the tracer's snapshots to the collector until a
signal stops it.

The server is one asyncio event loop on one thread: it accepts, does the TLS handshake, reads
each request's head and writes each response without a thread per connection. Formatting a scrape
(prometheus_client's exposition) runs on a fixed pool of WORKERS threads, and scrapes that
arrive while an identical one is being formatted share its result; bcrypt runs on one more
thread. So the process has the same threads whatever clients do. Every connection has deadlines:
its TLS handshake and request head within HEAD_TIMEOUT_S of being accepted, its response written
within WRITE_TIMEOUT_S, then closed within CLOSE_TIMEOUT_S. At most MAX_CONNECTIONS are open at
once; beyond that the oldest one that has not sent its request yet is dropped for the new one, so
idle or half-written connections (slowloris) cannot shut scrapers out. The listen backlog is
BACKLOG. TLS and basic authentication come from a web configuration file (webconfig.py)."""

from __future__ import annotations

import asyncio
import base64
import errno
import io
import ipaddress
import socket
import ssl
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Tuple
from urllib.parse import urlsplit

from ..errors import KvmtraceError, UsageError
from .collector import DEFAULT_PORT, Exporter
from .webconfig import WebConfig, Watched

BACKLOG = 1024  # connections the kernel queues before the server accepts them (capped by net.core.somaxconn)
WORKERS = 4  # threads formatting scrapes
MAX_CONNECTIONS = 256  # open at once; beyond, the oldest still sending its request is dropped
HEAD_TIMEOUT_S = 5.0  # from accept to the end of the request head (TLS handshake included)
WRITE_TIMEOUT_S = 10.0  # to write a response
CLOSE_TIMEOUT_S = 2.0  # then to close it (TLS: the client's close_notify)
MAX_HEAD_BYTES = 16384  # request line and headers
QUIET = (ConnectionError, TimeoutError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError)
TLS_TO_PLAIN = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                b"Client sent an HTTP request to an HTTPS server.\n")


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


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Server:
    """The exporter's HTTP(S) server on a bound, listening socket (see the module's docstring):
    ``serve_forever()`` serves on the calling thread until ``shutdown()`` from another one;
    ``server_close()`` closes the socket. ``web``: TLS and basic authentication (None: plain
    HTTP, no authentication)."""

    def __init__(self, sock: socket.socket, app, web: Optional[Watched] = None, log: Callable[[str], None] = _stderr):
        self.socket = sock
        self.server_address = sock.getsockname()
        self.app = app  # prometheus_client's WSGI app for the exporter's registry
        self.web = web
        self.log = log
        self.stats = dict(accepted=0, served=0, shared=0, dropped_idle=0, refused=0, unauthorized=0, bad_requests=0)
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._want_stop = threading.Event()
        self._started = threading.Event()
        self._done = threading.Event()
        self._conns: set = set()
        self._inflight: dict = {}  # request -> the formatting under way for it
        self._pending: "OrderedDict[asyncio.Task, None]" = OrderedDict()  # request not received yet
        self._render = self._auth = None

    # -- the interface of socketserver's servers, which serve() and the tests use
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._started.set()
        try:
            asyncio.run(self._main())
        finally:
            self._done.set()

    def shutdown(self) -> None:
        """Stop serve_forever() (from another thread) and wait for it to return."""
        self._want_stop.set()
        with self._lock:
            loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop is closed already
                pass
        if self._started.is_set():
            self._done.wait(timeout=10)

    def server_close(self) -> None:
        self.socket.close()

    # -- the event loop
    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        stop = asyncio.Event()
        with self._lock:
            if self._want_stop.is_set():
                return
            self._loop, self._stop = loop, stop
        self._render = ThreadPoolExecutor(WORKERS, thread_name_prefix="kvmtrace-http")
        self._auth = ThreadPoolExecutor(1, thread_name_prefix="kvmtrace-auth")
        self.socket.setblocking(False)
        acceptor = loop.create_task(self._accept_loop())
        try:
            await stop.wait()
        finally:
            acceptor.cancel()
            tasks = list(self._conns)
            for t in tasks:
                t.cancel()
            await asyncio.gather(acceptor, *tasks, return_exceptions=True)
            self._render.shutdown(wait=False, cancel_futures=True)
            self._auth.shutdown(wait=False, cancel_futures=True)
            with self._lock:
                self._loop = self._stop = None

    def _loop_error(self, loop, context) -> None:
        e = context.get("exception")
        if isinstance(e, (OSError,) + QUIET):  # a client's network trouble, not ours
            return
        self.log(f"kvmtrace exporter: {context.get('message', 'error')}: {type(e).__name__}: {e}")

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self.socket)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as e:
                if self.socket.fileno() < 0:
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._drop_oldest_pending()  # out of descriptors: free one, then back off
                else:
                    self.log(f"kvmtrace exporter: accept failed: {e.strerror or e}")
                await asyncio.sleep(0.05)
                continue
            self.stats["accepted"] += 1
            if len(self._conns) >= MAX_CONNECTIONS and not self._drop_oldest_pending():
                self.stats["refused"] += 1  # every place serves a request already: refuse cleanly
                conn.close()
                continue
            task = loop.create_task(self._connection(conn, addr))
            self._conns.add(task)
            self._pending[task] = None
            task.add_done_callback(self._forget)

    def _forget(self, task) -> None:
        self._conns.discard(task)
        self._pending.pop(task, None)

    def _drop_oldest_pending(self) -> bool:
        """Close the oldest connection that has not sent its request yet; False if none."""
        if not self._pending:
            return False
        task, _ = self._pending.popitem(last=False)
        self._conns.discard(task)
        task.cancel()
        self.stats["dropped_idle"] += 1
        return True

    async def _connection(self, conn: socket.socket, addr) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        deadline = loop.time() + HEAD_TIMEOUT_S
        left = lambda: max(0.001, deadline - loop.time())  # noqa: E731
        transport = None
        handed = closed = False
        try:
            web = None
            if self.web is not None:
                web = self.web.cfg
                if self.web.changed():  # reloading runs bcrypt: not on the event loop
                    web = await loop.run_in_executor(self._render, self.web.current)
            ctx = web.ssl_context if web is not None else None
            if ctx is not None and not await self._tls_hello(conn, left):
                return
            reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES)
            protocol = asyncio.StreamReaderProtocol(reader)
            handed = True  # from here asyncio owns the socket and closes it on every failure
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=ctx, ssl_handshake_timeout=left() if ctx is not None else None)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), left())
            except (asyncio.LimitOverrunError, ValueError):
                self._pending.pop(me, None)
                reply = self._error(431, "Request Header Fields Too Large")
            else:
                self._pending.pop(me, None)  # its request is in: no longer droppable
                reply = await self._request(head, web)
            await self._respond(writer, *reply)
            closed = True
        except QUIET:  # timed out, hung up, TLS refused: drop it
            pass
        except Exception as e:  # noqa: BLE001  (one line, never a traceback, and serve on)
            peer = addr[0] if isinstance(addr, tuple) else addr
            self.log(f"kvmtrace exporter: request from {peer} failed: {type(e).__name__}: {e}")
        finally:
            self._pending.pop(me, None)
            if not handed:
                conn.close()
            elif transport is not None and not closed:
                transport.abort()

    async def _tls_hello(self, conn: socket.socket, left) -> bool:
        """Wait for the client's first byte: True for a TLS handshake. A plain HTTP request to
        the TLS port is answered with a plain 400 that says so (as Go's servers do), then closed."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, left())
        finally:
            loop.remove_reader(conn.fileno())
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        if first == b"\x16" or not first:  # a TLS record, or EOF (the handshake will say so)
            return bool(first)
        if first.isalpha():
            try:
                conn.recv(MAX_HEAD_BYTES)  # read what came, so closing sends FIN, not RST
                conn.send(TLS_TO_PLAIN)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.stats["bad_requests"] += 1
        return False

    async def _request(self, head: bytes, web: Optional[WebConfig]):
        """(status, headers, body) for one request head."""
        import http.client

        line, _, rest = head.partition(b"\r\n")
        parts = line.decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._error(400, "Bad Request")
        method, target, _ = parts
        try:
            msg = http.client.parse_headers(io.BytesIO(rest))
        except (http.client.HTTPException, ValueError):
            return self._error(400, "Bad Request")
        if web is not None and web.users and not await self._authorized(msg.get("Authorization"), web):
            self.stats["unauthorized"] += 1
            return self._error(401, "Unauthorized", [("WWW-Authenticate", 'Basic realm="kvmtrace", charset="UTF-8"')])
        try:
            url = urlsplit(target)
        except ValueError:
            return self._error(400, "Bad Request")
        environ = {"REQUEST_METHOD": method, "PATH_INFO": url.path, "QUERY_STRING": url.query,
                   "HTTP_ACCEPT": msg.get("Accept"), "HTTP_ACCEPT_ENCODING": msg.get("Accept-Encoding")}
        # Scrapes asking the same thing while one is being formatted share that formatting: 200
        # at once cost one, not 200 (the figures change once per --interval anyway).
        key = tuple(sorted((k, v or "") for k, v in environ.items()))
        job = self._inflight.get(key)
        if job is None:
            job = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(self._render, self._call_app, environ))
            self._inflight[key] = job
            job.add_done_callback(lambda _: self._inflight.pop(key, None))
        else:
            self.stats["shared"] += 1
        reply = await asyncio.shield(job)
        self.stats["served"] += 1
        return reply

    def _call_app(self, environ: dict):
        got = {}

        def start_response(status, headers, exc_info=None):
            got["status"], got["headers"] = status, list(headers)

        body = b"".join(self.app(environ, start_response))
        return got["status"], got["headers"], body

    async def _authorized(self, header: Optional[str], web: WebConfig) -> bool:
        scheme, _, cred = (header or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            raw = base64.b64decode(cred.strip(), validate=True)
        except ValueError:  # binascii.Error is a ValueError
            return False
        user, sep, password = raw.partition(b":")
        if not sep:
            return False
        known = web.cached(user, password)
        if known is not None:
            return known
        return await asyncio.get_running_loop().run_in_executor(self._auth, web.check, user, password)

    @staticmethod
    def _error(code: int, phrase: str, headers=()):
        return f"{code} {phrase}", [("Content-Type", "text/plain; charset=utf-8")] + list(headers), f"{code} {phrase}\n".encode()

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: str, headers, body: bytes) -> None:
        head = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers]
        head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        writer.write("\r\n".join(head).encode("latin-1") + body)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        writer.close()
        try:  # TLS waits for the client's close_notify: a client that never sends it is cut off
            await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()


def bind(host: str, port: int, exporter: Exporter, web=None) -> Server:
    """A server for ``exporter`` bound to host:port (listening, not serving yet), or a
    KvmtraceError with the fix when the address cannot be used. ``web``: a WebConfig or a
    webconfig.Watched (TLS, basic authentication), or None."""
    from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app

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
    addr = infos[0][4][:2] if host else (("::" if fam == socket.AF_INET6 else "0.0.0.0"), port)
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
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
    if isinstance(web, WebConfig):
        web = Watched(web.path, web)
    return Server(sock, make_wsgi_app(registry), web)


def exposure_warning(server: Server) -> Optional[str]:
    """One line when the server is reachable beyond loopback without both TLS and
    authentication, saying how to restrict or secure it; None otherwise."""
    addr, port = server.server_address[:2]
    ip = ipaddress.ip_address(addr.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    web = server.web.cfg if server.web is not None else None
    tls, auth = bool(web and web.tls), bool(web and web.authenticates)
    if tls and auth:
        return None
    where = {"0.0.0.0": "every IPv4 interface", "::": "every interface"}.get(addr, addr)
    what = ("without TLS or authentication: anyone who reaches it can read it" if not (tls or auth) else
            "without TLS: passwords and metrics cross the network in clear" if auth else
            "with TLS but no authentication: anyone who reaches it can read it")
    return (f"kvmtrace exporter: warning: serving {where}, port {port}, {what}; restrict it "
            f"(--listen 127.0.0.1:{port}, a firewall) or secure it (--web.config.file with "
            f"tls_server_config and basic_auth_users: docs/exporter.md, Security)")


def serve(session, exporter: Exporter, server: Server, stop: Callable[[], bool],
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
