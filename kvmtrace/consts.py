"""Constants shared by Python and the BPF C code. C sees them only as -D defines generated here
(see ``c_defines``), so the two sides cannot drift."""

from enum import IntEnum


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


# Memslot event whose change type userspace derives from its mirrored table (exact-mode kernels
# without BTF for kvm_set_memslot): one past NR_CHANGES ("unknown").
MS_CHANGE_DERIVE = len(Change) + 1

# Histogram geometry: bucket 0 holds value 0, bucket i (i >= 1) holds 2**(i-1) <= v < 2**i.
LOG2_BUCKETS = 64

# The scenarios of the built-in workload (kvmtrace workload / demo / bench; workload/core.py
# implements one body per name). Add a scenario here and there, nowhere else.
SCENARIOS = ("unmap", "unmap-chunked", "map", "move-active", "move-inactive", "age", "churn", "mixed",
             "multi-vm")  # multi-vm: several VMs in one process (workload/multivm.py)
# scenarios of one VM (bench and demo compare one VM per run with its ground truth)
SINGLE_VM_SCENARIOS = tuple(s for s in SCENARIOS if s != "multi-vm")

# KVM uapi (include/uapi/linux/kvm.h; stable ABI). Every ioctl number kvmtrace uses, built with
# the kernel's _IOC rule; workload/kvm.py checks the encoded sizes against its ctypes structs.
KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int = 0) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def ioc_size(request: int) -> int:
    """The argument size encoded in an ioctl number."""
    return (request >> 16) & 0x3FFF


KVM_GET_API_VERSION = _ioc(_IOC_NONE, 0x00)
KVM_CREATE_VM = _ioc(_IOC_NONE, 0x01)  # 0xAE01
KVM_CHECK_EXTENSION = _ioc(_IOC_NONE, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _ioc(_IOC_NONE, 0x04)
KVM_CREATE_VCPU = _ioc(_IOC_NONE, 0x41)
KVM_SET_USER_MEMORY_REGION = _ioc(_IOC_WRITE, 0x46, 32)  # struct kvm_userspace_memory_region: 0x4020AE46
KVM_SET_USER_MEMORY_REGION2 = _ioc(_IOC_WRITE, 0x49, 160)  # struct kvm_userspace_memory_region2: 0x40A0AE49
KVM_RUN = _ioc(_IOC_NONE, 0x80)
KVM_GET_REGS = _ioc(_IOC_READ, 0x81, 144)  # struct kvm_regs (x86)
KVM_SET_REGS = _ioc(_IOC_WRITE, 0x82, 144)
KVM_GET_SREGS = _ioc(_IOC_READ, 0x83, 312)  # struct kvm_sregs (x86)
KVM_SET_SREGS = _ioc(_IOC_WRITE, 0x84, 312)
KVM_API_VERSION = 12
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_MEMSLOTS = 10
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0


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
    out.append(f"-DKVM_CREATE_VCPU_NR={KVM_CREATE_VCPU}")
    out.append(f"-DKVM_SET_USER_MEMORY_REGION_NR={KVM_SET_USER_MEMORY_REGION}")
    out.append(f"-DKVM_SET_USER_MEMORY_REGION2_NR={KVM_SET_USER_MEMORY_REGION2}")
    return out
