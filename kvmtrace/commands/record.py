"""kvmtrace record: per-interval aggregates (and raw events) to a recording directory, or with
``--rotate`` to a directory of recordings that rotate continuously."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import contextmanager

import click

from . import modes_option, parse_modes, self_cost_option

INTERVAL_RANGE = (0.01, 3600.0)  # seconds per interval
ROTATE_MIN = 1.0


class Signals:
    """What SIGINT / SIGTERM / SIGHUP asked for. ``stop``: stop cleanly (the tracer then yields
    one final snapshot); ``rotate``: with --rotate, SIGHUP closes the current recording and
    starts the next. A second SIGINT raises KeyboardInterrupt only before recording started
    (e.g. to abort a slow attach); once a recording is open, the recorder finishes the
    interval it is writing and closes cleanly, whatever arrives."""

    def __init__(self, rotate_on_hup: bool = False):
        self.stop = threading.Event()
        self.rotate = threading.Event()
        self.rotate_on_hup = rotate_on_hup
        self.recording = False

    def handler(self, signum, frame):
        if signum == signal.SIGHUP and self.rotate_on_hup:
            self.rotate.set()
            return
        if self.stop.is_set() and signum == signal.SIGINT and not self.recording:
            raise KeyboardInterrupt
        self.stop.set()


@contextmanager
def stop_on_signals(flag, rotate_on_hup: bool = False):
    """SIGINT / SIGTERM / SIGHUP set ``flag`` (a threading.Event, or a ``Signals``)."""
    sig_state = flag if isinstance(flag, Signals) else None
    if sig_state is None:
        sig_state = Signals(rotate_on_hup)
        sig_state.stop = flag
    from ..signals import handling

    with handling(sig_state.handler):
        yield sig_state


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


def attached_line(session, path: str) -> str:
    """The one line ``record`` prints on stderr once the probes are attached (scripts wait for
    it: everything after it is recorded)."""
    from ..analysis.recorder import printable

    plan = getattr(session, "plan", None)
    ops = [p for p in (getattr(plan, "ops", ()) or ()) if str(getattr(p, "attach", "none")) != "none"]
    modes = sorted({str(p.attach) for p in ops})
    how = f" ({', '.join(modes)}: {len(ops)} probe points)" if ops else ""
    return f"kvmtrace: attached{how}, recording to {printable(path)}"


def run_recording(session, recorder, duration=None, stop=None, status: StatusLine = None, prev=None):
    """Feed every interval of ``session`` into ``recorder``; returns how it stopped. With
    ``prev`` (the last cumulative snapshot of an earlier recording) the first interval is
    differenced against it, so consecutive recordings have no gap. The last snapshot is
    available as ``recorder.last_snapshot``."""
    from ..snapshot import cost_summary

    first = prev
    late = 0
    t0 = time.monotonic()
    for snap in session.snapshots(duration=duration, stop=stop):
        events = _take_events(session) if recorder.events else ()
        recorder.write(snap.delta(prev), events)
        prev = snap
        recorder.last_snapshot = snap
        late += snap.late_s > 0
        if status is not None:
            status.show(status_text(recorder, time.monotonic() - t0, duration, late))
    if prev is not None and prev is not first:  # kvmtrace's own cost over this recording
        span = prev if first is None else prev.delta(first)
        recorder.update_meta(self_cost=dict(cost_summary(span), late_intervals=late))
    if getattr(session, "interrupted", False):
        return "signal"
    if stop is not None and stop():
        return "stop"
    return "duration"


def check_number(name: str, value, lo=None, hi=None, integer: bool = False, lo_open: bool = False):
    """A numeric option: finite and in range, else one UsageError naming the valid range."""
    from ..errors import UsageError

    if value is None:
        return
    bad = not isinstance(value, (int, float)) or not math.isfinite(value)
    if not bad and lo is not None:
        bad = value <= lo if lo_open else value < lo
    if not bad and hi is not None:
        bad = value > hi
    if bad:
        rng = []
        if lo is not None:
            rng.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            rng.append(f"<= {hi:g}")
        kind = "an integer" if integer else "a finite number of seconds"
        raise UsageError(f"{name} must be {kind} {' and '.join(rng)}, not {value}",
                         f"pass e.g. {name} {max(lo or 1, 1):g}")


def parse_duration(text: str, name: str = "--rotate") -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds."""
    from ..errors import UsageError

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = (text or "").strip().lower()
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise UsageError(f"{name} {text!r} is not a duration", f"e.g. {name} 15m (units s, m, h, d)") from None
    return v


def validate(duration, interval, pid, rotate, keep) -> None:
    check_number("--interval", interval, *INTERVAL_RANGE)
    check_number("--duration", duration, 0, None, lo_open=True)
    check_number("--pid", pid, 1, 2 ** 22, integer=True)
    if rotate is not None:
        check_number("--rotate", rotate, max(ROTATE_MIN, interval), 366 * 86400)
    if keep is not None:
        from ..errors import UsageError

        if rotate is None:
            raise UsageError("--keep only applies with --rotate", "add --rotate DURATION, or leave --keep out")
        check_number("--keep", keep, 1, 1_000_000, integer=True)


@click.command(
    epilog="""\b
Examples:
  kvmtrace record -o before --duration 60            # every VM, 1 s intervals, Parquet
  kvmtrace record -o run1 --pid 4242 --events        # one VMM, with every raw event
  kvmtrace record -o run-csv --format csv --label 6.1-patched  # a directory of CSV files
  kvmtrace record -o /var/lib/kvmtrace --rotate 1h --keep 24    # continuous: a day, hourly
  kvmtrace record -o run2 --share-group kvmops       # readable by group kvmops (0750/0640)

\b
Scripts: once the probes are attached, record prints one line on stderr,
  kvmtrace: attached (MODES: N probe points), recording to DIR
and everything after it is recorded. SIGINT/SIGTERM stop cleanly; with
--rotate, SIGHUP closes the current recording and starts the next.
""",
)
@click.option("-o", "--output", "path", required=True, type=click.Path(),
              help="recording directory to create (its parent must exist; an existing empty one must be yours and "
                   "writable by nobody else); with --rotate a directory of recordings")
@click.option("--duration", type=float, default=None, help="seconds to record (default: until Ctrl-C/SIGTERM)")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help=f"seconds per interval ({INTERVAL_RANGE[0]:g} to {INTERVAL_RANGE[1]:g})")
@click.option("--events", is_flag=True, help="also record every raw event (larger files; drops are counted)")
@click.option("--label", default="", help="name of this recording in reports (e.g. the kernel or host)")
@click.option("--pid", type=int, default=None, help="trace only this VMM process")
@modes_option
@self_cost_option
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet", show_default=True)
@click.option("--rotate", "rotate_text", default=None, metavar="DURATION",
              help="continuous recording: close a complete recording every DURATION (e.g. 15m, 1h) and start the "
                   "next inside the -o directory (a restart continues it); SIGHUP rotates now")
@click.option("--keep", type=int, default=None, metavar="N",
              help="with --rotate: keep the newest N recordings, delete older ones")
@click.option("--share-group", default=None, metavar="GROUP",
              help="make the recording readable by GROUP (0750/0640); default private to you (0700/0600)")
def record(path, duration, interval, events, label, pid, modes, self_cost, fmt, rotate_text, keep, share_group):
    """Record per-interval aggregates (and raw events) to Parquet or CSV.

    PATH becomes a directory; every interval is committed (fsync), so a crash loses at most the
    interval being written. Ctrl-C or SIGTERM stops cleanly and keeps everything recorded.
    The recording verifies itself when read (docs/recording-guarantees.md)."""
    from ..analysis.recorder import Access, check_output_path, printable
    from ..text import decoded

    rotate = parse_duration(rotate_text) if rotate_text is not None else None
    validate(duration, interval, pid, rotate, keep)
    label = decoded(label)  # kept whole (valid Unicode); outputs escape it (text.py)
    Access(share_group)  # an unknown group is refused before anything is created
    if rotate is None or not _rotation_dir(path):  # --rotate continues its own directory
        check_output_path(path)
    else:  # ... only if it is the invoking user's and nobody else may write to it
        from ..output import check_existing_dir

        check_existing_dir(path, "-o")
    modes_t = parse_modes(modes)
    from ..tracer.session import TraceSession

    sigs = Signals(rotate_on_hup=rotate is not None)
    status = StatusLine()
    with stop_on_signals(sigs):
        with TraceSession(pid=pid, interval=interval, events=events, modes=modes_t, self_cost=self_cost) as s:
            meta = session_meta(s, label, pid, interval, events)
            meta = {k: v for k, v in meta.items() if v is not None}
            if rotate is None:
                summary = _record_one(s, path, fmt, meta, events, share_group, duration, sigs, status)
            else:
                from ..analysis import rotation

                summary = rotation.record_rotating(
                    s, path, fmt, meta, events, share_group, duration, sigs, status, rotate, keep,
                    run_recording=run_recording, attached=attached_line)
        # still under the stop handler: a second Ctrl-C while the summary prints stops nothing
        click.echo(summary)
        click.echo(f"next: kvmtrace report {printable(path)}")


def _rotation_dir(path) -> bool:
    from ..analysis.rotation import is_rotation_dir

    return is_rotation_dir(path)


def _record_one(s, path, fmt, meta, events, share_group, duration, sigs, status) -> str:
    from ..analysis.recorder import Recorder, printable

    with Recorder(path, fmt=fmt, meta=meta, events=events, plan=s.plan, share_group=share_group) as rec:
        sigs.recording = True
        click.echo(attached_line(s, path), err=True)
        how = run_recording(s, rec, duration=duration, stop=sigs.stop.is_set, status=status)
        status.done()
        rec.close(status="complete", stopped_by="signal" if sigs.stop.is_set() else how)
    return (f"recorded {rec.interval} intervals to {printable(path)}: {rec.totals['hva_ops']:,} hva ops, "
            f"{rec.totals['memslot_updates']:,} memslot updates, lost events {rec.lost_events:,}")
