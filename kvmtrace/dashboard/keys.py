"""The keys of the live view, kvm_stat's where they fit, and ``Controls``: the pure state
machine that turns key presses (and the text typed in a prompt) into view options and into the
few things only the driver can do (quit, change the tracer's interval, reset). No I/O, no
clock: tested key by key (tests/test_dashboard.py) and in tmux (tests/test_dashboard_tmux.py).

``KEYS`` is the one table of keys: the help overlay, ``kvmtrace top --help`` and docs/top.md
(checked by a test) all show it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from ..text import printable
from .model import ALL_OPS, SORT_KEYS, ViewOptions

INTERVAL_MIN, INTERVAL_MAX = 0.1, 3600.0  # as `top --interval`
PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT

# (keys, what they do); a key name "space" is the space bar
KEYS: Tuple[Tuple[str, str], ...] = (
    ("? h", "show the keys (any key closes the list)"),
    ("< >", "sort by the previous / next key: " + ", ".join(SORT_KEYS)),
    ("o", "reverse the sort order"),
    ("p", "filter by pid: type pids (e.g. 4242,4343), Enter"),
    ("g", "filter by guest: part of its name or command, Enter"),
    ("f", "show only the ops matching a regular expression"),
    ("c", "clear the filters (pid, guest, op)"),
    ("s", f"set the update interval (seconds, {INTERVAL_MIN:g} to {INTERVAL_MAX:g})"),
    ("r", "reset: zero the figures shown since start"),
    ("v", "choose the VM of the histogram panel"),
    ("space", "pause / resume the display (tracing goes on)"),
    ("q", "quit (Ctrl-C too) with a summary since start"),
)
PROMPT_HELP = "in a prompt: Enter applies, Esc cancels, an empty line clears that filter"
KEYS_HINT = "keys: ? help, q quit"

ENTER = ("\r", "\n")
BACKSPACE = ("\x7f", "\x08")
ESC = "\x1b"
SPACE = " "


def help_lines() -> Tuple[str, ...]:
    """The key table as lines (the help overlay, ``top --help``)."""
    w = max(len(k) for k, _ in KEYS)
    return tuple(f"{k:<{w}}  {what}" for k, what in KEYS) + (PROMPT_HELP,)


@dataclass(frozen=True)
class Prompt:
    kind: str  # pid, guest, op, interval
    label: str
    text: str = ""


PROMPTS = {
    "p": ("pid", "filter by pid (e.g. 4242,4343)"),
    "g": ("guest", "filter by guest name or command"),
    "f": ("op", "show the ops matching (regular expression, e.g. unmap|age)"),
    "s": ("interval", f"update interval in seconds ({INTERVAL_MIN:g} to {INTERVAL_MAX:g})"),
}


@dataclass(frozen=True)
class Action:
    """What the driver does after a key: ``quit``; ``interval``: set the source's interval;
    ``reset``: take the snapshot on screen as the new start; ``unpause``: show the newest
    snapshot again; ``panel``: show the next VM in the histogram panel; ``redraw``: the screen
    changed."""

    redraw: bool = False
    panel: bool = False
    quit: bool = False
    interval: Optional[float] = None
    reset: bool = False
    unpause: bool = False


NOTHING = Action()
REDRAW = Action(redraw=True)


def parse_pids(text: str) -> Tuple[int, ...]:
    """``4242, 4343`` -> (4242, 4343); ValueError with the message to show."""
    out = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= PID_MAX:
            raise ValueError(f"not a pid: {printable(part)} (type pids such as 4242,4343)")
        out.append(int(part))
    return tuple(dict.fromkeys(out))


def parse_ops(text: str) -> Tuple[str, ...]:
    """The ops whose name the regular expression ``text`` matches (re.search), in consts.Op
    order; ValueError with the message to show."""
    try:
        rx = re.compile(text)
    except re.error as e:
        raise ValueError(f"not a regular expression: {printable(text)} ({e})") from None
    ops = tuple(o for o in ALL_OPS if rx.search(o))
    if not ops:
        raise ValueError(f"no op matches {printable(text)} (ops: {', '.join(ALL_OPS)})")
    return ops


def parse_interval(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and INTERVAL_MIN <= v <= INTERVAL_MAX):
        raise ValueError(f"the interval is a number of seconds from {INTERVAL_MIN:g} to {INTERVAL_MAX:g},"
                         f" not {printable(text)}")
    return v


class Controls:
    """The key handling of the live view. ``opts`` (ViewOptions) is what the screen shows,
    help overlay, prompt and message included; ``press(key)`` returns the Action for the
    driver. A key is one character, or a whole escape sequence (arrow keys...), which is
    ignored. ``can_set_interval``: whether the source's interval can be changed."""

    def __init__(self, opts: ViewOptions, can_set_interval: bool = True):
        self.opts = opts
        self.can_set_interval = can_set_interval
        self.prompt: Optional[Prompt] = None

    def _set(self, **kw) -> Action:
        self.opts = replace(self.opts, **kw)
        return REDRAW

    def _show_prompt(self, message: str = "") -> None:
        p = self.prompt
        line = None if p is None else f"{p.label}: {p.text}"
        self.opts = replace(self.opts, prompt=line, message=message)

    def press(self, key: str) -> Action:
        if not key:
            return NOTHING
        if self.prompt is not None:
            return self._prompt_key(key)
        had_message = bool(self.opts.message)
        if had_message:
            self.opts = replace(self.opts, message="")
        if self.opts.help:  # any key closes the help; q still quits
            self.opts = replace(self.opts, help=False)
            return Action(quit=True) if key in ("q", "Q") else REDRAW
        if key in ("q", "Q"):
            return Action(quit=True)
        if key in ("?", "h"):
            return self._set(help=True)
        if key in ("<", ">"):
            i = SORT_KEYS.index(self.opts.sort) if self.opts.sort in SORT_KEYS else 0
            i = (i + (1 if key == ">" else -1)) % len(SORT_KEYS)
            return self._set(sort=SORT_KEYS[i])
        if key == "o":
            return self._set(reverse=not self.opts.reverse)
        if key == "c":
            return self._set(pids=(), vms=(), ops=())
        if key == "r":
            return Action(redraw=True, reset=True)
        if key == "v":
            return Action(redraw=True, panel=True)
        if key == SPACE:
            paused = not self.opts.paused
            self.opts = replace(self.opts, paused=paused)
            return Action(redraw=True, unpause=not paused)
        if key == "s" and not self.can_set_interval:
            return self._set(message="this source's interval cannot be changed")
        if key in PROMPTS:
            kind, label = PROMPTS[key]
            self.prompt = Prompt(kind, label)
            self._show_prompt()
            return REDRAW
        return REDRAW if had_message else NOTHING

    def _prompt_key(self, key: str) -> Action:
        p = self.prompt
        if key == ESC:
            self.prompt = None
            self._show_prompt()
            return REDRAW
        if key in BACKSPACE:
            self.prompt = replace(p, text=p.text[:-1])
            self._show_prompt(self.opts.message)
            return REDRAW
        if key in ENTER:
            return self._apply(p)
        if len(key) != 1 or not key.isprintable():  # escape sequences, control characters
            return NOTHING
        self.prompt = replace(p, text=p.text + key)
        self._show_prompt(self.opts.message)
        return REDRAW

    def _apply(self, p: Prompt) -> Action:
        text = p.text.strip()
        action = REDRAW
        try:
            if p.kind == "pid":
                new = dict(pids=parse_pids(text))
            elif p.kind == "guest":
                new = dict(vms=(text,) if text else ())
            elif p.kind == "op":
                new = dict(ops=parse_ops(text) if text else ())
            else:
                if not text:  # nothing typed: the interval stays
                    new = {}
                else:
                    v = parse_interval(text)
                    new = dict(interval=v)
                    action = Action(redraw=True, interval=v)
        except ValueError as e:  # the prompt stays open with the reason
            self._show_prompt(str(e))
            return REDRAW
        self.prompt = None
        self.opts = replace(self.opts, **new)
        self._show_prompt()
        return action


__all__ = ["KEYS", "KEYS_HINT", "PROMPT_HELP", "Action", "Controls", "help_lines", "parse_pids", "parse_ops",
           "parse_interval", "INTERVAL_MIN", "INTERVAL_MAX"]
