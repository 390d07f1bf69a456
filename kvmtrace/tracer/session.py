"""The tracer: plan → load → attach → read → detach, as a context manager that yields immutable
snapshots (see kvmtrace/snapshot.py). Imports bcc lazily and no display code.

    with TraceSession(pid=None, interval=1.0) as s:
        for snap in s.snapshots(duration=10):
            ...

Attach modes come from the probe plan (plan.resolve): exact modes (kprobe, fentry) aggregate
everything in the kernel; tracepoint mode aggregates counts and syscall-bounded latency in the
kernel and streams hva ranges and memslot ioctls through one ordered ring buffer, from which
userspace derives slots visited and change types against a mirrored memslot table (mirror.py).
"""

from __future__ import annotations

import ctypes as ct
import os
import resource
import signal
import socket
import threading
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .. import __version__
from ..consts import LOG2_BUCKETS, MS_CHANGE_DERIVE, Change, Op
from ..errors import CapabilityMissing, KvmtraceError, PermissionProblem
from . import records as R
from .cflags import build_cflags, source
from .mirror import Mirror
from .plan import KernelFacts, ProbePlan
from ..snapshot import HvaEvent, HvaStats, Log2Hist, MemslotEvent, MemslotStats, Snapshot, VmInfo, log2_bucket

OPS = {int(o): o.label for o in Op}
CHANGES = {int(c): c.label for c in Change}
CHANGES[len(Change)] = "unknown"


# ----------------------------------------------------------------------------- preflight
def have_capabilities() -> Tuple[bool, str]:
    """(ok, why not): root, or CAP_BPF + CAP_PERFMON (+ CAP_SYS_ADMIN for bcc's kprobes)."""
    if os.geteuid() == 0:
        return True, ""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(l.split()[1], 16) for l in f if l.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        eff = 0
    cap_sys_admin, cap_perfmon, cap_bpf = 21, 38, 39
    if eff & (1 << cap_sys_admin) or (eff & (1 << cap_perfmon) and eff & (1 << cap_bpf)):
        return True, ""
    return False, "tracing needs root, or CAP_BPF and CAP_PERFMON"


def ensure_tracefs() -> str:
    """Path of a mounted tracefs, mounting it at /sys/kernel/tracing when absent."""
    from .kernel import ensure_tracefs as mount_tracefs

    path, state = mount_tracefs()
    if path is None:
        raise CapabilityMissing(
            f"tracefs: {state}",
            "mount -t tracefs tracefs /sys/kernel/tracing (kernel needs CONFIG_TRACING)",
        )
    return path


def import_bcc():
    try:
        import bcc  # noqa: F401
        from bcc import BPF
    except ImportError as e:
        raise CapabilityMissing(
            f"bcc's Python bindings are not importable ({e})",
            "apt-get install python3-bpfcc, and run kvmtrace from a venv made with "
            "--system-site-packages (`make setup` does both); the PyPI package 'bcc' is unrelated",
        )
    return BPF


def bcc_version() -> str:
    try:
        import bcc

        return getattr(bcc, "__version__", "unknown")
    except ImportError:
        return "not installed"


def _load_error(e: Exception) -> KvmtraceError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = str(e).lower()
    if "kernel headers" in low or "linux/kconfig.h" in low or "no such file" in low and ".h" in low:
        return CapabilityMissing(
            f"bcc could not compile the BPF program: {msg}",
            "install kernel headers: apt-get install linux-headers-$(uname -r), or `make setup` "
            "(links the distribution's generic headers when the exact ones do not exist)",
        )
    if "operation not permitted" in low or "permission" in low:
        return PermissionProblem(f"the kernel refused the BPF program: {msg}",
                                 "run as root; check lockdown and kernel.unprivileged_bpf_disabled")
    return CapabilityMissing(f"loading the BPF program failed: {msg}",
                             "run `kvmtrace doctor` to see what this kernel supports")


def tracing_unavailable() -> str:
    """Why this host cannot trace (root, /dev/kvm, bcc, tracefs), or "" when it can. Used by
    tests and commands to skip or explain through the product's own checks."""
    ok, why = have_capabilities()
    if not ok:
        return why
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    try:
        import_bcc()
        ensure_tracefs()
    except KvmtraceError as e:
        return str(e)
    return ""


@contextmanager
def interrupt_on_signals():
    """SIGTERM and SIGHUP raise KeyboardInterrupt, so every exit path detaches and flushes."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


# ----------------------------------------------------------------------------- /proc
def vmm_pids() -> Dict[int, int]:
    """VMM processes running now: pid -> number of VMs (anon_inode:kvm-vm fds)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        fd_dir = f"/proc/{d}/fd"
        try:
            n = 0
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(f"{fd_dir}/{fd}") == "anon_inode:kvm-vm":
                        n += 1
                except OSError:
                    continue
            if n:
                out[int(d)] = n
        except OSError:
            continue
    return out


def exact_vm_id(kvm: int, pid: int) -> str:
    """VM id in exact modes: the struct kvm address and its VMM, since an address freed by one
    VM can be reused by the next."""
    return f"kvm:{kvm:#x}:{pid}"


def _owns_vm(pid: int) -> bool:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:kvm-vm":
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def proc_info(pid: int) -> Tuple[str, str, Optional[int], bool]:
    """(comm, guest name, vCPU count, alive) of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return "", "", None, False
    name = ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        for i, a in enumerate(argv[:-1]):
            if a == b"-name":
                v = argv[i + 1].decode(errors="replace")
                # QEMU: -name NAME or -name guest=NAME,debug-threads=on
                for part in v.split(","):
                    if part.startswith("guest="):
                        v = part[6:]
                        break
                else:
                    v = v.split(",")[0]
                name = v
                break
    except OSError:
        pass
    vcpus = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("anon_inode:kvm-vcpu"):
                    vcpus += 1
            except OSError:
                continue
    except OSError:
        pass
    return comm, name, vcpus, True


# ----------------------------------------------------------------------------- aggregation
class _Agg:
    """Userspace-side aggregate for one (vm, op|change)."""

    __slots__ = ("count", "errors", "sum", "max", "hist", "pid", "prov")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.sum = 0
        self.max = 0
        self.hist = [0] * LOG2_BUCKETS
        self.pid = 0
        self.prov = "none"

    def add(self, v: int, n: int = 1) -> None:
        self.count += n
        self.sum += v * n
        if v > self.max:
            self.max = v
        self.hist[log2_bucket(v)] += n


class TraceSession:
    def __init__(
        self,
        pid: Optional[int] = None,
        interval: float = 1.0,
        events: bool = False,
        modes: Optional[Tuple[str, ...]] = None,
        plan: Optional[ProbePlan] = None,
        facts: Optional[KernelFacts] = None,
        max_events: int = 2_000_000,
        ringbuf_pages: int = 4096,
    ) -> None:
        if pid is not None and (not isinstance(pid, int) or pid <= 0):
            raise KvmtraceError(f"--pid must be a positive process id, not {pid!r}", exit_code=2)
        if interval <= 0:
            raise KvmtraceError(f"--interval must be positive, not {interval}", exit_code=2)
        self.pid = pid
        self.interval = float(interval)
        self.keep_events = events
        self.modes = modes
        self.plan = plan
        self.facts = facts
        self.max_events = max_events
        self.ringbuf_pages = ringbuf_pages
        self.bpf = None
        self.meta: Dict[str, str] = {}
        self.interrupted = False
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._mirror = Mirror()
        self._derived: Dict[Tuple[str, str], _Agg] = defaultdict(_Agg)
        self._ms: Dict[Tuple[str, str], _Agg] = defaultdict(_Agg)
        self._events: deque = deque()
        self._pending: Dict[int, List[HvaEvent]] = defaultdict(list)
        self._events_dropped = 0
        self._perf_lost = 0
        self._seq = 0
        self._t0 = 0
        self._known_vmm: Dict[int, int] = {}
        self._proc_cache: Dict[int, Tuple[str, str]] = {}
        self._tp_vm: Dict[int, str] = {}
        self._exact = False
        self._tp_hva = False
        self._ms_tp = False
        self._rusage0 = 0.0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "TraceSession":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _resolve(self) -> ProbePlan:
        from .kernel import gather
        from .plan import resolve

        g = gather(trial=self.modes is None or "fentry" in self.modes)
        self.gathered = g
        self.facts = g.facts
        kwargs = {}
        if self.modes:
            kwargs["modes"] = tuple(self.modes)
        return resolve(self.facts, **kwargs)

    def open(self) -> None:
        ok, why = have_capabilities()
        if not ok:
            raise PermissionProblem(why, "run as root: sudo kvmtrace ...")
        if self.pid is not None and not os.path.exists(f"/proc/{self.pid}"):
            raise KvmtraceError(f"no process with pid {self.pid}",
                                "pass the pid of a running VMM (`kvmtrace doctor` lists the VMs running now)",
                                exit_code=2)
        ensure_tracefs()
        BPF = import_bcc()
        if self.plan is None:
            self.plan = self._resolve()
        unmap = self.plan.for_op("unmap")
        if unmap is None or not unmap.available:
            raise CapabilityMissing(
                "no way to trace unmap operations on this kernel",
                "run `kvmtrace doctor` for what is missing and how to fix it",
            )
        self._tp_hva = any(p.kind == "hva" and p.attach == "tracepoint" for p in self.plan.ops)
        self._exact = any(p.attach in ("kprobe", "fentry") for p in self.plan.ops)
        ms = self.plan.for_op("memslot_update")
        self._ms_tp = bool(ms and ms.attach == "tracepoint")
        ringbuf = True if self.facts is None or self.facts.ringbuf is None else bool(self.facts.ringbuf)
        fentry_module = None
        if any(p.attach == "fentry" for p in self.plan.ops) and self.facts is not None:
            cb = self.plan.for_op("unmap").callbacks[:1] or ("",)
            fentry_module = self.facts.kallsyms.get(cb[0]) or None
        cflags = build_cflags(
            self.plan, self.facts, pid=self.pid, ringbuf=ringbuf, ringbuf_pages=self.ringbuf_pages,
            events=self.keep_events, fentry_module=fentry_module,
        )
        self.cflags = cflags
        self._rusage0 = self._cpu()
        try:
            self.bpf = BPF(text=source().encode(), cflags=cflags)
            self._attach_kprobes()
        except KvmtraceError:
            self.close()
            raise
        except Exception as e:  # bcc raises bare Exception for every failure
            self.close()
            raise _load_error(e)
        # VMs that exist already: their memslots predate the trace (mirror marks them partial)
        self._known_vmm = vmm_pids()
        tbl = self._table("vmm")
        if tbl is not None:
            for p in self._known_vmm:
                tbl[tbl.Key(p)] = tbl.Leaf(1)
        if ringbuf:
            self.bpf["events"].open_ring_buffer(self._on_event)
        else:
            self.bpf["events"].open_perf_buffer(
                lambda cpu, data, size: self._on_event(None, data, size),
                page_cnt=256,
                lost_cb=self._on_lost,
            )
        self._ringbuf = ringbuf
        self._t0 = time.monotonic_ns()
        self._wall0 = time.time()
        self.meta = self._make_meta()
        self._stop.clear()
        self._thread = threading.Thread(target=self._consume_loop, name="kvmtrace-events", daemon=True)
        self._thread.start()

    def _table(self, name: str):
        """A map of the loaded object, or None when this build does not declare it."""
        try:
            return self.bpf[name]
        except KeyError:
            return None

    def _attach_kprobes(self) -> None:
        b = self.bpf
        for p in self.plan.ops:
            if p.attach != "kprobe":
                continue
            if p.kind == "hva":
                name = Op[p.op.upper()].name
                for i, cb in enumerate(p.callbacks[:2]):
                    opn = name if i == 0 else "AGE2"
                    b.attach_kprobe(event=cb, fn_name=f"kp_enter_{opn}_{cb}")
                    # no maxactive: bcc then attaches through perf_event_open, which the kernel
                    # cleans up even after SIGKILL (maxactive goes through kprobe_events)
                    b.attach_kretprobe(event=cb, fn_name=f"kp_exit_{opn}_{cb}")
                if p.slots_method == "handler":
                    for h in p.handlers[:1]:
                        b.attach_kprobe(event=h, fn_name=f"kp_handler_{h}")
            else:
                outer = p.callbacks[0]
                b.attach_kprobe(event=outer, fn_name="kp_ms_outer_enter")
                b.attach_kretprobe(event=outer, fn_name="kp_ms_outer_exit")
                if p.handlers and p.change_arg is not None:  # else: change type derived
                    b.attach_kprobe(event=p.handlers[0], fn_name="kp_ms_set_enter")
        if self.plan.vm_lifetime and any(p.attach == "kprobe" for p in self.plan.ops):
            init, destroy = self.plan.vm_lifetime  # VM creation and destruction (exact modes)
            b.attach_kprobe(event=init, fn_name="kp_vm_init")
            b.attach_kprobe(event=destroy, fn_name="kp_vm_destroy")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self.bpf is not None:
            try:
                self._drain()
            except Exception:
                pass
            try:
                self.bpf.cleanup()  # detaches kprobes/tracepoints, closes every fd
            finally:
                self.bpf = None

    # ------------------------------------------------------------------ event stream
    def _consume_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain()
            except Exception:  # a broken consumer must not kill the session silently
                self._events_dropped += 1
            self._stop.wait(0.005)

    def _drain(self) -> None:
        # one consumer at a time: libbpf's ring/perf buffer consumption is not thread-safe,
        # and two threads draining at once deliver records twice
        with self._drain_lock:
            if self.bpf is None:
                return
            if self._ringbuf:
                self.bpf.ring_buffer_consume()
            else:
                self.bpf.perf_buffer_poll(timeout=0)

    def _on_lost(self, n: int) -> None:
        self._perf_lost += n

    def _vm_key(self, ev) -> str:
        if ev.vm:  # exact: struct kvm * and its VMM (hva events carry the owner in e)
            return exact_vm_id(ev.vm, ev.e if ev.kind == R.EV_HVA else ev.tgid)
        return f"pid:{ev.tgid}"

    def _on_event(self, ctx, data, size) -> None:
        raw = ct.string_at(data, R.EVENT_SIZE)
        if not self.keep_events:
            # hot path, tracepoint mode: derive slots visited for one hva range
            _ts, a, b_, _c, _d, _e, _ret, kind, tgid, _tid, x, vmp = R.EVENT_STRUCT.unpack(raw)
            if kind == R.EV_HVA and not vmp:
                vm = self._tp_vm.get(tgid)
                if vm is None:
                    vm = self._tp_vm[tgid] = f"pid:{tgid}"
                with self._lock:
                    if vm not in self._mirror.created_in_trace:
                        return  # partial mirror: no derived figure (see _on_hva)
                    agg = self._derived.get((vm, OPS.get(x, "unknown")))
                    if agg is None:
                        agg = self._derived[(vm, OPS.get(x, "unknown"))]
                    agg.add(self._mirror.overlap(vm, a, b_))
                return
        ev = R.Event.from_buffer_copy(raw)
        kind = ev.kind
        with self._lock:
            if kind == R.EV_HVA:
                self._on_hva(ev)
            elif kind == R.EV_SC_END:
                pend = self._pending.pop(ev.tid, None)
                if pend:
                    for e in pend:
                        self._keep(_with_latency(e, ev.a))
            elif kind == R.EV_MEMSLOT:
                self._on_memslot(ev)
            elif kind == R.EV_VM_CREATE:
                if ev.ret >= 0:
                    self._remember(ev.tgid)
                    self._mirror.vm_created(f"pid:{ev.tgid}")
                    self._known_vmm[ev.tgid] = self._known_vmm.get(ev.tgid, 0) + 1

    def _keep(self, e) -> None:
        if not self.keep_events:
            return
        if len(self._events) >= self.max_events:
            self._events_dropped += 1
            return
        self._events.append(e)

    def _on_hva(self, ev) -> None:
        op = OPS.get(ev.x, "unknown")
        vm = self._vm_key(ev)
        memslots = self._mirror.count(vm)
        if ev.vm:  # exact mode: everything measured in the kernel
            p = self.plan.for_op(op)
            slots_ok = p is not None and p.slots == "exact"
            scanned_ok = p is not None and p.scanned == "exact"
            e = HvaEvent(ev.ts, vm, int(ev.e), ev.tid, op, ev.a, ev.b, ev.c,
                         (ev.d & 0xFFFFFFFF) if slots_ok else -1, (ev.d >> 32) if scanned_ok else -1,
                         -1 if memslots is None else memslots, "exact", "exact" if slots_ok else "none")
            self._keep(e)
            return
        # tracepoint mode: slots derived from the mirror; latency arrives with the syscall end
        if self._mirror.partial(vm):
            slots = -1  # memslots predate the trace: the mirror would undercount, so no figure
        else:
            slots = self._mirror.overlap(vm, ev.a, ev.b)
            self._derived[(vm, op)].add(slots)
        if self.keep_events:
            e = HvaEvent(ev.ts, vm, ev.tgid, ev.tid, op, ev.a, ev.b, -1, slots, -1,
                         -1 if memslots is None else memslots, "none",
                         "derived" if slots >= 0 else "none")
            self._pending[ev.tid].append(e)
            if len(self._pending) > 4096:  # threads that never end a syscall (kernel threads)
                for tid in list(self._pending)[:1024]:
                    for x in self._pending.pop(tid):
                        self._keep(x)

    def _remember(self, pid: int) -> None:
        """Name a VMM while it is alive (VM creation, first memslot update)."""
        if pid and pid not in self._proc_cache:
            comm, name, _vcpus, alive = proc_info(pid)
            if alive:
                self._proc_cache[pid] = (comm, name)

    def _on_memslot(self, ev) -> None:
        self._remember(ev.tgid)
        slot_field = ev.e & 0xFFFFFFFF
        flags = ev.e >> 32
        ok = ev.ret == 0
        vm = exact_vm_id(ev.vm, ev.tgid) if ev.vm else f"pid:{ev.tgid}"
        if ev.vm and ev.x != MS_CHANGE_DERIVE:
            # exact: change type measured by the kernel (ev.x), aggregated in the kernel
            change = CHANGES.get(ev.x, "unknown")
            if ok:
                self._mirror.update(vm, slot_field, ev.b, ev.c, ev.d, flags, True)
            cprov, lprov = "exact", "exact"
        else:
            # change type derived from the mirrored table, aggregated here
            ch = self._mirror.update(vm, slot_field, ev.b, ev.c, ev.d, flags, ok)
            change = None if (ch is None and ok) else (ch.label if ch is not None else "unknown")
            cprov, lprov = "derived", ("exact" if ev.vm else "syscall")
            if change is not None:  # None: a no-op request, KVM changed nothing
                a = self._ms[(vm, change)]
                a.add(ev.a)
                a.pid = ev.tgid
                a.prov = lprov
                if not ok:
                    a.errors += 1
        if change is not None:
            self._keep(MemslotEvent(ev.ts, vm, ev.tgid, ev.tid, change, slot_field & 0xFFFF,
                                    slot_field >> 16, ev.b, ev.c, ev.d, flags, int(ev.ret), ev.a,
                                    lprov, cprov))

    def take_events(self) -> list:
        """Raw events received since the last call (events=True)."""
        with self._lock:
            out = list(self._events)
            self._events.clear()
        return out

    # ------------------------------------------------------------------ snapshots
    @staticmethod
    def _cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def _make_meta(self) -> Dict[str, str]:
        m = {
            "host": socket.gethostname(),
            "kernel": os.uname().release,
            "kvmtrace": __version__,
            "bcc": bcc_version(),
            "start_wall": f"{self._wall0:.3f}",
            "pid_filter": "" if self.pid is None else str(self.pid),
            "interval_s": str(self.interval),
            "linear_scan": str(self.plan.linear_scan),
        }
        for p in self.plan.ops:
            m[f"plan.{p.op}"] = f"{p.attach} {p.target} latency={p.latency} slots={p.slots}"
        return m

    def _read_counters(self) -> List[int]:
        tbl = self.bpf["counters"]
        out = []
        for i in range(R.CNT_NOLAT + 1):
            v = tbl[tbl.Key(i)]
            out.append(sum(int(x) for x in v))
        return out

    def snapshot(self) -> Snapshot:
        """Read every map once and build a cumulative snapshot."""
        if self.bpf is None:
            raise KvmtraceError("tracer is not open")
        b = self.bpf
        mono = time.monotonic_ns()
        self._drain()
        aggs = {(int(k.vm), int(k.op), int(k.owner)): v for k, v in b["aggs"].items()}
        counters = self._read_counters()
        lin = bool(self.plan.linear_scan)
        hva: List[HvaStats] = []
        unattributed = 0
        vm_pids: Dict[str, int] = {}
        with self._lock:
            derived = {k: (a.count, a.sum, a.max, tuple(a.hist)) for k, a in self._derived.items()}
            ms_user = {k: (a.count, a.errors, a.sum, a.max, tuple(a.hist), a.pid, a.prov)
                       for k, a in self._ms.items()}
            known = dict(self._known_vmm)
            mirror_counts = {vm: len(t) for vm, t in self._mirror.tables.items()}
            partial = {vm: self._mirror.partial(vm) for vm in self._mirror.tables}
            dropped = self._events_dropped + self._perf_lost
        if not self._exact:
            # VMM tgids: the kernel's own set (added at KVM_CREATE_VM, never lost like an event
            # can be), those seen at start, and any other tgid with figures that owns a VM fd now
            tbl = self._table("vmm")
            if tbl is not None:
                for k in tbl.keys():
                    known.setdefault(int(k.value), 1)
            for vmraw, _op, _owner in aggs:
                if vmraw not in known and _owns_vm(vmraw):
                    known[vmraw] = 1
                    with self._lock:
                        self._known_vmm.setdefault(vmraw, 1)
        for (vmraw, opn, owner), a in sorted(aggs.items(), key=lambda kv: kv[0]):
            op = OPS.get(opn, "unknown")
            s = a.s
            count = int(s.count)
            if self._exact and vmraw > 0xFFFFFFFF:  # struct kvm pointer
                pid = owner
                vm = exact_vm_id(vmraw, pid)
                lat_prov = slots_prov = "exact"
                op_plan = self.plan.for_op(op)
                slots = (0, 0, 0, None)
                if op_plan is not None and op_plan.slots == "exact":  # one figure per operation
                    slots = (count, int(s.slots_sum), int(s.slots_max), tuple(a.slots))
                scanned = None
                if lin and op_plan is not None and op_plan.scanned == "exact":
                    scanned = int(s.scanned_sum)
            else:
                pid = vmraw
                if self.pid is None and pid not in known:
                    unattributed += count
                    continue
                vm = f"pid:{pid}"
                lat_prov, slots_prov = "syscall", "derived"
                slots = derived.get((vm, op), (0, 0, 0, None))
                scanned = None
            vm_pids[vm] = pid
            hva.append(HvaStats(
                vm_id=vm, pid=pid, op=op, count=count,
                lat_hist=Log2Hist(tuple(a.lat)),
                lat_count=count if lat_prov == "exact" else int(s.lat_count),
                lat_sum_ns=int(s.lat_sum),
                lat_max_ns=int(s.lat_max),
                lat_provenance=lat_prov,
                slots_hist=Log2Hist(slots[3]) if slots[3] else Log2Hist(),
                slots_count=slots[0], slots_sum=slots[1], slots_max=slots[2],
                slots_provenance=slots_prov if slots[0] else "none",
                scanned_sum=scanned,
                range_hist=Log2Hist(tuple(a.range)),
            ))
        memslot: List[MemslotStats] = []
        per_pid_total: Dict[int, int] = defaultdict(int)
        for (vm, change), (cnt, err, tot, mx, h, pid, prov) in sorted(ms_user.items()):
            memslot.append(MemslotStats(vm, pid, change, cnt, err, Log2Hist(h), tot, mx, prov, "derived"))
            per_pid_total[pid] += cnt
            vm_pids[vm] = pid
        msc = self._table("ms_count") if self._ms_tp else None
        if msc is not None:
            for k, v in msc.items():
                pid = int(k.value)
                missing = int(v.value) - per_pid_total.get(pid, 0)
                if missing > 0 and (self.pid is None or pid == self.pid):
                    # ioctls whose event was lost, or no-op requests: change type not observed
                    memslot.append(MemslotStats(f"pid:{pid}", pid, "unknown", missing, 0,
                                                Log2Hist(), 0, 0, "none", "none"))
        msa = self._table("ms_aggs") if self._table("ms_inflight") is not None else None
        if msa is not None:  # exact memslot programs built
            for k, v in sorted(msa.items(), key=lambda kv: (kv[0].vm, kv[0].op, kv[0].owner)):
                pid = int(k.owner)
                vm = exact_vm_id(int(k.vm), pid)
                vm_pids[vm] = pid
                memslot.append(MemslotStats(vm, pid, CHANGES.get(int(k.op), "unknown"), int(v.count),
                                            int(v.errors), Log2Hist(tuple(v.lat)),
                                            int(v.lat_sum), int(v.lat_max), "exact", "exact"))
        # VMs: every VM with figures, plus VMMs running now
        if not self._exact:
            for p in known:
                if self.pid is None or p == self.pid:
                    vm_pids.setdefault(f"pid:{p}", p)
        vms = []
        for vm, pid in sorted(vm_pids.items()):
            comm, name, vcpus, alive = proc_info(pid) if pid else ("", "", None, False)
            if alive:  # remember who it was: a VMM that exits keeps its name in the figures
                self._proc_cache[pid] = (comm, name)
            elif pid in self._proc_cache:
                comm, name = self._proc_cache[pid]
            mc = mirror_counts.get(vm)
            vms.append(VmInfo(vm, pid, comm, name, vcpus if alive else None, mc,
                              "derived" if mc is not None else "none", partial.get(vm, True), alive))
        self._seq += 1
        return Snapshot(
            seq=self._seq, wall_time=time.time(), mono_ns=mono,
            elapsed_s=(mono - self._t0) / 1e9, vms=tuple(vms), hva=tuple(hva),
            memslot=tuple(memslot), lost_events=counters[R.CNT_LOST] + dropped,
            map_full=counters[R.CNT_MAPFULL], unattributed=unattributed,
            self_cpu_s=self._cpu() - self._rusage0, meta=tuple(sorted(self.meta.items())),
        )

    def snapshots(self, duration: Optional[float] = None,
                  stop: Optional[Callable[[], bool]] = None) -> Iterator[Snapshot]:
        """A cumulative snapshot every interval until ``duration`` seconds pass, ``stop()`` is
        true, or Ctrl-C/SIGTERM (then one final snapshot is yielded and ``interrupted`` set)."""
        start = time.monotonic()
        nxt = start + self.interval
        while True:
            try:
                while True:
                    now = time.monotonic()
                    end = start + duration if duration is not None else None
                    target = nxt if end is None else min(nxt, end)
                    if now >= target or (stop is not None and stop()):
                        break
                    time.sleep(min(0.05, target - now))
            except KeyboardInterrupt:
                self.interrupted = True
                yield self.snapshot()
                return
            snap = self.snapshot()
            yield snap
            now = time.monotonic()
            if (duration is not None and now - start >= duration) or (stop is not None and stop()):
                return
            while nxt <= now:
                nxt += self.interval


def _with_latency(e: HvaEvent, lat: int) -> HvaEvent:
    from dataclasses import replace

    return replace(e, latency_ns=int(lat), lat_provenance="syscall")
