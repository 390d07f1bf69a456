"""The exporter's HTTP server against hostile clients, without root: the server of
`kvmtrace exporter` (bind + serve) with the collector fed by a fake tracer session, on
127.0.0.1. Abuse (1,000 idle half-written connections, a slowloris trickle, 200 concurrent
scrapes: the figures are printed), TLS and basic authentication through a web configuration
file in the exporter-toolkit's format, every bad web configuration as one line with the fix,
the warning when binding beyond loopback, and the numeric options refused like the other
commands'. The real command, with the tracer, through TLS and basic auth and scraped by a real
Prometheus: tests/test_exporter_tls_e2e.py."""

from __future__ import annotations

import base64
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvmtrace.errors import UsageError
from kvmtrace.exporter import server as srv
from kvmtrace.exporter.collector import Exporter
from kvmtrace.exporter.server import bind, serve
from tests.test_exporter import make_snap, need_tool

pytest.importorskip("prometheus_client")

IDLE = 1000
CONCURRENT = 200
PASSWORD = "s3cret pass"
# the server's promises (read with defaults, so that these tests run, and fail, on the server
# before them too)
WORKERS = getattr(srv, "WORKERS", 4)
HEAD_TIMEOUT_S = getattr(srv, "HEAD_TIMEOUT_S", 5.0)


def server_threads():
    return [t for t in threading.enumerate() if not t.name.startswith("abuse-client")]


class TickingSession:
    """TraceSession's consumer interface: a new snapshot every 0.2 s until stop()."""

    def __init__(self):
        self.seq = 0

    def snapshot(self):
        self.seq += 1
        return make_snap(seq=self.seq, count=self.seq)

    def snapshots(self, duration=None, stop=None):
        for _ in range(3000):  # bounded: 10 minutes at most
            if stop is not None and stop():
                return
            time.sleep(0.2)
            yield self.snapshot()


class Running:
    """bind() + serve() on a thread, as `kvmtrace exporter` runs them; stopped on exit."""

    def __init__(self, web=None, host="127.0.0.1"):
        self.ex = Exporter()
        self.server = bind(host, 0, self.ex, web) if web is not None else bind(host, 0, self.ex)
        self.port = self.server.server_address[1]
        self.flag = threading.Event()
        self.errors = []
        self.thread = threading.Thread(target=self._run, name="exporter-loop", daemon=True)

    def _run(self):
        try:
            serve(TickingSession(), self.ex, self.server, stop=self.flag.is_set)
        except BaseException as e:  # surfaced in __exit__
            self.errors.append(e)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.flag.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "serve() did not stop"
        assert not self.errors, self.errors


def scrape(port, timeout=30.0, scheme="http", context=None, headers=None):
    """(seconds, status, body) of one GET /metrics."""
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/metrics", headers=headers or {})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return time.monotonic() - t0, r.status, r.read()
    except urllib.error.HTTPError as e:
        return time.monotonic() - t0, e.code, e.read()


def enough_descriptors(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            why = f"needs {n} open files, RLIMIT_NOFILE hard limit is {hard} (ulimit -Hn {n})"
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def closed_by_peer(s: socket.socket) -> bool:
    """Has the server closed this connection (EOF or reset)? ``s`` is non-blocking."""
    try:
        return s.recv(4096) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except BlockingIOError:
        return False


def test_listen_backlog_is_at_least_128():
    """Regression: socketserver's backlog of 5 dropped SYNs under 200 concurrent scrapes."""
    ss = need_tool("ss", "iproute2")
    server = bind("127.0.0.1", 0, Exporter())
    try:
        port = server.server_address[1]
        out = subprocess.run([ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=30).stdout
        backlog = int(out.split()[2])  # Send-Q of a listening socket is its backlog
    finally:
        server.server_close()
    print(f"listen backlog {backlog}")
    assert backlog >= 128


def test_abuse_idle_connections_and_concurrent_scrapes(capsys):
    """1,000 idle half-written connections: the server's threads stay bounded, a scrape during
    and after them answers within a few seconds, and the server drops them itself; then 200
    concurrent scrapes, none failing or timing out. Prints its figures."""
    enough_descriptors(2 * IDLE + 256)
    before = len(server_threads())
    bound = WORKERS + 1 + 1 + 1  # formatting pool, bcrypt thread, event loop, the test's serve() loop
    with Running() as run:
        port = run.port
        assert scrape(port, 10)[1] == 200
        idle, refused = [], 0
        t0 = time.monotonic()
        for i in range(IDLE):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: written")  # no blank line
                s.setblocking(False)
                idle.append(s)
            except OSError:
                refused += 1
        opened_s = time.monotonic() - t0
        peak = 0
        for _ in range(5):
            peak = max(peak, len(server_threads()) - before)
            time.sleep(0.1)
        during_s, status, body = scrape(port, 30)
        assert status == 200 and b"kvmtrace_tracer_up 1.0" in body
        peak = max(peak, len(server_threads()) - before)
        # every idle connection is closed by the server, none waits for the client
        t1 = time.monotonic()
        open_ = set(range(len(idle)))
        while open_ and time.monotonic() - t1 < HEAD_TIMEOUT_S + 10:
            open_ = {i for i in open_ if not closed_by_peer(idle[i])}
            time.sleep(0.2)
        dropped_s = time.monotonic() - t1
        for s in idle:
            s.close()
        after_s, status_after, _ = scrape(port, 30)
        assert status_after == 200

        # 200 concurrent scrapes, all started together
        go = threading.Barrier(CONCURRENT)

        def one(_):
            go.wait(timeout=60)
            try:
                return scrape(port, 30)
            except OSError as e:
                return (30.0, repr(e), b"")

        with ThreadPoolExecutor(CONCURRENT, thread_name_prefix="abuse-client") as pool:
            results = list(pool.map(one, range(CONCURRENT)))
        peak = max(peak, len(server_threads()) - before)
        lat = sorted(r[0] for r in results)
        failed = [r[1] for r in results if r[1] != 200]
        stats = dict(run.server.stats) if hasattr(run.server, "stats") else {}
    with capsys.disabled():
        print(f"\nexporter abuse: {IDLE} idle half-written connections opened in {opened_s:.2f} s "
              f"({refused} refused at connect); server threads at most {peak} (bound {bound}); "
              f"scrape during them {during_s * 1000:.0f} ms; all closed by the server after "
              f"{dropped_s:.1f} s ({len(open_)} still open); scrape after them {after_s * 1000:.0f} ms\n"
              f"exporter abuse: {CONCURRENT} concurrent scrapes: {len(failed)} failed, "
              f"p50 {statistics.median(lat) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms; server counters {stats}")
    assert peak <= bound, f"{peak} server threads for {IDLE} idle connections"
    assert during_s < 5 and after_s < 5
    assert not open_, f"{len(open_)} idle connections still open after {dropped_s:.1f} s"
    assert not failed, failed[:5]
    assert lat[-1] < 30


def test_slowloris_trickle_is_dropped_at_the_deadline():
    """A client that keeps sending one byte a second never finishes its request: the server
    drops it HEAD_TIMEOUT_S after it connected, however busy the trickle keeps it."""
    with Running() as run:
        s = socket.create_connection(("127.0.0.1", run.port), timeout=5)
        s.settimeout(0.5)
        t0 = time.monotonic()
        closed_at = None
        try:
            for ch in b"GET /metrics HTTP/1.1\r\nX-Trickle: " + b"a" * 60:  # bounded: 90 s at most
                try:
                    s.sendall(bytes([ch]))
                except OSError:
                    closed_at = time.monotonic() - t0
                    break
                try:
                    data = s.recv(100)  # waits 0.5 s at most
                except socket.timeout:
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    closed_at = time.monotonic() - t0
                    break
                if time.monotonic() - t0 > HEAD_TIMEOUT_S + 10:
                    break
        finally:
            s.close()
        assert scrape(run.port, 10)[1] == 200
    print(f"slowloris trickle dropped after {closed_at} s")
    assert closed_at is not None and closed_at < HEAD_TIMEOUT_S + 3


def test_oversized_and_malformed_requests_get_a_status_and_the_server_serves_on():
    with Running() as run:
        def raw(data: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", run.port), timeout=10) as s:
                s.sendall(data)
                out = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return out
                    out += chunk

        assert raw(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 40000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")
        assert raw(b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(b"\x00\xff\x16garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
        assert scrape(run.port, 10)[1] == 200


def test_clients_hanging_up_are_quiet_and_an_unexpected_error_is_one_line(capsys):
    """Regression: a client closing before the response was written printed socketserver's
    traceback; now network trouble is silent, and a failure of ours is one line."""
    with Running() as run:
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", run.port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()  # reset at once
        assert scrape(run.port, 10)[1] == 200
        app = run.server.app

        def broken(environ, start_response):
            raise ValueError("bad")

        run.server.app = broken
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            scrape(run.port, 10)
        run.server.app = app
        assert scrape(run.port, 10)[1] == 200
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines() == ["kvmtrace exporter: request from 127.0.0.1 failed: ValueError: bad"]


# -- TLS and basic authentication


def openssl(*args, cwd):
    tool = need_tool("openssl", "openssl")
    p = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def make_pki(d: Path):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed
    by the CA (EC keys: fast), with the openssl command line."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=kvmtrace test CA", "-keyout", "ca.key", "-out", "ca.crt",
            cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", *ec, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def bcrypt_hash(password: str) -> str:
    bcrypt = pytest.importorskip("bcrypt")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


def write_config(d: Path, text: str) -> str:
    p = d / "web-config.yml"
    p.write_text(text)
    return str(p)


def client_ctx(pki, cert=False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return ctx


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_tls_and_basic_auth(tmp_path, pki):
    from kvmtrace.exporter.webconfig import load

    cfg = load(write_config(tmp_path, f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
                                      f"basic_auth_users:\n  prometheus: {bcrypt_hash(PASSWORD)}\n"))
    with Running(cfg) as run:
        port, ctx = run.port, client_ctx(pki)
        _, status, body = scrape(port, 10, "https", ctx, basic("prometheus", PASSWORD))
        assert status == 200 and b"kvmtrace_tracer_up 1.0" in body
        for headers in ({}, basic("prometheus", "wrong"), basic("nobody", PASSWORD), basic("prometheus", "x" * 100),
                        {"Authorization": "Basic !!!"}, {"Authorization": "Bearer abc"}):
            _, status, body = scrape(port, 10, "https", ctx, headers)
            assert status == 401 and b"kvmtrace_" not in body, headers
        # the right password again: from the cache, still 200
        assert scrape(port, 10, "https", ctx, basic("prometheus", PASSWORD))[1] == 200
        # plain HTTP to the TLS port: a clean 400 that says why, at once
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.0 400 ") and b"HTTPS server" in reply
        assert time.monotonic() - t0 < 3
        # a client that does not trust the certificate fails its handshake; the server serves on
        with pytest.raises(urllib.error.URLError) as e:
            scrape(port, 10, "https", ssl.create_default_context(), basic("prometheus", PASSWORD))
        assert isinstance(e.value.reason, ssl.SSLCertVerificationError)
        assert scrape(port, 10, "https", ctx, basic("prometheus", PASSWORD))[1] == 200
        assert run.server.stats["unauthorized"] == 6


def server_side_sockets(port) -> int:
    """Connections on the server's port that the server has not closed (established, or
    closed by the client only); one it closed is in FIN-WAIT or gone."""
    ss = need_tool("ss", "iproute2")
    out = subprocess.run([ss, "-tnH", "state", "established", "state", "close-wait", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=30).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def test_abuse_over_tls(tmp_path, pki, capsys):
    """TLS in front: idle connections that send nothing, ones that stall inside their
    ClientHello, and ones that finish the handshake but not their request: the threads stay
    bounded, an authenticated scrape during them answers, all are dropped at the deadline; a
    client that never answers the server's close_notify is cut off within CLOSE_TIMEOUT_S."""
    from kvmtrace.exporter.webconfig import load

    enough_descriptors(2 * IDLE + 256)
    cfg = load(write_config(tmp_path, f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
                                      f"basic_auth_users:\n  prometheus: {bcrypt_hash(PASSWORD)}\n"))
    n = 150
    before = len(server_threads())
    bound = WORKERS + 1 + 1 + 1
    with Running(cfg) as run:
        port, ctx = run.port, client_ctx(pki)
        assert scrape(port, 10, "https", ctx, basic("prometheus", PASSWORD))[1] == 200
        idle = []
        t0 = time.monotonic()
        for i in range(3 * n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 3 == 1:  # a ClientHello record announcing 512 bytes, 4 sent
                s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc")
            elif i % 3 == 2:  # handshake done, request half written
                s = ctx.wrap_socket(s, server_hostname="localhost")
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")
            idle.append(s)
        opened_s = time.monotonic() - t0
        peak = len(server_threads()) - before
        during_s, status, _ = scrape(port, 30, "https", ctx, basic("prometheus", PASSWORD))
        peak = max(peak, len(server_threads()) - before)
        t1 = time.monotonic()
        while server_side_sockets(port) > 0 and time.monotonic() - t1 < HEAD_TIMEOUT_S + 10:
            time.sleep(0.3)
        left, dropped_s = server_side_sockets(port), time.monotonic() - t1
        for s in idle:
            s.close()
        # a client that reads its response and then sits on the connection
        raw = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
        auth = basic("prometheus", PASSWORD)["Authorization"]
        raw.sendall(f"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\n\r\n".encode())
        got = b""
        while b"kvmtrace_tracer_up" not in got:
            got += raw.recv(65536)
        t2 = time.monotonic()
        while server_side_sockets(port) > 0 and time.monotonic() - t2 < 40:
            time.sleep(0.2)
        cut_s = time.monotonic() - t2
        raw.close()
    with capsys.disabled():
        print(f"\nexporter abuse over TLS: {3 * n} idle connections (silent, stalled ClientHello, half-written request) "
              f"opened in {opened_s:.2f} s; server threads at most {peak} (bound {bound}); authenticated scrape during "
              f"them {during_s * 1000:.0f} ms; server-side sockets left after {dropped_s:.1f} s: {left}; a client "
              f"ignoring close_notify cut off after {cut_s:.1f} s")
    assert status == 200 and during_s < 5
    assert peak <= bound
    assert left == 0
    assert cut_s < getattr(srv, "CLOSE_TIMEOUT_S", 2.0) + 2


def test_client_certificates_required(tmp_path, pki):
    from kvmtrace.exporter.webconfig import load

    cfg = load(write_config(tmp_path, f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
                                      f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki}/ca.crt\n"))
    assert cfg.authenticates and srv.exposure_warning(bind("127.0.0.1", 0, Exporter(), cfg)) is None
    with Running(cfg) as run:
        assert scrape(run.port, 10, "https", client_ctx(pki, cert=True))[1] == 200
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            scrape(run.port, 10, "https", client_ctx(pki, cert=False))
        assert scrape(run.port, 10, "https", client_ctx(pki, cert=True))[1] == 200


def test_web_config_change_is_picked_up_and_a_bad_change_keeps_the_old_one(tmp_path, pki, capsys):
    from kvmtrace.exporter.webconfig import Watched

    path = write_config(tmp_path, f"basic_auth_users:\n  a: {bcrypt_hash('one')}\n")
    lines = []
    with Running(Watched(path, log=lines.append)) as run:
        assert scrape(run.port, 10, headers=basic("a", "one"))[1] == 200
        time.sleep(0.05)
        Path(path).write_text(f"basic_auth_users:\n  a: {bcrypt_hash('two')}\n")
        assert scrape(run.port, 10, headers=basic("a", "one"))[1] == 401
        assert scrape(run.port, 10, headers=basic("a", "two"))[1] == 200
        Path(path).write_text("basic_auth_users:\n  a: two-in-clear\n")
        assert scrape(run.port, 10, headers=basic("a", "two"))[1] == 200
    assert len(lines) == 1 and "not applied" in lines[0] and "basic_auth_users.a is not a bcrypt hash" in lines[0]


def sample_config() -> str:
    return (Path(__file__).resolve().parent.parent / "deploy" / "web-config.yml").read_text()


def test_the_sample_web_config_loads_once_filled_in(tmp_path, pki):
    from kvmtrace.exporter.webconfig import load

    text = sample_config().replace("/etc/kvmtrace/exporter.crt", f"{pki}/server.crt") \
        .replace("/etc/kvmtrace/exporter.key", f"{pki}/server.key")
    with pytest.raises(UsageError) as e:  # its placeholder hash is refused on purpose
        load(write_config(tmp_path, text))
    assert "basic_auth_users.prometheus is not a bcrypt hash" in str(e.value)
    cfg = load(write_config(tmp_path, text.replace("REPLACE-WITH-A-BCRYPT-HASH", bcrypt_hash("x"))))
    assert cfg.tls and cfg.users.keys() == {"prometheus"}


BAD = [
    ("tls_server_config: [unclosed", "not valid YAML at line 1"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("tls_server_confg: {}\n", "unknown key tls_server_confg"),
    ("rate_limit: {interval: 1s, burst: 5}\n", "rate_limit is not supported by kvmtrace"),
    ("tls_server_config:\n  cert_file: {d}/server.crt\n  key_file: {d}/server.key\n  cipher_suites: [X]\n",
     "tls_server_config.cipher_suites is not supported"),
    ("tls_server_config:\n  cert_file: {d}/server.crt\n", "tls_server_config.key_file must be a file name"),
    ("tls_server_config:\n  cert_file: {d}/nope.crt\n  key_file: {d}/server.key\n", "nope.crt: no such file"),
    ("tls_server_config:\n  cert_file: {d}/server.crt\n  key_file: {d}/client.key\n", "cannot use cert_file"),
    ("tls_server_config:\n  cert_file: {d}/server.key\n  key_file: {d}/server.key\n", "cannot use cert_file"),
    ("tls_server_config:\n  cert_file: {d}/server.crt\n  key_file: {d}/server.key\n  client_auth_type: RequireAnyClientCert\n",
     "accepts unverified client certificates"),
    ("tls_server_config:\n  cert_file: {d}/server.crt\n  key_file: {d}/server.key\n  client_auth_type: RequireAndVerifyClientCert\n",
     "needs client_ca_file"),
    ("tls_server_config:\n  cert_file: {d}/server.crt\n  key_file: {d}/server.key\n  min_version: SSL3\n",
     "min_version 'SSL3' is not one of"),
    ("basic_auth_users:\n  prometheus: hunter2\n", "basic_auth_users.prometheus is not a bcrypt hash"),
    ("basic_auth_users: [prometheus]\n", "basic_auth_users must map user names"),
    ("basic_auth_users:\n  'a:b': $2b$04$abcdefghijklmnopqrstuu\n", "is not a user name"),
]


@pytest.mark.parametrize("text,want", BAD, ids=[w for _, w in BAD])
def test_a_bad_web_config_is_one_error_with_the_fix(tmp_path, pki, text, want):
    from kvmtrace.exporter.webconfig import load

    with pytest.raises(UsageError) as e:
        load(write_config(tmp_path, text.replace("{d}", str(pki))))
    assert want in e.value.message and e.value.remedy, str(e.value)


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-c", "from kvmtrace.cli import main; main()", "exporter", *args],
                          capture_output=True, text=True, timeout=timeout)


def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


def test_the_command_refuses_a_bad_web_config_in_one_line_before_tracing(tmp_path):
    p = run_cli("--web.config.file", write_config(tmp_path, "basic_auth_users:\n  prometheus: hunter2\n"))
    assert p.returncode == 2
    first, fix = p.stderr.splitlines()
    assert first.startswith("kvmtrace: --web.config.file ") and "is not a bcrypt hash" in first
    assert fix.startswith("  fix: hash the password with")


@pytest.mark.parametrize("option,value", [("--interval", "nan"), ("--interval", "inf"), ("--interval", "0"),
                                          ("--interval", "-1"), ("--interval", "99999"), ("--vm-grace", "nan"),
                                          ("--vm-grace", "inf"), ("--vm-grace", "1e300"), ("--max-vms", "10000000"),
                                          ("--pid", "0"), ("--pid", "99999999")])
def test_numeric_options_are_refused_like_the_other_commands(option, value):
    """Regression: --interval nan/inf and --vm-grace nan were accepted (nan froze the figures,
    a nan grace never expired a VM). A busy port stops the old code before it traces."""
    s, port = busy_port()
    with s:
        p = run_cli(option, value, "--listen", f"127.0.0.1:{port}")
    assert p.returncode == 2
    assert f"Invalid value for '{option}'" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "in use" not in p.stderr


def test_warning_when_bound_beyond_loopback(tmp_path, pki):
    from kvmtrace.exporter.webconfig import load

    for host in ("127.0.0.1", "::1", "localhost"):
        s = bind(host, 0, Exporter())
        assert srv.exposure_warning(s) is None, host
        s.server_close()
    s = bind("", 0, Exporter())  # --listen :PORT
    w = srv.exposure_warning(s)
    port = s.server_address[1]
    s.server_close()
    assert w.startswith("kvmtrace exporter: warning: serving every IPv4 interface") and "\n" not in w
    assert f"--listen 127.0.0.1:{port}" in w and "--web.config.file" in w and "without TLS or authentication" in w
    tls = f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
    auth = f"basic_auth_users:\n  p: {bcrypt_hash('x')}\n"
    for text, want in ((tls, "with TLS but no authentication"), (auth, "without TLS: passwords"), (tls + auth, None)):
        s = bind("0.0.0.0", 0, Exporter(), load(write_config(tmp_path, text)))
        w = srv.exposure_warning(s)
        s.server_close()
        assert (w is None) if want is None else (want in w), (text, w)
