"""Gather ``KernelFacts`` (the probe-plan resolver's input) from the running system.

Sources: /proc/kallsyms (text symbols), BTF (/sys/kernel/btf/vmlinux and the kvm module's split
BTF), tracefs events, the kernel config (/proc/config.gz or /boot/config-$(uname -r)), the kprobe
PMU / kprobe_events, lockdown, and *real trial loads*: a tiny fentry program on a KVM function
through bcc (imported lazily), and a ring-buffer map creation through the bpf() syscall.

Also a fixture dumper for tests/fixtures/kernels:
``python3 -m kvmtrace.tracer.kernel --dump-fixture [--no-trial]``.
"""

from __future__ import annotations

import ctypes
import errno
import gzip
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

from .plan import FUNCS_OF_INTEREST, STRUCTS_OF_INTEREST, TRACEPOINTS_OF_INTEREST, KernelFacts

if TYPE_CHECKING:
    from ..errors import Problem

BTF_DIR = "/sys/kernel/btf"
TRACEFS = "/sys/kernel/tracing"
TRACEFS_OLD = "/sys/kernel/debug/tracing"
SECURITYFS = "/sys/kernel/security"
FENTRY_PROBE_FUNC = "kvm_mmu_notifier_invalidate_range_start"



# --- small readers -------------------------------------------------------------------------


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def kallsyms(names: Optional[Iterable[str]] = None, path: str = "/proc/kallsyms") -> Tuple[Dict[str, str], Dict[str, str]]:
    """Text symbols -> module ("" for vmlinux), restricted to ``names`` when given, and for
    names absent in plain form, the compiler clone present (``foo.isra.0``, ``foo.constprop.0``).
    Names are readable without privilege (addresses are zeroed then; we ignore them)."""
    want = set(names) if names is not None else None
    syms: Dict[str, str] = {}
    clones: Dict[str, str] = {}
    try:
        f = open(path)
    except OSError:
        return syms, clones
    with f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or parts[1] not in ("t", "T"):
                continue
            name = parts[2]
            mod = parts[3].strip("[]") if len(parts) > 3 else ""
            if want is None:
                syms.setdefault(name, mod)
                continue
            if name in want:
                syms.setdefault(name, mod)
            elif "." in name:
                base = name.split(".", 1)[0]
                if base in want:
                    clones.setdefault(base, name)
    for base in list(clones):
        if base in syms:
            del clones[base]
    return syms, clones


def kernel_config(release: Optional[str] = None) -> Tuple[Optional[Dict[str, str]], str]:
    """The kernel config as {CONFIG_X: value} (``"n"`` for '# CONFIG_X is not set'), and its
    source path; None when neither /proc/config.gz nor /boot/config-<release> exists."""
    release = release or platform.release()
    text = None
    src = ""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            text = f.read()
            src = "/proc/config.gz"
    except OSError:
        p = f"/boot/config-{release}"
        text = _read(p)
        src = p if text is not None else ""
    if text is None:
        return None, ""
    cfg: Dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            cfg[k] = v
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            cfg[line[2:].split(" ", 1)[0]] = "n"
    return cfg, src


def tracefs_path() -> Optional[str]:
    """Where tracefs is mounted (events readable), or None."""
    for p in (TRACEFS, TRACEFS_OLD):
        if os.path.isdir(os.path.join(p, "events")):
            return p
    return None


def ensure_tracefs() -> Tuple[Optional[str], str]:
    """Mount tracefs at /sys/kernel/tracing when it is not mounted (root only).
    Returns (path or None, what happened)."""
    p = tracefs_path()
    if p:
        return p, "mounted"
    if os.geteuid() != 0:
        return None, "not mounted (mounting needs root)"
    try:
        _mount("nodev", TRACEFS, "tracefs")
    except OSError as e:
        return None, f"not mounted, and mounting failed: {os.strerror(e.errno)}"
    return (TRACEFS, "mounted by kvmtrace") if tracefs_path() else (None, "mount did not expose events")


def _mount(source: str, target: str, fstype: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _umount(target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount(target.encode())


def tracepoints(names: Iterable[str], base: Optional[str]) -> Tuple[str, ...]:
    """Which of ``names`` ("system:event") exist under tracefs events."""
    if not base:
        return ()
    out = []
    for n in names:
        sysname, ev = n.split(":", 1)
        if os.path.isdir(os.path.join(base, "events", sysname, ev)):
            out.append(n)
    return tuple(out)


def lockdown() -> Tuple[Optional[str], str]:
    """Kernel lockdown mode ("none", "integrity", "confidentiality") and how it was read.
    securityfs is mounted briefly (root) when it is not, then unmounted again."""
    path = os.path.join(SECURITYFS, "lockdown")
    text = _read(path)
    how = path
    if text is None and os.geteuid() == 0 and os.path.isdir(SECURITYFS) and not os.listdir(SECURITYFS):
        try:
            _mount("securityfs", SECURITYFS, "securityfs")
        except OSError:
            pass
        else:
            text = _read(path)
            _umount(SECURITYFS)
            how = f"{path} (securityfs mounted temporarily)"
    if text is None:
        return None, "securityfs lockdown file not readable"
    for tok in text.split():
        if tok.startswith("[") and tok.endswith("]"):
            return tok[1:-1], how
    return None, f"unparsable {path}: {text.strip()}"


def can_bpf() -> bool:
    """Enough privilege for BPF tracing programs (host.privileges: the one check)."""
    from .host import privileges

    return privileges().enough


# --- kprobes / fentry / ringbuf ------------------------------------------------------------


def kprobes_available(cfg: Optional[Dict[str, str]], tfs: Optional[str], lockdown_mode: Optional[str]) -> Tuple[Optional[bool], str]:
    """(available, reason). bcc attaches kprobes through the perf 'kprobe' PMU (4.17+) or
    tracefs kprobe_events; both need CONFIG_KPROBES. lockdown=confidentiality forbids them."""
    if cfg is not None and cfg.get("CONFIG_KPROBES", "n") == "n":
        return False, "CONFIG_KPROBES off"
    if lockdown_mode == "confidentiality":
        return False, "lockdown=confidentiality forbids kprobes"
    pmu = os.path.isdir("/sys/bus/event_source/devices/kprobe")
    events = bool(tfs) and os.path.exists(os.path.join(tfs, "kprobe_events"))
    if pmu or events:
        return True, "kprobe PMU present" if pmu else "kprobe_events present"
    if cfg is None:
        if tfs:
            return False, "no kprobe PMU and no kprobe_events in tracefs (kernel without CONFIG_KPROBES?)"
        return None, "no kernel config and tracefs not mounted"
    return False, "no kprobe PMU and no kprobe_events although CONFIG_KPROBES is set"


def _with_stderr_captured(fn):
    """Run fn() with fd 2 redirected to a temporary file (bcc and libbpf print load errors
    there); returns (result or exception, captured text)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            try:
                res = fn()
            except Exception as e:  # bcc raises bare Exception; classified by the caller
                res = e
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode("utf-8", "replace")
    return res, text


def _classify_bcc_error(exc: Exception, stderr: str) -> Tuple[str, str]:
    """(code, reason) of a failed bcc load. bcc reports failures only as text (a bare
    Exception and libbpf's stderr), so this is the one place that reads such text; everything
    downstream decides by the code."""
    msg = str(exc)
    text = msg + "\n" + stderr
    low = text.lower()
    if "kernel headers" in low or "linux/kconfig.h" in low or (".h' file not found" in low):
        return "headers", f"bcc found no kernel headers: {msg.strip().splitlines()[0][:160] if msg.strip() else 'compile failed'}"
    if "Need super-user privileges" in msg or "Operation not permitted" in text:
        return "eperm", "load refused (EPERM)"
    if "Permission denied" in text:
        return "eacces", "load refused (EACCES)"
    if "No such file or directory" in text or "ENOENT" in text:
        return "enoent", "load failed (ENOENT: the function's BTF was not found)"
    if "Invalid argument" in text:
        return "einval", "load failed (EINVAL)"
    if "compile" in text.lower() or "error:" in text:
        first = next((line for line in stderr.splitlines() if "error" in line.lower()), msg)
        return "compile", f"bcc could not compile the probe: {first.strip()[:160]}"
    return "failed", f"load failed: {msg.strip()[:160]}"


def load_problem(exc: Exception, stderr: str = "") -> "Problem":
    """A failed BPF compile/load (bcc's exception and captured stderr) as a typed Problem with
    its fix: ``problem.error()`` is what the tracer raises. Codes: load.headers, load.eperm,
    load.eacces, load.enoent, load.einval, load.compile, load.failed."""
    from ..errors import PermissionProblem, Problem

    code, reason = _classify_bcc_error(exc, stderr)
    if code == "headers":
        return Problem("load.headers", f"bcc could not compile the BPF program: {reason}",
                       f"install kernel headers: apt-get install linux-headers-{platform.release()}, or `make setup` "
                       "(links the distribution's generic headers when the exact ones do not exist)")
    if code in ("eperm", "eacces"):
        return Problem(f"load.{code}", f"the kernel refused the BPF program: {reason}",
                       "run as root; check lockdown and kernel.unprivileged_bpf_disabled", PermissionProblem.exit_code)
    return Problem(f"load.{code}", f"loading the BPF program failed: {reason}",
                   "run `kvmtrace doctor` to see what this kernel supports")


def bcc_version() -> Tuple[Optional[str], str]:
    try:
        import bcc  # noqa: F401  (python3-bpfcc)
    except Exception as e:  # ImportError, or libbcc missing underneath
        return None, f"import bcc failed: {e}"
    return getattr(bcc, "__version__", "unknown"), ""


def fentry_trial(func: str = FENTRY_PROBE_FUNC, module: str = "") -> Tuple[Optional[bool], str]:
    """A real trial: compile, load and attach an empty fentry program on ``func`` (in
    ``module`` when KVM is a module, via MODULE_KFUNC_PROBE), then detach. (ok, reason)."""
    ok, reason, _code = fentry_trial_coded(func, module)
    return ok, reason


def fentry_trial_coded(func: str = FENTRY_PROBE_FUNC, module: str = "") -> Tuple[Optional[bool], str, str]:
    """``fentry_trial`` with the code of the outcome: ok, not_tried, unsupported, eperm, eacces,
    enoent, einval, compile, failed, module_btf (bcc cannot attach to module functions)."""
    ver, err = bcc_version()
    if ver is None:
        return None, f"not tried: {err}", "not_tried"
    from bcc import BPF

    try:
        if not BPF.support_kfunc():
            return False, "not supported (bcc/kernel lack BPF trampolines or vmlinux BTF)", "unsupported"
    except Exception as e:
        return None, f"not tried: {e}", "not_tried"
    if module:
        text = f"MODULE_KFUNC_PROBE({module}, {func}) {{ return 0; }}"
    else:
        text = f"KFUNC_PROBE({func}) {{ return 0; }}"

    def load():
        b = BPF(text=text)
        b.cleanup()
        return True

    res, stderr = _with_stderr_captured(load)
    if res is True:
        return True, f"trial load of fentry on {func} succeeded", "ok"
    code, reason = _classify_bcc_error(res, stderr)
    if module and ("MODULE_KFUNC_PROBE" in stderr or "implicit declaration" in stderr):
        code, reason = "module_btf", "bcc lacks module BTF support (no MODULE_KFUNC_PROBE)"
    elif module and code == "enoent":
        code, reason = "module_btf", f"bcc lacks module BTF support (looked for {func} in vmlinux BTF only)"
    return False, reason, code


_SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_RINGBUF = 27


def _header_layouts():
    """KVM struct layouts from exact kernel headers (headers.layouts), bcc's noise captured."""
    try:
        from bcc import BPF
    except ImportError:
        return None, "bcc not importable"
    from .headers import layouts

    res, _err = _with_stderr_captured(lambda: layouts(BPF))
    if isinstance(res, Exception):
        return None, f"header layouts failed: {res}"
    return res


def ringbuf_supported() -> Tuple[Optional[bool], str]:
    """Create (and close) a small BPF ring buffer map through the bpf() syscall."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        return None, f"unknown bpf() syscall number on {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)()
    attr[0] = BPF_MAP_TYPE_RINGBUF
    attr[1] = 0  # key_size
    attr[2] = 0  # value_size
    attr[3] = 4096  # max_entries: one page
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(BPF_MAP_CREATE), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if fd >= 0:
        os.close(fd)
        return True, "ring buffer map created"
    e = ctypes.get_errno()
    if e in (errno.EPERM, errno.EACCES):
        return None, f"not verified ({errno.errorcode.get(e, e)})"
    return False, f"ring buffer map refused ({errno.errorcode.get(e, e)}): kernel before 5.8?"


# --- BTF ------------------------------------------------------------------------------------


@dataclass
class BtfFacts:
    vmlinux: bool = False
    modules: Tuple[str, ...] = ()  # module BTF files of interest present (e.g. "kvm")
    funcs: Optional[Dict[str, Tuple[str, ...]]] = None
    structs: Optional[Dict[str, Dict[str, int]]] = None
    sizes: Optional[Dict[str, int]] = None
    arrays: Optional[Dict[str, Dict[str, int]]] = None
    error: str = ""


def btf_facts(kvm_module: str = "", btf_dir: str = BTF_DIR) -> BtfFacts:
    """Prototypes and struct layouts of interest from vmlinux BTF (+ the KVM module's)."""
    from .btf import Btf, BtfError

    out = BtfFacts()
    vpath = os.path.join(btf_dir, "vmlinux")
    if not os.path.exists(vpath):
        out.error = f"{vpath} missing (kernel without CONFIG_DEBUG_INFO_BTF)"
        return out
    try:
        base = Btf.from_file(vpath, name="vmlinux")
        out.vmlinux = True
        btf = base
        mods = []
        if kvm_module:
            mpath = os.path.join(btf_dir, kvm_module)
            if os.path.exists(mpath):
                btf = Btf.from_file(mpath, base=base, name=kvm_module)
                mods.append(kvm_module)
            else:
                out.error = f"{mpath} missing (no module BTF: CONFIG_DEBUG_INFO_BTF_MODULES off?)"
        out.modules = tuple(mods)
        out.funcs = {}
        for fn in FUNCS_OF_INTEREST:
            p = btf.func_params(fn)
            if p is not None:
                out.funcs[fn] = p
        out.structs, out.sizes, out.arrays = {}, {}, {}
        for st in STRUCTS_OF_INTEREST:
            lay = btf.struct(st)
            if lay is None:
                continue
            out.structs[st] = {n: m.offset for n, m in lay.members.items() if n in STRUCTS_OF_INTEREST[st]}
            out.sizes[st] = lay.size
            arr = {n: m.nelems for n, m in lay.members.items() if n in STRUCTS_OF_INTEREST[st] and m.nelems is not None}
            if arr:
                out.arrays[st] = arr
    except (OSError, BtfError) as e:
        out.error = f"BTF unreadable: {e}"
        out.funcs = out.structs = out.sizes = out.arrays = None
    return out


# --- everything -----------------------------------------------------------------------------


@dataclass
class GatheredFacts:
    """KernelFacts plus the context doctor reports (not needed by the resolver)."""

    facts: KernelFacts
    btf: BtfFacts
    config_source: str = ""
    tracefs: Optional[str] = None
    tracefs_state: str = ""
    lockdown: Optional[str] = None
    lockdown_source: str = ""
    kvm_module: str = ""  # "" built in, else module name
    kvm_loaded: bool = False
    bcc_version: Optional[str] = None
    bcc_error: str = ""
    ringbuf_reason: str = ""
    extra: Dict[str, str] = field(default_factory=dict)
    # code of the fentry trial on the function KVM's notifier runs (fentry_trial_coded);
    # "" when the facts did not come from a trial here (fixtures)
    fentry_code: str = ""


def gather(trial: bool = True, mount_tracefs: bool = True) -> GatheredFacts:
    release = platform.release()
    syms, clones = kallsyms(FUNCS_OF_INTEREST)
    kvm_sym = syms.get(FENTRY_PROBE_FUNC)
    kvm_loaded = kvm_sym is not None or os.path.isdir("/sys/module/kvm")
    kvm_module = kvm_sym if kvm_sym is not None else ("kvm" if os.path.exists("/sys/module/kvm/initstate") else "")
    bf = btf_facts(kvm_module)
    cfg, cfg_src = kernel_config(release)
    tfs, tstate = ensure_tracefs() if mount_tracefs else (tracefs_path(), "")
    lock, lock_src = lockdown()
    kp, kp_reason = kprobes_available(cfg, tfs, lock)
    bver, berr = bcc_version()
    is_root = os.geteuid() == 0
    if not trial:
        fe, fe_reason, fe_code = None, "trial load skipped", "not_tried"
    elif kvm_sym is None:
        fe, fe_reason, fe_code = None, f"not tried: {FENTRY_PROBE_FUNC} not in kallsyms (KVM not loaded?)", "not_tried"
    elif not can_bpf():
        fe, fe_reason, fe_code = None, "not tried: needs root or CAP_BPF+CAP_PERFMON", "not_tried"
    elif not bf.vmlinux:
        fe, fe_reason, fe_code = False, "no vmlinux BTF (fentry needs CONFIG_DEBUG_INFO_BTF)", "no_btf"
    else:
        fe, fe_reason, fe_code = fentry_trial_coded(FENTRY_PROBE_FUNC, kvm_module)
    if kvm_module:
        # the trial ran on the module function: it speaks for module fentry only
        mfe, mfe_reason = fe, fe_reason
        if kvm_module not in bf.modules and fe is not True:
            mfe, mfe_reason, fe_code = False, f"no BTF for module {kvm_module} ({fe_reason})", "module_btf"
        fe, fe_reason = None, f"not tried on vmlinux (KVM is the module {kvm_module})"
    else:
        mfe, mfe_reason = None, "KVM is built in"
    rb, rb_reason = ringbuf_supported() if can_bpf() else (None, "not tried (needs privilege)")
    layout_source = ""
    if trial and kvm_sym is not None and can_bpf() and (bf.structs is not None) and "kvm" not in bf.structs:
        # KVM is a module without BTF (kernels before 5.11): take its struct layouts from the
        # kernel's own exact headers, through the compiler (headers.py), never from others
        lay, how = _header_layouts()
        if lay is not None:
            for key, target in (("structs", bf.structs), ("sizes", bf.sizes), ("arrays", bf.arrays)):
                if target is not None:
                    for k, v in lay[key].items():
                        target.setdefault(k, v)
            layout_source = how
    facts = KernelFacts(
        release=release,
        kallsyms=syms,
        btf_funcs=bf.funcs,
        btf_structs=bf.structs,
        btf_sizes=bf.sizes,
        btf_modules=bf.modules,
        tracepoints=tracepoints(TRACEPOINTS_OF_INTEREST, tfs),
        kprobes=kp,
        kprobes_reason=kp_reason,
        fentry=fe,
        fentry_reason=fe_reason,
        module_fentry=mfe,
        module_fentry_reason=mfe_reason,
        ringbuf=rb,
        is_root=is_root,
        btf_arrays=bf.arrays,
        kallsyms_clones=clones,
        layout_source=layout_source,
    )
    return GatheredFacts(
        facts=facts, btf=bf, config_source=cfg_src, tracefs=tfs, tracefs_state=tstate,
        lockdown=lock, lockdown_source=lock_src, kvm_module=kvm_module, kvm_loaded=kvm_loaded,
        bcc_version=bver, bcc_error=berr, ringbuf_reason=rb_reason, fentry_code=fe_code,
    )


# --- diagnosis ------------------------------------------------------------------------------


def diagnose(g: GatheredFacts, headers, devkvm, plan) -> List["Problem"]:
    """What is missing on this host and how to fix it, as typed Problems (doctor renders them;
    codes are stable). ``headers``/``devkvm`` come from tracer/host.py, ``plan`` from
    plan.resolve. Decisions use facts and codes only, never the text of a message."""
    from ..errors import PermissionProblem, Problem

    f = g.facts
    out: List[Problem] = []

    def add(code, problem, fix, exit_code=3):
        if not any(x.message == problem for x in out):
            out.append(Problem(code, problem, fix, exit_code))

    if not devkvm.present:
        add("kvm.missing", f"KVM missing: {devkvm.detail}",
            "enable virtualization in the firmware and load KVM: modprobe kvm_intel (or kvm_amd)")
    elif not devkvm.accessible:
        add("kvm.access", f"/dev/kvm: {devkvm.detail}", "run as root or add the user to the kvm group",
            PermissionProblem.exit_code)
    if g.bcc_version is None:
        add("bcc.missing", f"bcc unavailable: {g.bcc_error}", "apt-get install python3-bpfcc (then re-create the venv "
            "with --system-site-packages, or run `make setup`)")
    if headers.kind == "none":
        add("headers.missing", "no kernel headers for bcc", f"apt-get install linux-headers-{f.release or platform.release()} "
            "(or run `make setup`, which links the distribution's generic headers)")
    if not g.btf.vmlinux:
        add("btf.missing", f"no BTF: {g.btf.error}", "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y; without it "
            "argument positions and struct offsets are unknown")
    elif g.kvm_module and g.kvm_module not in g.btf.modules:
        add("btf.module_missing", f"no BTF for module {g.kvm_module}",
            "boot a kernel built with CONFIG_DEBUG_INFO_BTF_MODULES=y")
    if g.tracefs is None:
        add("tracefs.missing", f"tracefs: {g.tracefs_state}", "mount -t tracefs nodev /sys/kernel/tracing (as root)")
    if f.kprobes is not True:
        add("kprobes.unavailable", f"kprobes unavailable: {f.kprobes_reason}",
            "boot a kernel with CONFIG_KPROBES=y (every distribution kernel has it)"
            + ("; lockdown=confidentiality also forbids them" if g.lockdown == "confidentiality" else "")
            + "; meanwhile tracepoints give syscall-bounded latency and derived slots")
    fe_ok = f.module_fentry if g.kvm_module else f.fentry
    fe_reason = f.module_fentry_reason if g.kvm_module else f.fentry_reason
    if fe_ok is not True:
        where = f" on module {g.kvm_module}" if g.kvm_module else ""
        code = g.fentry_code or "unavailable"
        if code == "module_btf":
            fix = "install bcc >= 0.31 (MODULE_KFUNC_PROBE) or rely on kprobes"
        else:
            fix = "a kernel that permits BPF trampolines (fentry) on KVM functions; kprobes or tracepoints are used instead"
        if code == "eperm" and g.lockdown and g.lockdown != "none":
            fix += f" (lockdown={g.lockdown} is set here and may be the cause)"
        add(f"fentry.{code}", f"fentry{where} unavailable: {fe_reason}", fix)
    if f.ringbuf is False:
        add("ringbuf.unavailable", f"BPF ring buffer unavailable: {g.ringbuf_reason}", "raw events fall back to the "
            "perf buffer (kernel 5.8+ has the ring buffer)")
    for i, (prob, fix) in enumerate(plan.remedies):
        if i == 0 and f.btf_funcs is None and not g.btf.vmlinux:
            continue  # the plan's first problem is then "no BTF", reported above as btf.missing
        add(f"plan.{i}", prob, fix)
    return out


# --- fixtures -------------------------------------------------------------------------------


def facts_to_json(f: KernelFacts) -> dict:
    d = asdict(f)
    if d["btf_funcs"] is not None:
        d["btf_funcs"] = {k: list(v) for k, v in sorted(d["btf_funcs"].items())}
    d["btf_modules"] = list(f.btf_modules)
    d["tracepoints"] = list(f.tracepoints)
    return d


def facts_from_json(d: dict) -> KernelFacts:
    d = dict(d)
    d.pop("_comment", None)
    d.pop("_source", None)
    if d.get("btf_funcs") is not None:
        d["btf_funcs"] = {k: tuple(v) for k, v in d["btf_funcs"].items()}
    d["btf_modules"] = tuple(d.get("btf_modules", ()))
    d["tracepoints"] = tuple(d.get("tracepoints", ()))
    known = set(KernelFacts.__dataclass_fields__)
    return KernelFacts(**{k: v for k, v in d.items() if k in known})


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python3 -m kvmtrace.tracer.kernel")
    ap.add_argument("--dump-fixture", action="store_true", help="print KernelFacts as fixture JSON")
    ap.add_argument("--no-trial", action="store_true", help="skip the fentry trial load")
    a = ap.parse_args(argv)
    g = gather(trial=not a.no_trial)
    d = facts_to_json(g.facts)
    d["_source"] = f"captured live on {platform.node()} ({g.facts.release}) by kvmtrace.tracer.kernel --dump-fixture"
    json.dump(d, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
