"""`normscope.probe(...)` and `normscope.analyze(...)` are callable modules: the entry points of
DESIGN.md work while the packages' other names stay reachable."""

import torch
from torch import nn

import normscope.analyze
import normscope.probe
from normscope.analyze import Finding
from normscope.probe import Recipe


def test_callable_packages(tmp_path):
    rec = Recipe(
        nn.Linear(3, 2), [(torch.randn(8, 3), torch.randint(0, 2, (8,)))], nn.functional.cross_entropy, steps=3
    )
    run = normscope.probe(rec, run_dir=tmp_path / "r")
    assert run.meta["status"] == "complete"
    findings = normscope.analyze(run)
    assert all(isinstance(f, Finding) for f in findings)
    assert callable(normscope.analyze.signal_propagation) and normscope.probe.Recipe is Recipe
    from normscope.analyze import analyze
    from normscope.probe import probe

    assert analyze(run) == findings and callable(probe)
