"""recalibrate_bn (PreciseBN) against a brute-force numpy computation."""

import os
import tempfile

import numpy as np
import pytest
import torch
from fold_testlib import recal_worker, small_recal_net
from torch import nn

from normscope.errors import NormscopeError
from normscope.fold import recalibrate_bn


def _batches(n=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 5, 2, 4, 6, 3][:n]  # unequal batch sizes: equal weight per sample, not per batch
    return [torch.randn(b, 3, 6, 6, generator=g, dtype=dtype) * 2 + 1 for b in sizes]


def _bn_numpy(a: np.ndarray, bn: nn.BatchNorm2d) -> np.ndarray:
    """Training-mode BN on one batch (batch statistics), in numpy."""
    mean = a.mean(axis=(0, 2, 3), keepdims=True)
    var = a.var(axis=(0, 2, 3), keepdims=True)
    g = bn.weight.detach().numpy().reshape(1, -1, 1, 1)
    b = bn.bias.detach().numpy().reshape(1, -1, 1, 1)
    return (a - mean) / np.sqrt(var + bn.eps) * g + b


def _brute_force(model, batches):
    """Inputs of bn1 and of both bn2 calls, with BN normalising by batch statistics and dropout
    off; population mean and variance per channel over everything, in numpy."""
    seen1, seen2 = [], []
    with torch.no_grad():
        for x in batches:
            a1 = model.conv1(x).numpy()
            seen1.append(a1)
            h = np.maximum(_bn_numpy(a1, model.bn1), 0)
            a2 = model.conv2(torch.from_numpy(h)).numpy()
            seen2 += [a2, _bn_numpy(a2, model.bn2)]

    def stats(arrays):
        flat = np.concatenate([a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1) for a in arrays], axis=1)
        return flat.mean(1), (flat**2).mean(1) - flat.mean(1) ** 2

    return stats(seen1), stats(seen2)


def test_matches_numpy_and_reports_reuse():
    model = small_recal_net().double().train()
    batches = _batches()
    (m1, v1), (m2, v2) = _brute_force(model, batches)
    res = recalibrate_bn(model, batches)
    assert res.bns == ["bn1", "bn2"] and res.batches == 4 and res.samples == 14
    assert res.reused == {"bn2": 2}
    np.testing.assert_allclose(model.bn1.running_mean.numpy(), m1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.bn1.running_var.numpy(), v1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.bn2.running_mean.numpy(), m2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.bn2.running_var.numpy(), v2, rtol=1e-10, atol=1e-12)
    assert model.training and model.drop.training  # modes restored
    assert model.bn1.momentum == 0.1 and int(model.bn1.num_batches_tracked) == 0


def test_float32_model_and_tuple_batches():
    model = small_recal_net().eval()
    batches = [(x.float(), torch.zeros(len(x))) for x in _batches(3)]
    ref = small_recal_net().double()
    (m1, v1), _ = _brute_force(ref, [x.double() for x, _ in batches])
    res = recalibrate_bn(model, batches, input_fn=lambda b: b[0], max_batches=2)
    assert res.batches == 2
    (m1, v1), _ = _brute_force(ref, [x.double() for x, _ in batches[:2]])
    np.testing.assert_allclose(model.bn1.running_mean.numpy(), m1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.bn1.running_var.numpy(), v1, rtol=1e-4, atol=1e-5)
    assert not model.training


def test_errors_and_skips():
    with pytest.raises(NormscopeError, match="no batches"):
        recalibrate_bn(small_recal_net(), [])
    with pytest.raises(NormscopeError, match="input_fn"):
        recalibrate_bn(small_recal_net(), [object()])
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False), nn.BatchNorm2d(3))
    res = recalibrate_bn(model[:2].append(nn.Identity()), [torch.randn(2, 3, 4, 4)])
    assert "track_running_stats=False" in res.skipped["1"]
    res = recalibrate_bn(model, [torch.randn(2, 3, 4, 4)])
    assert res.bns == ["2"]


def test_distributed_sums_are_reduced_across_ranks():
    import torch.multiprocessing as mp

    batches = _batches(6, dtype=torch.float32)
    ref = small_recal_net()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    recalibrate_bn(ref, batches)  # one process, all batches
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(recal_worker, args=(2, os.path.join(tmp, "init"), batches, state, out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for got in ranks:
        assert got["dist"] and got["world"] == 2
        for name in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
            torch.testing.assert_close(got["state"][name], ref.state_dict()[name], rtol=1e-5, atol=1e-6)
    for name in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name])  # identical on every rank
