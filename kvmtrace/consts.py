"""Constants shared by Python and the BPF C code. C sees them only as -D defines generated here
(see ``c_defines``), so the two sides cannot drift."""

from enum import Enum, IntEnum


class Op(IntEnum):
    """Kinds of hva operation (one MMU-notifier callback for one VM)."""

    UNMAP = 0  # invalidate_range_start
    AGE = 1  # clear_flush_young, clear_young
    TEST_AGE = 2  # test_young
    CHANGE_PTE = 3  # change_pte (kernels before 6.10)

    @property
    def label(self) -> str:
        return self.name.lower()


class Change(IntEnum):
    """Memslot update change types (KVM's enum kvm_mr_change, in kvmtrace's own numbering)."""

    CREATE = 0
    DELETE = 1
    MOVE = 2
    FLAGS_ONLY = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class Provenance(str, Enum):
    """How a figure was obtained. Outputs never mix them silently."""

    EXACT = "exact"  # observed at function entry/exit
    SYSCALL = "syscall"  # bounded by the enclosing system call
    DERIVED = "derived"  # computed from mirrored state
    NONE = "none"  # not available in this mode

    def __str__(self) -> str:
        return self.value


class Attach(str, Enum):
    FENTRY = "fentry"
    KPROBE = "kprobe"
    TRACEPOINT = "tracepoint"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


# Memslot event whose change type userspace derives from its mirrored table (exact-mode kernels
# without BTF for kvm_set_memslot): one past NR_CHANGES ("unknown").
MS_CHANGE_DERIVE = len(Change) + 1

# Histogram geometry: bucket 0 holds value 0, bucket i (i >= 1) holds 2**(i-1) <= v < 2**i.
LOG2_BUCKETS = 64

# uapi ioctl numbers (include/uapi/linux/kvm.h); stable ABI.
KVMIO = 0xAE
KVM_CREATE_VM = 0xAE01
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)
KVM_SET_USER_MEMORY_REGION2 = 0x40A0AE49  # _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


def c_defines() -> list:
    """-D flags for the BPF C sources: every enum value and shared constant."""
    out = []
    for op in Op:
        out.append(f"-DOP_{op.name}={int(op)}")
    out.append(f"-DNR_OPS={len(Op)}")
    for ch in Change:
        out.append(f"-DCHANGE_{ch.name}={int(ch)}")
    out.append(f"-DNR_CHANGES={len(Change)}")  # = "unknown" in the maps
    out.append(f"-DMS_CHANGE_DERIVE={MS_CHANGE_DERIVE}")
    out.append(f"-DLOG2_BUCKETS={LOG2_BUCKETS}")
    out.append(f"-DKVM_CREATE_VM_NR={KVM_CREATE_VM}")
    out.append(f"-DKVM_SET_USER_MEMORY_REGION_NR={KVM_SET_USER_MEMORY_REGION}")
    out.append(f"-DKVM_SET_USER_MEMORY_REGION2_NR={KVM_SET_USER_MEMORY_REGION2}")
    return out
