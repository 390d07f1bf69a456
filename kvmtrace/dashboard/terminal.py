"""Single-key input for the live view. Only on a terminal: stdin is switched to cbreak mode
(keys arrive one by one, Ctrl-C still raises SIGINT) and always restored on exit, including on
exceptions and Ctrl-C. When stdin is not a tty nothing is read and nothing is changed."""

from __future__ import annotations

import codecs
import os
import re
import select
import sys
import threading
from typing import Callable, Optional


# one key: a CSI or SS3 escape sequence (arrow and function keys) as a whole, else one character
_KEY = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1bO.|.", re.S)


def split_keys(text: str) -> list:
    """The keys in what one read returned: escape sequences stay whole (the view ignores
    them), a lone ESC is the Esc key."""
    return _KEY.findall(text)


def stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, AttributeError):
        return False


class KeyReader:
    """Context manager: calls ``on_key(key)`` from a daemon thread for every key pressed (one
    character, or a whole escape sequence: split_keys).
    ``active`` tells whether keys are read at all."""

    def __init__(self, on_key: Callable[[str], None], enabled: bool = True, fd: Optional[int] = None):
        self.on_key = on_key
        self.fd = fd
        self.enabled = enabled
        self.active = False
        self.error: Optional[BaseException] = None  # first exception raised by on_key
        self._saved = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "KeyReader":
        if not self.enabled:
            return self
        if self.fd is None:
            if not stdin_is_tty():
                return self
            self.fd = sys.stdin.fileno()
        elif not os.isatty(self.fd):
            return self
        try:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        except (ImportError, OSError, ValueError):
            self._saved = None
            return self
        self.active = True
        self._thread = threading.Thread(target=self._run, name="kvmtrace-keys", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character split over two reads
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.1)
                if not ready:
                    continue
                data = os.read(self.fd, 32)
            except (OSError, ValueError):
                return
            if not data:
                return
            for key in split_keys(decoder.decode(data)):
                try:
                    self.on_key(key)
                except Exception as e:  # kept for the caller (KeyReader.error), keeps reading
                    if self.error is None:
                        self.error = e

    def restore(self):
        """Stop reading and put the terminal back as it was. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        if self._saved is not None:
            import termios

            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except (OSError, ValueError):
                pass
            self._saved = None
        self.active = False

    def __exit__(self, *exc):
        self.restore()
        return False
