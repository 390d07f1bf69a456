"""A fake TraceSession (the documented API: snapshots(duration, stop), take_events, plan,
meta, interrupted) that produces cumulative snapshots for as long as it is asked, with a known
truth: ``per_interval`` unmaps and one memslot create per snapshot. Used by the record command,
rotation and fault tests (no root)."""

from __future__ import annotations

import time

from kvmtrace.analysis.synth import SynthOp, SynthVm, simulate

_CACHE = {}


def synth(n, per_interval, events):
    key = (n, per_interval, events)
    if key not in _CACHE:
        vm = SynthVm("ffff1", 4242, comm="qemu", memslots=12)
        ops = [SynthOp("ffff1", op="unmap", per_interval=per_interval, slots=2),
               SynthOp("ffff1", change="create", per_interval=1)]
        _CACHE[key] = simulate([vm], ops, intervals=n, events=events)
    return _CACHE[key]


class CountingSession:
    per_interval = 50
    max_snaps = 400
    instances = []

    def __init__(self, pid=None, interval=1.0, events=False, modes=None, self_cost="sampled"):
        self.pid, self.interval, self.events = pid, interval, events
        self.plan = None
        self.meta = {"host": "fakehost", "kernel": "6.18-fake"}
        self.interrupted = False
        self._snaps, self._evs = synth(self.max_snaps, self.per_interval, True)
        self.i = -1  # index of the last snapshot yielded
        CountingSession.instances.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def truth_unmaps(self) -> int:
        return (self.i + 1) * self.per_interval

    def snapshots(self, duration=None, stop=None):
        start = time.monotonic()
        while True:
            nxt = time.monotonic() + self.interval
            while time.monotonic() < nxt and not (stop is not None and stop()):
                if duration is not None and time.monotonic() - start >= duration:
                    break
                time.sleep(min(0.005, self.interval))
            if self.i + 1 >= len(self._snaps):
                return
            self.i += 1
            yield self._snaps[self.i]
            if (duration is not None and time.monotonic() - start >= duration) or (stop is not None and stop()):
                return

    def take_events(self):
        return list(self._evs[self.i]) if self.events else []
