"""The report's figure data equals the run's statistics (no plotting involved)."""

import math

import numpy as np
import pytest
from report_testlib import FINDINGS

from normscope_reports import build_report
from normscope_reports import data as D


def test_heatmap_matrices_equal_stats(small_run):
    run = small_run
    hms = {h.title.split(" ")[0]: h for h in D.heatmaps(run)}
    rows = D.layer_rows(run)
    s = run.stats[(run.stats.phase == "train") & (run.stats.output == "")]
    std = hms["Activation"]
    assert std.rows == rows.label.tolist()
    for i, r in enumerate(rows.itertuples()):
        for j, step in enumerate(std.steps):
            want = s[(s.layer == r.layer) & (s.call == r.call) & (s.step == step)]["std"].iloc[0]
            assert std.values[i, j] == pytest.approx(math.log10(want))
    sat = hms["Saturated"]
    gate = rows.label.tolist().index("gate")
    np.testing.assert_allclose(sat.values[gate], s[s.layer == "gate"].sort_values("step").frac_sat)
    assert np.isnan(sat.values[rows.label.tolist().index("conv")]).all()
    dead = hms["Dead"]
    relu = rows.label.tolist().index("<script>alert(1)</script>")
    want = s[s.layer == "<script>alert(1)</script>"].sort_values("step")["active"].map(lambda a: np.mean(a == 0))
    np.testing.assert_allclose(dead.values[relu], want)
    g = run.grads[run.grads.layer == "fc"].sort_values("step")
    np.testing.assert_allclose(hms["Gradient"].values[rows.label.tolist().index("fc")], np.log10(g.rms))


def test_drift_heatmap_is_the_covariate_shift_quantity(small_run):
    """One home for drift: the report's heatmap shows what the covariate-shift check judges (lag 1)."""
    from normscope.analyze import covariate_shift

    hm = next(h for h in D.heatmaps(small_run) if h.title.startswith("Drift"))
    rows = D.layer_rows(small_run)
    ref = covariate_shift(small_run, lag=1)
    assert len(ref) and np.isfinite(hm.values).any()
    checked = 0
    for i, r in enumerate(rows.itertuples()):
        mine = ref[(ref.layer == r.layer) & (ref.call == r.call) & (ref.output == r.output)]
        for j, step in enumerate(hm.steps):
            want = mine[mine.step == step].sym_kl
            if len(want) and np.isfinite(want.iloc[0]):
                assert hm.values[i, j] == pytest.approx(math.log10(max(want.iloc[0], 1e-6)))
                checked += 1
            else:
                assert not np.isfinite(hm.values[i, j])
    assert checked >= len(rows)


def test_downsampling_keeps_means_and_bounds():
    vals = np.arange(20, dtype=float).reshape(2, 10)
    out, steps = D.downsample_steps(vals, np.arange(10) * 5, 5)
    np.testing.assert_allclose(out, [[0.5, 2.5, 4.5, 6.5, 8.5], [10.5, 12.5, 14.5, 16.5, 18.5]])
    np.testing.assert_array_equal(steps, [0, 10, 20, 30, 40])
    big = np.zeros((300, 3))
    small, labels = D.downsample_rows(big, [str(i) for i in range(300)], 120)
    assert small.shape[0] <= 120 and labels[0] == "0" and labels[-1] == "299"


def test_report_escapes_and_is_offline(small_run, tmp_path):
    path = build_report(small_run, findings=FINDINGS, out=tmp_path / "r.html")
    html = path.read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for bad in ("http://", "https://", "//cdn", "@import", "url("):
        assert bad not in html.replace("http-equiv", "")
    assert html.count("data:image/png;base64,") >= 6
    assert 'class="finding sev-warning"' in html


def test_report_of_run_still_being_written(tmp_path):
    import torch
    from torch import nn

    from normscope import load, watch

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with watch(model, tmp_path / "live", every=1, flush_every=1) as scope:
        for _ in range(2):
            model(torch.randn(8, 4)).sum().backward()
            scope.step()
        path = build_report(load(tmp_path / "live"), out=tmp_path / "live.html")
        html = path.read_text()
        assert "running" in html and "2 sampled" in html


def test_grouped_finding_with_bare_layer_names_renders(small_run, tmp_path):
    """Regression: a finding listing its layers as names (evidence layers: ["gate"], as bn-momentum did)
    made `normscope inspect` fail with "'str' object has no attribute 'get'" while writing the report."""
    grouped = [dict(FINDINGS[0], check="bn-momentum", layer="bn", evidence={"layers": ["bn", "gate", ""]}),
               dict(FINDINGS[0], check="covariate-shift", evidence={"layers": [{"layer": "gate", "severity": "info"},
                                                                             {"layer": "fc", "severity": "info"}]})]  # fmt: skip
    html = build_report(small_run, findings=grouped, out=tmp_path / "g.html").read_text()
    assert html.count("2 layers, worst first") == 2  # the names are read as layers (the empty one dropped)
    assert "(warning)" in html and "(info)" in html  # a bare name takes its finding's severity
