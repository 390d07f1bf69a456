"""Continuous recording (``record --rotate DURATION --keep N``) and reading it back.

The ``-o`` directory holds numbered recordings and an index::

    DIR/kvmtrace-rotation.json      format, label, rotate_s, keep, recordings (in order),
                                    deleted (names removed by --keep)
    DIR/000000-20261129T120000Z/    a complete recording (kvmtrace-recording.json ...)
    DIR/000001-20261129T130000Z/    ...

One tracer session feeds all of them: the first interval of each recording is differenced
against the last cumulative snapshot of the previous one, so consecutive recordings have no
gap and no overlap in counts. ``read_rotated`` concatenates the recordings still present into
one ``Recording`` (intervals renumbered in order).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import List

import pandas as pd

from ..errors import DataFileError
from .recording import META_FILE, Recording, read_recording

ROTATION_FILE = "kvmtrace-rotation.json"
ROTATION_FORMAT = "kvmtrace-rotation"
ROTATION_VERSION = 1


def is_rotation_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, ROTATION_FILE))


def _name(seq: int, t: float) -> str:
    return f"{seq:06d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(t))}"


def record_rotating(session, path, fmt, meta, events, share_group, duration, sigs, status, rotate_s, keep,
                    run_recording, attached) -> str:
    """Record into a new recording every ``rotate_s`` seconds (or on SIGHUP) until stopped."""
    from .recorder import Access, printable

    access = Access(share_group)
    try:
        # created, or continued after a restart: either way the invoking user's, writable by
        # nobody else (output.check_dir_stat), and written only through this descriptor
        dfd = access.open_dir(path, "-o")
    except OSError as e:
        from ..errors import UsageError

        raise UsageError(f"cannot create {printable(path)}: {e.strerror}", "choose a writable location") from e
    try:
        return _record_rotating(dfd, access, session, path, fmt, meta, events, share_group, duration, sigs, status,
                                rotate_s, keep, run_recording, attached)
    finally:
        os.close(dfd)


def _record_rotating(dfd, access, session, path, fmt, meta, events, share_group, duration, sigs, status, rotate_s,
                     keep, run_recording, attached) -> str:
    import click

    from .recorder import Recorder, printable, write_json_atomic

    index_path = os.path.join(path, ROTATION_FILE)
    seq = 0
    if os.path.exists(index_path):  # a restart (e.g. of the service) continues the directory
        index = read_index(path)
        index.update(rotate_s=rotate_s, keep=keep)
        names = index["recordings"] + list(index.get("deleted") or [])
        seq = 1 + max([int(n.split("-", 1)[0]) for n in names if n.split("-", 1)[0].isdigit()] or [-1])
    else:
        index = {"format": ROTATION_FORMAT, "format_version": ROTATION_VERSION, "label": meta.get("label", ""),
                 "rotate_s": rotate_s, "keep": keep, "recordings": [], "deleted": []}
    write_json_atomic(ROTATION_FILE, index, access=access, dir_fd=dfd)
    t_end = None if duration is None else time.monotonic() + duration
    prev = None
    first_seq = seq
    totals = {"intervals": 0, "hva_ops": 0, "memslot_updates": 0, "lost": 0}
    first = True
    while True:
        name = _name(seq, time.time())
        m = dict(meta, rotation={"seq": seq, "rotate_s": rotate_s})
        with Recorder(os.path.join(path, name), fmt=fmt, meta=m, events=events, plan=session.plan,
                      share_group=share_group, dir_fd=dfd) as rec:
            index["recordings"].append(name)
            write_json_atomic(ROTATION_FILE, index, access=access, dir_fd=dfd)
            if first:
                sigs.recording = True
                click.echo(attached(session, path), err=True)
                first = False
            t_rot = time.monotonic() + rotate_s
            sigs.rotate.clear()

            def stop() -> bool:
                return sigs.stop.is_set() or sigs.rotate.is_set() or time.monotonic() >= t_rot

            left = None if t_end is None else max(0.0, t_end - time.monotonic())
            how = run_recording(session, rec, duration=left, stop=stop, status=status, prev=prev)
            prev = getattr(rec, "last_snapshot", prev)
            status.done()
            done = (sigs.stop.is_set() or how in ("signal", "duration") or getattr(session, "interrupted", False)
                    or (t_end is not None and time.monotonic() >= t_end))
            rec.close(status="complete", stopped_by=("signal" if sigs.stop.is_set() else how) if done else "rotate")
        totals["intervals"] += rec.interval
        totals["hva_ops"] += rec.totals["hva_ops"]
        totals["memslot_updates"] += rec.totals["memslot_updates"]
        totals["lost"] += rec.lost_events
        if keep is not None:
            while len(index["recordings"]) > keep:
                old = index["recordings"].pop(0)
                index["deleted"].append(old)
                write_json_atomic(ROTATION_FILE, index, access=access, dir_fd=dfd)  # first forget it, then delete it
                _remove_recording(dfd, path, old)
        if done:
            break
        seq += 1
    return (f"recorded {totals['intervals']} intervals in {seq - first_seq + 1} recordings to {printable(path)}: "
            f"{totals['hva_ops']:,} hva ops, {totals['memslot_updates']:,} memslot updates, "
            f"lost events {totals['lost']:,}" + (f" (kept the newest {keep})" if keep is not None else ""))


def _remove_recording(dfd: int, path: str, name: str) -> None:
    """Delete the recording ``name`` of the rotation directory (``dfd``): rmtree relative to the
    descriptor (Python 3.11+); before 3.11 by path (rmtree still never follows a link below it)."""
    if sys.version_info >= (3, 11):
        shutil.rmtree(name, ignore_errors=True, dir_fd=dfd)
    else:
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def read_index(path: str) -> dict:
    p = os.path.join(path, ROTATION_FILE)
    try:
        with open(p, "rb") as f:
            idx = json.loads(f.read().decode("utf-8", "replace"))
    except (OSError, ValueError) as e:
        raise DataFileError(f"{p}: unreadable rotation index ({e})", "the directory of recordings is damaged") from e
    if not isinstance(idx, dict) or idx.get("format") != ROTATION_FORMAT or not isinstance(idx.get("recordings"), list):
        raise DataFileError(f"{path}: not a kvmtrace directory of rotated recordings")
    if idx.get("format_version") != ROTATION_VERSION:
        raise DataFileError(f"{path}: rotation format version {idx.get('format_version')}, "
                            f"this kvmtrace reads version {ROTATION_VERSION}")
    if not all(isinstance(n, str) and os.sep not in n and n not in ("", ".", "..") for n in idx["recordings"]):
        raise DataFileError(f"{path}: rotation index names a path outside the directory")
    return idx


def read_rotated(path: str, **kw) -> Recording:
    """The recordings of a rotation directory, in order, as one Recording."""
    idx = read_index(path)
    names = [n for n in idx["recordings"] if os.path.exists(os.path.join(path, n, META_FILE))]
    if not names:
        raise DataFileError(f"{path}: directory of rotated recordings holds no recording yet",
                            "wait for `kvmtrace record --rotate` to attach")
    recs: List[Recording] = []
    warnings: List[str] = []
    for n in names:
        try:
            r = read_recording(os.path.join(path, n), **kw)
        except DataFileError as e:
            if "holds no complete interval" in e.message:  # stopped (or still starting) before one
                warnings.append(f"{n}: skipped ({e.message})")
                continue
            if not recs:
                raise
            warnings.append(f"{path}: DAMAGED recording {n}: reading the recordings before it only ({e.message})")
            break
        recs.append(r)
        if any("DAMAGED" in w for w in r.warnings) and n != names[-1]:
            warnings.append(f"{path}: {n} is damaged: the recordings after it are not read (they would follow a gap)")
            break
    if not recs:
        raise DataFileError(f"{path}: no recording in this directory holds a complete interval",
                            "record for at least one interval")
    missing = [n for n in idx["recordings"] if n not in names]
    if missing:
        warnings.append(f"{path}: recordings {', '.join(missing)} are missing")
    if idx.get("deleted"):
        warnings.append(f"{path}: the {len(idx['deleted'])} oldest recordings were deleted by --keep "
                        f"(this report starts at {names[0]})")
    # a gap between recordings would mean lost intervals; the recorder never leaves one
    tables = {}
    offset = 0
    parts = {t: [] for t in recs[0].tables}
    for r in recs:
        for t in parts:
            if t in r.tables:
                df = r.tables[t]
                if offset:
                    df = df.copy()
                    df["interval"] = df["interval"] + offset
                parts[t].append(df)
        offset += len(r.tables["intervals"])
        warnings.extend(f"{os.path.basename(r.path)}: {w}" for w in r.warnings)
    for t, dfs in parts.items():
        tables[t] = pd.concat(dfs, ignore_index=True) if len(dfs) > 1 else dfs[0]
    meta = dict(recs[0].meta)
    last = recs[-1].meta
    meta["end"] = last.get("end")
    meta["intervals"] = sum(int(r.meta.get("intervals") or 0) for r in recs)
    meta["lost_events"] = sum(int(r.meta.get("lost_events") or 0) for r in recs)
    tot = {}
    for r in recs:
        for k, v in (r.meta.get("totals") or {}).items():
            tot[k] = tot.get(k, 0) + int(v)
    meta["totals"] = tot
    meta["status"] = "complete" if all(r.meta.get("status") == "complete" for r in recs) else last.get("status")
    meta["rotation"] = {"recordings": names, "deleted": list(idx.get("deleted") or []), "rotate_s": idx.get("rotate_s")}
    meta.pop("files", None)
    out = Recording(path, meta, tables, warnings)
    if idx.get("label"):
        out.source = idx["label"]
    return out
