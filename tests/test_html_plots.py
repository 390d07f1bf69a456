"""The plots of `report --html` and `compare --html` as data (analysis.plots), checked against
the raw events they were made from, and as matplotlib draws them (analysis.html.render): the
timelines per VM and op, latency CDFs per op and memslot change type, histograms on a log axis,
latency and slots against the memslot count, one colour per recording, readable log ticks, no
0.96-1.04 axis for a constant series. No root, no browser (tests/test_html_browser.py renders
the pages)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from kvmtrace.analysis import html as H
from kvmtrace.analysis import plots as P
from kvmtrace.analysis.recording import read_inputs
from kvmtrace.analysis.report import EVENT_COLUMNS, build_report
from kvmtrace.analysis.synth import SynthOp, SynthVm, record_synthetic, simulate
from kvmtrace.snapshot import Log2Hist

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "recordings")

# a busy run: two VMs, unmaps whose rate changes per interval, a heavy latency tail (a few
# operations near 100 µs+), ages at 509 memslots, memslot creates / moves / deletes
RATES = [40, 80, 160, 0, 120, 60, 200, 100]
INTERVALS = len(RATES)


def busy_run(seed: int = 3, slow: float = 1.0):
    vms = [SynthVm("ffff0001", 4242, comm="qemu-system-x86", name="web1", memslots=37),
           SynthVm("ffff0002", 4343, comm="qemu-system-x86", name="db1", memslots=509)]
    ops = [SynthOp("ffff0001", op="unmap", counts=RATES, lat_median_ns=1500 * slow, lat_sigma=1.2, slots=1, scanned=37),
           SynthOp("ffff0002", op="unmap", per_interval=50, lat_median_ns=4000 * slow, lat_sigma=0.5, slots=1,
                   scanned=509),
           SynthOp("ffff0002", op="age", per_interval=30, lat_median_ns=9000 * slow, slots=2, scanned=509),
           SynthOp("ffff0001", change="create", per_interval=3, lat_median_ns=40_000 * slow),
           SynthOp("ffff0001", change="move", counts=[1, 0, 2], lat_median_ns=900_000 * slow, lat_sigma=0.8),
           SynthOp("ffff0002", change="delete", per_interval=2, lat_median_ns=60_000 * slow)]
    return vms, ops, simulate(vms, ops, intervals=INTERVALS, seed=seed)


def busy_recording(path: str, label: str = "busy", events: bool = True, seed: int = 3, slow: float = 1.0) -> str:
    _, _, (snaps, evs) = busy_run(seed, slow)
    return record_synthetic(path, snaps, evs if events else None, meta={"label": label})


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    d = tmp_path_factory.mktemp("plots")
    busy_recording(str(d / "busy"))
    busy_recording(str(d / "busy-hist"), label="busy-hist", events=False)
    return read_inputs([str(d / "busy"), str(d / "busy-hist"), os.path.join(FIX, "multi-vm")],
                       event_columns=EVENT_COLUMNS)


@pytest.fixture(scope="module")
def rep(recs):
    return build_report(recs)


def _events(kind: str):
    """The busy run's raw events of one kind (hva / memslot), per interval."""
    _, _, (_, evs) = busy_run()
    cls = "HvaEvent" if kind == "hva" else "MemslotEvent"
    return [[e for e in batch if type(e).__name__ == cls] for batch in evs]


# ----------------------------------------------------------------------------- timelines


def test_timeline_rate_and_percentiles_per_interval_match_the_events(recs):
    tl = P.timeline(recs)
    per_iv = _events("hva")
    for source in ("busy", "busy-hist"):  # with raw events, and the same run without them
        web = tl[(tl.source == source) & (tl.vm_label == "web1[4242]#1") & (tl.op == "unmap")].sort_values("interval")
        # every interval of the VM, the one without unmaps at rate 0 (no row is stored for it)
        assert web["count"].tolist() == RATES
        assert web["rate_per_s"].tolist() == [float(r) for r in RATES]  # 1 s intervals
        assert web["t_s"].tolist() == [float(i + 1) for i in range(INTERVALS)]
        cap = 0  # the in-kernel maximum is cumulative: it caps the interpolation at the largest seen so far
        for i, row in enumerate(web.itertuples()):
            lat = np.array([e.latency_ns for e in per_iv[i] if e.vm_id == "ffff0001" and e.op == "unmap"], dtype=np.int64)
            assert len(lat) == RATES[i]
            if not len(lat):
                assert np.isnan(row.lat_p50_ns) and np.isnan(row.lat_p99_ns) and row.latency_source == ""
                continue
            if source == "busy":  # exact: numpy's percentiles of the interval's events
                assert row.latency_source == P.EVENT_SOURCE
                assert row.lat_p50_ns == pytest.approx(np.percentile(lat, 50), rel=1e-12)
                assert row.lat_p99_ns == pytest.approx(np.percentile(lat, 99), rel=1e-12)
                continue
            cap = max(cap, int(lat.max()))
            h = Log2Hist.from_counts(np.bincount([int(v).bit_length() for v in lat], minlength=64).tolist())
            assert row.latency_source == P.HIST_SOURCE
            assert row.lat_p50_ns == pytest.approx(min(h.quantile(0.5), cap))
            assert row.lat_p99_ns == pytest.approx(min(h.quantile(0.99), cap))
    # without raw events: the histogram for the busy run too
    hist = P.timeline(recs[:1], events=False)
    assert set(hist["latency_source"]) == {P.HIST_SOURCE, ""}
    # all VMs and ops of all recordings: the multi-vm fixture's five VMs too
    assert set(tl[tl.source == "multi-vm"]["vm_label"]) == {"selftest[900]#1", "selftest[900]#2", "selftest[900]#3",
                                                            "web1[901]#1", "web2[901]#2"}


def test_timeline_figures_one_per_op_with_rate_and_latency(recs):
    figs = P.timelines(P.timeline(recs))
    assert [f.title for f in figs] == ["age per interval", "unmap per interval"]
    unmap = figs[1]
    rate, lat = unmap.panels
    assert rate.y.unit == "rate" and rate.y.lim[0] == 0 and not rate.y.log
    assert lat.y.log and lat.y.unit == "ns"
    labels = {s.label for s in rate.series}
    assert "busy: web1[4242]#1" in labels and "multi-vm: selftest[900]#3" in labels
    assert all(len(s) for s in rate.series) and all(len(s) for s in lat.series)
    # p50 solid and p99 dashed for every VM drawn
    assert sorted(s.linestyle for s in lat.series) == sorted(["-", "--"] * len(rate.series))


# ----------------------------------------------------------------------------- distributions


def test_cdf_from_raw_events_is_exact_and_from_histograms_at_bucket_bounds(recs):
    d = P.latency_dists(recs, lambda i, r: (r.source, r.source, ""))
    got = {(r.key, r.kind, r.name): r for r in d.itertuples()}
    # every op and every memslot change type, per recording
    assert {(k, n) for s, k, n in got if s == "busy"} == {("hva", "unmap"), ("hva", "age"), ("memslot", "create"),
                                                          ("memslot", "move"), ("memslot", "delete")}
    hva = [e for b in _events("hva") for e in b]
    lat = np.array([e.latency_ns for e in hva if e.op == "unmap"], dtype=np.int64)
    ex = got[("busy", "hva", "unmap")]
    assert ex.exact and ex.n == len(lat)
    x, y, exact = P.cdf_points(ex.values, ex.counts, ex.hist)
    u, c = np.unique(lat, return_counts=True)
    assert exact and y[0] == 0.0 and y[-1] == 1.0
    np.testing.assert_array_equal(x[1:], u.astype(float))
    np.testing.assert_allclose(y[1:], np.cumsum(c) / len(lat))
    mem = [e for b in _events("memslot") for e in b]
    mv = got[("busy", "memslot", "move")]
    assert mv.exact and mv.n == sum(1 for e in mem if e.change == "move") == 3 * 1 + 3 * 0 + 2 * 2
    # the same run without raw events: a CDF from the log2 histogram, exact at 2^i
    hi = got[("busy-hist", "hva", "unmap")]
    assert not hi.exact and hi.values is None
    x, y, exact = P.cdf_points(hi.values, hi.counts, hi.hist)
    assert not exact and y[0] == 0.0 and y[-1] == 1.0
    for xi, yi in zip(x[1:], y[1:]):
        assert yi == pytest.approx(float(np.mean(lat < xi)))


def test_latency_figures_cdf_log_x_and_histogram_log_y_show_the_tail(recs):
    d = P.latency_dists(recs, lambda i, r: (r.source, r.source, ""))
    cdf, hist = P.latency_figures(d)
    titles = [p.title for p in cdf.panels]
    assert titles == ["age", "unmap", "memslot create", "memslot delete", "memslot move"]
    assert [p.title for p in hist.panels] == titles
    for p in cdf.panels:
        assert p.x.log and p.x.unit == "ns" and p.y.lim == (0.0, 1.0)
        assert all(len(s) for s in p.series)
    unmap = hist.panels[1]
    assert unmap.y.log and unmap.y.lim[0] < 1  # one operation in a bucket stands above the floor
    busy = [s for s in unmap.series if s.label == "busy"][0]
    # the slowest unmap's bucket is drawn with its count (the tail of a heavy distribution: 1-2 ops)
    lat = np.array([e.latency_ns for b in _events("hva") for e in b if e.op == "unmap"])
    top = int(lat.max()).bit_length()
    lo, hi = Log2Hist.bucket_bounds(top)
    idx = list(busy.x).index(float(lo))
    assert busy.y[idx] == float(np.sum((lat >= lo) & (lat < hi))) <= 3
    assert busy.x[-1] == float(hi)


def test_slots_visited_distribution_per_op_matches_the_events(recs):
    d = P.slots_dists(recs, lambda i, r: (r.source, r.source, ""))
    fig = P.slots_figure(d)
    assert [p.title for p in fig.panels] == ["age", "unmap"]
    hva = [e for b in _events("hva") for e in b]
    for p in fig.panels:
        assert p.x.unit == "bucket" and p.y.log
        busy = [s for s in p.series if s.label == "busy"][0]
        slots = np.array([e.slots for e in hva if e.op == p.title])
        buckets = np.array([int(v).bit_length() for v in slots])
        for x, y in zip(busy.x[:-1], busy.y[:-1]):  # steps over bucket indices: i - 0.5 .. i + 0.5
            b = int(x + 0.5)
            assert y == max(float(np.sum(buckets == b)), P.HIST_FLOOR), (p.title, b)
    # unmaps visit 1 memslot (bucket 1), ages 2 (bucket 2: "2-3")
    assert [s.x[0] for s in fig.panels[1].series if s.label == "busy"] == [0.5]
    assert [s.x[0] for s in fig.panels[0].series if s.label == "busy"] == [1.5]


# ----------------------------------------------------------------------------- against the memslot count


def test_vs_memslots_every_stored_percentile_and_sensible_ranges(rep):
    fig = P.vs_memslots(rep["by_memslots"], keys={s: s for s in rep["sources"]["source"]})
    titles = [p.title for p in fig.panels]
    assert titles == ["age: latency, p50 solid, p99 dashed, mean dotted", "age: memslots visited per op (mean)",
                      "age: memslots scanned per op (mean)", "unmap: latency, p50 solid, p99 dashed, mean dotted",
                      "unmap: memslots visited per op (mean)", "unmap: memslots scanned per op (mean)"]
    lat = fig.panels[3]
    styles = {(s.label, s.linestyle) for s in lat.series}
    # raw events: p50, p99 and mean; the multi-vm fixture's in-kernel buckets: the mean only
    assert {("busy", "-"), ("busy", "--"), ("busy", ":")} <= styles
    assert ("multi-vm", ":") in styles and ("multi-vm", "-") not in styles
    busy = [s for s in lat.series if s.label == "busy" and s.linestyle == "--"][0]
    assert list(busy.x) == [37.0, 509.0]  # web1 at 37 memslots, db1 at 509
    # a constant series (1 slot visited per unmap) gets 0 to a margin above 1, not 0.96-1.04
    visited = fig.panels[4]
    assert visited.y.lim == (0.0, pytest.approx(1.15))
    assert fig.panels[3].x.log and fig.panels[3].x.lim == (0.8, 1000.0)  # 1 to 509 memslots
    assert P.zero_range([1.0, 1.0, 1.0]) == (0.0, pytest.approx(1.15))
    assert P.log_range([1000.0, 1000.0]) == (800.0, 10000.0)
    assert P.log_range([2000.0, 9000.0]) == (1000.0, 10000.0)


# ----------------------------------------------------------------------------- colours and ticks


def test_one_colour_per_recording_across_every_figure_of_the_page(rep, recs):
    colours, sections = P.report_figures(rep, recs)
    assert list(colours) == ["busy", "busy-hist", "multi-vm"]
    assert len(set(colours.values())) == 3
    figs = [f for _, fs in sections for f in fs]
    assert len(figs) == 6  # timelines of age and unmap, CDFs, histograms, slots visited, against the memslot count
    for f in figs:
        for p in f.panels:
            for s in p.series:
                assert s.key in colours
                # the series is that recording's: its legend text names it
                assert s.label.startswith(s.key), (f.title, s.key, s.label)
    # and matplotlib draws each in that colour
    import matplotlib.colors as mc

    for f in figs:
        fig = H.render(f, colours)
        for ax, p in zip(fig.axes, f.panels):
            for line, s in zip(ax.get_lines(), p.series):
                assert mc.to_hex(line.get_color()) == colours[s.key]
        H._plt().close(fig)
    # compare pages: one colour per side
    c, _ = P.compare_figures(__import__("kvmtrace.analysis.compare", fromlist=["compare"]).compare(recs[:1], recs[1:2]),
                             (recs[:1], recs[1:2]))
    assert list(c) == ["before", "after"] and c["before"] != c["after"]


_READABLE = re.compile(r"^(\d+(\.\d+)? (ns|µs|ms|s)|[\d,]+(\.\d+)?|\d+-\d+)$")  # 1 µs, 1,000, 2-3 (slots)


def test_log_ticks_are_readable_never_powers_of_ten(rep, recs):
    assert [P.ns_tick(v) for v in (1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 2e3, 5e5)] == [
        "1 ns", "10 ns", "100 ns", "1 µs", "10 µs", "100 µs", "1 ms", "10 ms", "100 ms", "1 s", "2 µs", "500 µs"]
    assert [P.count_tick(v) for v in (1, 10, 1000, 10000, 0.5)] == ["1", "10", "1,000", "10,000", "0.5"]
    colours, sections = P.report_figures(rep, recs)
    seen = 0
    for _, figs in sections:
        for f in figs:
            fig = H.render(f, colours)
            fig.canvas.draw()
            for ax in fig.axes:
                for axis in (ax.xaxis, ax.yaxis):
                    lo, hi = sorted(axis.get_view_interval())
                    for t in axis.get_major_ticks():
                        if not (lo <= t.get_loc() <= hi) or not t.label1.get_visible():
                            continue
                        text = t.label1.get_text()
                        if text:
                            seen += 1
                            assert _READABLE.match(text), (f.title, text)
                            assert "×" not in text and "10^" not in text and "$" not in text
                    assert not axis.get_offset_text().get_text(), f.title
            H._plt().close(fig)
    assert seen > 50


def test_plot_labels_from_outside_are_text(tmp_path):
    """A recording labelled with TeX, HTML and control characters: the page renders, the label
    reaches matplotlib as text only, nothing of it lands in the HTML outside escaped text."""
    label = r"$\frac{$</div><img src=x>" + "\x1b[31m"
    path = busy_recording(str(tmp_path / "r"), label=label)
    recs = read_inputs([path], event_columns=EVENT_COLUMNS)
    doc = H.report_html(build_report(recs), recs=recs)
    assert doc.count('<img class="plot"') == 6
    assert "<img src=x>" not in doc and "\x1b" not in doc
    colours, sections = P.report_figures(build_report(recs), recs)
    labels = {s.label for _, fs in sections for f in fs for p in f.panels for s in p.series}
    assert r"$\frac{$</div><img src=x>\x1b[31m" in labels


def test_figures_without_data_are_left_out():
    empty = P.Figure("t", "alt", [P.Panel("p", P.Axis("x"), P.Axis("y"), [])])
    assert empty.empty and H.draw(empty, {}) == ""
    assert P.latency_figures(None) == [] and P.timelines(None) == []
