from kvmtrace.consts import Change
from kvmtrace.tracer.mirror import Mirror, SlotTable

MB = 1 << 20


def brute(slots, s, e):
    return sum(1 for (h, z) in slots if h < e and s < h + z)


def test_overlap_matches_brute_force_with_aliases():
    t = SlotTable()
    ranges = [(0x10000000 + i * 4 * MB, 4 * MB) for i in range(16)]
    ranges += [(0x10000000 + 2 * MB, 8 * MB)]  # an alias overlapping three others
    for i, (h, z) in enumerate(ranges):
        assert t.apply(0, i, i * 4 * MB, z, h, 0) == Change.CREATE
    for s, e in [(0, 1), (0x10000000, 0x10001000), (0x10000000 + 4 * MB - 4096, 0x10000000 + 4 * MB + 4096),
                 (0x10000000, 0x10000000 + 64 * MB), (0x10000000 + 64 * MB, 0x10000000 + 65 * MB),
                 (0x10000000 + 3 * MB, 0x10000000 + 3 * MB + 1)]:
        assert t.overlap(s, e) == brute(ranges, s, e), (hex(s), hex(e))


def test_classify_create_move_flags_delete():
    m = Mirror()
    vm = "pid:1"
    m.vm_created(vm)
    assert m.update(vm, 3, 0x0, 2 * MB, 0x7000000, 0, True) == Change.CREATE
    assert m.update(vm, 3, 0x0, 2 * MB, 0x7000000, 0, True) is None  # nothing changes
    assert m.update(vm, 3, 0x0, 2 * MB, 0x7000000, 1, True) == Change.FLAGS_ONLY
    assert m.update(vm, 3, 0x400000, 2 * MB, 0x7000000, 1, True) == Change.MOVE
    assert m.count(vm) == 1
    assert m.overlap(vm, 0x7000000, 0x7001000) == 1
    assert m.update(vm, 3, 0x400000, 0, 0, 0, True) == Change.DELETE
    assert m.count(vm) == 0 and m.overlap(vm, 0x7000000, 0x7001000) == 0
    assert not m.partial(vm) and m.partial("pid:2")


def test_failed_update_changes_nothing_and_address_spaces_are_distinct():
    m = Mirror()
    vm = "pid:1"
    assert m.update(vm, 5, 0, MB, 0x1000000, 0, False) == Change.CREATE
    assert m.count(vm) == 0
    m.update(vm, (1 << 16) | 5, 0, MB, 0x1000000, 0, True)  # as_id 1, slot 5
    m.update(vm, 5, 0, MB, 0x1000000, 0, True)  # as_id 0, slot 5
    assert m.count(vm) == 2 and m.overlap(vm, 0x1000000, 0x1000001) == 2


def test_bpf_log2_bucket_formula_matches_python_rule():
    """kvmtrace.c's branch-free log2_bucket, transcribed, equals snapshot.log2_bucket."""
    from kvmtrace.snapshot import log2_bucket

    M = (1 << 64) - 1

    def c_rule(v):
        v &= 0x3FFFFFFFFFFFFFFF
        r = 0
        for c, sh in ((0xFFFFFFFF, 5), (0xFFFF, 4), (0xFF, 3), (0xF, 2), (0x3, 1), (0x1, 0)):
            t = (((c - v) & M) >> 63) << sh
            v >>= t
            r |= t
        return r + v

    values = [0, 1, 2, 3, 4, 5, 7, 8, 255, 256, 4095, 4096, 10**6, 2**32 - 1, 2**32, 2**40 + 3, 2**61, 2**62 - 1]
    values += [2**k + d for k in range(62) for d in (-1, 0, 1) if 2**k + d >= 0]
    for v in values:
        assert c_rule(v) == log2_bucket(v), v


def test_bpf_tab_bound_transcribed_matches_bisect():
    """kvmtrace.c's tab_bound (the per-op binary search of tracepoint mode's slot tables),
    transcribed step by step, equals bisect_left / bisect_right, and the overlap it gives
    equals SlotTable.overlap."""
    import random
    from bisect import bisect_left, bisect_right

    def tab_bound(a, n, v, upper):
        base, ln, vv = 0, n, (v + 1 if upper else v)
        for _ in range(16):  # TAB_STEPS
            if ln <= 1:
                break
            half = ln >> 1
            lt = 1 if a[base + half] < vv else 0  # (x - vv) >> 63 for addresses below 2^62
            base += lt * half
            ln -= half
        lt = 1 if n and a[base] < vv else 0
        return base + (ln & lt)

    rng = random.Random(1)
    for n in (0, 1, 2, 3, 5, 64, 1000, 32764):
        a = sorted(rng.randrange(0, 1 << 20) for _ in range(n))
        for v in [rng.randrange(-1, (1 << 20) + 2) for _ in range(50)] + a[:3] + a[-3:]:
            assert tab_bound(a, n, v, False) == bisect_left(a, v)
            assert tab_bound(a, n, v, True) == bisect_right(a, v)
    t = SlotTable()
    ranges = [(rng.randrange(0, 1 << 30) & ~0xFFF, rng.randrange(1, 64) * 4096) for _ in range(300)]
    for i, (h, z) in enumerate(ranges):
        t.apply(0, i, i << 30, z, h, 0)
    starts, ends = sorted(h for h, _ in ranges), sorted(h + z for h, z in ranges)
    for _ in range(500):
        s = rng.randrange(0, 1 << 30)
        e = s + rng.randrange(1, 1 << 22)
        kernel = tab_bound(starts, len(starts), e, False) - tab_bound(ends, len(ends), s, True)
        assert kernel == t.overlap(s, e) == brute(ranges, s, e)
