// SPDX-License-Identifier: GPL-2.0
// kvmtrace BPF programs, compiled by bcc with -D defines generated in kvmtrace/tracer/cflags.py.
//
// Nothing here depends on kernel header struct layouts: every kernel struct offset arrives as a
// -D define taken from the running kernel's BTF (OFF_*), and the only structs declared here are
// uapi ones (stable ABI) and kvmtrace's own map/event records.
//
// Sections (each enabled by a define, so one object holds what the probe plan chose):
//   HVA_TP_<OP>      hva op via its kvm:* tracepoint; latency bounded by the enclosing syscall
//                    (raw_syscalls), slots derived in userspace from the mirrored memslot table
//   HVA_EXACT_<OP>   hva op via entry/exit of its kvm_mmu_notifier_* callback (kprobe or fentry),
//                    slots visited = per-slot handler calls inside the callback on the same thread
//                    (per distinct memslot argument for per-rmap handlers: H_<OP>_SLOT_ARG)
//   MS_TP            memslot updates via syscalls:sys_{enter,exit}_ioctl
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
#define MAX_AGG 4096  // (vm, op) pairs; 1.6 KB each, preallocated
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
#ifndef MAX_BUCKETS
#define MAX_BUCKETS 16384  // (vm, op, memslot-count bucket) triples
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

BPF_PERCPU_ARRAY(counters, u64, NR_CNT);
BPF_HASH(aggs, struct op_key, struct agg_val, MAX_AGG);
BPF_PERCPU_ARRAY(agg_zero, struct agg_val, 1);  // never written: the initial value of new entries
BPF_HASH(ms_aggs, struct op_key, struct ms_val, MAX_AGG);
BPF_PERCPU_ARRAY(ms_zero, struct ms_val, 1);
BPF_HASH(vmm, u32, u32, MAX_VMMS);       // known VMM tgids (tracepoint mode)
BPF_HASH(ms_count, u32, u64, MAX_VMMS);  // memslot ioctls per tgid (exact total for tp mode)

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

static __always_inline struct agg_val *agg_get_key(struct op_key *k)
{
    u32 zk = 0;
    struct agg_val *v = aggs.lookup(k);
    if (v)
        return v;
    struct agg_val *zero = agg_zero.lookup(&zk);
    if (!zero)
        return 0;
    aggs.insert(k, zero);
    v = aggs.lookup(k);
    if (!v)
        bump(CNT_MAPFULL);
    return v;
}

static __always_inline struct agg_val *agg_get(u64 vm, u32 op, u32 owner)
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
// Tracepoint mode: hva ops
// =====================================================================================
#if defined(HVA_TP_UNMAP) || defined(HVA_TP_AGE) || defined(HVA_TP_TEST_AGE) || defined(HVA_TP_CHANGE_PTE)
#define HVA_TP 1

struct sc_state {  // one system call of a VMM thread
    u64 ts;
    u32 n[NR_OPS];  // hva ops seen inside it, per op
};
BPF_TABLE("lru_hash", u32, struct sc_state, inflight, MAX_THREADS);

static __always_inline int tgid_wanted(u32 tgid)
{
#ifdef PID_FILTER
    return tgid == PID_FILTER;
#else
    return vmm.lookup(&tgid) != 0;
#endif
}

static __always_inline int on_hva_tp(void *ctx, u32 op, u64 start, u64 end)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (filtered_out(tgid))
        return 0;
    struct agg_val *a = agg_get(tgid, op, 0);
    if (a) {
        __sync_fetch_and_add(&a->s.count, 1);
        hist_inc(a->range, end - start, 1);
    }
    struct sc_state *s = inflight.lookup(&tid);
    if (s && s->ts) {
        if (op < NR_OPS)
            s->n[op]++;
    } else {
        bump(CNT_NOLAT);  // not inside a traced system call (kswapd, page fault path, ...)
    }
#ifdef EVENTS
    struct event ev = {};
    ev_head(&ev, EV_HVA, bpf_ktime_get_ns(), id);
    ev.hva.op = op;
    ev.hva.start = start;
    ev.hva.end = end;
    emit(ctx, &ev, RB_NO_WAKEUP);
#endif
    return 0;
}

#ifdef HVA_TP_UNMAP
TRACEPOINT_PROBE(kvm, kvm_unmap_hva_range) { return on_hva_tp(args, OP_UNMAP, args->start, args->end); }
#endif
#ifdef HVA_TP_AGE
TRACEPOINT_PROBE(kvm, kvm_age_hva) { return on_hva_tp(args, OP_AGE, args->start, args->end); }
#endif
#ifdef HVA_TP_TEST_AGE
TRACEPOINT_PROBE(kvm, kvm_test_age_hva) { return on_hva_tp(args, OP_TEST_AGE, args->hva, args->hva + PAGE_SIZE_B); }
#endif
#ifdef HVA_TP_CHANGE_PTE
TRACEPOINT_PROBE(kvm, kvm_set_spte_hva) { return on_hva_tp(args, OP_CHANGE_PTE, args->hva, args->hva + PAGE_SIZE_B); }
#endif

TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (!tgid_wanted(tgid))
        return 0;
    // reuse the thread's entry (its counters are zeroed at every syscall exit): a lookup and a
    // store instead of an LRU update per system call
    struct sc_state *cur = inflight.lookup(&tid);
    if (cur) {
        cur->ts = bpf_ktime_get_ns();
        return 0;
    }
    struct sc_state s = {};
    s.ts = bpf_ktime_get_ns();
    inflight.update(&tid, &s);
    return 0;
}

static __always_inline void sc_lat(u32 tgid, u32 op, u32 n, u64 dur)
{
    if (!n)
        return;
    struct agg_val *a = agg_get(tgid, op, 0);
    if (!a)
        return;
    hist_inc(a->lat, dur, n);
    __sync_fetch_and_add(&a->s.lat_count, n);
    __sync_fetch_and_add(&a->s.lat_sum, dur * n);
    max_update(&a->s.lat_max, dur);
}

TRACEPOINT_PROBE(raw_syscalls, sys_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct sc_state *s = inflight.lookup(&tid);
    if (!s || !s->ts)
        return 0;
    u64 dur = bpf_ktime_get_ns() - s->ts;
    s->ts = 0;
    u32 total = 0;
#pragma unroll
    for (int i = 0; i < NR_OPS; i++) {
        u32 n = s->n[i];
        if (n) {
            sc_lat(tgid, i, n, dur);
            total += n;
            s->n[i] = 0;
        }
    }
#ifdef EVENTS_LAT  // raw events kept: each gets its syscall's duration in userspace
    if (total) {
        struct event ev = {};
        ev_head(&ev, EV_SC_END, bpf_ktime_get_ns(), id);
        ev.sc_end.dur_ns = dur;
        ev.sc_end.nr_ops = total;
        emit(args, &ev, RB_NO_WAKEUP);
    }
#endif
    return 0;
}
#endif  // HVA_TP

// =====================================================================================
// Tracepoint mode: memslot updates (and VM creation) from the ioctl system call
// =====================================================================================
#ifdef MS_TP
struct ioc_state {
    u64 ts;
    u64 cmd;
    u64 fd;
    struct kt_region r;
};
BPF_TABLE("lru_hash", u32, struct ioc_state, ioc, MAX_THREADS);

TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
    u64 cmd = (u32)args->cmd;
    if (cmd != KVM_SET_USER_MEMORY_REGION_NR && cmd != KVM_SET_USER_MEMORY_REGION2_NR &&
        cmd != KVM_CREATE_VM_NR)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (filtered_out(tgid))
        return 0;
    struct ioc_state s = {};
    s.cmd = cmd;
    s.fd = args->fd;
    if (cmd != KVM_CREATE_VM_NR)
        bpf_probe_read_user(&s.r, sizeof(s.r), (void *)args->arg);
    s.ts = bpf_ktime_get_ns();
    ioc.update(&tid, &s);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct ioc_state *s = ioc.lookup(&tid);
    if (!s)
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct event ev = {};
    ev.tgid = tgid;
    ev.tid = tid;
    if (s->cmd == KVM_CREATE_VM_NR) {
        if (args->ret >= 0) {
            u32 one = 1;
            vmm.update(&tgid, &one);
        }
        ev.kind = EV_VM_CREATE;
        ev.ts = now;
        ev.vm_create.ret = (s32)args->ret;
    } else {
        u64 zero = 0, *c = ms_count.lookup_or_try_init(&tgid, &zero);
        if (c)
            __sync_fetch_and_add(c, 1);
        ev.kind = EV_MEMSLOT;
        ev.ts = s->ts;
        ev.memslot.lat_ns = now - s->ts;
        ev.memslot.gpa = s->r.guest_phys_addr;
        ev.memslot.size = s->r.memory_size;
        ev.memslot.hva = s->r.userspace_addr;
        ev.memslot.slot = s->r.slot;
        ev.memslot.flags = s->r.flags;
        ev.memslot.change = MS_CHANGE_DERIVE;  // from the ioctl: derived in userspace
        ev.memslot.ret = (s32)args->ret;
    }
    ioc.delete(&tid);
    emit(args, &ev, 0);
    return 0;
}
#endif  // MS_TP

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
};
// LRU: a callback whose exit probe was missed (kretprobe instances exhausted) ages out
BPF_TABLE("lru_hash", u32, struct cb_state, cb_inflight, MAX_THREADS);

// One VM's lifetime, from its creation (kvm_arch_init_vm) to its destruction
// (kvm_arch_destroy_vm); a VM older than the trace gets an entry (ordinal 0) when first seen.
struct vm_state {
    u32 tgid;      // VMM process
    u32 ordinal;   // n-th VM this VMM created while traced (1-based), 0 = older than the trace
    s32 memslots;  // current memslot count, -1 = unknown (see vm_memslots)
    u32 memslots_max;
};
BPF_HASH(vms, u64, struct vm_state, MAX_VMS);
BPF_TABLE("lru_hash", u32, u32, vm_seq, MAX_VMMS);  // tgid -> VMs created while traced

// Per (VM lifetime, op, log2 bucket of the VM's memslot count at the event): aggregated here so
// the memslot-count breakdown needs no raw events.
struct bucket_val {
    u64 count;
    u64 memslots_max;
    u64 lat_sum;
    u64 slots_sum;
    u64 scanned_sum;
};
BPF_HASH(mbuckets, struct op_key, struct bucket_val, MAX_BUCKETS);

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
    return vms.lookup(&kvm);
}

static __always_inline void vm_memslots(struct vm_state *v, s32 count)
{
    v->memslots = count;
    if (count > 0 && (u32)count > v->memslots_max)
        v->memslots_max = count;
}

static __always_inline int cb_enter(u32 op, u64 mn, u64 start, u64 end)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (filtered_out(tgid))
        return 0;
    struct cb_state s = {};
    s.vm = mn - OFF_KVM_MMU_NOTIFIER;
    s.op = op;
    s.start = start;
    s.end = end;
    s.memslots = -1;
    struct vm_state *v = vm_get(s.vm, tgid);
    if (v) {
        s.owner = v->tgid;
        s.ordinal = v->ordinal;
#if READ_MEMSLOTS
        s32 n = read_memslots(s.vm);
        s.scanned = n;
        s.memslots = n;
        vm_memslots(v, n);
#else
        s.memslots = v->memslots;
#endif
    } else {
        s.owner = tgid;
        bump(CNT_MAPFULL);
    }
    s.ts = bpf_ktime_get_ns();
    // reuse the thread's entry: a lookup and a copy instead of an LRU update per callback
    struct cb_state *cur = cb_inflight.lookup(&tid);
    if (cur) {
        *cur = s;
        return 0;
    }
    cb_inflight.update(&tid, &s);
    return 0;
}

static __always_inline void bucket_add(struct cb_state *s, u64 dur, u32 slots)
{
    if (s->memslots < 0)
        return;  // count unknown (VM older than the trace on an interval-tree kernel)
    struct op_key k = {};
    k.vm = s->vm;
    k.op = s->op;
    k.owner = s->owner;
    k.ordinal = s->ordinal;
    k.bucket = log2_bucket(s->memslots);
    struct bucket_val *b = mbuckets.lookup(&k);
    if (!b) {
        struct bucket_val z = {};
        mbuckets.insert(&k, &z);
        b = mbuckets.lookup(&k);
        if (!b) {
            bump(CNT_MAPFULL);
            return;
        }
    }
    __sync_fetch_and_add(&b->count, 1);
    __sync_fetch_and_add(&b->lat_sum, dur);
    __sync_fetch_and_add(&b->slots_sum, slots);
    __sync_fetch_and_add(&b->scanned_sum, s->scanned);
    max_update(&b->memslots_max, s->memslots);
}

static __always_inline int cb_exit(void *ctx)
{
    u64 now = bpf_ktime_get_ns();
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct cb_state *s = cb_inflight.lookup(&tid);
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
    struct agg_val *a = agg_get_key(&k);
    if (a) {
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
    }
    bucket_add(s, dur, slots);
#ifdef EVENTS
    struct event ev = {};
    ev_head(&ev, EV_HVA, s->ts, id);
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

// A per-slot handler called inside a callback on this thread. slot == 0: the handler runs once
// per overlapping memslot (5.13+ gfn handlers), so every call is one slot visited. slot != 0:
// the handler runs once per rmap (gfn, level) of each overlapping memslot, slot by slot, with the
// memslot as argument (5.10's arch rmap handlers), so each change of slot is one slot visited.
static __always_inline int handler_hit(u64 slot)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct cb_state *s = cb_inflight.lookup(&tid);
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
        bpf_probe_read_kernel(startp, 8, (void *)(r + OFF_RANGE_START));         \
        bpf_probe_read_kernel(endp, 8, (void *)(r + OFF_RANGE_END));             \
    } while (0)
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
    if (v && v->ordinal == 0)
        v->tgid = tgid;  // a VM older than the trace: memslot updates come from its VMM
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
