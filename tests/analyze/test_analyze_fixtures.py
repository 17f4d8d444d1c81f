"""Every recipe fixture triggers exactly its intended findings (warning/error) and its expected
info findings; healthy fixtures trigger none above info. One probe per fixture per session."""

import json

import numpy as np
import pytest
from analyze_testlib import fixture_files

from normscope.analyze.formulas import variance_shift_closed_form

FIXTURES = [p.stem for p in fixture_files()]
HEALTHY = [
    "healthy_cnn_digits",
    "healthy_mlp_wine",
    "healthy_finetune_frozen_bn",
    "healthy_transformer_digits",
    "healthy_pre_ln_transformer",
    "healthy_weight_norm_data_init",
    "healthy_scheduled_sgd",
    "healthy_amp_cnn_digits",
]


def test_fixture_catalog_covers_every_check():
    """Every check (except syncbn-recommended, which needs torch.distributed) has a fixture."""
    from analyze_testlib import fixture_module

    from normscope.analyze import list_checks

    covered = set()
    for p in fixture_files():
        mod = fixture_module(p)
        assert isinstance(mod.EXPECTED, set) and isinstance(mod.EXPECTED_INFO, set), p.name
        assert mod.__doc__ and len(mod.__doc__) > 80, f"{p.name} needs a docstring saying what it demonstrates"
        covered |= mod.EXPECTED | mod.EXPECTED_INFO
    ids = {c.id for c in list_checks()}
    assert covered <= ids
    assert ids - covered <= {"syncbn-recommended", "covariate-shift"}
    assert set(HEALTHY) <= set(FIXTURES) and len(FIXTURES) >= 18


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_triggers_exactly_its_findings(fixture_runs, name):
    mod, run, analysis = fixture_runs.get(name)
    loud = {f.check for f in analysis.findings if f.severity != "info"}
    info = {f.check for f in analysis.findings if f.severity == "info"}
    details = "\n".join(str(f) for f in analysis.findings)
    assert loud == mod.EXPECTED, f"{name}:\n{details}"
    assert mod.EXPECTED_INFO <= info, f"{name}:\n{details}"
    assert not [s for s in analysis.skipped if s.reason.startswith("check failed")], analysis.skipped
    json.dumps(analysis.to_dict())  # every finding serialises
    for f in analysis.findings:  # a grouped finding lists {"layer", "severity", …} (the report and table read them)
        grouped = f.evidence.get("layers")
        if grouped is not None:
            assert isinstance(grouped, list) and all(isinstance(r, dict) and r.get("layer") for r in grouped), f


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_fixtures_are_silent(fixture_runs, name):
    _, _, analysis = fixture_runs.get(name)
    assert analysis.errors == [] and analysis.warnings == []


def test_nan_fixture_names_the_injected_layer(fixture_runs):
    mod, run, analysis = fixture_runs.get("nan_injection")
    (f,) = [f for f in analysis.findings if f.check == "non-finite"]
    assert f.layer == mod.NAN_LAYER and f.step == mod.NAN_STEP and f.severity == "error"
    assert f.evidence["input"]["nan_count"] == 0  # its input was still finite
    # the probe stopped after the loss stayed non-finite
    assert "stopped" in (json.loads((run.run_dir / "probe.json").read_text())["stopped_early"] or "")


def test_dead_relu_fixtures_tell_born_from_died(fixture_runs):
    _, _, a = fixture_runs.get("dead_relu_negative_bias")
    f = next(f for f in a.findings if f.check == "dead-units" and f.layer == "1")
    assert f.severity == "error" and f.evidence["born_dead"] == f.evidence["dead_units"] == 77
    _, _, b = fixture_runs.get("dead_relu_high_lr")
    g = [f for f in b.findings if f.check == "dead-units" and f.severity != "info"]
    assert g and all(f.evidence["died"] > 0 and f.evidence["died_at_median"] is not None for f in g)


def test_dropout_fixture_measured_shift_matches_prediction(fixture_runs):
    _, _, a = fixture_runs.get("dropout_before_bn")
    (f,) = [f for f in a.findings if f.check == "dropout-bn-variance-shift"]
    ev = f.evidence
    assert ev["graph"] == "fx" and ev["dropouts"][0]["p"] == 0.5 and ev["dropouts"][0]["direct"]
    # measured on the eval-mode pass vs the running variance ≈ the closed form from the dropout's moments
    assert ev["measured_shift"] == pytest.approx(ev["predicted_shift"], rel=0.1)
    assert ev["var_ratio_eval_over_running"] == pytest.approx(ev["var_ratio_eval_over_train_dropout"], rel=0.1)


def test_stale_fixture_sees_the_shift_and_the_output_gap(fixture_runs):
    _, _, a = fixture_runs.get("stale_running_stats")
    fs = [f for f in a.findings if f.check == "stale-running-stats"]
    assert fs[0].layer == "1" and fs[0].evidence["population"] == "eval/eval"
    assert fs[0].evidence["mean_shift_sigma_median"] > 0.1
    assert fs[0].evidence["train_eval_output_gap"] > 0.25
    _, _, h = fixture_runs.get("healthy_cnn_digits")
    run = h.run_dir
    gap = json.loads((__import__("pathlib").Path(run) / "probe.json").read_text())["bn_gap"]["rel_gap"]
    assert gap < 0.25


def test_overfit_fixture_reports_the_early_stopping_step(fixture_runs):
    _, run, a = fixture_runs.get("overfit_small_data")
    (f,) = [f for f in a.findings if f.check == "overfitting"]
    ev = run.scalars[run.scalars.phase == "eval"]
    best = int(ev.step.iloc[int(np.argmin(ev.value.to_numpy()))])
    assert f.evidence["best_step"] == best and f.step[0] == best


def test_wine_inputs_flagged_by_scale_and_offset(fixture_runs):
    _, _, a = fixture_runs.get("unscaled_wine")
    (f,) = [f for f in a.findings if f.check == "unnormalized-inputs"]
    assert f.evidence["std_ratio"] > 1000  # proline (~300) vs hue (~0.2)
    assert 4 in f.evidence["off_centre"]  # magnesium: mean ~100, std ~14


def test_closed_form_helper_sanity():
    assert variance_shift_closed_form(0.5, 0.0, 1.0) == pytest.approx(0.5)


def test_mode_fixtures_say_what_their_docstrings_promise(fixture_runs):
    _, _, a = fixture_runs.get("eval_in_train_mode")
    (f,) = [f for f in a.findings if f.check == "eval-in-train-mode"]
    assert f.severity == "error" and f.evidence["metrics_fed"] == ["loss"] and f.evidence["dropout_in_train"] == 1
    _, _, b = fixture_runs.get("train_in_eval_mode")
    (g,) = [f for f in b.findings if f.check == "eval-in-train-mode"]
    assert g.evidence["cause"] == "train-in-eval-mode" and g.evidence["forwards"] == 80
    (s,) = [f for f in b.findings if f.check == "stale-running-stats"]
    assert "never updated its running statistics" in s.evidence["mode_cause"]
    _, _, c = fixture_runs.get("healthy_finetune_frozen_bn")
    frozen = [f for f in c.findings if f.check == "stale-running-stats"]
    assert frozen and all(f.severity == "info" and f.evidence.get("frozen_on_purpose") for f in frozen)
    _, _, d = fixture_runs.get("frozen_bn_drift")
    (h,) = [f for f in d.findings if f.check == "frozen-bn-drift"]
    assert h.severity == "warning" and h.evidence["mean_drift_sigma"] > 0.1
