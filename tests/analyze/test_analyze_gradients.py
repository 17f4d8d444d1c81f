"""vanishing/exploding-gradients: the depth profile against brute-force gradient RMS."""

import numpy as np
import pytest
import torch
from analyze_testlib import capture
from torch import nn

from normscope import watch
from normscope.analyze import analyze_full


@pytest.mark.parametrize("gain,check", [(2.5, "exploding-gradients"), (0.3, "vanishing-gradients"), (1.0, None)])
def test_depth_profile_equals_brute_force(tmp_path, gain, check):
    torch.manual_seed(0)
    layers = [nn.Linear(16, 16) for _ in range(9)]
    for lin in layers:
        nn.init.orthogonal_(lin.weight, gain=gain)
        nn.init.zeros_(lin.bias)
    model = nn.Sequential(*layers)
    names = [str(i) for i in range(9)]
    store, grads = {}, {}
    capture(model, names, store, grads)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with watch(model, tmp_path / "g", every=1):
        for _ in range(6):
            loss = (
                model(torch.randn(32, 16)).pow(2).mean()
                if gain >= 1
                else (model(torch.randn(32, 16)) - 1).pow(2).mean()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    a = analyze_full(tmp_path / "g")
    rms = {n: [float(g.double().pow(2).mean().sqrt()) for _, g in sorted(grads[n].items())] for n in names}
    window = slice(3, 6)  # last half of 6 sampled steps
    want = np.median(rms["0"][window]) / np.median(rms["8"][window])
    found = [f for f in a.findings if f.check in ("exploding-gradients", "vanishing-gradients")]
    if check is None:
        assert not found and 0.1 < want < 10
        return
    (f,) = found
    assert f.check == check and f.layer == "0" and f.step == (3, 5)
    assert f.evidence["ratio_first_over_last"] == pytest.approx(want, rel=1e-5)
    per = {r["layer"]: r["grad_rms"] for r in f.evidence["per_layer"]}
    for n in names:
        assert per[n] == pytest.approx(np.median(rms[n][window]), rel=1e-5)
    assert f.evidence["backward_gain"][0] == pytest.approx(per["0"] / per["1"])
