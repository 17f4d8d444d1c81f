"""Diagnostic panels (reports/panels): discovered per module, shown when the run has their signal,
absent otherwise, and a failing panel costs one 'Not shown' line, never the report."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analyze"))

from synthetic import SyntheticRun  # noqa: E402

from normscope.analyze import analyze_full  # noqa: E402
from normscope_reports.html import build_report  # noqa: E402
from normscope_reports.panels import panel_modules  # noqa: E402


def _run(tmp_path, drift: bool):
    r = SyntheticRun(
        tmp_path / "r", {"0": {"type": "Linear", "params": 10}, "1": {"type": "BatchNorm2d", "params": 32}}
    )
    for step in range(4):
        r.stat(step, "0")
        r.param(step, "0.weight", 1.0, 0.1, 1e-3)
        if drift:
            for name, v in (("bn_mean_drift", 0.1 * step), ("bn_mean_drift_max", 0.2 * step),
                            ("bn_var_log_ratio", 0.0), ("bn_var_log_ratio_max", 0.0), ("bn_train_forwards", 1.0)):  # fmt: skip
                r.signal(step, "1", name, v)
    modes = {"batchnorm": 1, "dropout": 0, "forwards": {"train": 4, "eval": 0}, "events": {}, "metrics_fed": [],
             "frozen_bn": {"1": "requires_grad=False"} if drift else {}}  # fmt: skip
    return r.done(modes=modes)


def test_frozen_bn_panel_shown_with_its_finding(tmp_path):
    run = _run(tmp_path, drift=True)
    a = analyze_full(run)
    assert [f.check for f in a.findings if f.severity == "warning"] == ["frozen-bn-drift"]
    html = build_report(run, a.findings, a.skipped).read_text()
    assert 'id="panel-frozen-bn-drift"' in html and "running-mean drift" in html


def test_no_signal_no_panel_and_a_failing_panel_is_one_line(tmp_path, monkeypatch):
    run = _run(tmp_path, drift=False)
    html = build_report(run, [], []).read_text()
    assert "panel-frozen-bn-drift" not in html
    mod = next(m for m in panel_modules() if m.__name__.endswith("bn_drift"))

    def boom(run, findings, F):
        raise RuntimeError("plot bug")

    monkeypatch.setattr(mod, "panels", boom)
    html = build_report(run, [], [], out=tmp_path / "b.html").read_text()
    assert "bn_drift panel: RuntimeError: plot bug" in html


def test_panel_thresholds_are_the_ones_the_run_was_judged_by():
    from normscope_reports.panels import threshold

    judged = [{"check": "frozen-bn-drift", "evidence": {"thresholds": {"mean_warn": 0.25}}}]
    assert threshold(judged, "frozen-bn-drift", "mean_warn") == 0.25  # a user's config, from the evidence
    assert threshold([], "frozen-bn-drift", "mean_warn") == 0.1  # no finding: the check's default
    assert threshold([], "attention-logit-growth", "warn") == 50.0
