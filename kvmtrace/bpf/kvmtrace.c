// SPDX-License-Identifier: GPL-2.0
// kvmtrace BPF programs, compiled by bcc with -D defines generated in kvmtrace/tracer/cflags.py.
//
// Nothing here depends on kernel header struct layouts: every kernel struct offset arrives as a
// -D define taken from the running kernel's BTF (OFF_*), and the only structs declared here are
// uapi ones (stable ABI) and kvmtrace's own map/event records.
//
// Sections (each enabled by a define, so one object holds what the probe plan chose):
//   HVA_TP_<OP>      hva op via its kvm:* tracepoint (a raw tracepoint program); latency bounded
//                    by the enclosing syscall (raw_syscalls sys_enter/sys_exit, raw tracepoints),
//                    slots derived in the kernel from the VM's slot table (tracepoint mode below)
//   HVA_EXACT_<OP>   hva op via entry/exit of its kvm_mmu_notifier_* callback (kprobe or fentry),
//                    slots visited = per-slot handler calls inside the callback on the same thread
//                    (per distinct memslot argument for per-rmap handlers: H_<OP>_SLOT_ARG)
//   MS_TP            memslot updates and VM creation via their ioctls, seen by the raw_syscalls
//                    programs (tp_sys_enter / tp_sys_exit, which tail-calls tp_ioc_exit)
//   MS_EXACT         memslot updates via kvm_set_memslot (change type) inside the outer
//                    region-setting function (whole-update latency)
//   VM_LIFE          exact modes: VM creation/destruction (VM_INIT_FN, VM_DESTROY_FN), so each VM
//                    lifetime is its own key (struct kvm *, VMM tgid, per-VMM ordinal)
//   READ_MEMSLOTS    linear-scan kernels: the memslot count (= slots scanned) read at each callback
//   MODE_FENTRY      exact programs are fentry/fexit (BTF trampolines) instead of kprobes
//   PID_FILTER       only this tgid (VMM process)
//   EVENTS           stream raw hva events (memslot/VM events are always streamed: userspace
//                    mirrors the memslot table from them)
//   USE_RINGBUF      BPF ring buffer (5.8+), else a perf buffer

#include <uapi/linux/ptrace.h>

#ifndef MAX_AGG
#define MAX_AGG 4096  // (vm, op) pairs; 1.6 KB each (2.2 KB in exact modes), preallocated
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 16384
#endif
#ifndef MAX_VMMS
#define MAX_VMMS 1024
#endif
#ifndef MAX_VMS
#define MAX_VMS 8192  // live VMs (entries leave at VM destruction)
#endif
#ifndef PAGE_SIZE_B
#define PAGE_SIZE_B 4096
#endif

// ---- records shared with userspace. struct event, the EV_* kinds and the CNT_* counters are
// generated from kvmtrace/tracer/records.py and prepended to this file (cflags.source()) ----
struct sum_val {   // per (vm, op): latency and slot sums
    u64 count;     // operations observed
    u64 lat_count;
    u64 lat_sum;
    u64 lat_max;
    u64 slots_count;
    u64 slots_sum;
    u64 slots_max;
    u64 scanned_sum;
    u64 tgid;      // last VMM tgid seen for this vm (exact mode attribution)
};

// Everything about one (vm, op) in one map value, so an event costs one hash lookup:
// sums plus log2 histograms (bucket 0 = 0, bucket i = [2^(i-1), 2^i)) of latency (ns),
// slots visited and range size (bytes).
struct agg_val {
    struct sum_val s;
    u64 lat[LOG2_BUCKETS];
    u64 slots[LOG2_BUCKETS];
    u64 range[LOG2_BUCKETS];
};

struct op_key {
    u64 vm;        // struct kvm * (exact modes) or tgid (tracepoint mode)
    u32 op;        // hva op, or memslot change type (ms_* maps)
    u32 owner;     // exact modes: the VM's VMM tgid, so a struct kvm address reused by a
                   // later VM of another process is another key; 0 in tracepoint mode
    u32 ordinal;   // exact modes: the n-th VM its VMM created while traced (0 = older than the
                   // trace): with vm and owner, one VM's lifetime; 0 in tracepoint mode
    u32 bucket;    // by-memslot-count maps: log2 bucket of the VM's memslot count; else 0
};

struct ms_val {    // per (vm, change): memslot updates
    u64 count;
    u64 errors;
    u64 lat_sum;
    u64 lat_max;
    u64 tgid;
    u64 lat[LOG2_BUCKETS];
};

struct kt_region {  // uapi struct kvm_userspace_memory_region (and the head of ..._region2)
    u32 slot;
    u32 flags;
    u64 guest_phys_addr;
    u64 memory_size;
    u64 userspace_addr;
};

#ifndef MS_BUCKETS
#define MS_BUCKETS 16  // log2 buckets of a memslot count (32764 -> bucket 15)
#endif

#if defined(HVA_EXACT_UNMAP) || defined(HVA_EXACT_AGE) || defined(HVA_EXACT_TEST_AGE) || \
    defined(HVA_EXACT_CHANGE_PTE)
// Exact modes: hva ops of one (VM lifetime, op) at one log2 bucket of the VM's memslot count at
// the event, kept inside the (VM, op) value (index = bucket), so that an operation costs one
// hash lookup for both tables.
struct bucket_val {
    u64 count;
    u64 memslots_max;
    u64 lat_sum;
    u64 slots_sum;
    u64 scanned_sum;
};
struct ex_agg {
    struct agg_val a;
    struct bucket_val b[MS_BUCKETS];
};
#define EXACT_HVA 1
#define AGG_T struct ex_agg  // 2.2 KB: MAX_AGG entries preallocated (9.2 MB at 4096)
#else
#define AGG_T struct agg_val
#endif

BPF_PERCPU_ARRAY(counters, u64, NR_CNT);
BPF_HASH(aggs, struct op_key, AGG_T, MAX_AGG);
BPF_PERCPU_ARRAY(agg_zero, AGG_T, 1);  // never written: the initial value of new entries
BPF_HASH(ms_aggs, struct op_key, struct ms_val, MAX_AGG);
BPF_PERCPU_ARRAY(ms_zero, struct ms_val, 1);

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif
#define RB_NO_WAKEUP 1

static __always_inline void bump(u32 idx)
{
    u64 *v = counters.lookup(&idx);
    if (v)
        (*v)++;
}

// bcc rewrites map calls only outside macros, hence a function rather than a macro.
static __always_inline void emit(void *ctx, struct event *ev, u64 flags)
{
#ifdef USE_RINGBUF
    if (events.ringbuf_output(ev, sizeof(*ev), flags) != 0)
        bump(CNT_LOST);
#else
    if (events.perf_submit(ctx, ev, sizeof(*ev)) != 0)
        bump(CNT_LOST);
#endif
}

static __always_inline int filtered_out(u32 tgid)
{
#ifdef PID_FILTER
    return tgid != PID_FILTER;  // --pid: only this VMM process
#else
    return 0;
#endif
}

static __always_inline void ev_head(struct event *ev, u32 kind, u64 ts, u64 pid_tgid)
{
    ev->kind = kind;
    ev->ts = ts;
    ev->tgid = pid_tgid >> 32;
    ev->tid = (u32)pid_tgid;
}

static __always_inline u32 log2_bucket(u64 v)
{
    // bucket 0 = 0; bucket i = [2^(i-1), 2^i), i.e. the bit length of v: the same rule as
    // snapshot.log2_bucket. Branch-free ((C - v) >> 63 is 1 exactly when v > C, for v < 2^63),
    // so the verifier walks one path instead of 2^6 per histogram update. Values of 2^62 and
    // more (none occur: ns, bytes, slot counts) would land in lower buckets.
    u64 r, t;
    v &= 0x3FFFFFFFFFFFFFFFULL;
    asm volatile("" : "+r"(v));  // keep clang from turning the arithmetic back into branches
    t = ((0xFFFFFFFFULL - v) >> 63) << 5; v >>= t; r = t;
    t = ((0xFFFFULL - v) >> 63) << 4; v >>= t; r |= t;
    t = ((0xFFULL - v) >> 63) << 3; v >>= t; r |= t;
    t = ((0xFULL - v) >> 63) << 2; v >>= t; r |= t;
    t = ((0x3ULL - v) >> 63) << 1; v >>= t; r |= t;
    t = (0x1ULL - v) >> 63; v >>= t; r |= t;
    return (u32)(r + v);
}

static __always_inline AGG_T *agg_get_key(struct op_key *k)
{
    u32 zk = 0;
    AGG_T *v = aggs.lookup(k);
    if (v)
        return v;
    AGG_T *zero = agg_zero.lookup(&zk);
    if (!zero)
        return 0;
    aggs.insert(k, zero);
    v = aggs.lookup(k);
    if (!v)
        bump(CNT_MAPFULL);
    return v;
}

static __always_inline AGG_T *agg_get(u64 vm, u32 op, u32 owner)
{
    struct op_key k = {};
    k.vm = vm;
    k.op = op;
    k.owner = owner;
    return agg_get_key(&k);
}

static __always_inline void hist_inc(u64 *hist, u64 value, u64 n)
{
    u32 b = log2_bucket(value) & (LOG2_BUCKETS - 1);
    __sync_fetch_and_add(&hist[b], n);
}

static __always_inline void max_update(u64 *slot, u64 v)
{
    if (*slot < v)
        *slot = v;  // a lost race only under-reports a max by one concurrent value
}

// =====================================================================================
// Tracepoint mode: VM identity and per-VM slot tables (shared by the hva and memslot parts)
// =====================================================================================
// A VM is the descriptor its VMM got from KVM_CREATE_VM: (tgid, fd) -> gen, a number unique in
// this trace (a later VM on the same fd number gets a new gen). Memslot ioctls on any other
// descriptor are dropped here (CNT_IGNORED), before any map or ring buffer is touched.
// Each VM created while traced gets a slot table (one of MAX_TABS): its slot records (hash,
// for the change type, exactly as kvm_set_memory_region decides it) and the hva starts and
// ends of its slots in two sorted arrays, so that the slots an hva range overlaps are two
// binary searches: #(start < end_q) - #(end <= start_q). The arrays are kept sorted at update
// time by tail-called programs shifting SHIFT_CHUNK entries each (O(n) per update, rare).
#if defined(HVA_TP_UNMAP) || defined(HVA_TP_AGE) || defined(HVA_TP_TEST_AGE) || \
    defined(HVA_TP_CHANGE_PTE) || defined(MS_TP)
#define TP_VMS 1
#define TAB_CAP 32768  // >= KVM_USER_MEM_SLOTS (32764) of one address space
#define TAB_MASK (TAB_CAP - 1)
#define TAB_STEPS 16   // binary search steps: log2(TAB_CAP) + 1
// entries moved per tail-called program: the ioctl's end (1 tail call) and 32 shift runs cover
// TAB_CAP, 33 tail calls in a chain: the kernel's limit (MAX_TAIL_CALL_CNT 33 since 5.17's
// "bpf: Change value of MAX_TAIL_CALL_CNT from 32 to 33", which made the interpreter agree with
// the x86 JIT: that already allowed 33 before)
#define SHIFT_CHUNK 1024
#define SHIFT_BLOCK 16    // entries moved branch-free between two tests of the end (64 blocks a program)
#ifndef MAX_TABS
#define MAX_TABS 16    // slot tables (512 KiB each): VMs created while traced, alive at once
#endif
#ifndef MAX_TP_VMS
#define MAX_TP_VMS 4096  // VMs known (alive, or dead and not yet read by userspace)
#endif
#ifndef MAX_SLOTREC
#define MAX_SLOTREC 131072  // slot records over all VMs (allocated on use)
#endif
#ifndef MAX_TP_AGG
#define MAX_TP_AGG 2048  // (vm, op) aggregates in the hash (VMs without an aggregate slot)
#endif
#ifndef MAX_TP_LIVE
#define MAX_TP_LIVE 256  // aggregate slots (power of two): VMs created while traced, alive or
#endif                   // not yet read after death, whose aggregates are array entries
#define VM_PER_PROC 8  // the first places of a process's VM list, in its vmm entry (and the
                       // threads' copies); places from VM_PER_PROC on are in tp_vmmore
#ifndef VM_LIST_MAX
#define VM_LIST_MAX 16 // live VMs of one process the list holds; a VM beyond it is not registered
#endif             // (records.VM_LIST_MAX: the same, tests/test_records.py). The loops beyond
                   // VM_PER_PROC are unrolled: 6.1's verifier refused a bounded loop of 56
                   // ("the sequence of 8193 jumps is too complex"), 6.12's hit its 1 M limit
#define FD_VCPU (1ull << 63)  // tp_vmfd value: a vCPU descriptor of the VM (gen in the other bits)
#define TP_DUP (1ull << 32)   // ioc_state.cmd of dup/dup2/dup3/fcntl(F_DUPFD*) (no ioctl number)
#ifndef TABS_PER_PROC
#define TABS_PER_PROC 4  // slot tables one process may hold: one process cannot take them all
#endif
#define NO_TAB 0xFFFFFFFFu
#define MS_BUCKETS 16  // log2 buckets of a memslot count (32764 -> bucket 15)
#define NO_BUCKET 0xFF
#ifndef NR_CLOSE
#define NR_CLOSE 3     // x86_64 (tracepoint mode is built for x86 only)
#endif
#ifndef OFF_PT_REGS_DI
#define OFF_PT_REGS_DI 112  // x86_64 struct pt_regs: di (the first syscall argument), 15th word
#endif                      // of the entry frame, the same layout as ptrace's user_regs_struct
#define KT_ENOTTY 25
#define KT_EBADF 9
enum { VMF_PARTIAL = 1, VMF_DEAD = 2, VMF_NOTAB = 4, VMF_BROKEN = 8 };

struct vmm_val {   // one VMM process: its live VMs in creation order (notifier order reversed)
    u32 created;   // VMs it created while traced (the next VM's ordinal - 1)
    u32 n;
    u64 gen[VM_PER_PROC];
    u32 tab[VM_PER_PROC];
    u32 fd[VM_PER_PROC];
    u32 agg[VM_PER_PROC];  // its aggregate slot in tp_avals + 1; 0: none (aggregates in tp_aggs)
};
struct vmfd_key {
    u32 tgid;
    u32 fd;
};
struct tp_vm {     // one VM lifetime, keyed by gen; userspace removes it once read after death
    u32 tgid;
    u32 fd;
    u32 ordinal;   // 0 = predates the trace
    u32 flags;     // VMF_*
    u32 tab;
    u32 n;         // memslots now (exact unless VMF_PARTIAL)
    u32 nmax;
    u32 agg;       // aggregate slot in tp_avals + 1 (0: none, its aggregates are in tp_aggs)
    u32 refs;      // descriptors of its process known to hold it: the VM fd and its dups, vCPU fds
    u32 pad;
};
struct vm_ent {    // one place of a process's VM list beyond the first VM_PER_PROC
    u64 gen;
    u32 tab;
    u32 fd;
    u32 agg;
    u32 pad;
};
struct tab_hdr {
    u64 gen;       // owning VM, 0 = free
    u64 seq;       // bumped after every finished table change
    u32 n;         // entries in the sorted arrays
    u32 busy;      // memslot ioctls in flight on the VM (its kernel table may be mid-change)
    u32 broken;    // table lost sync (concurrent writers, overflow): figures underived
    u32 pad;
};
struct tab_data {
    u64 start[TAB_CAP];
    u64 end[TAB_CAP];
};
struct slot_key {
    u64 gen;
    u32 slot;      // as_id << 16 | slot id, as passed by userspace
    u32 pad;
};
struct slot_rec {
    u64 gpa;
    u64 size;
    u64 hva;
    u32 flags;
    u32 pad;
};
struct tp_bkt {    // hva ops at one memslot-count bucket (derived ops only)
    u64 count;
    u64 lat_count;
    u64 lat_sum;
    u64 slots_sum;
    u64 nmax;      // largest memslot count seen in the bucket
    u64 nsum;      // sum of the memslot counts (= slots scanned on linear-scan kernels)
};
// Per (vm gen, op, tgid): the common aggregate plus tracepoint-mode figures. Every op is counted
// exactly once, in its memslot-count bucket or, when its slots were not derived, in `und`; the
// sums that follow from those (count, slots_count/sum, lat_count/sum, scanned_sum) are left 0
// in `a` and summed by userspace (records.TpAggRow.from_map): fewer atomic adds per event. `a`
// keeps the histograms and the maxima.
struct tp_agg {
    struct agg_val a;
    u64 owner;     // tp_avals: the gen owning the slot (0 = free); tp_aggs: 0
    struct tp_bkt b[MS_BUCKETS];
    struct tp_bkt und;  // ops whose slots figure could not be derived (nmax, nsum, slots_sum: 0)
};

// known VMM processes; allocated on insert, so that a value userspace replaces (seeding) stays
// valid memory for a program still holding it (freed after an RCU grace period)
BPF_F_TABLE("hash", u32, struct vmm_val, vmm, MAX_VMMS, BPF_F_NO_PREALLOC);
// places VM_PER_PROC.. of a process's VM list, keyed (tgid, place): only processes with more than
// VM_PER_PROC live VMs use it
BPF_F_TABLE("hash", struct vmfd_key, struct vm_ent, tp_vmmore, MAX_TP_VMS, BPF_F_NO_PREALLOC);
// One counter per tgid mod VMM_MARKS, bumped after every change of a known VMM process's VM
// list and never cleared, so nonzero marks a VMM: the syscall programs, which run for every
// task on the host, leave at once for almost every task that is no VMM (an array read instead
// of a hash lookup and a task-storage lookup); a marked tgid (a VMM, or one sharing its index)
// is then checked exactly. Its value also versions the list: a thread keeps a copy of its
// process's list (struct vm_list) valid while the counter has not moved, so an hva op needs no
// hash lookup (a change of another process sharing the index only makes the copy be taken
// again). It would read 0 again after 2^32 changes at one index.
#ifndef VMM_MARKS
#define VMM_MARKS 65536  // power of two
#endif
BPF_ARRAY(vmm_mark, u32, VMM_MARKS);

static __always_inline int vmm_marked(u32 tgid)
{
    u32 i = tgid & (VMM_MARKS - 1);
    u32 *m = vmm_mark.lookup(&i);
    return m && *m;
}

// After a change of tgid's VM list (or to mark it a VMM): its copies become stale.
static __always_inline void vmm_bump(u32 tgid)
{
    u32 i = tgid & (VMM_MARKS - 1);
    u32 *m = vmm_mark.lookup(&i);
    if (m)
        __sync_fetch_and_add(m, 1);
}
BPF_HASH(tp_vmfd, struct vmfd_key, u64, MAX_TP_VMS);
BPF_HASH(tp_vms, u64, struct tp_vm, MAX_TP_VMS);
BPF_ARRAY(tp_gen, u64, 1);
BPF_ARRAY(tp_hdr, struct tab_hdr, MAX_TABS);
BPF_ARRAY(tp_tab, struct tab_data, MAX_TABS);
BPF_F_TABLE("hash", struct slot_key, struct slot_rec, tp_slots, MAX_SLOTREC, BPF_F_NO_PREALLOC);
BPF_HASH(tp_aggs, struct op_key, struct tp_agg, MAX_TP_AGG);
BPF_PERCPU_ARRAY(tp_agg_zero, struct tp_agg, 1);
// The aggregates of a VM created while traced: entries [slot * NR_OPS + op] of an array, found
// from its process's VM list without a hash lookup (at the op and at the syscall exit). The
// slot of a VM is gen mod MAX_TP_LIVE when that is free; userspace frees it (zeroes its values,
// the first last) after reading the dead VM's final figures. Every use checks `owner`, so a
// slot two VMs took at the same instant (check-then-set) only sends the other's ops to the hash.
BPF_ARRAY(tp_avals, struct tp_agg, MAX_TP_LIVE * NR_OPS);

// tp_avals slot + 1 for the new VM `gen`, or 0 when its slot is taken (then: the hash). Its
// values are zeroed here too (userspace zeroed them when it freed the slot, but the last system
// call of a VM read and freed meanwhile may have added its latency after that).
static __always_inline u32 tp_aslot_take(u64 gen)
{
    u32 slot = (u32)gen & (MAX_TP_LIVE - 1), zk = 0;
    u32 i0 = slot * NR_OPS;
    struct tp_agg *a = tp_avals.lookup(&i0);
    struct tp_agg *zero = tp_agg_zero.lookup(&zk);
    if (!a || a->owner || !zero)
        return 0;
#pragma unroll
    for (int op = NR_OPS - 1; op >= 0; op--) {  // the first entry (the free mark) last
        u32 i = i0 + op;
        tp_avals.update(&i, zero);
        struct tp_agg *x = tp_avals.lookup(&i);
        if (x)
            x->owner = gen;
    }
    return slot + 1;
}

// agg_get's twin for tracepoint mode's map (bcc rewrites map calls only in plain code, not in a
// macro or through a map pointer, so the two cannot share one body)
static __always_inline struct tp_agg *tp_agg_get(u64 gen, u32 op, u32 tgid)
{
    struct op_key k = {};
    u32 zk = 0;
    k.vm = gen;
    k.op = op;
    k.owner = tgid;
    struct tp_agg *v = tp_aggs.lookup(&k);
    if (v)
        return v;
    struct tp_agg *zero = tp_agg_zero.lookup(&zk);
    if (!zero)
        return 0;
    tp_aggs.insert(&k, zero);
    v = tp_aggs.lookup(&k);
    if (!v)
        bump(CNT_MAPFULL);
    return v;
}

static __always_inline void tab_free(u32 tab, u64 gen)
{
    struct tab_hdr *h = tp_hdr.lookup(&tab);
    if (h && h->gen == gen) {
        h->seq++;
        h->gen = 0;
    }
}

// The VM of `gen` is gone (its fd closed or reused, or its process exited): free its table,
// mark it dead for userspace, which reads its final figures and removes it.
static __always_inline void vm_gone(u32 tgid, u32 fd, u64 gen)
{
    struct tp_vm *v = tp_vms.lookup(&gen);
    if (v) {
        v->flags |= VMF_DEAD;
        if (v->tab != NO_TAB)
            tab_free(v->tab, gen);
    }
    struct vmfd_key k = {};
    k.tgid = tgid;
    k.fd = fd;
    tp_vmfd.delete(&k);
}

// Remove `gen` from the list of process tgid, keeping the order of the others (places beyond
// the first VM_PER_PROC move down from tp_vmmore).
static __always_inline void vmm_drop(struct vmm_val *p, u64 gen, u32 tgid)
{
    u32 found = 0, n = p->n;
#pragma unroll
    for (int i = 0; i < VM_PER_PROC; i++) {
        if (i < n && p->gen[i] == gen)
            found = 1;
        if (found && i + 1 < VM_PER_PROC) {
            p->gen[i] = p->gen[i + 1];
            p->tab[i] = p->tab[i + 1];
            p->fd[i] = p->fd[i + 1];
            p->agg[i] = p->agg[i + 1];
        }
    }
    if (n > VM_PER_PROC) {
        struct vmfd_key k = {};
        k.tgid = tgid;
        u32 more = 1;
#pragma unroll
        for (u32 j = VM_PER_PROC; j < VM_LIST_MAX; j++) {  // only lists beyond VM_PER_PROC
            if (!more || j >= n) {
                more = 0;
                continue;
            }
            k.fd = j;
            struct vm_ent *e = tp_vmmore.lookup(&k);
            if (!e) {
                more = 0;
                continue;
            }
            struct vm_ent x = *e;
            u32 hit = !found && x.gen == gen;
            if (found) {  // place j - 1 takes place j
                if (j == VM_PER_PROC) {
                    p->gen[VM_PER_PROC - 1] = x.gen;
                    p->tab[VM_PER_PROC - 1] = x.tab;
                    p->fd[VM_PER_PROC - 1] = x.fd;
                    p->agg[VM_PER_PROC - 1] = x.agg;
                } else {
                    struct vmfd_key pk = {};
                    pk.tgid = tgid;
                    pk.fd = j - 1;
                    tp_vmmore.update(&pk, &x);
                }
            }
            if (hit)
                found = 1;
        }
        if (found) {
            k.fd = n - 1;
            tp_vmmore.delete(&k);
        }
    }
    if (found && p->n > 0)
        p->n--;
    if (found)
        vmm_bump(tgid);
}

// Place `i` (>= VM_PER_PROC) of process tgid's list, or NULL.
static __always_inline struct vm_ent *more_get(u32 tgid, u32 i)
{
    struct vmfd_key k = {};
    k.tgid = tgid;
    k.fd = i;
    return tp_vmmore.lookup(&k);
}

// Descriptor `fd` of tgid no longer holds its VM (closed, or replaced by dup2/dup3): the VM
// leaves the process's list once no known descriptor holds it. (Whether the kernel's struct kvm
// dies then is not seen: a reference kvmtrace does not know of, e.g. a descriptor passed to
// another process, keeps its notifier; its ops then count as ambiguous, never as another VM's.)
static __always_inline void fd_close(u32 tgid, u32 fd)
{
    struct vmfd_key k = {};
    k.tgid = tgid;
    k.fd = fd;
    u64 *g = tp_vmfd.lookup(&k);
    if (!g)
        return;
    u64 gen = *g & ~FD_VCPU;
    tp_vmfd.delete(&k);
    struct tp_vm *v = tp_vms.lookup(&gen);
    if (!v)
        return;
    if (v->refs > 1) {
        __sync_fetch_and_add(&v->refs, -1);
        return;
    }
    v->refs = 0;
    vm_gone(tgid, fd, gen);
    struct vmm_val *p = vmm.lookup(&tgid);
    if (p)
        vmm_drop(p, gen, tgid);
}

// Descriptor `fd` of tgid now holds the VM of `val` (a dup of one of its descriptors, or a
// vCPU: FD_VCPU set).
static __always_inline void fd_add(u32 tgid, u32 fd, u64 val)
{
    u64 gen = val & ~FD_VCPU;
    struct tp_vm *v = tp_vms.lookup(&gen);
    if (!v || (v->flags & VMF_DEAD))
        return;
    struct vmfd_key k = {};
    k.tgid = tgid;
    k.fd = fd;
    // (a descriptor whose close was not seen, or that dup2 replaced: tp_fd_exit closed it)
    if (tp_vmfd.update(&k, &val) != 0) {
        bump(CNT_MAPFULL);
        return;
    }
    __sync_fetch_and_add(&v->refs, 1);
}

static __always_inline u32 tab_alloc(u64 gen)
{
    // check-then-set (the BPF atomics bcc emits have no compare-and-swap): two VMs created at
    // the same instant may pick one table; the later owner keeps it, and the other VM's
    // figures are underived (its events check the owner), never wrong
#pragma unroll
    for (u32 i = 0; i < MAX_TABS; i++) {
        u32 k = i;
        struct tab_hdr *h = tp_hdr.lookup(&k);
        if (!h || h->gen)
            continue;
        h->gen = gen;
        h->n = 0;
        h->busy = 0;
        h->broken = 0;
        h->seq++;
        return i;
    }
    bump(CNT_MAPFULL);  // every table in use: this VM's figures are underived
    return NO_TAB;
}

// KVM_CREATE_VM returned `fd` to `tgid`.
static __always_inline void vm_register(u32 tgid, u32 fd)
{
    struct vmfd_key k = {};
    k.tgid = tgid;
    k.fd = fd;
    // (a descriptor whose close was not seen no longer holds its VM: tp_fd_exit closed it)
    struct vmm_val *p = vmm.lookup(&tgid);
    if (p && p->n >= VM_LIST_MAX) {  // not registered: its ops count as ambiguous, its updates as ignored
        bump(CNT_MAPFULL);
        return;
    }
    if (!p) {
        struct vmm_val z = {};
        vmm.insert(&tgid, &z);
        p = vmm.lookup(&tgid);
        if (!p) {
            bump(CNT_MAPFULL);
            return;
        }
    }
    // (marked already: the ioctl's entry bumped the mark)
    u32 zk = 0;
    u64 *g = tp_gen.lookup(&zk);
    if (!g)
        return;
    // a new gen: the counter is bumped without a fetching atomic (bcc's BPF target has none),
    // so two VMs created at the same instant may draw the same number: the insertion, which
    // fails for an existing key, tells, and the next number is tried
    struct tp_vm v = {};
    v.tgid = tgid;
    v.fd = fd;
    v.refs = 1;
    p->created++;
    v.ordinal = p->created;
    u64 gen = 0;
    int ok = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (!ok) {
            gen = *g + 1;
            *g = gen;
            if (tp_vms.insert(&gen, &v) == 0)
                ok = 1;
        }
    }
    if (!ok) {
        bump(CNT_MAPFULL);
        return;
    }
    struct tp_vm *vp = tp_vms.lookup(&gen);
    if (!vp)
        return;
    u32 held = 0;
#pragma unroll
    for (int i = 0; i < VM_PER_PROC; i++) {
        if (i < p->n && p->tab[i] != NO_TAB)
            held++;
    }
    if (held >= TABS_PER_PROC) {
        bump(CNT_MAPFULL);  // this process's share of the tables is used: figures underived
        v.tab = NO_TAB;
    } else {
        v.tab = tab_alloc(gen);
    }
    vp->tab = v.tab;
    if (v.tab == NO_TAB)
        vp->flags |= VMF_NOTAB;
    u32 aslot = tp_aslot_take(gen);
    vp->agg = aslot;
    if (tp_vmfd.update(&k, &gen) != 0)
        bump(CNT_MAPFULL);
    u32 n = p->n;
    if (n >= VM_PER_PROC && n < VM_LIST_MAX) {  // a place beyond the vmm entry's
        struct vm_ent e = {};
        e.gen = gen;
        e.tab = v.tab;
        e.fd = fd;
        e.agg = aslot;
        struct vmfd_key mk = {};
        mk.tgid = tgid;
        mk.fd = n;
        if (tp_vmmore.update(&mk, &e) == 0)
            p->n = n + 1;
        else
            bump(CNT_MAPFULL);
    } else if (n < VM_PER_PROC) {
        // stores at constant offsets: the verifiers of 6.1 and 6.12 refused p->gen[n] ("R4
        // unbounded memory access": the bound of n is lost on its way through the stack)
#pragma unroll
        for (int i = 0; i < VM_PER_PROC; i++) {
            if (i == n) {
                p->gen[i] = gen;
                p->tab[i] = v.tab;
                p->fd[i] = fd;
                p->agg[i] = aslot;
            }
        }
        p->n = n + 1;
    }
    vmm_bump(tgid);  // after the change: a copy taken meanwhile is stale at once
}

// First index in a[0..n) with a[i] >= v (lower) or a[i] > v (upper), n <= TAB_CAP: a binary
// search whose steps are branch-free (values are user addresses, below 2^62, so the sign of a
// difference is the comparison); it stops when one candidate is left, at most 15 steps.
static __always_inline u32 tab_bound(u64 *a, u32 n, u64 v, int upper)
{
    u64 base = 0, len = n, vv = upper ? v + 1 : v;
    for (int i = 0; i < TAB_STEPS; i++) {  // a bounded loop (5.3+; tracepoint mode needs 5.13)
        if (len <= 1)  // ceil(log2(n)) steps: none for one slot, 15 at 32764
            break;
        u64 half = len >> 1;
        u64 x = a[(base + half) & TAB_MASK];
        u64 lt = (x - vv) >> 63;  // x < vv
        asm volatile("" : "+r"(lt));
        base += lt * half;
        len -= half;
    }
    u64 x = a[base & TAB_MASK];
    u64 lt = (x - vv) >> 63;
    asm volatile("" : "+r"(lt));
    return (u32)(base + (len & lt));
}

// The per-thread state of a VMM thread's current system call, kept by the raw_syscalls
// programs (below): its start time and the hva ops inside it (their latency is the call's),
// and whether it is a memslot ioctl whose end the ioctl exit program handles.
#define SC_ENTS 4

struct vm_list {   // the thread's copy of its process's VM list (struct vmm_val's order)
    u32 tgid;
    u32 ver;       // the process's vmm_mark when copied; 0: no copy
    u32 n;
    u32 pad;
    u64 gen[VM_PER_PROC];
    u32 tab[VM_PER_PROC];
    u32 agg[VM_PER_PROC];
};

struct sc_ent {    // hva ops of one (vm, op, memslot bucket) inside the current system call
    u64 gen;
    u32 aidx;      // its aggregate's tp_avals index + 1; 0: in tp_aggs
    u8 op;
    u8 bucket;     // NO_BUCKET: slots not derived
    u16 n;
};
struct sc_state {  // one system call of a VMM thread
    u64 ts;
    u64 last_start;  // the previous hva op of this thread: the kernel calls each VM's notifier
    u64 last_end;    // in turn with the same range, newest VM first
    u32 rep;
    u32 nent;
    u32 ioc;         // a memslot ioctl or KVM_CREATE_VM: its state is in `ioc` (MS_TP)
    u32 last_op;     // the op of last_start/last_end
    struct sc_ent e[SC_ENTS];
    struct vm_list vl;
};
#ifdef TP_TASK_STORAGE
// per-thread state in task-local storage (5.11+, BTF): a pointer chase instead of a hash
// lookup, three times per system call of a VMM thread; freed with the task
BPF_TASK_STORAGE(inflight, struct sc_state);
#else
BPF_TABLE("lru_hash", u32, struct sc_state, inflight, MAX_THREADS);
#endif

static __always_inline struct sc_state *sc_get(u32 tid)
{
#ifdef TP_TASK_STORAGE
    return inflight.task_storage_get((struct task_struct *)bpf_get_current_task_btf(), 0, 0);
#else
    return inflight.lookup(&tid);
#endif
}

static __always_inline struct sc_state *sc_new(u32 tid)
{
#ifdef TP_TASK_STORAGE
    return inflight.task_storage_get((struct task_struct *)bpf_get_current_task_btf(), 0,
                                     BPF_LOCAL_STORAGE_GET_F_CREATE);
#else
    struct sc_state z = {};
    inflight.update(&tid, &z);
    return inflight.lookup(&tid);
#endif
}

static __always_inline int tgid_wanted(u32 tgid)
{
#ifdef PID_FILTER
    return tgid == PID_FILTER;
#else
    return vmm.lookup(&tgid) != 0;
#endif
}

#endif  // TP_VMS

// =====================================================================================
// Tracepoint mode: hva ops
// =====================================================================================
#if defined(HVA_TP_UNMAP) || defined(HVA_TP_AGE) || defined(HVA_TP_TEST_AGE) || defined(HVA_TP_CHANGE_PTE)
#define HVA_TP 1
static __always_inline int on_hva_tp(void *ctx, u32 op, u64 start, u64 end)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (filtered_out(tgid))
        return 0;
    struct sc_state *s = sc_get(tid);
    // The process's VM list: the thread's copy while the process's mark has not moved since
    // it was taken (every change of a list bumps it), else the hash (and a fresh copy).
    u32 mi = tgid & (VMM_MARKS - 1);
    u32 *mk = vmm_mark.lookup(&mi);
    u32 ver = mk ? *(volatile u32 *)mk : 0;  // read once, before the list is copied
    struct vmm_val *p = 0;
    u32 n = 0, copied = 0;
    if (s && ver && s->vl.ver == ver && s->vl.tgid == tgid) {
        n = s->vl.n;
        copied = 1;
    } else {
        p = vmm.lookup(&tgid);
        if (p) {
            n = p->n;
            if (s) {
#pragma unroll
                for (int i = 0; i < VM_PER_PROC; i++) {
                    s->vl.gen[i] = p->gen[i];
                    s->vl.tab[i] = p->tab[i];
                    s->vl.agg[i] = p->agg[i];
                }
                s->vl.n = n;
                s->vl.tgid = tgid;
                s->vl.ver = ver;
            }
        }
    }
    // Attribution: one notifier per VM, called newest VM first, each with the same range;
    // the rep-th repeat of a range (of one op) on this thread belongs to the rep-th newest live
    // VM. Every notifier gets every range (test_young aside, which stops at the first young
    // VM), so each listed VM gets one op per range whichever order the list had.
    u32 rep = 0;
    if (s) {
        if (s->last_start == start && s->last_end == end && s->last_op == op) {
            rep = s->rep + 1;
        } else {
            s->last_start = start;
            s->last_end = end;
            s->last_op = op;
        }
        s->rep = rep;
    }
    if (n > VM_LIST_MAX)
        n = VM_LIST_MAX;
    if (rep >= n) {
        // More notifiers than listed VMs: a VM of this process that the list does not hold
        // (no VMM at all: kswapd, another process's madvise: tgid 0, unattributed). Kept apart
        // per process as ambiguous (gen 0, tgid), never given to a listed VM.
        struct tp_agg *u = tp_agg_get(0, op, (copied || p) ? tgid : 0);
        if (u)
            __sync_fetch_and_add(&u->und.count, 1);
        return 0;
    }
    u32 idx = n - 1 - rep;
    u64 gen = 0;
    u32 tab = NO_TAB, aslot = 0;
    if (idx >= VM_PER_PROC) {  // a place beyond the first: its hash (lists longer than VM_PER_PROC)
        struct vm_ent *e = more_get(tgid, idx);
        if (!e)
            return 0;
        gen = e->gen;
        tab = e->tab;
        aslot = e->agg;
    } else {
        // masked where it is used, behind a barrier clang cannot see through: 6.1's verifier
        // lost the bound of a mask applied earlier on its way through the stack ("R3 unbounded
        // memory access" at p->gen[idx])
        asm volatile("" : "+r"(idx));
        idx &= VM_PER_PROC - 1;
        if (copied && s) {
            gen = s->vl.gen[idx];
            tab = s->vl.tab[idx];
            aslot = s->vl.agg[idx];
        } else if (p) {
            gen = p->gen[idx];
            tab = p->tab[idx];
            aslot = p->agg[idx];
        } else {
            return 0;  // not reached: n > 0 came from one of them
        }
    }
    // Derivation: the VM's slot table, unless a memslot update is in flight or finished meanwhile
    u32 slots = 0, nslots = 0, ok = 0;
    struct tab_hdr *h = tab == NO_TAB ? 0 : tp_hdr.lookup(&tab);
    struct tab_data *t = tab == NO_TAB ? 0 : tp_tab.lookup(&tab);
    if (h && t && h->gen == gen && !h->broken) {
        u64 seq = h->seq;
        u32 busy = h->busy;
        asm volatile("" ::: "memory");
        nslots = h->n;
        if (!busy && nslots <= TAB_CAP && start < end) {
            u32 before_end = tab_bound(t->start, nslots, end, 0);  // slots starting before end
            u32 ended = tab_bound(t->end, nslots, start, 1);       // slots ending at or before start
            slots = before_end > ended ? before_end - ended : 0;
            asm volatile("" ::: "memory");
            ok = h->seq == seq && h->busy == 0 && h->gen == gen;
        } else if (!busy && start >= end) {
            ok = 1;
        }
    }
    u32 bucket = ok ? (log2_bucket(nslots) & (MS_BUCKETS - 1)) : NO_BUCKET;
    // the aggregate: the VM's array slot (no hash lookup), else the hash
    u32 aidx = 0;
    struct tp_agg *a = 0;
    if (aslot) {
        u32 i = (aslot - 1) * NR_OPS + op;
        a = tp_avals.lookup(&i);
        if (a && a->owner == gen)
            aidx = i + 1;
        else
            a = 0;
    }
    if (!a)
        a = tp_agg_get(gen, op, tgid);
    if (a) {  // four atomic adds per derived op: the sums follow from the buckets (struct tp_agg)
        hist_inc(a->a.range, end - start, 1);
        if (ok) {
            struct tp_bkt *b = &a->b[bucket & (MS_BUCKETS - 1)];
            hist_inc(a->a.slots, slots, 1);
            __sync_fetch_and_add(&b->count, 1);
            __sync_fetch_and_add(&b->slots_sum, slots);
            max_update(&a->a.s.slots_max, slots);
            max_update(&b->nmax, nslots);
#if LINEAR_SCAN  // kernels before 5.17 scan every used slot of every address space per callback
            __sync_fetch_and_add(&b->nsum, nslots);
#endif
        } else {
            __sync_fetch_and_add(&a->und.count, 1);
        }
    }
    if (s && s->ts) {  // latency: the enclosing system call's, added at its exit
        u32 i, done = 0;
#pragma unroll
        for (i = 0; i < SC_ENTS; i++) {
            if (!done && i < s->nent && s->e[i].gen == gen && s->e[i].op == op && s->e[i].bucket == bucket) {
                s->e[i].n++;
                done = 1;
            }
        }
        u32 ne = s->nent;
        if (!done && ne < SC_ENTS) {
            s->e[ne & (SC_ENTS - 1)].gen = gen;
            s->e[ne & (SC_ENTS - 1)].aidx = aidx;
            s->e[ne & (SC_ENTS - 1)].op = op;
            s->e[ne & (SC_ENTS - 1)].bucket = bucket;
            s->e[ne & (SC_ENTS - 1)].n = 1;
            s->nent = ne + 1;
            done = 1;
        }
        if (!done)
            bump(CNT_NOLAT);
    } else {
        bump(CNT_NOLAT);  // not inside a traced system call (page fault path, ...)
    }
#ifdef EVENTS_LAT  // raw events kept (record --events)
    struct event ev = {};
    ev_head(&ev, EV_HVA, bpf_ktime_get_ns(), id);
    ev.hva.op = op;
    ev.hva.start = start;
    ev.hva.end = end;
    ev.hva.slots = ok ? slots : 0xFFFFFFFFu;
    ev.hva.memslots = ok ? nslots : 0xFFFFFFFFu;
    ev.vm = gen;
    emit(ctx, &ev, RB_NO_WAKEUP);
#endif
    return 0;
}

// Raw tracepoints (BPF_PROG_TYPE_RAW_TRACEPOINT, 4.17+; module tracepoints 5.0+): the program
// gets the tracepoint's arguments (ctx->args[i], its TP_PROTO in order) instead of a record the
// kernel first builds in a per-CPU buffer, which is what a classic tracepoint program costs on
// top (measured: bench/overhead's count-same-hooks baselines of both kinds). The kvm:* events'
// prototypes have been (start, end) and (hva) since they were added; raw_syscalls' are
// (struct pt_regs *regs, long id) at entry and (regs, long ret) at exit.
#ifdef HVA_TP_UNMAP
RAW_TRACEPOINT_PROBE(kvm_unmap_hva_range) { return on_hva_tp(ctx, OP_UNMAP, ctx->args[0], ctx->args[1]); }
#endif
#ifdef HVA_TP_AGE
RAW_TRACEPOINT_PROBE(kvm_age_hva) { return on_hva_tp(ctx, OP_AGE, ctx->args[0], ctx->args[1]); }
#endif
#ifdef HVA_TP_TEST_AGE
RAW_TRACEPOINT_PROBE(kvm_test_age_hva) { return on_hva_tp(ctx, OP_TEST_AGE, ctx->args[0], ctx->args[0] + PAGE_SIZE_B); }
#endif
#ifdef HVA_TP_CHANGE_PTE
RAW_TRACEPOINT_PROBE(kvm_set_spte_hva) { return on_hva_tp(ctx, OP_CHANGE_PTE, ctx->args[0], ctx->args[0] + PAGE_SIZE_B); }
#endif

static __always_inline void sc_lat(u32 tgid, struct sc_ent *e, u64 dur)
{
    u32 n = e->n;
    if (!n)
        return;
    struct tp_agg *a;
    if (e->aidx) {
        u32 i = e->aidx - 1;
        a = tp_avals.lookup(&i);
        if (a && a->owner != e->gen) {  // the VM was read after its death and its slot freed
            u32 ci = CNT_NOLAT;
            u64 *c = counters.lookup(&ci);
            if (c)
                *c += n;
            return;
        }
    } else {
        a = tp_agg_get(e->gen, e->op, tgid);
    }
    if (!a)
        return;
    struct tp_bkt *b = e->bucket != NO_BUCKET ? &a->b[e->bucket & (MS_BUCKETS - 1)] : &a->und;
    hist_inc(a->a.lat, dur, n);
    __sync_fetch_and_add(&b->lat_count, n);
    __sync_fetch_and_add(&b->lat_sum, dur * n);
    max_update(&a->a.s.lat_max, dur);
}

// The end of a VMM thread's system call: the hva ops inside it get its duration as latency.
static __always_inline void sc_end(void *ctx, struct sc_state *s, u32 tgid, u64 id)
{
    u64 ts = s->ts;
    u32 ne = s->nent, total = 0;
    if (!ts || !ne)  // most of a VMM's system calls (KVM_RUN, I/O) run no hva op: no clock read
        return;
    u64 dur = bpf_ktime_get_ns() - ts;  // a clock read costs ~35 ns here (docs/benchmarks.md)
#pragma unroll
    for (int i = 0; i < SC_ENTS; i++) {
        if (i < ne) {
            total += s->e[i].n;
            sc_lat(tgid, &s->e[i], dur);
            s->e[i].n = 0;
        }
    }
    s->nent = 0;
#ifdef EVENTS_LAT  // raw events kept: each gets its syscall's duration in userspace
    if (total) {
        struct event ev = {};
        ev_head(&ev, EV_SC_END, bpf_ktime_get_ns(), id);
        ev.sc_end.dur_ns = dur;
        ev.sc_end.nr_ops = total;
        emit(ctx, &ev, RB_NO_WAKEUP);
    }
#endif
}
#endif  // HVA_TP

// =====================================================================================
// Tracepoint mode: memslot updates (and VM creation) from the ioctl system call
// =====================================================================================
#ifdef MS_TP
#if defined(EVENTS_LAT) || (defined(EVENTS) && !defined(EVENTS_TP_HVA))
#define TP_RAW 1   // raw events kept: memslot updates are streamed too
#endif
enum { JOB_NONE = 0, JOB_INSERT = 1, JOB_REMOVE = 2 };
struct ioc_state {
    u64 ts;
    u64 cmd;
    u64 fd;
    u64 gen;
    struct kt_region r;
    u32 tab;       // the VM's table, NO_TAB when none or when busy was not taken
    u32 job;       // JOB_*: table change done by the tail-called shift programs
    u32 n;         // entries before the change
    u32 ps;        // position of the start value (insert: where it goes; remove: where it is)
    u32 pe;        // same for the end value
    u32 j;         // shift progress
    u64 vs;        // start and end values inserted
    u64 ve;
};
BPF_TABLE("lru_hash", u32, struct ioc_state, ioc, MAX_THREADS);
// tail-called programs, filled by userspace before the system-call programs are attached
// Each place where a VM can leave a process's list (fd_close, whose vmm_drop moves the places
// beyond it) is in a program of its own: tp_close (close()) and tp_fd_exit (a new descriptor:
// KVM_CREATE_VM, KVM_CREATE_VCPU, dup*), so that no program inlines it twice (6.12 refused
// tp_ioc_exit at its 1 M processed-instruction limit when it held three copies).
enum { JOB_SHIFT_RIGHT = 0, JOB_SHIFT_LEFT = 1, JOB_IOC_EXIT = 2, JOB_FD_EXIT = 3, JOB_CLOSE = 4 };
BPF_PROG_ARRAY(tp_jobs, 5);  // shift right (insert), shift left (remove), the ioctl's end, the
                             // end of a call returning a VM's new descriptor, a VM fd's close()

static __always_inline void ioc_release(struct ioc_state *s, int changed)
{
    if (s->tab == NO_TAB)
        return;
    u32 tab = s->tab;
    struct tab_hdr *h = tp_hdr.lookup(&tab);
    if (!h)
        return;
    if (changed)
        h->seq++;
    if (h->busy > 0)
        __sync_fetch_and_add(&h->busy, -1);
    s->tab = NO_TAB;
}

static __always_inline void tab_broken(u32 tab)
{
    struct tab_hdr *h = tp_hdr.lookup(&tab);
    if (h)
        h->broken = 1;
}

// ioctl(fd, cmd, arg) entered (from tp_sys_enter): 1 when it is a memslot update of a known VM
// or KVM_CREATE_VM, whose state is then kept in `ioc` for tp_ioc_exit; 0 for anything else.
static __always_inline u32 ioc_enter(u32 tgid, u32 tid, u64 fd, u64 cmd32, u64 arg)
{
    u64 cmd = (u32)cmd32;
    if (cmd != KVM_SET_USER_MEMORY_REGION_NR && cmd != KVM_SET_USER_MEMORY_REGION2_NR &&
        cmd != KVM_CREATE_VM_NR && cmd != KVM_CREATE_VCPU_NR)
        return 0;
    if (filtered_out(tgid))
        return 0;
    struct ioc_state s = {};
    s.cmd = cmd;
    s.fd = fd;
    s.tab = NO_TAB;
    if (cmd == KVM_CREATE_VM_NR) {
        vmm_bump(tgid);  // marked: its system calls' exits must look further from now on
    } else {
        // only descriptors KVM_CREATE_VM returned: anything else never becomes a VM or update
        struct vmfd_key k = {};
        k.tgid = tgid;
        k.fd = (u32)fd;
        u64 *g = tp_vmfd.lookup(&k);
        if (!g || (*g & FD_VCPU)) {  // (a vCPU descriptor is no VM's)
            if (cmd != KVM_CREATE_VCPU_NR)
                bump(CNT_IGNORED);
            return 0;
        }
        s.gen = *g;
        struct tp_vm *v = tp_vms.lookup(&s.gen);
        if (!v || (v->flags & VMF_DEAD)) {
            if (cmd != KVM_CREATE_VCPU_NR)
                bump(CNT_IGNORED);
            return 0;
        }
        if (cmd == KVM_CREATE_VCPU_NR)
            goto keep;  // its descriptor holds the VM (tp_ioc_exit)
        bpf_probe_read_user(&s.r, sizeof(s.r), (void *)arg);
        u32 tab = v->tab;
        struct tab_hdr *h = tab == NO_TAB ? 0 : tp_hdr.lookup(&tab);
        if (h && h->gen == s.gen) {
            __sync_fetch_and_add(&h->busy, 1);  // hva ops from now until the exit are underived
            s.tab = tab;
        }
    }
keep:
    s.ts = bpf_ktime_get_ns();
    if (ioc.update(&tid, &s) != 0) {
        if (s.tab != NO_TAB)
            ioc_release(&s, 0);
        bump(CNT_MAPFULL);
        return 0;
    }
    return 1;
}

// The thread's ioctl state, dropped unhandled (its table released).
static __always_inline void ioc_drop(u32 tid)
{
    struct ioc_state *s = ioc.lookup(&tid);
    if (s) {
        ioc_release(s, 0);
        ioc.delete(&tid);
    }
}

// dup(old) / dup2(old, new) / dup3 / fcntl(old, F_DUPFD*) entered by a VMM thread: 1 when
// `old` holds a known VM (the new descriptor will hold it too) or `new` does (dup2/dup3 close it
// first); the state waits in `ioc` for tp_ioc_exit, which has the new descriptor.
static __always_inline u32 dup_enter(u32 tgid, u32 tid, u32 oldfd, u32 newfd, u32 has_new)
{
    struct vmfd_key k = {};
    k.tgid = tgid;
    k.fd = oldfd;
    u64 *g = tp_vmfd.lookup(&k);
    u64 val = g ? *g : 0;
    u32 closes = 0;
    if (has_new && newfd != oldfd) {
        k.fd = newfd;
        closes = tp_vmfd.lookup(&k) != 0;
    }
    if (!val && !closes)
        return 0;
    struct ioc_state s = {};
    s.cmd = TP_DUP;
    s.fd = oldfd;
    s.gen = val;
    s.tab = NO_TAB;
    s.r.slot = newfd;
    s.r.flags = closes;
    if (ioc.update(&tid, &s) != 0) {
        bump(CNT_MAPFULL);
        return 0;
    }
    return 1;
}

static __always_inline void ms_account(u64 gen, u32 tgid, u32 change, s64 ret, u64 dur)
{
    struct op_key k = {};
    u32 zk = 0;
    k.vm = gen;
    k.op = change;
    k.owner = tgid;
    struct ms_val *v = ms_aggs.lookup(&k);
    if (!v) {
        struct ms_val *zero = ms_zero.lookup(&zk);
        if (zero) {
            ms_aggs.insert(&k, zero);
            v = ms_aggs.lookup(&k);
        }
    }
    if (!v) {
        bump(CNT_MAPFULL);
        return;
    }
    __sync_fetch_and_add(&v->count, 1);
    if (ret != 0)
        __sync_fetch_and_add(&v->errors, 1);
    __sync_fetch_and_add(&v->lat_sum, dur);
    max_update(&v->lat_max, dur);
    v->tgid = tgid;
    hist_inc(v->lat, dur, 1);
}

// The end of a call that returns a new descriptor of a known VM (KVM_CREATE_VCPU, dup*) or a
// new VM (KVM_CREATE_VM): tail-called by tp_ioc_exit.
int tp_fd_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct ioc_state *s = ioc.lookup(&tid);
    if (!s)
        return 0;
    s64 ret = (s64)ctx->args[1];  // raw_syscalls:sys_exit(regs, ret)
    u64 cmd = s->cmd, gen = s->gen;
    u32 oldfd = s->fd;
    ioc.delete(&tid);
    if (ret < 0 || (cmd == TP_DUP && (u32)ret == oldfd))  // failed, or dup2(fd, fd): no change
        return 0;
    // the new descriptor held a VM (dup2/dup3 closed it, or its close was not seen): it no
    // longer does. The one place of this program that can drop a VM from its process's list.
    fd_close(tgid, (u32)ret);
    if (cmd == KVM_CREATE_VCPU_NR) {
        fd_add(tgid, (u32)ret, gen | FD_VCPU);
    } else if (cmd == TP_DUP) {
        if (gen)
            fd_add(tgid, (u32)ret, gen);
    } else {
        vm_register(tgid, (u32)ret);
        // rare: lets userspace name the VMM while it is alive
        struct event ev = {};
        ev_head(&ev, EV_VM_CREATE, bpf_ktime_get_ns(), id);
        ev.vm_create.ret = (s32)ret;
        emit(ctx, &ev, 0);
    }
    return 0;
}

// A close() of a descriptor kvmtrace knows holds a VM: tail-called by tp_sys_enter.
int tp_close(struct bpf_raw_tracepoint_args *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    // close's fd is its first argument: the di register of the saved user registers
    u64 fd = 0;
    bpf_probe_read_kernel(&fd, sizeof(fd), (void *)(ctx->args[0] + OFF_PT_REGS_DI));
    fd_close(tgid, (u32)fd);
    return 0;
}

// The end of a memslot ioctl, or of a call returning a new descriptor: tail-called by
// tp_sys_exit (a separate program, so that the hot system-call exit stays small for the
// verifier and the cache).
int tp_ioc_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct ioc_state *s = ioc.lookup(&tid);
    if (!s)
        return 0;
    if (s->cmd == TP_DUP || s->cmd == KVM_CREATE_VCPU_NR || s->cmd == KVM_CREATE_VM_NR) {
        tp_jobs.call(ctx, JOB_FD_EXIT);
        // not reached once the program is installed (userspace does that before attaching)
        ioc.delete(&tid);
        bump(CNT_LOST);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    s64 ret = (s64)ctx->args[1];  // raw_syscalls:sys_exit(regs, ret)
    if (ret == -KT_ENOTTY || ret == -KT_EBADF) {  // the descriptor is no VM (any more)
        bump(CNT_IGNORED);
        ioc_release(s, 0);
        ioc.delete(&tid);
        return 0;
    }
    u64 gen = s->gen;
    struct tp_vm *v = tp_vms.lookup(&gen);
    if (!v) {
        ioc_release(s, 0);
        ioc.delete(&tid);
        return 0;
    }
    // the change type, as kvm_set_memory_region decides it from the old and the new slot
    struct slot_key sk = {};
    sk.gen = gen;
    sk.slot = s->r.slot;
    struct slot_rec *old = tp_slots.lookup(&sk);
    u32 partial = v->flags & VMF_PARTIAL;
    u32 ch = NR_CHANGES;  // unknown
    int noop = 0;
    if (!old && partial) {
        ch = NR_CHANGES;  // the slot may predate the trace: not derivable
    } else if (s->r.memory_size == 0) {
        if (old)
            ch = CHANGE_DELETE;
        else
            noop = 1;
    } else if (!old) {
        ch = CHANGE_CREATE;
    } else if (s->r.guest_phys_addr != old->gpa) {
        ch = CHANGE_MOVE;
    } else if (s->r.flags != old->flags) {
        ch = CHANGE_FLAGS_ONLY;
    } else {
        noop = 1;
    }
    if (noop && ret == 0) {  // KVM changed nothing
        ioc_release(s, 0);
        ioc.delete(&tid);
        return 0;
    }
    ms_account(gen, tgid, ch, ret, now - s->ts);
#ifdef TP_RAW
    struct event ev = {};
    ev_head(&ev, EV_MEMSLOT, s->ts, id);
    ev.memslot.lat_ns = now - s->ts;
    ev.memslot.gpa = s->r.guest_phys_addr;
    ev.memslot.size = s->r.memory_size;
    ev.memslot.hva = s->r.userspace_addr;
    ev.memslot.slot = s->r.slot;
    ev.memslot.flags = s->r.flags;
    ev.memslot.change = ch;  // classified here
    ev.memslot.ret = (s32)ret;
    ev.vm = gen;
    emit(ctx, &ev, 0);
#endif
    if (ret != 0) {  // a failed update changes nothing
        ioc_release(s, 0);
        ioc.delete(&tid);
        return 0;
    }
    u64 vs = 0, ve = 0;
    u32 job = JOB_NONE;
    if (ch == CHANGE_DELETE && old) {
        vs = old->hva;
        ve = old->hva + old->size;
        tp_slots.delete(&sk);
        if (v->n > 0)
            v->n--;
        job = JOB_REMOVE;
    } else if (ch == CHANGE_MOVE || ch == CHANGE_FLAGS_ONLY) {
        if (old) {
            old->gpa = s->r.guest_phys_addr;
            old->flags = s->r.flags;
        }
    } else if (s->r.memory_size) {  // create (or a slot of a partial VM seen for the first time)
        struct slot_rec r = {};
        r.gpa = s->r.guest_phys_addr;
        r.size = s->r.memory_size;
        r.hva = s->r.userspace_addr;
        r.flags = s->r.flags;
        if (tp_slots.update(&sk, &r) != 0) {
            bump(CNT_MAPFULL);
            v->flags |= VMF_BROKEN;
        }
        if (ch == CHANGE_CREATE) {
            v->n++;
            if (v->n > v->nmax)
                v->nmax = v->n;
            vs = r.hva;
            ve = r.hva + r.size;
            job = JOB_INSERT;
        }
    }
    if (job == JOB_NONE || s->tab == NO_TAB) {
        ioc_release(s, 0);
        ioc.delete(&tid);
        return 0;
    }
    u32 tab = s->tab;
    struct tab_hdr *h = tp_hdr.lookup(&tab);
    struct tab_data *t = tp_tab.lookup(&tab);
    if (!h || !t || h->gen != gen || h->broken) {
        ioc_release(s, 0);
        ioc.delete(&tid);
        return 0;
    }
    u32 n = h->n;
    if (h->busy != 1 || n > TAB_CAP || (job == JOB_INSERT && n >= TAB_CAP) || (job == JOB_REMOVE && n == 0)) {
        // a concurrent update of the same VM (KVM serialises them; our copies would race),
        // or a full table: the table is no longer trusted, its figures become underived
        h->broken = 1;
        ioc_release(s, 1);
        ioc.delete(&tid);
        return 0;
    }
    s->job = job;
    s->n = n;
    s->vs = vs;
    s->ve = ve;
    s->ps = tab_bound(t->start, n, vs, 0);
    s->pe = tab_bound(t->end, n, ve, 0);
    if (job == JOB_REMOVE) {
        if (t->start[s->ps & TAB_MASK] != vs || t->end[s->pe & TAB_MASK] != ve || s->ps >= n || s->pe >= n) {
            h->broken = 1;
            ioc_release(s, 1);
            ioc.delete(&tid);
            return 0;
        }
        s->j = s->ps < s->pe ? s->ps : s->pe;
        tp_jobs.call(ctx, JOB_SHIFT_LEFT);
    } else {
        s->j = n;
        tp_jobs.call(ctx, JOB_SHIFT_RIGHT);
    }
    // the tail call failed (programs not installed yet, or the chain limit)
    h->broken = 1;
    ioc_release(s, 1);
    ioc.delete(&tid);
    return 0;
}

// Tail-called: move up to SHIFT_CHUNK entries per program run, then call itself; the last run
// writes the new values, the count, and releases the table (seq bumped, busy dropped).
//
// Shape for the verifier: it walks a bounded loop once per iteration (the counter is a known,
// precise value, so no iteration's state prunes another's) and every conditional jump inside
// multiplies the paths it follows. The move is therefore branch-free in blocks of SHIFT_BLOCK
// entries (the comparisons are sign bits of differences of values clang cannot see are 32-bit,
// so it cannot turn them back into compares, which BPF has only as jumps); a step past the end
// moves nothing and leaves j in place, and the only jump is one test per block. With the
// comparisons as jumps (clang did that) 6.12 stopped at its 1,000,000-instruction limit after
// ~205 of the 1,024 steps (E2BIG) and 6.18 needed 538,652.
static __always_inline u64 shift_opaque(u64 v)
{
    asm volatile("" : "+r"(v));
    return v;
}

int tp_shift_right(void *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ioc_state *s = ioc.lookup(&tid);
    if (!s)
        return 0;
    u32 tab = s->tab;
    struct tab_hdr *h = tp_hdr.lookup(&tab);
    struct tab_data *t = tp_tab.lookup(&tab);
    if (!h || !t)
        return 0;
    u32 ps32 = s->ps, pe32 = s->pe;
    u64 j = shift_opaque(s->j), ps = shift_opaque(ps32), pe = shift_opaque(pe32);
    u64 d = ps - pe, neg = shift_opaque(d >> 63);
    u64 lo = pe + (d & -neg);  // min(ps, pe) without a jump: the verifier walks the loop once, not twice
    for (int b = 0; b < SHIFT_CHUNK / SHIFT_BLOCK; b++) {
        if (j <= lo)
            break;
#pragma unroll
        for (int i = 0; i < SHIFT_BLOCK; i++) {
            // entry j takes entry j-1 in an array whose new value goes below j; j moves while > lo
            u64 live = (lo - j) >> 63, ms = (ps - j) >> 63, me = (pe - j) >> 63;
            asm volatile("" : "+r"(live), "+r"(ms), "+r"(me));
            u64 x = t->start[j & TAB_MASK], y = t->start[(j - 1) & TAB_MASK];
            t->start[j & TAB_MASK] = x ^ ((x ^ y) & -ms);
            x = t->end[j & TAB_MASK];
            y = t->end[(j - 1) & TAB_MASK];
            t->end[j & TAB_MASK] = x ^ ((x ^ y) & -me);
            j -= live;
        }
    }
    if (j > lo) {
        s->j = (u32)j;
        tp_jobs.call(ctx, JOB_SHIFT_RIGHT);
        h->broken = 1;  // chain limit reached (cannot happen below TAB_CAP entries)
    } else {
        t->start[ps32 & TAB_MASK] = s->vs;
        t->end[pe32 & TAB_MASK] = s->ve;
        h->n = s->n + 1;
    }
    ioc_release(s, 1);
    ioc.delete(&tid);
    return 0;
}

int tp_shift_left(void *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ioc_state *s = ioc.lookup(&tid);
    if (!s)
        return 0;
    u32 tab = s->tab;
    struct tab_hdr *h = tp_hdr.lookup(&tab);
    struct tab_data *t = tp_tab.lookup(&tab);
    if (!h || !t)
        return 0;
    u32 last32 = s->n - 1;  // n >= 1: the exit program checked
    u64 j = shift_opaque(s->j), ps = shift_opaque(s->ps), pe = shift_opaque(s->pe);
    u64 last = shift_opaque(last32);
    for (int b = 0; b < SHIFT_CHUNK / SHIFT_BLOCK; b++) {
        if (j >= last)
            break;
#pragma unroll
        for (int i = 0; i < SHIFT_BLOCK; i++) {
            // entry j takes entry j+1 in an array whose removed value was at or below j
            u64 live = (j - last) >> 63;
            u64 ms = live & (((j - ps) >> 63) ^ 1), me = live & (((j - pe) >> 63) ^ 1);
            asm volatile("" : "+r"(live), "+r"(ms), "+r"(me));
            u64 x = t->start[j & TAB_MASK], y = t->start[(j + 1) & TAB_MASK];
            t->start[j & TAB_MASK] = x ^ ((x ^ y) & -ms);
            x = t->end[j & TAB_MASK];
            y = t->end[(j + 1) & TAB_MASK];
            t->end[j & TAB_MASK] = x ^ ((x ^ y) & -me);
            j += live;
        }
    }
    if (j < last) {
        s->j = (u32)j;
        tp_jobs.call(ctx, JOB_SHIFT_LEFT);
        h->broken = 1;
    } else {
        h->n = last32;
    }
    ioc_release(s, 1);
    ioc.delete(&tid);
    return 0;
}

// A VMM process ends or execs (a new mm: no notifier of its VMs is on it): its VMs are gone,
// their tables free, its entries removed. (Further descriptors of its VMs, dups and vCPUs, stay
// in tp_vmfd until userspace removes the VM: their VM is dead, they hold nothing.)
static __always_inline void vmm_forget(u32 tgid)
{
    struct vmm_val *p = vmm.lookup(&tgid);
    if (!p)
        return;
    u32 n = p->n;
#pragma unroll
    for (int i = 0; i < VM_PER_PROC; i++) {
        if (i < n)
            vm_gone(tgid, p->fd[i], p->gen[i]);
    }
#pragma unroll
    for (u32 j = VM_PER_PROC; j < VM_LIST_MAX; j++) {  // only lists beyond VM_PER_PROC
        if (j >= n)
            continue;
        struct vmfd_key k = {};
        k.tgid = tgid;
        k.fd = j;
        struct vm_ent *e = tp_vmmore.lookup(&k);
        if (e) {
            vm_gone(tgid, e->fd, e->gen);
            tp_vmmore.delete(&k);
        }
    }
    vmm.delete(&tgid);
    vmm_bump(tgid);
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if ((u32)id != tgid)  // the thread group leader ends last in practice: prune once, then
        return 0;
    vmm_forget(tgid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    vmm_forget(bpf_get_current_pid_tgid() >> 32);
    return 0;
}
#endif  // MS_TP

// =====================================================================================
// Tracepoint mode: the system calls (raw_syscalls sys_enter / sys_exit as raw tracepoints)
// =====================================================================================
// One pair of programs serves both parts: an hva op's latency is its system call's, memslot
// updates and VM creation are ioctls, a VM leaves with close() of its descriptor. They run for
// every system call of every task on the host: a task that is no VMM leaves sys_exit after one
// byte read, and sys_enter after that and a compare of the call number (an ioctl also reads
// its three arguments from the saved registers). The classic syscalls:sys_{enter,exit}_ioctl
// tracepoints served the ioctls before: while any classic syscall tracepoint is attached,
// every system call of every task goes through perf's syscall handlers, which cost more than
// these programs (measured: docs/benchmarks.md, "The ioctl tracepoints' tax").
// Userspace attaches them itself (not bcc's automatic attach), after tp_jobs is filled.
#ifdef TP_VMS
#ifndef NR_IOCTL
#define NR_IOCTL 16    // x86_64
#endif
#ifndef OFF_PT_REGS_DX
#define OFF_PT_REGS_DX 96  // x86_64 struct pt_regs: dx, si, di in a row (third, second, first argument)
#endif
#define NR_DUP 32      // x86_64 dup, dup2, dup3, fcntl (and its F_DUPFD, F_DUPFD_CLOEXEC)
#define NR_DUP2 33
#define NR_DUP3 292
#define NR_FCNTL 72
#define KT_F_DUPFD 0
#define KT_F_DUPFD_CLOEXEC 1030
struct sc_args3 {
    u64 dx;
    u64 si;
    u64 di;
};

int tp_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    u32 ioc_pending = 0;
#ifdef MS_TP
    if (ctx->args[1] == NR_IOCTL) {  // memslot updates and VM creation, by any task
        struct sc_args3 a = {};
        bpf_probe_read_kernel(&a, sizeof(a), (void *)(ctx->args[0] + OFF_PT_REGS_DX));
        ioc_pending = ioc_enter(tgid, tid, a.di, a.si, a.dx);
    }
#endif
    if (!ioc_pending && !vmm_marked(tgid))  // almost every task that is no VMM: one byte read
        return 0;
    // a VMM thread reuses its state (zeroed at every syscall exit); any other marked task costs
    // the lookup of its tgid
    struct sc_state *cur = 0;
#ifdef TP_TASK_STORAGE
    cur = sc_get(tid);  // cheap, and NULL for every task that never ran a VMM syscall
#endif
    if (!cur) {
        if (!ioc_pending && !tgid_wanted(tgid))
            return 0;
#ifndef TP_TASK_STORAGE
        cur = sc_get(tid);
#endif
        if (!cur)
            cur = sc_new(tid);
        if (!cur)  // (an ioctl's state stays in `ioc`: the exit finds it there)
            return 0;
    }
    cur->ioc = ioc_pending;
    cur->ts = bpf_ktime_get_ns();
    cur->last_start = cur->last_end = 0;
#ifdef MS_TP
    u64 nr = ctx->args[1];
    if (nr == NR_CLOSE) {  // a descriptor closed: a VM leaves the list once none holds it
        // close's fd is its first argument: the di register of the saved user registers
        u64 fd = 0;
        bpf_probe_read_kernel(&fd, sizeof(fd), (void *)(ctx->args[0] + OFF_PT_REGS_DI));
        struct vmfd_key k = {};
        k.tgid = tgid;
        k.fd = (u32)fd;
        if (tp_vmfd.lookup(&k)) {
            tp_jobs.call(ctx, JOB_CLOSE);
            bump(CNT_LOST);  // not reached once the program is installed (before attaching)
        }
    } else if (nr == NR_DUP || nr == NR_DUP2 || nr == NR_DUP3 || nr == NR_FCNTL) {
        struct sc_args3 a = {};
        bpf_probe_read_kernel(&a, sizeof(a), (void *)(ctx->args[0] + OFF_PT_REGS_DX));
        if (nr != NR_FCNTL || a.si == KT_F_DUPFD || a.si == KT_F_DUPFD_CLOEXEC)
            cur->ioc = dup_enter(tgid, tid, (u32)a.di, (u32)a.si, nr == NR_DUP2 || nr == NR_DUP3);
    }
#endif
    return 0;
}

int tp_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (!vmm_marked(tgid))
        return 0;
    struct sc_state *s = sc_get(tid);
    if (!s) {
#ifdef MS_TP
        // no state (its creation failed at the entry: task storage busy or full): an ioctl
        // kept in `ioc` still ends (a VM created right then is registered all the same)
        if (ioc.lookup(&tid))
            tp_jobs.call(ctx, JOB_IOC_EXIT);
#endif
        return 0;
    }
#ifdef HVA_TP
    sc_end(ctx, s, tgid, id);
#endif
    s->ts = 0;
    s->last_start = s->last_end = 0;
#ifdef MS_TP
    if (s->ioc) {
        s->ioc = 0;
        tp_jobs.call(ctx, JOB_IOC_EXIT);
        // not reached once the program is installed (userspace does that before attaching)
        ioc_drop(tid);
        bump(CNT_LOST);
    }
#endif
    return 0;
}
#endif  // TP_VMS

// =====================================================================================
// Exact mode (kprobe or fentry): callback entry/exit, per-slot handlers, memslot updates
// =====================================================================================
#if defined(HVA_EXACT_UNMAP) || defined(HVA_EXACT_AGE) || defined(HVA_EXACT_TEST_AGE) || \
    defined(HVA_EXACT_CHANGE_PTE) || defined(MS_EXACT)
#define EXACT 1

#ifdef MODE_FENTRY
// fentry/fexit: ctx is the u64 argument array (return value after the arguments on fexit)
#define ARG(ctx, n) (((u64 *)(ctx))[n])
#ifdef FENTRY_MODULE
#define FENTRY_(m, fn) MODULE_KFUNC_PROBE(m, fn)
#define FEXIT_(m, fn) MODULE_KRETFUNC_PROBE(m, fn)
#define FENTRY(fn) FENTRY_(FENTRY_MODULE, fn)
#define FEXIT(fn) FEXIT_(FENTRY_MODULE, fn)
#else
#define FENTRY_(fn) KFUNC_PROBE(fn)
#define FEXIT_(fn) KRETFUNC_PROBE(fn)
#define FENTRY(fn) FENTRY_(fn)
#define FEXIT(fn) FEXIT_(fn)
#endif
#define CTX_T void
#else
#define KARG_0(c) PT_REGS_PARM1(c)
#define KARG_1(c) PT_REGS_PARM2(c)
#define KARG_2(c) PT_REGS_PARM3(c)
#define KARG_3(c) PT_REGS_PARM4(c)
#define KARG_4(c) PT_REGS_PARM5(c)
#define KARG_5(c) PT_REGS_PARM6(c)
#define KARG_(c, n) KARG_##n(c)
#define ARG(ctx, n) KARG_(ctx, n)
#define CTX_T struct pt_regs
#endif

struct cb_state {  // one callback in flight on this thread
    u64 ts;
    u64 vm;        // struct kvm *
    u64 start;
    u64 end;
    u64 last_slot; // per-slot handlers with a slot argument: the slot of the last call
    u32 op;
    u32 slots;     // memslots the callback's per-slot handlers visited
    u32 scanned;   // linear-scan kernels: memslots the lookup examines (the memslot count)
    s32 memslots;  // the VM's memslot count at entry, -1 = unknown
    u32 owner;     // the VM's VMM tgid (vm_state), else the current one
    u32 ordinal;   // the VM's per-VMM ordinal (vm_state), 0 = older than the trace
    u64 epoch;     // vm_epoch + 1 when owner, ordinal and memslots were read from vm_state; 0 = not
};
#ifdef CB_TASK_STORAGE
// 5.11+ with BTF: the thread's state in task-local storage, created at its first callback and
// freed with the task (bounded by the tasks alive)
BPF_TASK_STORAGE(cb_task, struct cb_state);
#else
// LRU: a callback whose exit probe was missed (kretprobe instances exhausted) ages out
BPF_TABLE("lru_hash", u32, struct cb_state, cb_inflight, MAX_THREADS);
#endif

// The state of the callback in flight on this thread, or NULL.
static __always_inline struct cb_state *cb_get(void)
{
#ifdef CB_TASK_STORAGE
    return cb_task.task_storage_get((struct task_struct *)bpf_get_current_task_btf(), 0, 0);
#else
    u32 tid = (u32)bpf_get_current_pid_tgid();
    return cb_inflight.lookup(&tid);
#endif
}

// One VM's lifetime, from its creation (kvm_arch_init_vm) to its destruction
// (kvm_arch_destroy_vm); a VM older than the trace gets an entry (ordinal 0) when first seen.
struct vm_state {
    u32 tgid;      // VMM process
    u32 ordinal;   // n-th VM this VMM created while traced (1-based), 0 = older than the trace
    s32 memslots;  // current memslot count, -1 = unknown (see vm_memslots)
    u32 memslots_max;
};
BPF_HASH(vms, u64, struct vm_state, MAX_VMS);
// Bumped at every change of any vm_state (VM created or destroyed, memslot count or owner
// changed): a thread whose previous callback was on the same VM at the same epoch reuses what it
// read from vm_state then (one array read, inlined by the JIT, instead of a hash lookup).
BPF_ARRAY(vm_epoch, u64, 1);
BPF_TABLE("lru_hash", u32, u32, vm_seq, MAX_VMMS);  // tgid -> VMs created while traced


#if READ_MEMSLOTS
// Kernels before 5.17 keep each address space's memslots in a sorted array, and the hva lookup
// examines every used entry of every address space (plan.py: LINEAR_SCAN_LOOPS cites the loop
// per version). So slots scanned = the memslot count = the sum of used_slots, read here once
// per callback: 2 reads per address space, whatever the count.
static __always_inline s32 read_memslots(u64 kvm)
{
    u64 ptr[NR_AS] = {};
    s32 total = 0;
    bpf_probe_read_kernel(&ptr, sizeof(ptr), (void *)(kvm + OFF_KVM_MEMSLOTS));
#pragma unroll
    for (int as = 0; as < NR_AS; as++) {
        int used = 0;
        if (!ptr[as])
            continue;
        bpf_probe_read_kernel(&used, sizeof(used), (void *)(ptr[as] + OFF_MEMSLOTS_USED));
        if (used > 0)
            total += used;
    }
    return total;
}
#endif

// Memslot count kept in vm_state from the updates kvmtrace observes: exact for a VM created
// while traced when the change type is read in the kernel; unknown otherwise (never guessed).
#if READ_MEMSLOTS || (defined(MS_EXACT) && !defined(MS_DERIVE))
#define MEMSLOTS_AT_CREATE 0
#else
#define MEMSLOTS_AT_CREATE -1
#endif

static __always_inline void vm_changed(void)
{
    u32 k = 0;
    u64 *e = vm_epoch.lookup(&k);
    if (e)
        __sync_fetch_and_add(e, 1);
}

static __always_inline struct vm_state *vm_get(u64 kvm, u32 tgid)
{
    struct vm_state *v = vms.lookup(&kvm);
    if (v)
        return v;
    // older than the trace: the current task is its VMM when it updates memslots (the usual
    // first sighting); a callback run by another task (kswapd) is a best guess
    struct vm_state n = {};
    n.tgid = tgid;
    n.memslots = -1;
    vms.insert(&kvm, &n);
    vm_changed();
    return vms.lookup(&kvm);
}

static __always_inline void vm_memslots(struct vm_state *v, s32 count)
{
    if (v->memslots == count)
        return;
    v->memslots = count;
    vm_changed();
    if (count > 0 && (u32)count > v->memslots_max)
        v->memslots_max = count;
}

// The thread's state, created at its first callback (reused by the next ones).
static __always_inline struct cb_state *cb_new(u64 id)
{
#ifdef CB_TASK_STORAGE
    return cb_task.task_storage_get((struct task_struct *)bpf_get_current_task_btf(), 0,
                                    BPF_LOCAL_STORAGE_GET_F_CREATE);
#else
    u32 tid = (u32)id;
    struct cb_state *cur = cb_inflight.lookup(&tid);
    if (cur)
        return cur;
    struct cb_state z = {};
    cb_inflight.update(&tid, &z);
    return cb_inflight.lookup(&tid);
#endif
}

static __always_inline int cb_enter(u32 op, u64 mn, u64 start, u64 end)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (filtered_out(tgid))
        return 0;
    struct cb_state *s = cb_new(id);
    if (!s) {
        bump(CNT_MAPFULL);  // no room for the thread's state: the callback is not counted
        return 0;
    }
    u64 vm = mn - OFF_KVM_MMU_NOTIFIER;
    u32 zk = 0;
    u64 *ep = vm_epoch.lookup(&zk);
    u64 epoch = ep ? *ep + 1 : 0;
#if READ_MEMSLOTS
    s32 n = read_memslots(vm);
    int same = epoch && s->epoch == epoch && s->vm == vm && s->memslots == n;
#else
    int same = epoch && s->epoch == epoch && s->vm == vm;
#endif
    if (!same) {  // another VM than this thread's previous callback, or a VM changed since
        s->vm = vm;
        s->memslots = -1;
        s->epoch = 0;
        struct vm_state *v = vm_get(vm, tgid);
        if (v) {
            s->owner = v->tgid;
            s->ordinal = v->ordinal;
#if READ_MEMSLOTS
            s->memslots = n;
            vm_memslots(v, n);
#else
            s->memslots = v->memslots;
#endif
            // the epoch read BEFORE vm_state (a seqlock's read side): a change written
            // meanwhile, this callback's own included, bumps it and the next callback rereads
            s->epoch = epoch;
        } else {
            s->owner = tgid;
            bump(CNT_MAPFULL);
        }
    }
#if READ_MEMSLOTS
    s->scanned = n;
#endif
    s->op = op;
    s->start = start;
    s->end = end;
    s->last_slot = 0;
    s->slots = 0;
    s->ts = bpf_ktime_get_ns();  // last: handlers and the exit count only while ts != 0
    return 0;
}

#ifdef EXACT_HVA
// The operation's memslot-count bucket, inside its (VM, op) value.
static __always_inline void bucket_add(struct ex_agg *x, struct cb_state *s, u64 dur, u32 slots)
{
    if (s->memslots < 0)
        return;  // count unknown (VM older than the trace on an interval-tree kernel)
    struct bucket_val *b = &x->b[log2_bucket(s->memslots) & (MS_BUCKETS - 1)];
    __sync_fetch_and_add(&b->count, 1);
    __sync_fetch_and_add(&b->lat_sum, dur);
    __sync_fetch_and_add(&b->slots_sum, slots);
    __sync_fetch_and_add(&b->scanned_sum, s->scanned);
    max_update(&b->memslots_max, s->memslots);
}

static __always_inline int cb_exit(void *ctx)
{
    u64 now = bpf_ktime_get_ns();
    struct cb_state *s = cb_get();
    if (!s || !s->ts)
        return 0;
    u64 dur = now - s->ts;
    u32 op = s->op;
    u32 slots = s->slots;
    struct op_key k = {};
    k.vm = s->vm;
    k.op = op;
    k.owner = s->owner;
    k.ordinal = s->ordinal;
    struct ex_agg *x = agg_get_key(&k);
    if (x) {
        struct agg_val *a = &x->a;
        __sync_fetch_and_add(&a->s.count, 1);
        hist_inc(a->range, s->end - s->start, 1);
        hist_inc(a->lat, dur, 1);
        hist_inc(a->slots, slots, 1);
        // every exact operation has a latency and a slot figure: lat_count and slots_count
        // are the count (userspace reads them so), which saves two atomic adds per event
        __sync_fetch_and_add(&a->s.lat_sum, dur);
        max_update(&a->s.lat_max, dur);
        __sync_fetch_and_add(&a->s.slots_sum, slots);
        max_update(&a->s.slots_max, slots);
#if READ_MEMSLOTS
        __sync_fetch_and_add(&a->s.scanned_sum, s->scanned);
#endif
        bucket_add(x, s, dur, slots);
    }
#ifdef EVENTS
    struct event ev = {};
    ev_head(&ev, EV_HVA, s->ts, bpf_get_current_pid_tgid());
    ev.hva.op = op;
    ev.hva.start = s->start;
    ev.hva.end = s->end;
    ev.hva.lat_ns = dur;
    ev.hva.slots = slots;
    ev.hva.scanned = s->scanned;
    ev.hva.owner = s->owner;
    ev.hva.ordinal = s->ordinal;
    ev.hva.memslots = s->memslots;
    ev.vm = s->vm;
    emit(ctx, &ev, RB_NO_WAKEUP);
#endif
    s->ts = 0;  // done; the entry is reused by the thread's next callback
    return 0;
}
#endif  // EXACT_HVA

// A per-slot handler called inside a callback on this thread. slot == 0: the handler runs once
// per overlapping memslot (5.13+ gfn handlers), so every call is one slot visited. slot != 0:
// the handler runs once per rmap (gfn, level) of each overlapping memslot, slot by slot, with the
// memslot as argument (5.10's arch rmap handlers), so each change of slot is one slot visited.
static __always_inline int handler_hit(u64 slot)
{
    struct cb_state *s = cb_get();
    if (!s || !s->ts)
        return 0;
    if (slot) {
        if (slot == s->last_slot)
            return 0;
        s->last_slot = slot;
    }
    s->slots++;
    return 0;
}

// ---- VM lifetimes ----
#ifdef VM_LIFE
static __always_inline int vm_created(void *ctx, u64 kvm)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (filtered_out(tgid))
        return 0;
    u32 zero = 0, *seq = vm_seq.lookup_or_try_init(&tgid, &zero);
    struct vm_state v = {};
    v.tgid = tgid;
    if (seq) {
        // not atomic (fetch-and-add returns nothing before 5.12): two threads of one VMM
        // creating VMs at the same instant could share an ordinal
        v.ordinal = *seq + 1;
        *seq = v.ordinal;
    }
    v.memslots = MEMSLOTS_AT_CREATE;
    vms.update(&kvm, &v);
    vm_changed();
    struct event ev = {};
    ev_head(&ev, EV_VM_LIFE, bpf_ktime_get_ns(), id);
    ev.vm = kvm;
    ev.vm_life.owner = tgid;
    ev.vm_life.ordinal = v.ordinal;
    ev.vm_life.memslots = v.memslots;
    emit(ctx, &ev, 0);
    return 0;
}

static __always_inline int vm_destroyed(void *ctx, u64 kvm)
{
    struct vm_state *v = vms.lookup(&kvm);
    if (!v)
        return 0;  // not traced (other VMM under --pid) or never seen
    u64 id = bpf_get_current_pid_tgid();
    struct event ev = {};
    ev_head(&ev, EV_VM_LIFE, bpf_ktime_get_ns(), id);
    ev.vm = kvm;
    ev.vm_life.owner = v->tgid;
    ev.vm_life.ordinal = v->ordinal;
    ev.vm_life.memslots = v->memslots;
    ev.vm_life.memslots_max = v->memslots_max;
    ev.vm_life.destroyed = 1;
    vms.delete(&kvm);  // the address may be reused by the next VM: its own entry then
    vm_changed();
    emit(ctx, &ev, 0);
    return 0;
}
#endif

// Argument positions (CB_*_ARG_*) come from BTF parameter names; a callback without an end
// argument (test_young, change_pte take one address) covers one page.
#define CB_RANGE(ctx, OPN, startp, endp)                                        \
    do {                                                                         \
        *(startp) = ARG(ctx, CB_##OPN##_START_ARG);                              \
        *(endp) = *(startp) + PAGE_SIZE_B;                                       \
    } while (0)

// One program per macro expansion: bcc before 0.2x keeps only the first function of an expansion.
#ifdef MODE_FENTRY
#define CB_ENTER(OPN, FN, OPV)                                                   \
    FENTRY(FN) { u64 st = 0, en = 0; CB_ARGS_##OPN(ctx, &st, &en);               \
                 return cb_enter(OPV, ARG(ctx, 0), st, en); }
#define CB_EXIT(OPN, FN) FEXIT(FN) { return cb_exit(ctx); }
#define HANDLER_PROG(FN, OPN) FENTRY(FN) { return handler_hit(H_SLOT_##OPN(ctx)); }
#else
#define CB_ENTER(OPN, FN, OPV)                                                   \
    int KP_CB_PROG(enter, OPN, FN)(struct pt_regs *ctx) { u64 st = 0, en = 0;         \
        CB_ARGS_##OPN(ctx, &st, &en); return cb_enter(OPV, ARG(ctx, 0), st, en); }
#define CB_EXIT(OPN, FN) int KP_CB_PROG(exit, OPN, FN)(struct pt_regs *ctx) { return cb_exit(ctx); }
#define HANDLER_PROG(FN, OPN) int KP_HANDLER_PROG(FN)(struct pt_regs *ctx) { return handler_hit(H_SLOT_##OPN(ctx)); }
#endif
#define CB_ENTER_(OPN, FN, OPV) CB_ENTER(OPN, FN, OPV)
#define CB_EXIT_(OPN, FN) CB_EXIT(OPN, FN)
#define HANDLER_PROG_(FN, OPN) HANDLER_PROG(FN, OPN)
// the memslot argument of handlers called per rmap rather than per slot (H_<OP>_SLOT_ARG)
#ifdef H_UNMAP_SLOT_ARG
#define H_SLOT_UNMAP(ctx) ARG(ctx, H_UNMAP_SLOT_ARG)
#else
#define H_SLOT_UNMAP(ctx) 0
#endif
#ifdef H_AGE_SLOT_ARG
#define H_SLOT_AGE(ctx) ARG(ctx, H_AGE_SLOT_ARG)
#else
#define H_SLOT_AGE(ctx) 0
#endif
#ifdef H_TEST_AGE_SLOT_ARG
#define H_SLOT_TEST_AGE(ctx) ARG(ctx, H_TEST_AGE_SLOT_ARG)
#else
#define H_SLOT_TEST_AGE(ctx) 0
#endif
#ifdef H_CHANGE_PTE_SLOT_ARG
#define H_SLOT_CHANGE_PTE(ctx) ARG(ctx, H_CHANGE_PTE_SLOT_ARG)
#else
#define H_SLOT_CHANGE_PTE(ctx) 0
#endif

// unmap: invalidate_range_start(mn, const struct mmu_notifier_range *range)
#define CB_ARGS_UNMAP(ctx, startp, endp)                                        \
    do {                                                                         \
        u64 r = ARG(ctx, CB_UNMAP_RANGE_ARG);                                    \
        RANGE_READ(r, startp, endp);                                             \
    } while (0)
// struct mmu_notifier_range has had start and end adjacent (unsigned long start, end) since it
// was introduced (4.19): one read for both where the offsets say so
#if OFF_RANGE_END == OFF_RANGE_START + 8
#define RANGE_READ(r, startp, endp)                                             \
    do {                                                                         \
        u64 se[2] = {};                                                          \
        bpf_probe_read_kernel(se, sizeof(se), (void *)((r) + OFF_RANGE_START));  \
        *(startp) = se[0];                                                       \
        *(endp) = se[1];                                                         \
    } while (0)
#else
#define RANGE_READ(r, startp, endp)                                             \
    do {                                                                         \
        bpf_probe_read_kernel(startp, 8, (void *)((r) + OFF_RANGE_START));       \
        bpf_probe_read_kernel(endp, 8, (void *)((r) + OFF_RANGE_END));           \
    } while (0)
#endif
// age: clear_flush_young / clear_young (mn, mm, start, end)
#define CB_ARGS_AGE(ctx, startp, endp)                                          \
    do { *(startp) = ARG(ctx, CB_AGE_START_ARG); *(endp) = ARG(ctx, CB_AGE_END_ARG); } while (0)
#define CB_ARGS_AGE2 CB_ARGS_AGE
// test_age: test_young (mn, mm, address) or (mn, mm, start, end)
#if CB_TEST_AGE_END_ARG >= 0
#define CB_ARGS_TEST_AGE(ctx, startp, endp)                                     \
    do { *(startp) = ARG(ctx, CB_TEST_AGE_START_ARG); *(endp) = ARG(ctx, CB_TEST_AGE_END_ARG); } while (0)
#else
#define CB_ARGS_TEST_AGE(ctx, startp, endp) CB_RANGE(ctx, TEST_AGE, startp, endp)
#endif
// change_pte (mn, mm, address, pte)
#define CB_ARGS_CHANGE_PTE(ctx, startp, endp) CB_RANGE(ctx, CHANGE_PTE, startp, endp)

#ifdef HVA_EXACT_UNMAP
CB_ENTER_(UNMAP, CB_UNMAP_FN, OP_UNMAP)
CB_EXIT_(UNMAP, CB_UNMAP_FN)
#ifdef H_UNMAP_FN
HANDLER_PROG_(H_UNMAP_FN, UNMAP)
#endif
#endif
#ifdef HVA_EXACT_AGE
CB_ENTER_(AGE, CB_AGE_FN, OP_AGE)
CB_EXIT_(AGE, CB_AGE_FN)
#ifdef CB_AGE2_FN
CB_ENTER_(AGE2, CB_AGE2_FN, OP_AGE)
CB_EXIT_(AGE2, CB_AGE2_FN)
#endif
#ifdef H_AGE_FN
HANDLER_PROG_(H_AGE_FN, AGE)
#endif
#endif
#ifdef HVA_EXACT_TEST_AGE
CB_ENTER_(TEST_AGE, CB_TEST_AGE_FN, OP_TEST_AGE)
CB_EXIT_(TEST_AGE, CB_TEST_AGE_FN)
#ifdef H_TEST_AGE_FN
HANDLER_PROG_(H_TEST_AGE_FN, TEST_AGE)
#endif
#endif
#ifdef HVA_EXACT_CHANGE_PTE
CB_ENTER_(CHANGE_PTE, CB_CHANGE_PTE_FN, OP_CHANGE_PTE)
CB_EXIT_(CHANGE_PTE, CB_CHANGE_PTE_FN)
#ifdef H_CHANGE_PTE_FN
HANDLER_PROG_(H_CHANGE_PTE_FN, CHANGE_PTE)
#endif
#endif

// ---- memslot updates ----
#ifdef MS_EXACT
struct ms_state {
    u64 ts;
    u64 kvm;
    s32 change;  // kernel enum kvm_mr_change value seen in kvm_set_memslot, -1 = not reached
    u32 pad;
    struct kt_region r;  // the uapi region (head of kvm_userspace_memory_region2 too)
};
BPF_HASH(ms_inflight, u32, struct ms_state, MAX_THREADS);

// The kernel's enum kvm_mr_change (KVM_MR_CREATE=0, DELETE=1, MOVE=2, FLAGS_ONLY=3 since
// 3.x) arrives as KMR_* defines read from BTF, mapped onto kvmtrace's Change numbering here.
static __always_inline u32 map_change(s32 c)
{
    if (c == KMR_CREATE) return CHANGE_CREATE;
    if (c == KMR_DELETE) return CHANGE_DELETE;
    if (c == KMR_MOVE) return CHANGE_MOVE;
    if (c == KMR_FLAGS_ONLY) return CHANGE_FLAGS_ONLY;
    return NR_CHANGES;  // unknown
}

static __always_inline int ms_outer_enter(u64 kvm, u64 mem)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (filtered_out(tgid))
        return 0;
    struct ms_state s = {};
    s.kvm = kvm;
    s.change = -1;
    bpf_probe_read_kernel(&s.r, sizeof(s.r), (void *)mem);
    s.ts = bpf_ktime_get_ns();
    ms_inflight.update(&tid, &s);
    struct vm_state *v = vm_get(kvm, tgid);
    if (v && v->ordinal == 0 && v->tgid != tgid) {
        v->tgid = tgid;  // a VM older than the trace: memslot updates come from its VMM
        vm_changed();
    }
    return 0;
}

// The VM's memslot count after an update: read from the kernel on linear-scan kernels, else
// kept from the change types (create +1, delete -1) when it is known.
static __always_inline void ms_count_update(u64 kvm, u32 ch, s64 ret)
{
    struct vm_state *v = vms.lookup(&kvm);
    if (!v)
        return;
#if READ_MEMSLOTS
    vm_memslots(v, read_memslots(kvm));
#else
    if (ret != 0 || v->memslots < 0)
        return;
    if (ch == CHANGE_CREATE)
        vm_memslots(v, v->memslots + 1);
    else if (ch == CHANGE_DELETE && v->memslots > 0)
        vm_memslots(v, v->memslots - 1);
    else if (ch == NR_CHANGES)
        v->memslots = -1;  // an update of unknown type: the count is unknown from now on
#endif
}

static __always_inline int ms_set_enter(s64 change)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ms_state *s = ms_inflight.lookup(&tid);
    if (s)
        s->change = (s32)change;
    return 0;
}

static __always_inline int ms_outer_exit(void *ctx, s64 ret)
{
    u64 now = bpf_ktime_get_ns();
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct ms_state *s = ms_inflight.lookup(&tid);
    if (!s)
        return 0;
    u64 dur = now - s->ts;
#ifdef MS_DERIVE
    // No BTF for kvm_set_memslot's `change`: userspace derives the change type from its
    // mirrored memslot table, in event order; latency is still the function's own.
    u32 ch = MS_CHANGE_DERIVE;
#else
    if (s->change < 0 && ret == 0) {
        // no-op update (nothing changed): KVM returns before kvm_set_memslot
        ms_inflight.delete(&tid);
        return 0;
    }
    u32 ch = s->change < 0 ? NR_CHANGES : map_change(s->change);
    ms_count_update(s->kvm, ch, ret);
    struct op_key k = {};
    u32 zk = 0;
    k.vm = s->kvm;
    k.op = ch;
    k.owner = id >> 32;  // memslot updates always come from the VMM itself
    struct vm_state *vs = vms.lookup(&k.vm);
    if (vs && vs->tgid == k.owner)
        k.ordinal = vs->ordinal;
    struct ms_val *v = ms_aggs.lookup(&k);
    if (!v) {
        struct ms_val *zero = ms_zero.lookup(&zk);
        if (zero) {
            ms_aggs.insert(&k, zero);
            v = ms_aggs.lookup(&k);
        }
    }
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        if (ret != 0)
            __sync_fetch_and_add(&v->errors, 1);
        __sync_fetch_and_add(&v->lat_sum, dur);
        max_update(&v->lat_max, dur);
        v->tgid = id >> 32;
        hist_inc(v->lat, dur, 1);
    } else {
        bump(CNT_MAPFULL);
    }
#endif  // MS_DERIVE
    struct event ev = {};
    ev_head(&ev, EV_MEMSLOT, s->ts, id);
    ev.memslot.lat_ns = dur;
    ev.memslot.gpa = s->r.guest_phys_addr;
    ev.memslot.size = s->r.memory_size;
    ev.memslot.hva = s->r.userspace_addr;
    ev.memslot.slot = s->r.slot;
    ev.memslot.flags = s->r.flags;
    ev.memslot.change = ch;
    ev.memslot.ret = (s32)ret;
    ev.vm = s->kvm;
    ms_inflight.delete(&tid);
    emit(ctx, &ev, 0);
    return 0;
}

#ifdef MODE_FENTRY
#define MS_OUTER_ENTER(OUTER) FENTRY(OUTER) { return ms_outer_enter(ARG(ctx, 0), ARG(ctx, 1)); }
#define MS_OUTER_EXIT(OUTER) FEXIT(OUTER) { return ms_outer_exit(ctx, (s64)(int)ARG(ctx, MS_OUTER_NARGS)); }
#define MS_SET_PROG(SET) FENTRY(SET) { return ms_set_enter((s64)(int)ARG(ctx, SET_MEMSLOT_CHANGE_ARG)); }
#else
#define MS_OUTER_ENTER(OUTER) \
    int KP_MS_OUTER_ENTER(struct pt_regs *ctx) { return ms_outer_enter(ARG(ctx, 0), ARG(ctx, 1)); }
#define MS_OUTER_EXIT(OUTER) \
    int KP_MS_OUTER_EXIT(struct pt_regs *ctx) { return ms_outer_exit(ctx, (s64)(int)PT_REGS_RC(ctx)); }
#define MS_SET_PROG(SET) \
    int KP_MS_SET_ENTER(struct pt_regs *ctx) { return ms_set_enter((s64)(int)ARG(ctx, SET_MEMSLOT_CHANGE_ARG)); }
#endif
#define MS_OUTER_ENTER_(OUTER) MS_OUTER_ENTER(OUTER)
#define MS_OUTER_EXIT_(OUTER) MS_OUTER_EXIT(OUTER)
#define MS_SET_PROG_(SET) MS_SET_PROG(SET)
MS_OUTER_ENTER_(MS_OUTER_FN)
MS_OUTER_EXIT_(MS_OUTER_FN)
#ifndef MS_DERIVE
MS_SET_PROG_(MS_SET_FN)
#endif
#endif  // MS_EXACT

#ifdef VM_LIFE
// kvm_arch_init_vm(kvm, type) and kvm_arch_destroy_vm(kvm): arch hooks every kernel has (global
// functions of arch/x86/kvm/x86.c), called once per VM from kvm_create_vm / kvm_destroy_vm, which
// are static and may be inlined.
// One program per macro expansion (see above).
#ifdef MODE_FENTRY
#define VM_INIT_PROG(FN) FENTRY(FN) { return vm_created(ctx, ARG(ctx, 0)); }
#define VM_DESTROY_PROG(FN) FENTRY(FN) { return vm_destroyed(ctx, ARG(ctx, 0)); }
#else
#define VM_INIT_PROG(FN) int KP_VM_INIT(struct pt_regs *ctx) { return vm_created(ctx, ARG(ctx, 0)); }
#define VM_DESTROY_PROG(FN) int KP_VM_DESTROY(struct pt_regs *ctx) { return vm_destroyed(ctx, ARG(ctx, 0)); }
#endif
#define VM_INIT_PROG_(FN) VM_INIT_PROG(FN)
#define VM_DESTROY_PROG_(FN) VM_DESTROY_PROG(FN)
VM_INIT_PROG_(VM_INIT_FN)
VM_DESTROY_PROG_(VM_DESTROY_FN)
#endif  // VM_LIFE
#endif  // EXACT
