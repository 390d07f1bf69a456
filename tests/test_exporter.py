"""The Prometheus exporter without root: snapshots built by hand, the collector, the VM gate,
--listen parsing and binding, the serving loop with a fake session, and `promtool check metrics`
on the exposition."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest

from kvmtrace.errors import KvmtraceError, UsageError
from kvmtrace.exporter.collector import LAT_BUCKETS, Exporter, VmGate, hist_buckets, render
from kvmtrace.exporter.server import bind, parse_listen, serve
from kvmtrace.snapshot import HvaStats, Log2Hist, MemslotStats, SelfCost, Snapshot, VmInfo

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def need_tool(name: str, package: str) -> str:
    """Path of a tool scripts/setup.sh installs; in CI its absence is a failure, elsewhere a skip."""
    p = shutil.which(name)
    if p is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} missing: scripts/setup.sh installs Debian's {package} package")
        pytest.skip(f"{name} not installed (make setup installs Debian's {package} package)")
    return p


def promtool() -> str:
    return need_tool("promtool", "prometheus")


LAT_VALUES = [0, 1, 100, 127, 128, 129, 4095, 4096, 10**6, 2**35 - 1, 2**35, 10**12]
SLOT_VALUES = [0, 1, 1, 2, 3, 4, 7, 8, 300, 32764]


def make_snap(seq=1, count=7, vms=None, lat_prov="syscall", slots_prov="derived", **kw) -> Snapshot:
    vms = vms if vms is not None else (
        VmInfo("pid:100", 100, "qemu-system-x86", "web1", 2, 12, "derived", False, True, ordinal=1, memslots_max=14),
        VmInfo("pid:200", 200, "kvmtrace-wl", "", 1, 5, "derived", True, True, ordinal=0),
    )
    lat = Log2Hist.from_values(LAT_VALUES)
    slots = Log2Hist.from_values(SLOT_VALUES)
    hva = (
        HvaStats("pid:100", 100, "unmap", count=count, lat_hist=lat, lat_count=lat.total, lat_sum_ns=sum(LAT_VALUES),
                 lat_max_ns=max(LAT_VALUES), lat_provenance=lat_prov, slots_hist=slots, slots_count=slots.total,
                 slots_sum=sum(SLOT_VALUES), slots_max=32764, slots_provenance=slots_prov, underived=3),
        HvaStats("pid:200", 200, "age", count=count * 2, lat_provenance="none", slots_provenance="none"),
    )
    ms = (
        MemslotStats("pid:100", 100, "create", 12, 1, Log2Hist.from_values([5000] * 12), 60000, 5000, "syscall", "derived"),
        MemslotStats("pid:100", 100, "unknown", 2, 0, Log2Hist(), 0, 0, "none", "none"),
    )
    base = dict(seq=seq, wall_time=1.7e9 + seq, mono_ns=seq * 10**9, elapsed_s=float(seq), vms=vms, hva=hva,
                memslot=ms, lost_events=4, map_full=1, unattributed=9, self_cpu_s=0.25, ignored_ioctls=2)
    base.update(kw)
    return Snapshot(**base)


def families(exp: Exporter):
    return {f.name: f for f in text_string_to_metric_families(render(exp).decode())}


def samples(fams, name, **labels):
    return [s for f in fams.values() for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def test_histogram_buckets_are_the_kernel_buckets_exactly():
    h = Log2Hist.from_values(LAT_VALUES)
    buckets = hist_buckets(h, LAT_BUCKETS, 1e9)
    assert buckets[-1] == ("+Inf", len(LAT_VALUES))
    assert len(buckets) == len(LAT_BUCKETS) + 1
    for le, cum in buckets[:-1]:
        le_ns = round(float(le) * 1e9)
        assert le_ns + 1 & le_ns == 0, f"le {le} is not 2**i - 1 ns"
        assert cum == sum(1 for v in LAT_VALUES if v <= le_ns), le
        assert le == repr(le_ns / 1e9)  # the shortest exact spelling, no float residue
    s = hist_buckets(Log2Hist.from_values(SLOT_VALUES), range(0, 17), 1)
    assert [le for le, _ in s[:4]] == ["0.0", "1.0", "3.0", "7.0"]
    for le, cum in s[:-1]:
        assert cum == sum(1 for v in SLOT_VALUES if v <= float(le))


def test_exposition_carries_every_figure_with_the_vm_labels():
    ex = Exporter(VmGate(), plan_ops=[("unmap", "tracepoint", "kvm:kvm_unmap_hva_range", "syscall", "derived")],
                  memslots_limit=32764, build={"bcc": "0.26.0", "kernel": "6.1.0"})
    ex.update(make_snap())
    f = families(ex)
    web = dict(vm="web1[100]#1", vm_id="pid:100")
    (ops,) = samples(f, "kvmtrace_hva_operations_total", op="unmap", **web)
    assert ops.value == 7
    (cnt,) = samples(f, "kvmtrace_hva_latency_seconds_count", op="unmap", **web)
    assert cnt.value == len(LAT_VALUES)
    (sm,) = samples(f, "kvmtrace_hva_latency_seconds_sum", op="unmap", **web)
    assert sm.value == pytest.approx(sum(LAT_VALUES) / 1e9)
    (sl,) = samples(f, "kvmtrace_hva_memslots_visited_count", op="unmap", **web)
    assert sl.value == len(SLOT_VALUES)
    assert samples(f, "kvmtrace_hva_underived_operations_total", op="unmap", **web)[0].value == 3
    # no latency or slots figure for the age op of the second VM: no series, not zeros
    other = dict(vm="kvmtrace-wl[200]#?", vm_id="pid:200")
    assert samples(f, "kvmtrace_hva_operations_total", op="age", **other)[0].value == 14
    assert not samples(f, "kvmtrace_hva_latency_seconds_count", op="age")
    assert not samples(f, "kvmtrace_hva_memslots_visited_count", op="age")
    # memslot updates by change type, their latency, the VM's memslot count
    (cr,) = samples(f, "kvmtrace_memslot_updates_total", change="create", **web)
    assert cr.value == 12
    assert samples(f, "kvmtrace_memslot_update_errors_total", change="create", **web)[0].value == 1
    assert samples(f, "kvmtrace_memslot_update_latency_seconds_count", change="create")[0].value == 12
    assert samples(f, "kvmtrace_memslot_updates_total", change="unknown")[0].value == 2
    assert not samples(f, "kvmtrace_memslot_update_latency_seconds_count", change="unknown")
    assert samples(f, "kvmtrace_vm_memslots", **web)[0].value == 12
    assert samples(f, "kvmtrace_vm_memslots_max", **web)[0].value == 14
    # the second VM predates the trace: its memslot count would be wrong, so none is exported
    assert not samples(f, "kvmtrace_vm_memslots", vm_id="pid:200")
    assert samples(f, "kvmtrace_vm_memslots_complete", vm_id="pid:200")[0].value == 0
    # the VMM's pid, guest name and command: once per VM, in kvmtrace_vm_info
    (info,) = samples(f, "kvmtrace_vm_info", **web)
    assert info.value == 1 and info.labels == dict(web, pid="100", guest="web1", comm="qemu-system-x86")
    assert samples(f, "kvmtrace_vm_info", **other)[0].labels["guest"] == ""
    # kvmtrace itself
    for name, want in (("kvmtrace_lost_events_total", 4), ("kvmtrace_map_full_total", 1),
                       ("kvmtrace_unattributed_operations_total", 9), ("kvmtrace_ignored_ioctls_total", 2),
                       ("kvmtrace_tracer_cpu_seconds_total", 0.25), ("kvmtrace_kvm_memslots_limit", 32764),
                       ("kvmtrace_bpf_stats_enabled", 0), ("kvmtrace_tracer_up", 1)):
        assert samples(f, name)[0].value == want, name
    assert samples(f, "kvmtrace_bpf_stats_info")[0].labels["state"] == "unavailable"
    assert not samples(f, "kvmtrace_bpf_run_seconds_total")  # unavailable: no made-up zero cost
    assert samples(f, "kvmtrace_build_info")[0].labels["bcc"] == "0.26.0"
    assert samples(f, "kvmtrace_attach_info", op="unmap")[0].labels["attach"] == "tracepoint"


PER_VM = ("kvmtrace_hva_", "kvmtrace_memslot_", "kvmtrace_vm_")
DIMENSIONS = {"op", "change", "le"}  # what a per-VM series is per, besides the VM


def test_every_per_vm_series_carries_the_same_two_vm_labels_and_no_provenance():
    """One VM naming on every family (vm_id: the id, vm: the name), nothing else about the VM
    except in kvmtrace_vm_info, and no provenance label anywhere (kvmtrace_attach_info has it)."""
    ex = Exporter(plan_ops=[("unmap", "tracepoint", "kvm:kvm_unmap_hva_range", "syscall", "derived")])
    ex.update(make_snap(lat_prov="exact", slots_prov="exact", cost=SelfCost("enabled", 10, 1, 0.1, (("p", 10, 1),))))
    f = families(ex)
    per_vm = [s for fam in f.values() for s in fam.samples if s.name.startswith(PER_VM)]
    assert {s.name for s in per_vm} >= {"kvmtrace_hva_operations_total", "kvmtrace_hva_latency_seconds_count",
                                        "kvmtrace_memslot_updates_total", "kvmtrace_vm_alive", "kvmtrace_vm_info"}
    for s in per_vm:
        extra = {"pid", "guest", "comm"} if s.name == "kvmtrace_vm_info" else set()
        assert set(s.labels) - DIMENSIONS == {"vm_id", "vm"} | extra, (s.name, s.labels)
    for s in (s for fam in f.values() for s in fam.samples):
        assert "provenance" not in s.labels, (s.name, s.labels)
    assert samples(f, "kvmtrace_attach_info", op="unmap")[0].labels["latency"] == "syscall"


def test_a_counter_and_its_histogram_divide_without_ignoring():
    """rate(X_count) / rate(operations_total) matches series one to one: same label sets."""
    ex = Exporter()
    ex.update(make_snap())
    f = families(ex)

    def keyed(name):
        return {tuple(sorted(s.labels.items())) for s in samples(f, name)}

    ops = keyed("kvmtrace_hva_operations_total")
    for name in ("kvmtrace_hva_latency_seconds_count", "kvmtrace_hva_memslots_visited_count",
                 "kvmtrace_hva_underived_operations_total"):
        assert keyed(name) and keyed(name) <= ops, name
    assert keyed("kvmtrace_memslot_update_latency_seconds_count") <= keyed("kvmtrace_memslot_updates_total")
    vms = keyed("kvmtrace_vm_alive")
    assert keyed("kvmtrace_vm_memslots") <= vms and keyed("kvmtrace_vm_memslots_complete") == vms


def test_bpf_cost_exported_when_the_kernel_measures_it():
    ex = Exporter()
    ex.update(make_snap(cost=SelfCost("enabled", 5_000_000, 40, 0.3, (("tp_unmap", 3_000_000, 30), ("tp_ioctl", 2_000_000, 10)))))
    f = families(ex)
    assert samples(f, "kvmtrace_bpf_stats_enabled")[0].value == 1
    assert samples(f, "kvmtrace_bpf_run_seconds_total", program="tp_unmap")[0].value == pytest.approx(0.003)
    assert samples(f, "kvmtrace_bpf_runs_total", program="tp_ioctl")[0].value == 10


def test_before_the_first_snapshot_only_build_and_up_zero():
    f = families(Exporter())
    assert samples(f, "kvmtrace_tracer_up")[0].value == 0
    assert not samples(f, "kvmtrace_hva_operations_total")


def test_scrape_size_does_not_grow_with_the_event_count():
    """A scrape formats one series per (VM, op) whatever the number of events behind it."""
    sizes = []
    for count in (1, 10**3, 10**9):
        ex = Exporter()
        ex.update(make_snap(count=count))
        sizes.append(sum(len(f.samples) for f in families(ex).values()))
    assert sizes[0] == sizes[1] == sizes[2]


def vm(i, alive=True):
    return VmInfo(f"pid:{i}", i, "qemu", f"g{i}", alive=alive, ordinal=1)


def test_gate_caps_vms_counts_the_dropped_and_expires_exited_vms():
    now = [0.0]
    g = VmGate(max_vms=2, grace_s=10, clock=lambda: now[0])
    g.update([vm(1), vm(2), vm(3)])
    assert set(g.admitted) == {"pid:1", "pid:2"} and g.refused == 1 and g.dropped_total == 1
    now[0] = 5
    g.update([vm(1, alive=False), vm(2)])  # VM 1 exited: still exported during the grace (no one waits)
    assert set(g.admitted) == {"pid:1", "pid:2"} and g.refused == 0
    now[0] = 16
    g.update([vm(1, alive=False), vm(2), vm(3)])  # grace over: VM 1 drops out, VM 3 gets its place
    assert set(g.admitted) == {"pid:2", "pid:3"} and g.refused == 0 and g.expired_total == 1
    now[0] = 100
    g.update([vm(1, alive=False), vm(2), vm(3), vm(4)])  # an expired VM never comes back
    assert "pid:1" not in g.admitted and g.refused == 1 and g.dropped_total == 2


def test_exporter_reports_refused_vms_and_freezes_labels():
    ex = Exporter(VmGate(max_vms=1))
    ex.update(make_snap())
    f = families(ex)
    assert samples(f, "kvmtrace_exporter_vms", state="refused")[0].value == 1
    assert samples(f, "kvmtrace_exporter_vms_dropped_total")[0].value == 1
    assert not samples(f, "kvmtrace_hva_operations_total", vm_id="pid:200")
    # the guest name learned later does not split the VM's series
    renamed = tuple(VmInfo(v.vm_id, v.pid, v.comm, "renamed", ordinal=v.ordinal) for v in make_snap().vms)
    ex.update(make_snap(seq=2, vms=renamed))
    f = families(ex)
    assert samples(f, "kvmtrace_hva_operations_total", vm_id="pid:100")[0].labels["vm"] == "web1[100]#1"
    assert samples(f, "kvmtrace_vm_info", vm_id="pid:100")[0].labels["guest"] == "web1"


@pytest.mark.parametrize("text,want", [("127.0.0.1:9132", ("127.0.0.1", 9132)), (":80", ("", 80)),
                                       ("[::1]:9132", ("::1", 9132)), ("localhost:1", ("localhost", 1))])
def test_parse_listen(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["9132", "::1:9132", "host:", "host:0", "host:70000", "[::1]9132", "h:x"])
def test_parse_listen_rejects_with_the_fix(text):
    with pytest.raises(UsageError) as e:
        parse_listen(text)
    assert "HOST:PORT" in str(e.value) and "fix:" in str(e.value)


def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


def test_port_in_use_is_one_line_with_the_fix():
    s, port = busy_port()
    with s:
        with pytest.raises(KvmtraceError) as e:
            bind("127.0.0.1", port, Exporter())
        assert f"port {port} is in use" in str(e.value) and "--listen" in e.value.remedy
        # the command fails the same way before loading anything, without a traceback
        p = subprocess.run([sys.executable, "-c", "from kvmtrace.cli import main; main()", "exporter", "--listen",
                            f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.splitlines()[0] == f"kvmtrace: port {port} is in use on 127.0.0.1", p.stderr
    assert "Traceback" not in p.stderr


class FakeSession:
    """TraceSession's consumer interface: snapshot() and snapshots(stop=)."""

    def __init__(self, n, on_each=None):
        self.n = n
        self.calls = 0
        self.on_each = on_each

    def snapshot(self):
        self.calls += 1
        return make_snap(seq=self.calls, count=self.calls * 10)

    def snapshots(self, duration=None, stop=None):
        for _ in range(self.n):
            if stop is not None and stop():
                return
            yield self.snapshot()


def test_serve_publishes_each_snapshot_and_closes_the_port():
    ex = Exporter()
    server = bind("127.0.0.1", 0, ex)
    port = server.server_address[1]
    seen = []

    def scrape(snap):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        f = {fam.name: fam for fam in text_string_to_metric_families(body)}
        seen.append((snap.seq, samples(f, "kvmtrace_hva_operations_total", vm_id="pid:100", op="unmap")[0].value))
        assert samples(f, "process_resident_memory_bytes")  # the process collector is served too

    s = FakeSession(3)
    n = serve(s, ex, server, stop=lambda: False, on_snapshot=scrape)
    assert n == 4 and s.calls == 4  # one initial snapshot, then one per interval; scrapes took none
    assert seen == [(2, 20), (3, 30), (4, 40)]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_promtool_check_metrics_passes_on_the_exposition():
    tool = promtool()
    ex = Exporter(plan_ops=[("unmap", "tracepoint", "kvm:kvm_unmap_hva_range", "syscall", "derived")],
                  memslots_limit=32764)
    ex.update(make_snap(cost=SelfCost("enabled", 10, 1, 0.1, (("p", 10, 1),))))
    p = subprocess.run([tool, "check", "metrics"], input=render(ex), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()


# A scraper hanging up, request deadlines, abuse, TLS and basic auth: tests/test_exporter_security.py
