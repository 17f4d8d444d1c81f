"""analyze()/analyze_full(), Finding, Config, the registry and the doc pages."""

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from normscope import NormscopeError, watch
from normscope.analyze import (
    Analysis,
    Config,
    Finding,
    SkipCheck,
    analyze,
    analyze_full,
    list_checks,
    register,
)
from normscope.analyze.registry import _REGISTRY

REPO = Path(__file__).resolve().parents[2]
CATALOG = {
    "dead-units", "saturation", "non-finite", "covariate-shift", "dropout-bn-variance-shift", "small-batch-bn",
    "stale-running-stats", "syncbn-recommended", "redundant-bias", "bn-in-sequence-model", "vanishing-gradients",
    "exploding-gradients", "update-ratio", "effective-lr", "norm-weight-decay", "unnormalized-inputs",
    "overfitting", "underfitting", "legacy-lrn", "weight-sparsity", "eval-in-train-mode", "frozen-bn-drift",
    "attention-logit-growth", "output-logit-divergence", "massive-activations", "weight-norm-init", "post-ln-gradient",
    "loss-scaling", "bn-momentum", "norm-scale-init",
}  # fmt: skip


def small_run(tmp_path, model=None, steps=3):
    model = model or nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, tmp_path / "r", every=1) as scope:
        for _ in range(steps):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.log(loss=loss)
    return tmp_path / "r", model


def test_catalog_ids_and_doc_pages():
    infos = list_checks()
    assert {c.id for c in infos} == CATALOG
    for c in infos:
        assert c.severity in ("error", "warning", "info") and c.summary and not c.summary.endswith(" ")
        page = REPO / c.doc
        assert page.exists(), f"missing {c.doc}"
        text = page.read_text()
        assert text.startswith(f"# {c.id}") and "## Sources" in text and "## How to fix" in text
        for key in c.thresholds:
            assert f"`{key}`" in text, f"{c.doc} does not document threshold {key}"


def test_defaults_follow_checks_md():
    cfg = Config()
    assert cfg.thresholds("dead-units")["warn"] == 0.10 and cfg.thresholds("dead-units")["error"] == 0.40
    assert cfg.thresholds("dead-units")["dormant_tau"] == 0.025
    assert cfg.thresholds("dropout-bn-variance-shift")["warn"] == 1.1
    assert (cfg.get("small-batch-bn", "warn"), cfg.get("small-batch-bn", "error")) == (16, 4)
    st = cfg.thresholds("stale-running-stats")
    assert (st["mean_sigma"], st["var_lo"], st["var_hi"]) == (0.1, 0.8, 1.25)
    assert cfg.get("vanishing-gradients", "ratio") == 1e-3 and cfg.get("exploding-gradients", "ratio") == 1e3
    ur = cfg.thresholds("update-ratio")
    # relative to the optimizer's healthy centre: SGD 1e-3 → warn outside 1e-5 … 1e-1 as CHECKS.md; Adam 1e-2
    assert (ur["low_warn"], ur["high_warn"], ur["low_info"], ur["high_info"]) == (1e-2, 1e2, 1e-1, 1e1)
    assert (ur["sgd_center"], ur["adam_center"]) == (1e-3, 1e-2)
    assert (
        cfg.thresholds("unnormalized-inputs")["std_ratio"] == 100
        and cfg.thresholds("unnormalized-inputs")["mean_std"] == 3
    )
    assert cfg.get("weight-sparsity", "rel") == 1e-3
    assert (cfg.get("weight-norm-init", "low"), cfg.get("weight-norm-init", "high")) == (0.1, 10)
    assert cfg.get("post-ln-gradient", "ratio") == 10


@pytest.mark.parametrize("data,match", [
    ({"dead-unit": {"warn": 0.2}}, r"unknown check 'dead-unit'"),
    ({"dead-units": {"warning": 0.2}}, r"unknown setting 'warning' for check 'dead-units'"),
    ({"dead-units": {"warn": "high"}}, r"dead-units.warn must be a number"),
    ({"dead-units": {"warn": True}}, r"dead-units.warn must be a number"),
    ({"small-batch-bn": {"warn": 7.5}}, r"must be a whole number"),
    ({"update-ratio": {"include_1d": 1}}, r"must be true or false"),
    ({"disable": ["nope"]}, r"cannot disable unknown check 'nope'"),
    ({"dead-units": 3}, r"must be a table"),
    ([1, 2], r"configuration must be a table"),
])  # fmt: skip
def test_config_errors_are_one_line(data, match):
    with pytest.raises(NormscopeError, match=match) as e:
        Config.from_dict(data)
    assert "\n" not in str(e.value)


def test_config_overrides_and_disable(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad():
        model[0].bias[:6] = -50.0  # 6/32 = 19 % dead: a warning by default
    run, _ = small_run(tmp_path, model, steps=12)
    base = {"dead-units": {"min_judge_samples": 64}}
    sev = lambda a: [f.severity for f in a.findings if f.check == "dead-units"]  # noqa: E731
    assert sev(analyze_full(run, config=base)) == ["warning"]
    assert sev(analyze_full(run, config={"dead-units": {"min_judge_samples": 64, "warn": 0.25}})) == ["info"]
    assert sev(analyze_full(run, config={"dead-units": {"min_judge_samples": 64, "error": 0.15}})) == ["error"]
    a = analyze_full(run, config=Config.from_dict(base | {"disable": ["dead-units"]}))
    assert not sev(a) and ("dead-units", "disabled in the configuration") in {(s.check, s.reason) for s in a.skipped}
    assert Config.from_dict({"dead-units": {"warn": 0.3}}).to_dict()["dead-units"]["warn"] == 0.3


def test_finding_is_plain_json_safe_data():
    import numpy as np

    f = Finding("x", "warning", "l", (2, 5), "msg", {"a": np.float32(1.5), "b": float("nan"), "c": np.arange(3),
                                                     "d": (1, np.int64(2))}, "fix")  # fmt: skip
    d = f.to_dict()
    assert json.loads(json.dumps(d)) == {"check": "x", "severity": "warning", "layer": "l", "step": [2, 5],
                                         "message": "msg", "evidence": {"a": 1.5, "b": None, "c": [0, 1, 2], "d": [1, 2]},
                                         "recommendation": "fix"}  # fmt: skip
    assert Finding.from_dict(d).step == (2, 5)
    with pytest.raises(AttributeError):
        f.check = "y"  # frozen
    with pytest.raises(ValueError):
        Finding("x", "fatal", None, None, "m")
    assert hash(f) == hash(Finding.from_dict(d))


def test_analyze_sorts_by_severity_then_execution_order_and_reports_skips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].bias[:10] = -50.0  # error
        model[2].bias[:3] = -50.0  # warning
    run, _ = small_run(tmp_path, model, steps=12)
    a = analyze_full(str(run), config={"dead-units": {"min_judge_samples": 64}})
    assert isinstance(a, Analysis)
    dead = [(f.severity, f.layer) for f in a.findings if f.check == "dead-units"]
    assert dead == [("error", "1")]  # one finding per check and cause, the worst layer first
    layers = [(r["severity"], r["layer"]) for r in a.findings[0].evidence["layers"]]
    assert layers == [("error", "1"), ("warning", "3")] and "1 more layer(s): 3" in a.findings[0].message
    per_layer = analyze_full(str(run), config={"dead-units": {"min_judge_samples": 64}}, group=False)
    assert [(f.severity, f.layer) for f in per_layer.findings if f.check == "dead-units"] == layers
    ranks = [("error", "warning", "info").index(f.severity) for f in a.findings]
    assert ranks == sorted(ranks)
    reasons = {s.check: s.reason for s in a.skipped}
    assert "no BatchNorm" in reasons["small-batch-bn"] and "probe" in reasons["unnormalized-inputs"]
    assert "eval loss" in reasons["overfitting"]
    assert set(a.checks_run) | set(reasons) == CATALOG
    assert analyze(run, config={"dead-units": {"min_judge_samples": 64}}) == a.findings
    assert a.counts()["error"] >= 1 and a.worst == "error"
    json.dumps(a.to_dict())


def test_custom_check_registration_skip_and_failure(tmp_path):
    run, _ = small_run(tmp_path)

    @register(id="test-custom", severity="info", summary="A test check.", needs=("stats",), thresholds={"k": 1.0})
    def custom(ctx, p):
        return [Finding("test-custom", "info", None, None, f"k={p['k']}")]

    @register(id="test-skipper", severity="info", summary="Always skips.")
    def skipper(ctx, p):
        raise SkipCheck("nothing to see")

    @register(id="test-broken", severity="info", summary="Always breaks.")
    def broken(ctx, p):
        raise KeyError("boom")

    try:
        with pytest.warns(UserWarning, match="test-broken check failed"):
            a = analyze_full(run, config={"test-custom": {"k": 2.0}})
        assert [f.message for f in a.findings if f.check == "test-custom"] == ["k=2.0"]
        reasons = {s.check: s.reason for s in a.skipped}
        assert reasons["test-skipper"] == "nothing to see"
        assert reasons["test-broken"].startswith("check failed: KeyError")
        assert [f.check for f in analyze(run, checks=["test-custom"])] == ["test-custom"]
        with pytest.raises(NormscopeError, match="unknown check 'nope'"):
            analyze(run, checks=["nope"])
    finally:
        for k in ("test-custom", "test-skipper", "test-broken"):
            _REGISTRY.pop(k, None)


def test_analyze_bad_input(tmp_path):
    with pytest.raises(NormscopeError, match="needs a Run"):
        analyze(3)
    with pytest.raises(NormscopeError, match="does not exist"):
        analyze(tmp_path / "nothing")
    run, _ = small_run(tmp_path)
    with pytest.raises(NormscopeError, match="config must be"):
        analyze(run, config=[1])
    (Path(run) / "probe.json").write_text("{not json")
    with pytest.raises(NormscopeError, match="probe.json is corrupt"):
        analyze(run)


def test_docs_cite_the_papers_named_in_checks_md():
    want = {
        "dead-units": ["Sokar", "CS231n"], "saturation": ["Glorot"], "dropout-bn-variance-shift": ["Li"],
        "small-batch-bn": ["Wu"], "covariate-shift": ["Santurkar"], "effective-lr": ["van Laarhoven", "Hoffer"],
        "unnormalized-inputs": ["LeCun"], "legacy-lrn": ["Ioffe"],
    }  # fmt: skip
    for cid, names in want.items():
        text = (REPO / "docs" / "checks" / f"{cid}.md").read_text()
        for n in names:
            assert re.search(n, text), (cid, n)
