"""Signal handlers installed for the length of a ``with`` block and restored after it: the one
helper behind ``top``'s and ``demo``'s stop-on-signal behaviour and ``record``'s flag."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def handling(handler: Callable, signals: Iterable[int] = STOP_SIGNALS):
    """Install ``handler`` for ``signals`` (main thread only: elsewhere nothing changes), and
    put the previous handlers back on exit. SIGINT is installed explicitly even when it was
    ignored (a shell starts a script's background jobs with SIGINT ignored)."""
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            try:
                old[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


def raise_interrupt(signum, frame):
    """A handler that ends the running code like Ctrl-C (KeyboardInterrupt), so every ``with``
    and ``finally`` on the way out runs: terminals restored, files flushed, probes detached."""
    raise KeyboardInterrupt
