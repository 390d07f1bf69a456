"""The real `kvmtrace exporter` (root, BPF, a real VM) behind TLS and basic authentication,
scraped by Debian's Prometheus through its own TLS and basic-auth client: the workload's unmap
count must arrive exactly, a job with a wrong password must be refused (up 0, HTTP 401), and
SIGTERM must still detach and exit 0. Before that, the abuse test's phases against the real
process: threads counted in /proc with 1,000 idle connections open, 200 concurrent scrapes. The server's behaviour under abuse is tested without root
in tests/test_exporter_security.py."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import statistics
import subprocess
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvmtrace.tracer import session as S

pytestmark = pytest.mark.root

WHY = S.tracing_unavailable()
if WHY:
    pytest.skip(f"needs root, bcc, tracefs and /dev/kvm: {WHY}", allow_module_level=True)

from tests.test_exporter import need_tool  # noqa: E402
from tests.test_exporter_prometheus import KVMTRACE, Prom, free_port, get, wait_for  # noqa: E402
from tests.test_exporter_security import (CONCURRENT, IDLE, PASSWORD, basic, bcrypt_hash, client_ctx,  # noqa: E402
                                          enough_descriptors, make_pki, scrape)
from tests.test_tracer_e2e import run_workload  # noqa: E402


class TlsProm(Prom):
    """Prometheus on a loopback port scraping the exporter every second over https with basic
    auth: job kvmtrace with the right password, job wrong with a wrong one."""

    def __init__(self, d, target: str, pki):
        (d / "right").write_text(PASSWORD)
        (d / "wrong").write_text("not-" + PASSWORD)
        jobs = "".join(
            f"  - job_name: {job}\n    scheme: https\n"
            f"    tls_config:\n      ca_file: {pki}/ca.crt\n      server_name: localhost\n"
            f"    basic_auth:\n      username: prometheus\n      password_file: {d / job.replace('kvmtrace', 'right')}\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
            for job in ("kvmtrace", "wrong"))
        super().__init__(d, target, jobs=jobs)

    def up(self, job: str):
        r = self.query(f'up{{job="{job}"}}')
        return r[0][1] if r else None


def real_abuse(pid: int, port: int, ctx):
    """The abuse test's two phases against the real command (tracer running, TLS, basic auth):
    its thread count from /proc while 1,000 idle connections are open, an authenticated scrape
    during them, then 200 concurrent authenticated scrapes. Prints the figures."""
    enough_descriptors(2 * IDLE + 256)
    tasks = lambda: len(os.listdir(f"/proc/{pid}/task"))  # noqa: E731
    auth = basic("prometheus", PASSWORD)
    scrape(port, 10, "https", ctx, auth)
    base = tasks()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(IDLE)]
    during = tasks()
    during_s, status, _ = scrape(port, 30, "https", ctx, auth)
    during = max(during, tasks())
    for s in idle:
        s.close()

    def one(_):
        try:
            return scrape(port, 30, "https", ctx, auth)[:2]
        except OSError as e:
            return 30.0, repr(e)

    with ThreadPoolExecutor(CONCURRENT) as pool:
        results = list(pool.map(one, range(CONCURRENT)))
    lat = sorted(r[0] for r in results)
    failed = [r[1] for r in results if r[1] != 200]
    print(f"\nreal exporter (TLS + basic auth): {base} threads serving, {during} with {IDLE} idle connections open; "
          f"scrape during them {during_s * 1000:.0f} ms; {CONCURRENT} concurrent scrapes: {len(failed)} failed, "
          f"p50 {statistics.median(lat) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")
    assert during <= base + 2 and status == 200 and during_s < 5  # + the pool's lazily started threads
    assert not failed, failed[:5]


def test_prometheus_scrapes_the_real_exporter_through_tls_and_basic_auth(tmp_path):
    pki = make_pki(tmp_path)
    cfg = tmp_path / "web-config.yml"
    cfg.write_text(f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"  # relative: the file's dir
                   f"basic_auth_users:\n  prometheus: {bcrypt_hash(PASSWORD)}\n")
    port = free_port()
    err = open(tmp_path / "exporter.err", "w+")
    proc = subprocess.Popen([str(KVMTRACE), "exporter", "--listen", f"127.0.0.1:{port}", "--interval", "0.5",
                             "--web.config.file", str(cfg)], stdout=subprocess.DEVNULL, stderr=err)
    ctx = client_ctx(pki)
    prom = None
    try:
        wait_for(lambda: proc.poll() is None and b"kvmtrace_tracer_up 1.0" in
                 scrape(port, 2, "https", ctx, basic("prometheus", PASSWORD))[2], 120,
                 "the exporter to serve its first snapshot over TLS")
        assert scrape(port, 5, "https", ctx)[1] == 401
        with pytest.raises(urllib.error.URLError) as e:  # a client that does not trust our CA
            scrape(port, 5, "https", ssl.create_default_context(), basic("prometheus", PASSWORD))
        assert isinstance(e.value.reason, ssl.SSLCertVerificationError)
        real_abuse(proc.pid, port, ctx)
        prom = TlsProm(tmp_path, f"127.0.0.1:{port}", pki)
        wait_for(lambda: prom.up("kvmtrace") == 1, 30, "Prometheus to scrape the exporter over TLS")
        wait_for(lambda: prom.up("wrong") == 0, 30, "Prometheus' job with the wrong password to fail")
        truth = run_workload(tmp_path, "--slots", "8", "--scenario", "unmap", "--pages", "300", "--iterations", "1")
        want = truth["hva_ops"]["unmap"]
        # the VM's series joined with kvmtrace_vm_info, which has its pid
        q = (f'kvmtrace_hva_operations_total{{job="kvmtrace",op="unmap"}} * on (job, instance, vm_id) '
             f'group_left kvmtrace_vm_info{{pid="{truth["pid"]}"}}')

        def unmaps():
            r = prom.query(q)
            return r and r[0][1] == want

        wait_for(unmaps, 30, f"Prometheus to see the workload's {want} unmaps through TLS")
        assert not prom.query('kvmtrace_tracer_up{job="wrong"}')  # nothing came through the wrong password
        print(f"prometheus over TLS + basic auth: up 1, wrong password up 0, unmaps {want} exact")
    finally:
        if prom is not None:
            prom.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    err.seek(0)
    log = err.read()
    assert rc == 0, log
    assert f"serving https://127.0.0.1:{port}/metrics" in log and "probes detached" in log
    assert "warning" not in log and "Traceback" not in log, log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
