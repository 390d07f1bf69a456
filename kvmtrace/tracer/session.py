"""The tracer: plan → load → attach → read → detach, as a context manager that yields immutable
snapshots (see kvmtrace/snapshot.py). Imports bcc lazily and no display code.

    with TraceSession(pid=None, interval=1.0) as s:
        for snap in s.snapshots(duration=10):
            ...

Attach modes come from the probe plan (plan.resolve): exact modes (kprobe, fentry) aggregate
everything in the kernel; tracepoint mode aggregates counts and syscall-bounded latency in the
kernel and streams hva ranges and memslot ioctls through one ordered ring buffer, from which
userspace derives slots visited and change types against a mirrored memslot table (mirror.py).

This module only opens (pre-flight, cflags, load, attach, open buffers), reads the maps and
closes. What the records and maps mean is the decoders' business: decode_exact.py and
decode_tp.py, joined in decode_common.py, which take plain values (records.MapContents) and
run without bcc or root.
"""

from __future__ import annotations

import ctypes as ct
from dataclasses import replace
import os
import socket
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .. import __version__
from ..errors import CapabilityMissing, KvmtraceError, PermissionProblem
from . import host, kernel, rawevents
from . import records as R
from .cflags import build_cflags, source
from .decode_common import Decoding
from .plan import KernelFacts, ProbePlan
from .selfcost import MODES as SELF_COST_MODES, CostMeter, process_cpu_s
from ..snapshot import SelfCost, Snapshot


# ----------------------------------------------------------------------------- preflight
def _name(n) -> str:
    return n.decode() if isinstance(n, bytes) else str(n)


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
    """bcc's version for metadata ("not installed" when it does not import)."""
    return kernel.bcc_version()[0] or "not installed"


def tracing_unavailable() -> str:
    """Why this host cannot trace (root, /dev/kvm, bcc, tracefs), or "" when it can. Used by
    tests and commands to skip or explain through the product's own checks."""
    ok, why = host.can_trace()
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
        ring_reader: str = "auto",
        self_cost: str = "sampled",
    ) -> None:
        if pid is not None and (not isinstance(pid, int) or pid <= 0):
            raise KvmtraceError(f"--pid must be a positive process id, not {pid!r}", exit_code=2)
        if interval <= 0:
            raise KvmtraceError(f"--interval must be positive, not {interval}", exit_code=2)
        if self_cost not in SELF_COST_MODES:
            raise KvmtraceError(f"--self-cost must be sampled, full or off, not {self_cost!r}", exit_code=2)
        self.pid = pid
        self.interval = float(interval)
        self.keep_events = events
        self.modes = modes
        self.plan = plan
        self.facts = facts
        self.max_events = max_events
        self.ringbuf_pages = ringbuf_pages
        # "mmap": batches read through the ring buffer's pages (rawevents.py); "bcc": bcc's
        # per-record callback; "auto": mmap where supported
        self.ring_reader = ring_reader
        self.self_cost = self_cost  # CostMeter mode: sampled, full or off (BPF run-time statistics)
        self._reader = None
        self.bpf = None
        self.meta: Dict[str, str] = {}
        self.slot_tables = ""  # tracepoint mode: "in kernel", or "unavailable: why"
        self.interrupted = False
        self._drain_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.decoding: Optional[Decoding] = None  # built once the plan is known (open)
        self._perf_lost = 0
        self._consumer_errors = 0
        self._seq = 0
        self._t0 = 0
        self._rusage0 = 0.0
        self._cost: Optional[CostMeter] = None
        self._seeded: set = set()  # tracepoint mode: VMM pids whose running VMs were seeded at attach

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
        ok, why = host.can_trace()
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
        self.decoding = Decoding(self.plan, keep_events=self.keep_events, max_events=self.max_events,
                                 pid=self.pid, proc_info=host.proc_info, owns_vm=host.owns_vm)
        ringbuf = True if self.facts is None or self.facts.ringbuf is None else bool(self.facts.ringbuf)
        fentry_module = None
        if any(p.attach == "fentry" for p in self.plan.ops) and self.facts is not None:
            cb = self.plan.for_op("unmap").callbacks[:1] or ("",)
            fentry_module = self.facts.kallsyms.get(cb[0]) or None
        cflags = build_cflags(
            self.plan, self.facts, pid=self.pid, ringbuf=ringbuf, ringbuf_pages=self.ringbuf_pages,
            events=self.keep_events, fentry_module=fentry_module,
        )
        from .decode_tp import tp_cflags

        cflags += tp_cflags(self.plan)
        self.cflags = cflags
        # kvmtrace's own cost: BPF run-time statistics from before the programs are attached
        # until the session closes (sampled by default: they cost two clock reads per run)
        self._cost = CostMeter(mode=self.self_cost).start()
        try:
            self.bpf = BPF(text=source().encode(), cflags=cflags)
            self._attach_kprobes()
        except KvmtraceError:
            self.close()
            raise
        except Exception as e:  # bcc raises bare Exception for every failure
            self.close()
            raise kernel.load_problem(e).error()
        # VMs that exist already: their memslots predate the trace (partial)
        known = host.vmm_pids()
        self.decoding.stream.known_vmm.update(known)
        if self._table("tp_vms") is not None:
            try:
                self._tp_setup(BPF)
            except Exception as e:  # bcc raises bare Exception for every failure
                self.close()
                if isinstance(e, KvmtraceError):
                    raise
                raise kernel.load_problem(e).error()
        if ringbuf and self.ring_reader != "bcc" and not rawevents.supported():
            import mmap

            self._reader = rawevents.RingReader.open(self.bpf["events"].map_fd,
                                                     self.ringbuf_pages * mmap.PAGESIZE)
        elif ringbuf:
            self.bpf["events"].open_ring_buffer(self._on_event)
        else:
            self.bpf["events"].open_perf_buffer(
                lambda cpu, data, size: self._on_event(None, data, size),
                page_cnt=256,
                lost_cb=self._on_lost,
            )
        self._ringbuf = ringbuf
        self._cost.watch({_name(n): f.fd for n, f in self.bpf.funcs.items()})
        # CPU time counts from here, as the snapshots' elapsed time does (the BPF compile and
        # load before it would otherwise inflate the first intervals' CPU share)
        self._rusage0 = self._cpu()
        self._t0 = time.monotonic_ns()
        self._wall0 = time.time()
        self.meta = self._make_meta()
        self._stop.clear()
        self._thread = threading.Thread(target=self._consume_loop, name="kvmtrace-events", daemon=True)
        self._thread.start()

    def _tp_setup(self, BPF) -> None:
        """Tracepoint mode: install the programs the system-call exit tail-calls (the ioctl's
        end, and the table-shifting programs it calls in turn); register the VMs running now
        (from /proc/PID/fd) as predating the trace, while no kernel program changes a VM list;
        attach the system-call programs (raw_syscalls sys_enter/sys_exit: after the tail-call
        targets, so that no ioctl's end finds them missing); then register the VMs created
        between that scan and the attach, merged with those the kernel registered since. Every
        VM created after this returns is the kernel's: ``record`` prints "attached" after it."""
        jobs = self.bpf["tp_jobs"]
        if "-DMS_TP" in self.cflags:
            # the ioctl's end, the end of a call returning a VM's new descriptor, a VM fd's close
            for i, fn in ((2, "tp_ioc_exit"), (3, "tp_fd_exit"), (4, "tp_close")):
                jobs[ct.c_int(i)] = ct.c_int(self.bpf.load_func(fn, BPF.RAW_TRACEPOINT).fd)
            self._tp_tables(BPF, jobs)
        else:
            self.slot_tables = "unavailable: memslot updates are not traced by ioctl"
        self._tp_seed(concurrent=False)
        for tp in ("sys_enter", "sys_exit"):
            self.bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=f"tp_{tp}".encode())
        self._tp_seed(concurrent=True)

    def _tp_tables(self, BPF, jobs) -> None:
        try:
            fds = [self.bpf.load_func(fn, BPF.RAW_TRACEPOINT).fd for fn in ("tp_shift_right", "tp_shift_left")]
        except Exception as e:  # bcc raises bare Exception; seen before the programs' branch-free
            # blocks: 6.12's verifier at its 1 M processed-instruction limit (E2BIG)
            # Without them a memslot update cannot keep its VM's slot table sorted: the kernel
            # marks the table broken and every op of that VM counts as underived (never
            # guessed). Counts, latency and change types are unaffected.
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            self.slot_tables = f"unavailable: the kernel refused the slot-table programs ({why[:160]})"
        else:
            for i, fd in enumerate(fds):
                jobs[ct.c_int(i)] = ct.c_int(fd)
            self.slot_tables = "in kernel"

    def _tp_seed(self, concurrent: bool) -> None:
        """Register the VMs of /proc/PID/fd that no one registered (descriptors of one VM, its
        dups, are one VM: kcmp), as predating the trace. The second seeding also ends VMs seeded
        by the first whose descriptor was closed before the system-call programs could see it."""
        found = host.vm_fds()
        for pid in sorted(set(found) | self._seeded):
            if self.pid is not None and pid != self.pid:
                continue
            self._tp_seed_pid(pid, sorted(found.get(pid, ())), concurrent)
            self._seeded.add(pid)

    def _tp_seed_pid(self, pid: int, fds: List[int], concurrent: bool) -> None:
        """Compare and merge, never overwrite: the process's VM list is rebuilt from tp_vms
        (every VM the kernel or a seeding registered: predating VMs first, by fd, then the
        kernel's in creation order), written whole, and kept only if the process's mark (bumped
        by the kernel at a KVM_CREATE_VM's entry and after every change of a list) did not move
        meanwhile; else rebuilt again. The wait before the check lets a program that read the
        old value finish (its changes then show in tp_vms and in the mark)."""
        from .decode_tp import seed_gen

        vmm, vms, vmfd = self.bpf["vmm"], self.bpf["tp_vms"], self.bpf["tp_vmfd"]
        more, marks = self.bpf["tp_vmmore"], self.bpf["vmm_mark"]
        mk = marks.Key(pid % len(marks))
        groups = _same_file_groups(pid, fds)
        for attempt in range(10):
            m0 = int(marks[mk].value)
            new = [g for g in groups if all(vmfd.get(_fdkey(vmfd, pid, fd)) is None for fd in g)]
            closed = 0
            for k, x in list(vms.items()):  # seeded, and its descriptor closed unseen meanwhile
                if (int(k.value) >= R.SEED_GEN_BASE and int(x.tgid) == pid and not int(x.flags) & R.VMF_DEAD
                        and int(x.fd) not in fds):
                    x.flags = int(x.flags) | R.VMF_DEAD
                    vms[k] = x
                    vmfd.pop(_fdkey(vmfd, pid, int(x.fd)), None)
                    closed += 1
            if not new and not closed and attempt == 0:
                return  # every VM descriptor is known already
            for g in new:
                gen = seed_gen(pid, g[0])
                v = vms.Leaf()
                v.tgid, v.fd, v.ordinal, v.tab, v.refs = pid, g[0], 0, R.NO_TAB, len(g)
                v.flags = R.VMF_PARTIAL | R.VMF_NOTAB
                vms[vms.Key(gen)] = v
                for fd in g:
                    _insert_new(vmfd, _fdkey(vmfd, pid, fd), vmfd.Leaf(gen))
            rows = [(int(k.value), R.TpVmRow.from_map(x)) for k, x in vms.items()]
            rows = [(g, r) for g, r in rows if r.tgid == pid and not r.dead]
            lst = sorted((x for x in rows if x[0] >= R.SEED_GEN_BASE), key=lambda x: x[1].fd)
            lst += sorted(x for x in rows if x[0] < R.SEED_GEN_BASE)
            lst = lst[:R.VM_LIST_MAX]
            old = vmm.get(vmm.Key(pid))
            p = vmm.Leaf()
            p.created = max([int(old.created) if old is not None else 0] + [r.ordinal for _, r in rows])
            p.n = len(lst)
            for i, (g, r) in enumerate(lst):
                if i < R.VM_PER_PROC:
                    p.gen[i], p.tab[i], p.fd[i], p.agg[i] = g, r.tab, r.fd, r.agg
                else:
                    e = more.Leaf()
                    e.gen, e.tab, e.fd, e.agg = g, r.tab, r.fd, r.agg
                    more[_fdkey(more, pid, i)] = e
            for i in range(len(lst), R.VM_LIST_MAX):
                more.pop(_fdkey(more, pid, i), None)
            vmm[vmm.Key(pid)] = p
            if concurrent:
                time.sleep(0.02)
            if int(marks[mk].value) == m0:
                break
        marks[mk] = marks.Leaf((marks[mk].value + 1) & 0xFFFFFFFF or 1)  # copies of the list are stale

    def _table(self, name: str):
        """A map of the loaded object, or None when this build does not declare it."""
        try:
            return self.bpf[name]
        except KeyError:
            return None

    def _attach_kprobes(self) -> None:
        for probe, fn, prog in R.kprobe_programs(self.plan):
            if probe == "kprobe":
                self.bpf.attach_kprobe(event=fn, fn_name=prog)
            else:
                self.bpf.attach_kretprobe(event=fn, fn_name=prog)

    def close(self) -> None:
        self._stop.set()
        if self._cost is not None:
            self._cost.close()  # BPF statistics off again (they cost a clock read per run)
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
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None

    # ------------------------------------------------------------------ event stream
    def _consume_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain()
            except Exception:  # a broken consumer must not kill the session silently
                self._consumer_errors += 1
            self._stop.wait(0.005)

    def _drain(self, timeout: float = -1) -> None:
        # one consumer at a time: libbpf's ring/perf buffer consumption is not thread-safe,
        # and two threads draining at once deliver records twice. ``timeout``: give up when
        # the consumer thread holds the buffer longer (it is draining already)
        if not self._drain_lock.acquire(timeout=timeout):
            return
        try:
            if self.bpf is None:
                return
            if self._reader is not None:
                b = self._reader.read()
                if len(b):
                    self.decoding.on_batch(b)
            elif self._ringbuf:
                self.bpf.ring_buffer_consume()
            else:
                self.bpf.perf_buffer_poll(timeout=0)
        finally:
            self._drain_lock.release()

    def _on_lost(self, n: int) -> None:
        self._perf_lost += n

    def _on_event(self, ctx, data, size) -> None:
        self.decoding.on_raw(ct.string_at(data, R.EVENT_SIZE))

    def take_events(self) -> list:
        """Raw events received since the last call (events=True), as objects."""
        return self.decoding.take_events() if self.decoding is not None else []

    def take_event_batches(self) -> tuple:
        """Raw events received since the last call (events=True): (list of HvaEventBatch,
        list of other event objects); hva events stay columns (no object per event)."""
        return self.decoding.take_event_batches() if self.decoding is not None else ([], [])

    # ------------------------------------------------------------------ snapshots
    @staticmethod
    def _cpu() -> float:
        return process_cpu_s()

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
        if self.slot_tables:  # tracepoint mode: where slots visited come from, or why they do not
            m["tp.slot_tables"] = self.slot_tables
        for p in self.plan.ops:
            m[f"plan.{p.op}"] = f"{p.attach} {p.target} latency={p.latency} slots={p.slots}"
        return m

    def _read_counters(self) -> List[int]:
        tbl = self.bpf["counters"]
        out = []
        for i in range(R.CNT_IGNORED + 1):
            v = tbl[tbl.Key(i)]
            out.append(sum(int(x) for x in v))
        return out

    def read_maps(self) -> R.MapContents:
        """Every map the decoders need, read once, as plain values."""
        b = self.bpf
        aggs, buckets = {}, {}
        for k, v in b["aggs"].items():
            key = _key(k)
            if hasattr(v, "b"):  # exact hva programs: memslot-count buckets inside the value
                aggs[key], bk = R.split_exact_agg(v)
                buckets.update(R.exact_bucket_rows(key, bk))
            else:
                aggs[key] = R.AggRow.from_map(v)
        vmm = self._table("vmm")
        msc = self._table("ms_count")
        msa = self._table("ms_aggs") if self._table("ms_inflight") is not None else None
        vms = self._table("vms")  # exact modes
        tp = None
        if self._table("tp_vms") is not None:
            tvms = {int(k.value): R.TpVmRow.from_map(v) for k, v in b["tp_vms"].items()}
            taggs = {(int(k.vm), int(k.op), int(k.owner)): R.TpAggRow.from_map(v) for k, v in b["tp_aggs"].items()}
            taggs.update(self._tp_slot_aggs(tvms))
            tp = R.TpMaps(
                aggs=taggs,
                vms=tvms,
                ms={(int(k.vm), int(k.op), int(k.owner)): R.MsRow.from_map(v) for k, v in b["ms_aggs"].items()},
            )
        return R.MapContents(
            tp=tp,
            aggs=aggs,
            counters=tuple(self._read_counters()),
            vmm=None if vmm is None else tuple(int(k.value) for k in vmm.keys()),
            ms_count=None if msc is None else {int(k.value): int(v.value) for k, v in msc.items()},
            ms_aggs=None if msa is None else {_key(k): R.MsRow.from_map(v) for k, v in msa.items()},
            vms=None if vms is None else {int(k.value): R.VmRow.from_map(v) for k, v in vms.items()},
            buckets=None if vms is None else buckets,
        )

    def _tp_slot_aggs(self, vms: Dict[int, R.TpVmRow]) -> Dict[Tuple[int, int, int], R.TpAggRow]:
        """Tracepoint mode: the aggregates of VMs that have an array slot (tp_avals), keyed as
        tp_aggs' are; a slot another VM owns (taken at the same instant) is not this VM's."""
        t = self._table("tp_avals")
        out: Dict[Tuple[int, int, int], R.TpAggRow] = {}
        if t is None:
            return out
        for gen, v in vms.items():
            if not v.agg:
                continue
            for op in range(R.NR_OPS):
                x = t[t.Key((v.agg - 1) * R.NR_OPS + op)]
                if int(x.owner) == gen:
                    row = R.TpAggRow.from_map(x)
                    if row.agg.count:
                        out[(gen, op, v.tgid)] = row
        return out

    def _tp_free_slots(self, vms: Dict[int, R.TpVmRow], gens: List[int]) -> None:
        """Free the array slots of VMs retired from the maps: zeroed, the first entry (the
        kernel's free mark) last."""
        t = self._table("tp_avals")
        if t is None:
            return
        for g in gens:
            v = vms.get(g)
            if v is None or not v.agg:
                continue
            i0 = (v.agg - 1) * R.NR_OPS
            if int(t[t.Key(i0)].owner) != g:
                continue
            for i in range(i0 + R.NR_OPS - 1, i0 - 1, -1):
                t[t.Key(i)] = t.Leaf()

    def _tp_retire(self, maps: R.MapContents) -> None:
        """Remove VMs that are gone from the kernel's maps once their final figures are read
        (the decoder keeps them): bounded tables however many VMs come and go."""
        agg_keys, ms_keys, gens = self.decoding.tp.retire(maps)
        if not gens:
            return
        b = self.bpf
        for name, keys in (("tp_aggs", agg_keys), ("ms_aggs", ms_keys)):
            t = b[name]
            for vm, op, owner in keys:
                k = t.Key()
                k.vm, k.op, k.owner = vm, op, owner
                t.pop(k, None)
        self._tp_free_slots(maps.tp.vms, gens)
        vms, slots = b["tp_vms"], b["tp_slots"]
        for g in gens:
            vms.pop(vms.Key(g), None)
        dead = set(gens)
        for k in [k for k in slots.keys() if int(k.gen) in dead]:
            slots.pop(k, None)
        # descriptors the kernel could not drop with their VM: dups and vCPUs of a VM whose
        # process exited or exec'd (its exit knows only the VM fds of its list)
        vmfd = b["tp_vmfd"]
        for k in [k for k, v in vmfd.items() if int(v.value) & ~R.FD_VCPU in dead]:
            vmfd.pop(k, None)

    def snapshot(self, drain_wait: float = -1) -> Snapshot:
        """Read every map once and build a cumulative snapshot. Its time (``mono_ns``) is the
        moment the maps are read, and kvmtrace's CPU time and BPF cost are read with them, so
        an interval's rates and CPU share divide figures by the time they really cover.
        ``drain_wait``: how long to wait for the consumer thread when it is busy decoding the
        event buffer (negative: until it is done, so the snapshot holds every event sent
        before it; ``snapshots`` waits at most one interval except for the final one)."""
        if self.bpf is None:
            raise KvmtraceError("tracer is not open")
        self._drain(timeout=drain_wait)
        mono = time.monotonic_ns()
        maps = self.read_maps()
        cpu = self._cpu() - self._rusage0
        cost = self._cost.read() if self._cost is not None else SelfCost()
        parts = self.decoding.decode(maps, extra_lost=self._perf_lost + self._consumer_errors)
        if maps.tp is not None:
            self._tp_retire(maps)
        self._seq += 1
        return Snapshot(
            seq=self._seq, wall_time=time.time(), mono_ns=mono,
            elapsed_s=(mono - self._t0) / 1e9, vms=parts.vms, hva=parts.hva,
            memslot=parts.memslot, lost_events=parts.lost_events,
            map_full=parts.map_full, unattributed=parts.unattributed,
            by_memslots=parts.by_memslots, ignored_ioctls=parts.ignored_ioctls, ambiguous=parts.ambiguous,
            self_cpu_s=cpu, meta=tuple(sorted(self.meta.items())), cost=cost,
        )

    def snapshots(self, duration: Optional[float] = None,
                  stop: Optional[Callable[[], bool]] = None) -> Iterator[Snapshot]:
        """A cumulative snapshot every interval until ``duration`` seconds pass, ``stop()`` is
        true, or Ctrl-C/SIGTERM (then one final snapshot is yielded and ``interrupted`` set)."""
        start = time.monotonic()
        nxt = start + self.interval
        step = self.interval
        while True:
            try:
                while True:
                    if self.interval != step:  # changed while waiting (top's key s): applies now
                        nxt, step = nxt - step + self.interval, self.interval
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
            # late: the consumer came back after the interval's end (it fell behind), or
            # taking the snapshot itself took long
            last = (duration is not None and time.monotonic() - start >= duration) or \
                (stop is not None and stop())
            snap = self.snapshot(drain_wait=-1 if last else self.interval)
            late = snap.mono_ns / 1e9 - target
            if late > max(0.05, self.interval / 10):  # scheduling noise is not lateness
                snap = replace(snap, late_s=round(late, 3))
            yield snap
            now = time.monotonic()
            if (duration is not None and now - start >= duration) or (stop is not None and stop()):
                return
            step = self.interval
            while nxt <= now:
                nxt += step


def _fdkey(table, tgid: int, fd: int):
    k = table.Key()
    k.tgid, k.fd = tgid, fd
    return k


def _insert_new(table, key, leaf) -> bool:
    """An insertion that never replaces an entry (BPF_NOEXIST): False when the key exists."""
    from bcc import libbcc

    return libbcc.lib.bpf_update_elem(table.map_fd, ct.byref(key), ct.byref(leaf), 1) == 0


_SYS_KCMP, _KCMP_FILE = 312, 0  # x86_64 (tracepoint mode is built for x86 only)


def _same_file_groups(pid: int, fds: List[int]) -> List[List[int]]:
    """Descriptors of ``pid`` grouped by the open file they refer to (kcmp KCMP_FILE): dup()s of
    one VM descriptor are one VM. Where kcmp fails, every descriptor is its own group."""
    libc = ct.CDLL(None, use_errno=True)
    groups: List[List[int]] = []
    for fd in sorted(fds):
        for g in groups:
            if libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, g[0], fd) == 0:
                g.append(fd)
                break
        else:
            groups.append([fd])
    return groups


def _key(k) -> tuple:
    """An op_key as (vm, op, owner[, ordinal]): the ordinal (exact modes) only when set, so a
    tracepoint-mode key stays (tgid, op, 0)."""
    ordinal = int(getattr(k, "ordinal", 0))
    base = (int(k.vm), int(k.op), int(k.owner))
    return base + (ordinal,) if ordinal else base
