"""norm-scale-init on real runs: γ's RMS at the start and each norm's output RMS at the first step
against brute force, and the harm it names (the same network with γ = 1 trains; with γ ~ N(0, 0.02)
it does not)."""

import warnings

import numpy as np
import pytest
import torch
from analyze_testlib import FIXTURES, fixture_module, train_watched
from torch import nn

import normscope
from normscope import load
from normscope.analyze import analyze_full


def _fixture():
    return fixture_module(FIXTURES / "norm_scale_init.py")


def test_evidence_equals_brute_force(tmp_path):
    torch.manual_seed(0)
    model = _fixture().model()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    want_init = {n: float(m.weight.detach().double().pow(2).mean().sqrt()) for n, m in bns.items()}
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    outs = train_watched(model, tmp_path / "r", 3, lambda i: (x, y), names=list(bns),
                         optimizer=lambda ps: torch.optim.Adam(ps, 1e-3))  # fmt: skip
    seen = {n: float(o[0].double().pow(2).mean().sqrt()) for n, o in outs.items()}  # the first forward's RMS
    (f,) = [f for f in analyze_full(load(tmp_path / "r")).findings if f.check == "norm-scale-init"]
    assert [x["layer"] for x in f.evidence["layers"]] == list(bns) and f.evidence["norm_layers"] == 8
    assert f.evidence["init_rms"] == pytest.approx(want_init, rel=1e-6)
    assert f.evidence["output_rms_first_step"] == pytest.approx(seen, rel=1e-4)
    ratio = seen[list(bns)[-1]] / seen[list(bns)[0]]
    assert f.evidence["output_rms_last_over_first"] == pytest.approx(ratio, rel=1e-4) and ratio < 1e-3
    assert f.severity == "error" and f.evidence["signal_collapsed"]


def test_the_same_network_with_unit_scales_trains_and_is_silent(tmp_path):
    fx = _fixture()
    losses = {}
    for label, fix in (("broken", False), ("fixed", True)):
        r = fx.recipe()
        if fix:
            for m in r.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = normscope.probe(r, run_dir=tmp_path / label)
        a = analyze_full(run)
        losses[label] = float(
            np.mean(run.scalars[(run.scalars.name == "loss") & (run.scalars.phase == "train")].value.iloc[-10:])
        )
        found = [f for f in a.findings if f.check == "norm-scale-init"]
        assert bool(found) is not fix
        if fix:
            assert not [str(f) for f in a.findings if f.severity != "info"]
    assert losses["broken"] > 2.0 > 1.0 > losses["fixed"]  # ln 10 = 2.30: the broken init barely learns
