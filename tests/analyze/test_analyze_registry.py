"""The registry: one module per check, `needs` as the only gate, thresholds, reload-safe registration."""

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import normscope.analyze.checks as checks_pkg
from normscope.analyze import Finding, Thresholds, analyze_full, list_checks, register
from normscope.analyze.context import Context
from normscope.analyze.engine import missing
from normscope.analyze.registry import _REGISTRY, NEEDS, registry
from normscope.store import load, write_probe

REPO = Path(__file__).resolve().parents[2]


def _tiny_run(tmp_path, steps=2):
    from test_analyze_api import small_run  # the same tiny watched MLP

    run_dir, model = small_run(tmp_path, steps=steps)
    return load(run_dir), model


def test_one_module_per_check_with_one_entry_point():
    mods = [m.name for m in pkgutil.iter_modules(checks_pkg.__path__) if not m.name.startswith("_")]
    specs = registry()
    assert sorted(m.replace("_", "-") for m in mods) == sorted(specs)
    for cid, spec in specs.items():
        assert spec.module == f"normscope.analyze.checks.{cid.replace('-', '_')}"
        assert spec.func.__name__ == "check"
        mod = importlib.import_module(spec.module)
        assert mod.ID == cid


def test_catalog_derived_from_registry_docs_and_readme():
    ids = {c.id for c in list_checks()}
    pages = {p.stem for p in (REPO / "docs" / "checks").glob("*.md")}
    assert pages == ids
    readme = (REPO / "README.md").read_text()
    listed = re.search(r"## The checks\n\n(.*?) — plus", readme, re.S).group(1)
    assert {s.strip() for s in listed.replace("\n", " ").split(",")} == ids


def test_reload_of_a_check_module_replaces_it():
    import normscope.analyze.checks.dead_units as mod

    before = registry()["dead-units"]
    importlib.reload(mod)
    after = registry()["dead-units"]
    assert after.func is mod.check and after.func is not before.func
    assert after.thresholds == before.thresholds


def test_a_second_module_claiming_a_taken_id_is_refused():
    with pytest.raises(ValueError, match="registered twice"):

        @register(id="dead-units", severity="info", summary="An impostor.")
        def check(ctx, t):  # defined in this test module, not normscope.analyze.checks.dead_units
            return []

    assert registry()["dead-units"].module == "normscope.analyze.checks.dead_units"


def test_unknown_need_and_severity_are_refused():
    with pytest.raises(ValueError, match="unknown needs"):
        register(id="x-need", severity="info", summary="s", needs=("gpu",))
    with pytest.raises(ValueError, match="severity"):
        register(id="x-sev", severity="fatal", summary="s")


def test_thresholds_read_only_by_key_and_attribute():
    t = Thresholds({"warn": 0.1, "error": 0.4}, "dead-units")
    assert t.warn == t["warn"] == 0.1 and dict(t) == {"warn": 0.1, "error": 0.4}
    with pytest.raises(AttributeError, match="no threshold 'nope'"):
        _ = t.nope
    with pytest.raises(AttributeError, match="read-only"):
        t.warn = 2


@pytest.mark.parametrize("need", sorted(NEEDS))
def test_every_need_is_gated_by_the_engine(tmp_path, need):
    """A need the run does not meet skips the check with the engine's reason, before the check runs."""
    run, model = _tiny_run(tmp_path)
    calls = []

    @register(id="test-need", severity="info", summary="Needs one thing.", needs=(need,))
    def check(ctx, t):
        calls.append(1)
        return [Finding("test-need", "info", None, None, "ran")]

    try:
        ctx = Context(run)
        reason = missing(ctx, need)
        met = {"stats", "standard-stats", "grads", "params", "updates", "train-loss", "graph", "training", "modes"}
        assert (reason is None) == (need in met), (need, reason)
        a = analyze_full(run, checks=["test-need"])
        if reason is None:
            assert calls and [f.message for f in a.findings] == ["ran"]
        else:
            assert not calls and [(s.check, s.reason) for s in a.skipped] == [("test-need", reason)]
    finally:
        _REGISTRY.pop("test-need", None)


def test_probe_needs_name_what_the_probe_did_not_measure(tmp_path):
    run, model = _tiny_run(tmp_path)
    write_probe(run.run_dir, {"mode": "recipe", "notes": {"bn": "no BatchNorm layer"}, "weights": {"0.weight": {}}})
    ctx = Context(load(run.run_dir))
    assert missing(ctx, "probe-bn") == "the probe did not measure BatchNorm population statistics (no BatchNorm layer)"
    assert missing(ctx, "probe-inputs") == "the probe did not measure the input features' statistics"
    assert missing(ctx, "weights") is None
    assert missing(Context(run, model=model), "weights") is None
