"""kvmtrace record: per-interval aggregates (and raw events) to a recording directory."""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager

import click

from . import modes_option, parse_modes


@contextmanager
def stop_on_signals(flag: threading.Event):
    """SIGINT / SIGTERM / SIGHUP set ``flag`` (the tracer then yields one final snapshot and
    stops); a second SIGINT raises KeyboardInterrupt as usual."""

    def handler(signum, frame):
        if flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set()

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class StatusLine:
    """One rewritten status line on a terminal; a plain line every ``every`` seconds otherwise."""

    def __init__(self, stream=None, every: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self._last = 0.0
        self._width = 0

    def show(self, text: str) -> None:
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._width = len(text)
        elif time.monotonic() - self._last >= self.every:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last = time.monotonic()

    def done(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()


def status_text(rec, elapsed: float, duration, late: int = 0) -> str:
    t = rec.totals
    span = f"{elapsed:.0f}/{duration:.0f} s" if duration else f"{elapsed:.0f} s"
    parts = [f"recording {span}", f"{rec.interval} intervals", f"hva ops {t['hva_ops']:,}",
             f"memslot updates {t['memslot_updates']:,}"]
    if rec.events:
        parts.append(f"events {t['hva_events'] + t['memslot_events']:,}")
    parts.append(f"lost {rec.lost_events:,}")
    if late:
        parts.append(f"{late} late intervals (kvmtrace fell behind)")
    parts.append(f"{rec.bytes_on_disk() / 1e6:.1f} MB")
    return " | ".join(parts)


def session_meta(session, label: str, pid, interval: float, events: bool) -> dict:
    sm = dict(getattr(session, "meta", {}) or {})
    return {
        "host": sm.get("host"),
        "kernel": sm.get("kernel"),
        "label": label,
        "pid_filter": pid,
        "interval_s": interval,
        "raw_events": events,
        "session": sm,
    }


def _take_events(session) -> list:
    """Raw events of the interval; hva events as columns when the tracer offers them."""
    take = getattr(session, "take_event_batches", None)
    if take is None:
        return session.take_events()
    batches, others = take()
    return list(batches) + list(others)


def run_recording(session, recorder, duration=None, stop=None, status: StatusLine = None) -> str:
    """Feed every interval of ``session`` into ``recorder``; returns how it stopped."""
    from ..snapshot import cost_summary

    prev = None
    late = 0
    t0 = time.monotonic()
    for snap in session.snapshots(duration=duration, stop=stop):
        events = _take_events(session) if recorder.events else ()
        recorder.write(snap.delta(prev), events)
        prev = snap
        late += snap.late_s > 0
        if status is not None:
            status.show(status_text(recorder, time.monotonic() - t0, duration, late))
    if prev is not None:  # kvmtrace's own cost over the whole recording
        recorder.update_meta(self_cost=dict(cost_summary(prev), late_intervals=late))
    if getattr(session, "interrupted", False):
        return "signal"
    if stop is not None and stop():
        return "stop"
    return "duration"


@click.command(
    epilog="""\b
Examples:
  kvmtrace record -o before --duration 60            # every VM, 1 s intervals, Parquet
  kvmtrace record -o run1 --pid 4242 --events        # one VMM, with every raw event
  kvmtrace record -o run-csv --format csv --label 6.1-patched  # a directory of CSV files
""",
)
@click.option("-o", "--output", "path", required=True, type=click.Path(), help="recording directory to create")
@click.option("--duration", type=float, default=None, help="seconds to record (default: until Ctrl-C/SIGTERM)")
@click.option("--interval", type=float, default=1.0, show_default=True, help="seconds per interval")
@click.option("--events", is_flag=True, help="also record every raw event (larger files; drops are counted)")
@click.option("--label", default="", help="name of this recording in reports (e.g. the kernel or host)")
@click.option("--pid", type=int, default=None, help="trace only this VMM process")
@modes_option
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet", show_default=True)
def record(path, duration, interval, events, label, pid, modes, fmt):
    """Record per-interval aggregates (and raw events) to Parquet or CSV.

    PATH becomes a directory; every interval is flushed, so a crash loses at most one interval.
    Ctrl-C or SIGTERM stops cleanly and keeps everything recorded."""
    from ..errors import UsageError
    from ..analysis.recording import Recorder

    if duration is not None and duration <= 0:
        raise UsageError(f"--duration must be positive, not {duration}")
    if interval <= 0:
        raise UsageError(f"--interval must be positive, not {interval}")
    from ..tracer.session import TraceSession

    flag = threading.Event()
    status = StatusLine()
    with stop_on_signals(flag):
        with TraceSession(pid=pid, interval=interval, events=events, modes=parse_modes(modes)) as s:
            meta = session_meta(s, label, pid, interval, events)
            meta = {k: v for k, v in meta.items() if v is not None}
            with Recorder(path, fmt=fmt, meta=meta, events=events, plan=s.plan) as rec:
                how = run_recording(s, rec, duration=duration, stop=flag.is_set, status=status)
                status.done()
                rec.close(status="complete", stopped_by="signal" if flag.is_set() else how)
    click.echo(
        f"recorded {rec.interval} intervals to {path}: {rec.totals['hva_ops']:,} hva ops, "
        f"{rec.totals['memslot_updates']:,} memslot updates, lost events {rec.lost_events:,}"
    )
    click.echo(f"next: kvmtrace report {path}")
