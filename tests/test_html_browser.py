"""The HTML pages of `report --html` and `compare --html`, read as a person would: the headline
first, human units, no sentinels or raw timestamps, and rendered in a real headless browser
(Debian's chromium, installed by scripts/setup.sh): the page renders, nothing overflows a 1280 px
window, the plots are present and load, and a screenshot of the whole page at 1280 px shows data
inside every plot area (not an empty axis). Set KVMTRACE_HTML_SHOTS=DIR to keep screenshots."""

from __future__ import annotations

import html as htmlmod
import json
import os
import re
import shutil
import subprocess

import pytest

from kvmtrace.cli import main

from .test_html_plots import busy_recording

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "recordings")
WIDTH = 1280

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup.sh installs it)")

# Injected by the test only (the pages themselves hold no scripts): measures the laid-out page and
# leaves the figures in the DOM for --dump-dom.
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = [].slice.call(document.images);
  var r = {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
    scrollHeight: document.documentElement.scrollHeight,
    plots: imgs.map(function (i) { var b = i.getBoundingClientRect();
      return {alt: i.alt, axes: i.getAttribute('data-axes') || '', left: b.left + window.scrollX,
              top: b.top + window.scrollY, width: b.width, height: b.height}; }),
    imgs: imgs.length, loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    imgRight: Math.max.apply(null, imgs.map(function (i) { return Math.ceil(i.getBoundingClientRect().right); }).concat([0])),
    tableRight: Math.max.apply(null, [].slice.call(document.querySelectorAll('table')).map(function (t) {
      return Math.ceil(t.getBoundingClientRect().right); }).concat([0])),
    h2: [].slice.call(document.querySelectorAll('h2')).map(function (h) { return h.textContent; })};
  var d = document.createElement('pre'); d.id = 'kvmtrace-probe'; d.textContent = JSON.stringify(r);
  document.body.appendChild(d);
});
</script>"""


def _cli(args, capsys, code=0):
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    assert e.value.code == code, out.err


def _pages(tmp_path, capsys, report=True):
    rep = tmp_path / "report.html"
    if report:
        _cli(["report", os.path.join(FIX, "multi-vm"), os.path.join(FIX, "basic"), os.path.join(FIX, "hist-only"),
              os.path.join(FIX, "bench-before"), "--html", str(rep)], capsys)
    cmp_bench = tmp_path / "compare-bench.html"
    _cli(["compare", os.path.join(FIX, "bench-before"), os.path.join(FIX, "bench-after"), "--html", str(cmp_bench)], capsys,
         code=3)  # one run per configuration: inconclusive
    cmp_rec = tmp_path / "compare.html"
    _cli(["compare", os.path.join(FIX, "hist-only"), os.path.join(FIX, "basic"), "--html", str(cmp_rec)], capsys, code=3)
    return dict({"report": rep} if report else {}, **{"compare-bench": cmp_bench, "compare": cmp_rec})


def _visible_text(page: str) -> str:
    page = re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', page)
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    return htmlmod.unescape(re.sub(r"<[^>]+>", " ", page))


def test_pages_read_as_a_person_would(tmp_path, capsys):
    pages = _pages(tmp_path, capsys)
    for name, p in pages.items():
        page = p.read_text()
        assert "<script" not in page and "http://" not in page and "https://" not in page, name
        text = re.sub(r"p[=<][0-9.e+-]+", "p", _visible_text(page))  # p-values may be 1e-05
        assert not re.search(r"\d\.?\d*e[+-]\d\d", text), (name, re.findall(r"\S*\de[+-]\d\d\S*", text)[:5])
        assert not re.search(r"(^|\s)-1(\s|$)", text), name  # no -1 sentinels
        assert not re.search(r"\b1[5-9]\d{8}(\.\d+)?\b", text), name  # no raw Unix timestamps
        assert page.count('<img class="plot"') >= 2, name
    rep = pages["report"].read_text()
    h2 = re.findall(r"<h2>(.*?)</h2>", rep)
    assert h2[0] == "Per VM and op"  # the headline first
    text = _visible_text(rep)
    # every VM named apart; units on every latency; a date, not a timestamp
    for label in ("selftest[900]#1", "selftest[900]#2", "selftest[900]#3", "web1[901]#1", "web2[901]#2"):
        assert label in text
    assert "509/0" in text and "1.87 µs" in text and "2023-11-14 22:13:20 UTC" in text
    cb = _visible_text(pages["compare-bench"].read_text())
    assert re.findall(r"<h2>(.*?)</h2>", pages["compare-bench"].read_text())[0] == "Before -&gt; after"
    assert ("before: bench-before · 4 recording(s) · kernel 5.10-synthetic · host synthetic · attach kprobe"
            in " ".join(cb.split()))
    assert "509 -> -" in cb and "1.81 µs -> 816 ns (inconclusive)" in cb


def _render(page, tmp_path, shot_name=None) -> dict:
    probe = tmp_path / (page.stem + "-probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
            f"--window-size={WIDTH},2000"]
    r = subprocess.run(base + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="kvmtrace-probe">(.*?)</pre>', r.stdout)
    assert m, f"page did not render (chromium exit {r.returncode}): {r.stderr[-500:]}"
    shots = os.environ.get("KVMTRACE_HTML_SHOTS")
    if shots:
        os.makedirs(shots, exist_ok=True)
        subprocess.run(base[:-1] + [f"--window-size={WIDTH},2600", f"--screenshot={os.path.join(shots, page.stem + '.png')}",
                                    page.as_uri()], capture_output=True, timeout=120)
    return json.loads(htmlmod.unescape(m.group(1)))


@needs_browser
def test_pages_render_in_headless_chromium_without_overflow(tmp_path, capsys):
    for name, page in _pages(tmp_path, capsys).items():
        got = _render(page, tmp_path)
        assert got["innerWidth"] == WIDTH, (name, got)
        assert got["scrollWidth"] <= WIDTH, (name, got)  # no horizontal overflow at 1280 px
        assert got["tableRight"] <= WIDTH and got["imgRight"] <= WIDTH, (name, got)
        assert got["imgs"] >= 2 and got["loaded"] == got["imgs"], (name, got)  # plots present and decoded
        assert got["h2"][0] in ("Per VM and op", "Before -> after"), (name, got)


@needs_browser
def test_overflow_check_can_fail(tmp_path, capsys):
    # the measurement is real: a table wider than the window is caught
    wide = tmp_path / "wide.html"
    wide.write_text("<!DOCTYPE html><html><body><h2>Per VM and op</h2><table><tr>"
                    + "".join(f"<td style='white-space:nowrap'>column-{i:03d}-wide-cell</td>" for i in range(80))
                    + "</tr></table></body></html>")
    got = _render(wide, tmp_path)
    assert got["scrollWidth"] > WIDTH and got["tableRight"] > WIDTH


# ----------------------------------------------------------------------------- screenshots: every plot has data

MAX_SHOT = 16000  # px: chromium's screenshot of one window
INSET = 3  # px inside each plot area's frame (the spines)
INK = 40  # non-white pixels a plot area needs to count as holding data


def _rich_pages(tmp_path, capsys):
    """Pages over recordings with everything the plots show: raw events and histograms only,
    several VMs with a changing rate, a latency tail, every memslot change type; compare sides of
    three runs each, the after side 40% faster."""
    busy = busy_recording(str(tmp_path / "busy"))
    rep = tmp_path / "report-rich.html"
    _cli(["report", busy, os.path.join(FIX, "multi-vm"), os.path.join(FIX, "hist-only"), os.path.join(FIX, "bench-before"),
          "--html", str(rep)], capsys)
    for side, slow, seed in (("before", 1.0, 10), ("after", 0.6, 20)):
        (tmp_path / side).mkdir()
        for run in range(3):
            busy_recording(str(tmp_path / side / f"run{run}"), label=f"{side}-{run}", seed=seed + run, slow=slow)
    cmp_rec = tmp_path / "compare-rich.html"
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path / "before"), str(tmp_path / "after"), "--html", str(cmp_rec)])
    capsys.readouterr()
    return {"report-rich": rep, "compare-rich": cmp_rec}


def _screenshot(page, tmp_path, height: int):
    shot = tmp_path / (page.stem + ".png")
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
                    f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={WIDTH},{height}",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.exists(), "chromium wrote no screenshot"
    shots = os.environ.get("KVMTRACE_HTML_SHOTS")
    if shots:
        os.makedirs(shots, exist_ok=True)
        shutil.copy(shot, os.path.join(shots, shot.name))
    return shot


def plot_ink(page, tmp_path) -> list:
    """(alt, [non-white pixels inside each plot area]) per plot of the page, measured on a
    screenshot of the whole page at 1280 px: legends, titles and tick labels lie outside the
    plot areas (the pages' plots draw no grid), so an empty axis counts 0."""
    from PIL import Image

    got = _render(page, tmp_path)
    assert got["scrollHeight"] <= MAX_SHOT, got["scrollHeight"]
    shot = _screenshot(page, tmp_path, got["scrollHeight"])
    img = Image.open(shot).convert("RGB")
    assert img.size[0] == WIDTH and img.size[1] >= got["scrollHeight"] - 1, img.size
    px = img.load()
    out = []
    for p in got["plots"]:
        assert p["axes"], p["alt"]  # every plot says where its areas are
        counts = []
        for rect in p["axes"].split(";"):
            fx0, fy0, fx1, fy1 = (float(v) for v in rect.split(","))
            x0, x1 = int(p["left"] + fx0 * p["width"]) + INSET, int(p["left"] + fx1 * p["width"]) - INSET
            y0, y1 = int(p["top"] + fy0 * p["height"]) + INSET, int(p["top"] + fy1 * p["height"]) - INSET
            assert 0 <= x0 < x1 <= WIDTH and 0 <= y0 < y1 <= img.size[1], (p["alt"], rect)
            counts.append(sum(1 for x in range(x0, x1) for y in range(y0, y1) if min(px[x, y]) < 235))
        out.append((p["alt"], counts))
    return out


@needs_browser
def test_every_plot_area_shows_data_in_a_1280px_screenshot(tmp_path, capsys):
    pages = _rich_pages(tmp_path, capsys)
    pages.update(_pages(tmp_path, capsys, report=False))
    expect = {
        # timelines of age and unmap; CDFs; histograms; memslots visited; against the memslot count
        "report-rich": ["timeline of age: rate and latency per interval", "timeline of unmap: rate and latency per interval",
                        "latency CDFs", "latency histograms", "memslots visited per operation",
                        "latency and slots against memslot count"],
        "compare-rich": ["ratio per row", "latency CDFs", "latency histograms", "memslots visited per operation"],
        "compare-bench": ["latency and slots against memslot count, before and after", "ratio per row", "latency CDFs",
                          "latency histograms", "memslots visited per operation"],
        "compare": ["ratio per row", "latency CDFs", "latency histograms", "memslots visited per operation"],
    }
    ink = {}
    for name, page in pages.items():
        ink[name] = got = plot_ink(page, tmp_path)
        assert [alt for alt, _ in got] == expect[name], name
        for alt, counts in got:
            assert counts and min(counts) >= INK, (name, alt, counts)
    # the panels: CDFs and histograms per op and memslot change type, before and after overlaid;
    # per op rate and latency side by side; latency, visited and scanned against the memslot count
    panels = {name: {alt: len(c) for alt, c in got} for name, got in ink.items()}
    assert panels["compare-rich"]["latency CDFs"] == panels["compare-rich"]["latency histograms"] == 5
    assert panels["report-rich"]["timeline of unmap: rate and latency per interval"] == 2
    assert panels["report-rich"]["latency CDFs"] == 5  # age, unmap, memslot create / delete / move
    assert panels["report-rich"]["latency and slots against memslot count"] == 6


@needs_browser
def test_plot_ink_check_finds_an_empty_plot_area(tmp_path):
    # the measurement is real: a plot with one empty panel is caught, the full one passes
    import numpy as np

    from kvmtrace.analysis import html as H
    from kvmtrace.analysis import plots as P

    full = P.Panel("data", P.Axis("x", "count"), P.Axis("y", "count"),
                   [P.Series("a", "a", np.arange(10.0), np.arange(10.0) ** 2, marker="o")])
    empty = P.Panel("nothing", P.Axis("x", "count", lim=(0, 1)), P.Axis("y", "count", lim=(0, 1)), [])
    spec = P.Figure("one empty panel", "half empty", [P._finish(full), empty])
    page = tmp_path / "half.html"
    page.write_text("<!DOCTYPE html><html><body><h2>Per VM and op</h2>"
                    + H._fig_png(H.render(spec, P.colour_map(["a"])), spec.alt) + "</body></html>")
    (alt, (ink_full, ink_empty)), = plot_ink(page, tmp_path)
    assert ink_full >= INK and ink_empty == 0
