"""Struct layouts from the running kernel's *own* headers, for kernels whose KVM module has no
BTF (module BTF exists only since 5.11: Debian 11's 5.10 has vmlinux BTF but none for kvm.ko).

Used only when the headers are exact (/lib/modules/$(uname -r)/build is the headers package of
this very kernel, checked through its version.h and utsrelease.h), never with compat headers of
another version: that is how a distribution-header layout silently reads garbage.

The offsets come out of the compiler, not out of a parser: bcc compiles a program whose array
maps are sized by ``offsetof(...) + 1`` against kvm_host.h, and the created maps' max_entries
are the answers. Nothing is attached, and nothing is read from kernel memory.
"""

from __future__ import annotations

import os
import platform
from typing import Dict, Optional, Tuple

# (struct, member) -> C expression; "sizeof" entries give struct sizes, "nelems" array lengths
_COMMON = [
    ("kvm", "mmu_notifier", "offsetof(struct kvm, mmu_notifier)"),
    ("kvm", "memslots", "offsetof(struct kvm, memslots)"),
    ("kvm", "#nelems:memslots", "sizeof(((struct kvm *)0)->memslots) / sizeof(((struct kvm *)0)->memslots[0])"),
    ("kvm_memory_slot", "userspace_addr", "offsetof(struct kvm_memory_slot, userspace_addr)"),
    ("kvm_memory_slot", "npages", "offsetof(struct kvm_memory_slot, npages)"),
    ("kvm_memory_slot", "id", "offsetof(struct kvm_memory_slot, id)"),
    ("kvm_memory_slot", "#sizeof", "sizeof(struct kvm_memory_slot)"),
]
# sorted memslot array (the linear scan): present before 5.17 only
_LINEAR = [
    ("kvm_memslots", "used_slots", "offsetof(struct kvm_memslots, used_slots)"),
    ("kvm_memslots", "memslots", "offsetof(struct kvm_memslots, memslots)"),
]


def exact_headers(release: Optional[str] = None) -> Tuple[bool, str]:
    """(True, path) when /lib/modules/RELEASE/build holds this kernel's own headers."""
    release = release or platform.release()
    build = f"/lib/modules/{release}/build"
    utsrel = os.path.join(build, "include/generated/utsrelease.h")
    try:
        with open(utsrel) as f:
            text = f.read()
    except OSError:
        return False, f"{utsrel} missing"
    if f'"{release}"' not in text:
        return False, f"{build} holds headers of another kernel ({text.strip()})"
    return True, os.path.realpath(build)


def _program(queries) -> str:
    lines = ["#include <linux/kvm_host.h>"]
    for i, (_s, _m, expr) in enumerate(queries):
        lines.append(f"BPF_ARRAY(q{i}, u8, ({expr}) + 1);")
    lines.append("int kvmtrace_layout_probe(void *ctx) { return 0; }")
    return "\n".join(lines) + "\n"


def layouts(BPF) -> Tuple[Optional[dict], str]:
    """({"structs": {...}, "sizes": {...}, "arrays": {...}}, how) from the exact headers, or
    (None, why not)."""
    ok, where = exact_headers()
    if not ok:
        return None, f"no exact kernel headers: {where}"
    for queries, label in ((_COMMON + _LINEAR, "sorted memslot array"), (_COMMON, "no used_slots")):
        try:
            b = BPF(text=_program(queries).encode())
        except Exception:  # member missing in this kernel: try the smaller set
            continue
        try:
            structs: Dict[str, Dict[str, int]] = {}
            sizes: Dict[str, int] = {}
            arrays: Dict[str, Dict[str, int]] = {}
            for i, (st, member, _expr) in enumerate(queries):
                v = int(b[f"q{i}"].max_entries) - 1
                if member == "#sizeof":
                    sizes[st] = v
                elif member.startswith("#nelems:"):
                    arrays.setdefault(st, {})[member.split(":", 1)[1]] = v
                else:
                    structs.setdefault(st, {})[member] = v
            return {"structs": structs, "sizes": sizes, "arrays": arrays}, f"exact kernel headers at {where} ({label})"
        finally:
            b.cleanup()
    return None, f"kvm_host.h from {where} did not compile with bcc"
