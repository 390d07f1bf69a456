"""Names from outside are data (issue 20, item 1). A VMM chooses its own comm and QEMU -name;
a recording carries label, host, kernel and status strings someone else wrote. Whatever they
hold, every output (live top and its plain/log/CSV forms, report text/CSV/HTML/JSON, compare,
doctor, the exporter, error messages) must not crash, must let no control character of theirs
reach a terminal, must never interpret them as rich markup, and must cap them for display,
while JSON keeps them whole. Hypothesis feeds arbitrary text (and undecodable bytes) through
every output; one regression test per finding of the adversarial run reproduces it."""

from __future__ import annotations

import csv
import dataclasses
import html.parser
import io
import json
import os
import re
import subprocess
import sys
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.console import Console

from kvmtrace.dashboard.live import run_live
from kvmtrace.dashboard.model import ViewOptions
from kvmtrace.dashboard.plain import CsvSink, plain_table
from kvmtrace.dashboard.view import render, render_summary, render_text
from kvmtrace.output import unescape_cell
from kvmtrace.snapshot import VmInfo
from kvmtrace.text import NAME_CAP, decoded, display, printable
from tests.synthetic_top import SyntheticSession, snapshot_at, tracepoint_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLAN = tracepoint_plan()
WIDTH = 120
# what an adversarial VMM or recording chose (issue 20, Found 1)
CLOSE_TAG = "[/x]"
OSC_TITLE = "\x1b]2;PWNED\x1b\\"
CONCEAL = "\x1b[8mhidden"
CLEAR = "\x1b[2J\x1b[31m"
MARKUP = "[bold red]B"
LINK = "[link=http://127.0.0.1/]click[/link]"
NEWLINE = "evil\nname"
LONG = "q" * 6144

_SGR = re.compile(r"\x1b\[[0-9;]*m")  # rich's own colours and styles on a terminal
_ESCAPED = ("Cc", "Cf", "Cs", "Zl", "Zp")


def controls(out: str, terminal: bool = False) -> list:
    """Control, format and separator characters in ``out`` other than newlines (and, for a
    terminal, other than the renderer's own SGR style sequences)."""
    if terminal:
        out = _SGR.sub("", out)
    return [c for c in out if c != "\n" and unicodedata.category(c) in _ESCAPED]


def term_console(width: int = WIDTH) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor",
                   legacy_windows=False, soft_wrap=False)


# arbitrary text; and bytes decoded as the tracer decodes /proc (replace) or as a path is
# decoded (surrogateescape), so undecodable bytes reach the renderers too
names = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=60, max_size=300),
    st.binary(max_size=80).map(lambda b: b.decode("utf-8", "replace")),
    st.sampled_from([CLOSE_TAG, OSC_TITLE, CONCEAL, CLEAR, MARKUP, LINK, NEWLINE, LONG, "[", "]", "\\", "$x$",
                     "=cmd|' /C calc'!A0", "\u202eevil", "\u2028", "\x85", "\x00", "a\tb"]),
)
raw_names = st.one_of(names, st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")))


# ---------------------------------------------------------------------------- text.py


@given(raw_names)
def test_printable_leaves_nothing_a_terminal_acts_on(s):
    p = printable(s)
    assert not controls(p)
    assert printable(p) == p  # idempotent: escaping is done once
    if not controls(s) and "\n" not in s:
        assert p == s  # ordinary text is shown as it is
    d = display(s)
    assert not controls(d) and len(d) <= NAME_CAP and cell_len(d) <= NAME_CAP
    if cell_len(p) <= NAME_CAP and len(p) <= NAME_CAP:
        assert d == p
    else:
        assert d.endswith("…") and p.startswith(d[:-1])  # cut, never inside an escape
    decoded(s).encode("utf-8")  # always valid Unicode (raises otherwise)


def test_escapes_are_visible_and_undecodable_bytes_show_as_hex():
    assert printable(OSC_TITLE) == "\\x1b]2;PWNED\\x1b\\"
    assert printable("a\nb\tc\r") == "a\\nb\\tc\\r"
    assert printable("x\u202ey\x85\x7f") == "x\\u202ey\\x85\\x7f"
    assert printable(b"lab\xffel") == "lab\\xffel" == printable(b"lab\xffel".decode("utf-8", "surrogateescape"))
    assert decoded(b"lab\xffel") == "lab\ufffdel" and decoded("\ud800") == "\ufffd" * 3
    assert display("日本" * 40) == "日本" * 15 + "日…" and cell_len(display("日本" * 40)) == 63  # no half glyph


# ---------------------------------------------------------------------------- top


def hostile_top(name: str, comm: str, host: str = "testhost", kernel: str = "6.18.0-test"):
    """(cum, delta, meta) of the synthetic top session with guest-a named ``name`` (comm
    ``comm``) and the second VM's comm ``comm``."""
    def sub(s):
        return dataclasses.replace(s, vms=tuple(dataclasses.replace(
            v, name=name if v.pid == 4242 else "", comm=comm) for v in s.vms))

    cum, prev = sub(snapshot_at(4)), sub(snapshot_at(3))
    return cum, cum.delta(prev), {"host": host, "kernel": kernel}


def top_outputs(cum, delta, meta, tmp_dir: str) -> dict:
    """Every output of `kvmtrace top` for one interval: the live screen (as a terminal gets
    it, and as plain text), the final summary, --once/the batch table, and --csv."""
    out = {}
    c = term_console()
    c.print(render(cum, delta, meta, PLAN, ViewOptions(), WIDTH))
    out["screen"] = c.file.getvalue()
    c = term_console()
    c.print(render_summary(cum, meta, PLAN, ViewOptions(), WIDTH))
    out["summary"] = c.file.getvalue()
    out["text"] = render_text(cum, delta, meta, PLAN, ViewOptions(), WIDTH)
    out["wide"] = render_text(cum, delta, meta, PLAN, ViewOptions(), 400)
    out["once"] = plain_table(cum, delta, meta, PLAN, ViewOptions())
    out["batch_summary"] = plain_table(cum, None, meta, PLAN, ViewOptions(), summary=True)
    path = os.path.join(tmp_dir, "top.csv")
    if os.path.exists(path):
        os.unlink(path)
    with CsvSink(path) as sink:
        sink.write(cum, delta, PLAN, ViewOptions())
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        out["csv"] = list(csv.reader(f))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=raw_names, comm=raw_names, host=raw_names, kernel=raw_names)
def test_top_shows_any_name_as_data(tmp_path, name, comm, host, kernel):
    cum, delta, meta = hostile_top(name, comm, host, kernel)
    out = top_outputs(cum, delta, meta, str(tmp_path))
    for k in ("screen", "summary"):
        assert not controls(out[k], terminal=True), k
    for k in ("text", "wide", "once", "batch_summary"):
        assert not controls(out[k]), k
    shown = display(name or comm or "?")
    # markup is never interpreted: the panel title shows the name literally
    assert f"VM 4242 {shown} · since start" in out["wide"]
    for k in ("screen", "summary", "text"):
        assert all(cell_len(line) <= WIDTH for line in _SGR.sub("", out[k]).splitlines()), k
    # --once: three header lines, the column names, one line per VM, the total
    assert len(out["once"].splitlines()) == 3 + 1 + 2 + 1
    # --csv: the whole name, made printable, in one cell (no raw control byte)
    header, *rows = out["csv"]
    assert all(not controls(cell) for r in out["csv"] for cell in r)
    r = dict(zip(header, next(r for r in rows if r[header.index("pid")] == "4242")))
    assert unescape_cell(r["name"]) == printable(name or comm or "?")


def test_top_close_tag_comm_does_not_crash_the_live_screen():
    """Found: comm `[/x]` kills live `top` (MarkupError, exit 1). The real live path (rich
    Live on a terminal) with a session whose VM has that comm."""
    class Tty(io.StringIO):
        def isatty(self):
            return True

    class Hostile(SyntheticSession):
        def snapshots(self, duration=None, stop=None):
            for s in super().snapshots(duration, stop):
                yield dataclasses.replace(s, vms=tuple(dataclasses.replace(v, name="", comm=CLOSE_TAG) for v in s.vms))

    out = Tty()
    last = run_live(Hostile(interval=0.1, sleep=False, count=3), out=out, keys=False, signals=False)
    assert last is not None and last.seq == 3
    text = out.getvalue()
    assert CLOSE_TAG in text  # shown literally (screen and summary)


@pytest.mark.parametrize("name,bad", [(OSC_TITLE, "\x1b]2;"), (CONCEAL, "\x1b[8m"), (CLEAR, "\x1b[2J")])
def test_top_passes_no_terminal_sequence_of_a_name(name, bad):
    """Found: comm `\\x1b]2;PWNED\\x1b\\\\` set the terminal title, `\\x1b[8m` hid a row."""
    cum, delta, meta = hostile_top(name, name)
    c = term_console()
    c.print(render(cum, delta, meta, PLAN, ViewOptions(), WIDTH))
    c.print(render_summary(cum, meta, PLAN, ViewOptions(), WIDTH))
    assert bad not in c.file.getvalue()
    assert not controls(c.file.getvalue(), terminal=True)


def test_top_markup_in_a_name_is_text():
    """Found: `[bold red]B` and `[link=...]` were rendered as markup."""
    for name, cell in ((MARKUP, "[bold red]B"), (LINK, "[link=http://12…")):
        cum, delta, meta = hostile_top(name, "qemu")
        screen = render_text(cum, delta, meta, PLAN, ViewOptions(), WIDTH).splitlines()
        assert next(ln for ln in screen if ln.startswith("4242 ")).startswith(f"4242 {cell} ")
        assert any(ln.startswith(f"VM 4242 {name} · since start") for ln in screen)


def test_top_newline_in_a_name_keeps_one_row_per_vm():
    """Found: a newline in a name broke table rows."""
    cum, delta, meta = hostile_top(NEWLINE, "qemu")
    once = plain_table(cum, delta, meta, PLAN, ViewOptions()).splitlines()
    assert [ln.split()[:2] for ln in once if ln.lstrip().startswith("4242")] == [["4242", "evil\\nname"]]
    screen = render_text(cum, delta, meta, PLAN, ViewOptions(), WIDTH).splitlines()
    assert [ln.split()[:2] for ln in screen if ln.startswith("4242")] == [["4242", "evil\\nname"]]
    assert not any(ln.lstrip().startswith("name") for ln in once + screen)


def test_six_kb_name_is_capped_for_display_only():
    """Found: a 6 KB `-name` became a 6 KB label."""
    v = VmInfo("pid:1", 1, comm="qemu", name=LONG, ordinal=1)
    assert v.name == LONG
    assert v.label == "q" * (NAME_CAP - 1) + "…[1]#1"
    cum, delta, meta = hostile_top(LONG, "qemu", host=LONG, kernel=LONG)
    wide = render_text(cum, delta, meta, PLAN, ViewOptions(), 1000)
    assert max(cell_len(ln) for ln in wide.splitlines()) < 400
    once = plain_table(cum, delta, meta, PLAN, ViewOptions())
    assert max(len(ln) for ln in once.splitlines()) < 400


# ---------------------------------------------------------------------------- report


def hostile_recording(path: str, name: str, comm: str, label: str = "lab", host: str = "host",
                      kernel: str = "6.18", status=None) -> str:
    from kvmtrace.analysis.recording import META_FILE
    from kvmtrace.analysis.synth import SynthOp, SynthVm, record_synthetic, simulate

    vm = SynthVm("ffff1", 4242, comm=comm, name=name, memslots=12)
    ops = [SynthOp("ffff1", op="unmap", per_interval=20, slots=2), SynthOp("ffff1", change="create", per_interval=1)]
    snaps, _ = simulate([vm], ops, intervals=2, events=False)
    record_synthetic(path, snaps, meta={"label": label, "host": host, "kernel": kernel})
    if status is not None:  # a status written by someone else
        mp = os.path.join(path, META_FILE)
        with open(mp) as f:
            meta = json.load(f)
        meta["status"] = status
        with open(mp, "w") as f:
            json.dump(meta, f)
    return path


def report_of(*paths):
    from kvmtrace.analysis.recording import read_inputs
    from kvmtrace.analysis.report import EVENT_COLUMNS, build_report

    return build_report(read_inputs(list(paths), event_columns=EVENT_COLUMNS))


def report_text(rep, terminal: bool = False, width: int = 400) -> str:
    from kvmtrace.analysis.render import print_renderables, report_renderables

    if terminal:
        c = term_console(width)
        for it in report_renderables(rep):
            c.print(it)
        return c.file.getvalue()
    buf = io.StringIO()
    print_renderables(report_renderables(rep), file=buf, width=width)
    return buf.getvalue()


_PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "thead", "tbody",
              "tr", "th", "td", "b", "div", "img"}


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def page_of(doc: str) -> _Page:
    p = _Page()
    p.feed(doc)
    p.close()
    return p


def csv_cells(directory: str) -> dict:
    out = {}
    for fn in sorted(os.listdir(directory)):
        with open(os.path.join(directory, fn), newline="", encoding="utf-8") as f:
            out[fn] = list(csv.reader(f))
    return out


stored = st.one_of(names, st.just(""))  # what a recording can hold: valid Unicode


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=stored, comm=stored, label=stored, host=stored, kernel=stored, status=stored)
def test_report_shows_any_recorded_name_as_data(tmp_path_factory, monkeypatch, name, comm, label, host, kernel,
                                                status):
    from kvmtrace.analysis import export
    from kvmtrace.analysis import html as H
    from kvmtrace.analysis.report import Report, to_json

    d = tmp_path_factory.mktemp("rep")
    rec = hostile_recording(str(d / "r"), name, comm, label, host, kernel, status)
    rep = report_of(rec)
    shown_label = display(name or comm or "?") + "[4242]#1"
    # text: no crash, nothing for the terminal, the label literally (markup not parsed)
    plain = report_text(rep)
    assert not controls(plain)
    assert shown_label in plain
    assert not controls(report_text(rep, terminal=True, width=WIDTH), terminal=True)
    # HTML (plots left out here: test_report_html_plot_labels_are_text covers them)
    monkeypatch.setattr(H, "report_figures", lambda *a, **k: ({}, []))
    doc = H.report_html(rep)
    assert not controls(doc)
    page = page_of(doc)
    assert set(page.tags) <= _PAGE_TAGS
    assert shown_label in "".join(page.text)
    # CSV: no control character in any cell; the whole name (made printable) in the hva table
    out = str(d / "csv")
    export.write_csv_tables({t: rep[t] for t in Report.TABLES}, out)
    cells = csv_cells(out)
    assert all(not controls(c) for rows in cells.values() for r in rows for c in r)
    head, *rows = cells["hva_ops.csv"]
    assert {unescape_cell(r[head.index("name")]) for r in rows} == {printable(name)}
    # JSON keeps everything whole
    doc = export.dumps(to_json(rep))
    assert not controls(doc)
    j = json.loads(doc)
    assert {(h["name"], h["comm"]) for h in j["hva_ops"]} == {(name, comm)}
    src = j["sources"][0]
    assert (src["label"], src["host"], src["kernel"], src["status"]) == (label or src["label"], host, kernel, status)
    assert all(cell_len(h["vm_label"]) <= NAME_CAP + len("[4242]#1") for h in j["hva_ops"])


@pytest.fixture(scope="module")
def hostile_rec(tmp_path_factory):
    """One recording where every string is hostile."""
    d = tmp_path_factory.mktemp("hostile")
    return hostile_recording(str(d / "r"), name=CLEAR + MARKUP + LINK, comm=CLOSE_TAG + "\x07",
                             label=CLOSE_TAG + OSC_TITLE, host="h" + CLOSE_TAG + "\n", kernel=CONCEAL + LONG,
                             status="[/s]\x1b")


def test_report_close_tag_and_escapes_do_not_reach_the_terminal(hostile_rec, tmp_path):
    """Found: `[/x]` in a name, label, host or status killed `report` (MarkupError), also with
    --csv/--html; `report` passed `\\x1b[2J\\x1b[31m` to the terminal; markup was rendered."""
    from click.testing import CliRunner

    from kvmtrace.commands.report import report

    r = CliRunner().invoke(report, [hostile_rec, "--csv", str(tmp_path / "csv"), "--html", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert "\\x1b[2J\\x1b[31m[bold red]B[link=http://127.0.0.1/]click[/link][4242]#1" in r.output
    assert "[/x]\\x1b]2;PWNED\\x1b\\" in r.output  # the label (source), literally
    assert "h[/x]\\n" in r.output and "[/s]\\x1b" in r.output
    assert not controls(report_text(report_of(hostile_rec), terminal=True), terminal=True)
    # and JSON still keeps every name whole (display capping and escaping are for people)
    from kvmtrace.analysis.report import to_json

    j = to_json(report_of(hostile_rec))
    assert j["hva_ops"][0]["name"] == CLEAR + MARKUP + LINK and j["hva_ops"][0]["comm"] == CLOSE_TAG + "\x07"
    assert j["sources"][0]["kernel"] == CONCEAL + LONG and j["sources"][0]["host"] == "h" + CLOSE_TAG + "\n"
    assert len(j["hva_ops"][0]["vm_label"]) <= NAME_CAP + len("[4242]#1")


def test_report_csv_and_html_carry_no_raw_control_bytes(hostile_rec, tmp_path):
    """Found: CSV and HTML carried raw ESC/BEL bytes."""
    from click.testing import CliRunner

    from kvmtrace.commands.report import report

    r = CliRunner().invoke(report, [hostile_rec, "--csv", str(tmp_path / "csv"), "--html", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    for fn in os.listdir(tmp_path / "csv"):
        data = (tmp_path / "csv" / fn).read_bytes()
        assert b"\x1b" not in data and b"\x07" not in data, fn
    page = (tmp_path / "r.html").read_text()
    assert not controls(page)
    assert "\\x1b[2J\\x1b[31m[bold red]B[link=http://127.0.0.1/]click[/link][4242]#1" in "".join(page_of(page).text)


def test_report_six_kb_kernel_is_capped_in_text_and_html(hostile_rec):
    from kvmtrace.analysis import html as H

    text = report_text(report_of(hostile_rec), width=400)
    assert LONG[:200] not in text and "\\x1b[8mhidden" + "q" * (NAME_CAP - 14) + "…" in text
    doc = H.report_html(report_of(hostile_rec))
    assert LONG[:200] not in doc


def test_report_html_plot_labels_are_text(tmp_path):
    """A "$" pair in a recording's name is not TeX for matplotlib (a parse error would end the
    report); the label is shown as data."""
    from kvmtrace.analysis import html as H

    rec = hostile_recording(str(tmp_path / "r"), "vm", "qemu", label=r"$\frac{$" + CLOSE_TAG + "\x1b")
    doc = H.report_html(report_of(rec))
    assert "<img" in doc and not controls(doc)


# ---------------------------------------------------------------------------- compare


sides = st.fixed_dictionaries({"label": names, "kernel": names, "host": names, "attach": names})


@settings(max_examples=80, deadline=None)
@given(before=sides, after=sides)
def test_compare_header_shows_sides_as_data(before, after):
    from kvmtrace.analysis.html import _side_lines
    from kvmtrace.analysis.render import compare_header

    c = term_console()
    for t in compare_header(before, after):
        c.print(t)
    out = c.file.getvalue()
    assert not controls(out, terminal=True)
    wide = Console(file=io.StringIO(), width=1000, no_color=True)
    for t in compare_header(before, after):
        wide.print(t)
    assert f"before: {display(before['label'])}  kernel {display(before['kernel'])}" in wide.file.getvalue()
    doc = _side_lines(before, after)
    assert not controls(doc) and set(page_of(doc).tags) <= {"div", "b"}


def test_compare_of_hostile_recordings(hostile_rec, tmp_path):
    from click.testing import CliRunner

    from kvmtrace.commands.compare import compare

    other = hostile_recording(str(tmp_path / "o"), MARKUP, CLOSE_TAG, label=OSC_TITLE + "\n" + LONG, host=CLEAR)
    r = CliRunner().invoke(compare, [hostile_rec, other, "--csv", str(tmp_path / "c.csv"),
                                     "--html", str(tmp_path / "c.html")])
    assert r.exit_code == 3, r.output  # one run a side: inconclusive (no crash, no markup error)
    assert not controls(r.output)
    assert "after:  \\x1b]2;PWNED\\x1b\\\\nqqq" in r.output and LONG[:100] not in r.output
    assert not controls((tmp_path / "c.html").read_text())
    assert b"\x1b" not in (tmp_path / "c.csv").read_bytes()


# ---------------------------------------------------------------------------- doctor


@settings(max_examples=60, deadline=None)
@given(comm=raw_names, name=raw_names)
def test_doctor_shows_running_vms_as_data(comm, name):
    from kvmtrace.commands import doctor as D
    from tests.test_doctor import gathered

    r = D.collect(gathered=gathered("6.18-builtin-host"))
    r["vms"] = [{"pid": 4242, "comm": comm, "name": name, "vm_fds": 1, "vcpus": 1}]
    c = term_console(1000)
    D.render(r, c)
    out = c.file.getvalue()
    assert not controls(out, terminal=True)
    assert f"pid 4242 {display(comm)}" in _SGR.sub("", out)


def test_doctor_close_tag_comm():
    from kvmtrace.commands import doctor as D
    from tests.test_doctor import gathered

    r = D.collect(gathered=gathered("6.18-builtin-host"))
    r["vms"] = [{"pid": 4242, "comm": CLOSE_TAG, "name": OSC_TITLE, "vm_fds": 1, "vcpus": 1}]
    c = Console(file=io.StringIO(), width=200, no_color=True)
    D.render(r, c)
    assert "pid 4242 [/x] '\\x1b]2;PWNED\\x1b\\'" in c.file.getvalue()


# ---------------------------------------------------------------------------- exporter


@settings(max_examples=60, deadline=None)
@given(name=raw_names, comm=raw_names)
def test_exporter_label_values_are_valid_and_capped(name, comm):
    from prometheus_client.parser import text_string_to_metric_families

    from kvmtrace.exporter.collector import Exporter, render as expose
    from tests.test_exporter import make_snap

    vm = VmInfo("pid:100", 100, comm, name, 2, 12, "derived", False, True, ordinal=1)
    e = Exporter()
    e.update(make_snap(vms=(vm,)))
    text = expose(e).decode("utf-8")
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.labels.get("vm_id") == "pid:100"]
    assert samples
    for s in samples:
        assert s.labels["vm"] == vm.label
        assert cell_len(s.labels["vm"]) <= NAME_CAP + len("[100]#1")
    (info,) = [s for s in samples if s.name == "kvmtrace_vm_info"]
    assert info.labels["guest"] == display(name) and info.labels["comm"] == display(comm)


def test_exporter_six_kb_name_is_capped():
    from kvmtrace.exporter.collector import Exporter, render as expose
    from tests.test_exporter import make_snap

    e = Exporter()
    e.update(make_snap(vms=(VmInfo("pid:100", 100, "qemu", LONG + "\n\"x", 2, 12, ordinal=1),)))
    text = expose(e).decode("utf-8")
    assert LONG[:100] not in text
    assert 'guest="' + "q" * (NAME_CAP - 1) + '…"' in text


# ---------------------------------------------------------------------------- errors


def test_error_message_echoing_a_path_is_one_clean_line(tmp_path):
    bad = str(tmp_path / ("rec" + OSC_TITLE + "\n" + CLOSE_TAG))
    r = subprocess.run([sys.executable, "-m", "kvmtrace", "report", bad], capture_output=True, text=True,
                       errors="surrogateescape", env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("kvmtrace: ") and "\\x1b]2;PWNED\\x1b\\\\n[/x]" in lines[0]
    assert len(lines) <= 2 and not controls(r.stderr)
