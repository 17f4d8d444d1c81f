"""unnormalized-inputs: per channel for images, categorical columns left out, constant columns as info."""

import numpy as np
import torch
from torch import nn

import normscope
from normscope import Recipe


def _probe(tmp_path, model, x, y, name):
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    run = normscope.probe(Recipe(model, batches, nn.functional.cross_entropy, optimizer=opt, steps=6),
                          run_dir=tmp_path / name)  # fmt: skip
    return [f for f in normscope.analyze(run) if f.check == "unnormalized-inputs"], run


def test_images_standardised_per_channel_with_constant_borders_are_fine(tmp_path):
    """Regression: per-pixel statistics made constant border pixels an infinite std ratio."""
    from sklearn.datasets import load_digits

    img = torch.from_numpy(load_digits().images[:256].astype(np.float32)).unsqueeze(1)
    x = nn.functional.interpolate(img, size=(16, 16), mode="bilinear").repeat(1, 3, 1, 1)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    assert (x[:, :, 0, 0].std(0) < 1e-6).all()  # the border pixels are constant
    y = torch.randint(0, 3, (256,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    found, run = _probe(tmp_path, model, x, y, "img")
    assert not found, [str(f) for f in found]
    assert run.probe["inputs"]["axis"] == 1 and len(run.probe["inputs"]["mean"]) == 3  # one entry per channel
    # the same images with one channel scaled ×1000 is a real scale problem, reported per channel
    x2 = x.clone()
    x2[:, 2] *= 1000
    found, _ = _probe(tmp_path, model, x2, y, "img2")
    assert [f.severity for f in found] == ["warning"] and "input channels" in found[0].message


def test_one_hot_and_categorical_columns_are_not_badly_scaled(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 256
    cont = torch.randn(n, 4, generator=g)
    cat = torch.randint(0, 20, (n,), generator=g)
    onehot = nn.functional.one_hot(cat, 20).float()  # rare categories: tiny std
    code = torch.randint(0, 7, (n, 1), generator=g).float()  # integer codes 0..6
    const = torch.full((n, 1), 3.0)
    x = torch.cat([cont, onehot, code, const], 1)
    y = torch.randint(0, 2, (n,), generator=g)
    torch.manual_seed(0)
    found, run = _probe(tmp_path, nn.Sequential(nn.Linear(26, 8), nn.ReLU(), nn.Linear(8, 2)), x, y, "tab")
    assert [f.severity for f in found] == ["info"], [str(f) for f in found]  # only the constant column
    assert found[0].evidence["constant_features"] == [25]
    assert set(run.probe["inputs"]["discrete"]) >= set(range(4, 25))
    # a continuous column on a different scale is still caught
    x[:, 0] *= 1e4
    found, _ = _probe(tmp_path, nn.Sequential(nn.Linear(26, 8), nn.ReLU(), nn.Linear(8, 2)), x, y, "tab2")
    assert "warning" in [f.severity for f in found]
