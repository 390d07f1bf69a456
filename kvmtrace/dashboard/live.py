"""Drives the view from a tracer session: ``run_live``. Used by ``kvmtrace top`` and
``kvmtrace demo``.

The session's maps are read once per interval (only ``session.snapshots()`` is called); key
presses and terminal resizes re-render the last snapshot pair without touching the tracer.
Modes: live screen (stdout is a terminal), batch (stdout is not a terminal: a plain table per
interval, like ``top -b``), ``once``, ``log``; ``csv_path`` adds per-interval CSV rows to any.
Ctrl-C or ``q`` ends the run with a final summary (cumulative totals) and a restored terminal.
"""

from __future__ import annotations

import _thread
import math
import platform
import sys
import threading
from dataclasses import replace
from typing import Optional, Sequence, TextIO

from ..errors import UsageError
from ..signals import STOP_SIGNALS, handling, raise_interrupt
from ..snapshot import Snapshot, departed, with_vms
from .keys import Controls
from .model import ALL_OPS, SORT_KEYS, ViewOptions, build_view, cycle_selected, shown_ops
from .plain import CsvSink, LogFormatter, plain_table
from .terminal import KeyReader
from .view import render, render_summary

# after `q`, how long a session may take to honour stop() (TraceSession polls it every 50 ms and
# then reads its maps once more) before the main thread is interrupted like Ctrl-C
QUIT_GRACE_S = 2.0


def make_options(
    sort: str = "ops",
    pids: Sequence[int] = (),
    vms: Sequence[str] = (),
    ops: Sequence[str] = (),
    interval: Optional[float] = None,
) -> ViewOptions:
    """Validated ViewOptions (UsageError on a bad sort key or op name)."""
    if sort not in SORT_KEYS:
        raise UsageError(f"unknown sort key {sort!r}", f"use one of: {', '.join(SORT_KEYS)}")
    bad = [o for o in ops if o not in ALL_OPS]
    if bad:
        raise UsageError(f"unknown op {', '.join(bad)}", f"use one of: {', '.join(ALL_OPS)}")
    if interval is not None and not (math.isfinite(interval) and interval > 0):
        raise UsageError(f"interval must be positive, not {interval}", "give --interval in seconds, e.g. 1")
    return ViewOptions(
        sort=sort,
        pids=tuple(int(p) for p in pids),
        vms=tuple(vms),
        ops=tuple(o for o in ALL_OPS if o in ops),
        interval=interval,
    )


def merged_meta(snap: Optional[Snapshot], session_meta) -> dict:
    """Snapshot meta, overridden by the session's, with host and kernel filled in."""
    m = dict(snap.meta) if snap is not None else {}
    m.update({k: v for k, v in dict(session_meta or {}).items() if isinstance(v, (str, int, float))})
    m.setdefault("host", platform.node())
    m.setdefault("kernel", platform.release())
    return m


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def interrupt_on_signals(signals=STOP_SIGNALS):
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread while the view
    runs, so every way of stopping it restores the terminal and prints the summary. SIGINT is
    installed explicitly: a shell starts background jobs of a script with SIGINT ignored, and
    ``kill -INT`` must still stop ``top`` there. Old handlers come back on exit."""
    return handling(raise_interrupt, signals)


class _Screen:
    """The renderable given to rich.Live: renders the shown snapshot pair at the width rich
    offers, so a terminal resize re-lays the screen out at the next refresh. Keys go through
    keys.Controls (pure); what only the driver can do (the session's interval, reset, quit) is
    done here."""

    def __init__(self, meta_of, plan, opts: ViewOptions, ascii_bars: bool, session=None):
        self.meta_of = meta_of
        self.plan = plan
        self.session = session
        self.controls = Controls(opts, can_set_interval=session is not None and hasattr(session, "interval"))
        self.ascii_bars = ascii_bars
        self.shown = (None, None)  # (cum, delta) on screen
        self.latest = (None, None)  # newest pair (differs while paused)
        self.base: Optional[Snapshot] = None  # snapshot of the last reset (key r)
        self.lock = threading.Lock()  # keys arrive on the key reader's thread
        self.quit_requested = False  # key q

    @property
    def opts(self) -> ViewOptions:
        return self.controls.opts

    @opts.setter
    def opts(self, value: ViewOptions):
        self.controls.opts = value

    def update(self, cum: Snapshot, delta: Snapshot):
        with self.lock:
            self.latest = (cum, delta)
            if not self.opts.paused:
                self.shown = self.latest

    def key(self, ch: str) -> bool:
        """Apply a key; True when it changed what is shown (q sets ``quit_requested``)."""
        with self.lock:
            act = self.controls.press(ch)
            if act.panel and self.shown[0] is not None:
                cum, delta = self.shown
                view = build_view(cum, delta, self.plan, self.opts)
                self.opts = replace(self.opts, selected=cycle_selected(view, self.opts.selected))
            if act.quit:
                self.quit_requested = True
            if act.interval is not None:
                self.session.interval = act.interval  # the session waits for it from now on
            if act.reset and self.shown[0] is not None:
                self.base = self.shown[0]
            if act.unpause:
                self.shown = self.latest
            return act.redraw

    def __rich_console__(self, console, options):
        with self.lock:
            cum, delta = self.shown
            opts, base = self.opts, self.base
        yield render(cum, delta, self.meta_of(cum), self.plan, opts, options.max_width, self.ascii_bars, base)


class _Quit:
    def __init__(self):
        self.requested = False
        self.done = False
        self.lock = threading.Lock()

    def request(self):
        """`q`: ask the session to stop; if it is still inside an interval after a grace time,
        interrupt the main thread (the same path as Ctrl-C)."""
        self.requested = True

        def late():
            with self.lock:
                if not self.done:
                    _thread.interrupt_main()

        t = threading.Timer(QUIT_GRACE_S, late)
        t.daemon = True
        t.start()

    def finish(self):
        with self.lock:
            self.done = True


def run_live(
    session,
    duration: Optional[float] = None,
    once: bool = False,
    log: bool = False,
    csv_path: Optional[str] = None,
    sort: str = "ops",
    pids: Sequence[int] = (),
    vms: Sequence[str] = (),
    ops: Sequence[str] = (),
    interval: Optional[float] = None,
    keys: Optional[bool] = None,
    out: Optional[TextIO] = None,
    stop=None,
    signals: bool = True,
) -> Optional[Snapshot]:
    """Show ``session`` (a TraceSession, already entered) until ``duration`` elapses, ``stop()``
    is true, ``q`` or Ctrl-C; return the last cumulative snapshot (None if no interval completed)
    with the VMs that ended during the run, whose final figures the tracer no longer reports.

    ``keys``: read keys (keys.KEYS) when stdin is a terminal (default: only in the live screen).
    ``out``: where to write (default sys.stdout); colour and cursor codes only on a terminal.
    ``signals``: SIGINT/SIGTERM/SIGHUP end the view like Ctrl-C (``interrupt_on_signals``);
    False when the caller handles signals itself (demo).
    """
    if once and log:
        raise UsageError("--once and --log exclude each other", "choose one of them")
    if interval is None:
        interval = getattr(session, "interval", None)
    opts = make_options(sort, pids, vms, ops, interval)
    out = out if out is not None else sys.stdout
    plan = getattr(session, "plan", None)
    session_meta = getattr(session, "meta", None)

    def meta_of(snap):
        return merged_meta(snap, session_meta)

    sink = CsvSink(csv_path) if csv_path else None
    try:
        with interrupt_on_signals(STOP_SIGNALS if signals else ()):
            if once or log or not _isatty(out):
                return _run_stream(session, duration, once, log, sink, plan, meta_of, opts, out, stop)
            return _run_screen(session, duration, sink, plan, meta_of, opts, out, keys is not False, stop)
    finally:
        if sink is not None:
            sink.close()


def _emit(out: TextIO, text: str):
    out.write(text + "\n")
    out.flush()


def _run_stream(session, duration, once, log, sink, plan, meta_of, opts, out, stop) -> Optional[Snapshot]:
    tty = _isatty(out)
    logf = LogFormatter(shown_ops(plan, (), opts), repeat=20 if tty else 0) if log else None
    prev = last = None
    gone: dict = {}  # VMs the tracer forgot after their end: their final figures, for the summary
    try:
        for snap in session.snapshots(duration=duration, stop=stop):
            delta = snap.delta(prev)
            gone.update(departed(prev, snap))
            prev = last = snap
            if sink is not None:
                sink.write(snap, delta, plan, opts)
            if once:
                _emit(out, plain_table(snap, delta, meta_of(snap), plan, opts))
                return snap
            if logf is not None:
                for line in logf.lines_for(snap, delta, plan, opts):
                    _emit(out, line)
            else:
                _emit(out, plain_table(snap, delta, meta_of(snap), plan, opts) + "\n")
    except KeyboardInterrupt:
        pass
    whole = _whole(last, gone)
    _summary(out, whole, plan, meta_of, opts, logf)
    return whole


def _whole(last: Optional[Snapshot], gone: dict) -> Optional[Snapshot]:
    """The last snapshot with the VMs that ended before it (the summary covers the whole run)."""
    return None if last is None else with_vms(last, gone.values())


def _summary(out, last, plan, meta_of, opts, logf=None, console=None):
    try:
        if last is None:
            _emit(out, "kvmtrace top: stopped before the first interval completed")
        elif logf is not None:
            for line in logf.lines_for(last, None, plan, opts, summary=True):
                _emit(out, line)
        elif console is not None:
            console.print(render_summary(last, meta_of(last), plan, opts, console.width))
        else:
            _emit(out, plain_table(last, None, meta_of(last), plan, opts, summary=True))
    except OSError:  # a closed pipe, or the terminal hung up (SIGHUP): nothing left to print to
        pass


def _run_screen(session, duration, sink, plan, meta_of, opts, out, want_keys, stop) -> Optional[Snapshot]:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=out)
    ascii_bars = not (console.encoding or "").lower().startswith("utf")
    screen = _Screen(meta_of, plan, opts, ascii_bars, session)
    quit_ = _Quit()
    live_ref = []

    def on_key(ch: str):
        changed = screen.key(ch)
        if screen.quit_requested:
            if not quit_.requested:
                quit_.request()
            return
        if changed and live_ref:
            live_ref[0].refresh()

    def should_stop() -> bool:
        return quit_.requested or (stop is not None and stop())

    last = None
    prev = None
    gone: dict = {}
    try:
        with KeyReader(on_key, enabled=want_keys) as keys:
            screen.opts = replace(screen.opts, keys=keys.active)
            with Live(
                screen,
                console=console,
                screen=True,
                auto_refresh=True,
                refresh_per_second=2,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live:
                live_ref.append(live)
                try:
                    for snap in session.snapshots(duration=duration, stop=should_stop):
                        delta = snap.delta(prev)
                        gone.update(departed(prev, snap))
                        prev = last = snap
                        if sink is not None:
                            sink.write(snap, delta, plan, opts)
                        screen.update(snap, delta)
                        live.refresh()
                        if quit_.requested:
                            break
                except KeyboardInterrupt:
                    pass
                finally:
                    quit_.finish()
                    live_ref.clear()
            if keys.error is not None:
                raise keys.error
    except KeyboardInterrupt:
        quit_.finish()
    whole = _whole(last, gone)
    # the summary keeps the sort and filters in force; it covers the whole run (a reset is for the screen)
    final = replace(screen.opts, paused=False, help=False, prompt=None, message="")
    _summary(out, whole, plan, meta_of, final, console=console)
    return whole
