"""probe(): training under watch, eval losses, the measurement passes, probe.json, errors."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from normscope import NormscopeError
from normscope.probe import Recipe, probe
from normscope.store.sidecars import PROBE_FORMAT, read_probe


def data(n=96, d=6, batch=16, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 2 + 1 + shift
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def test_probe_trains_logs_and_writes_probe_file(tmp_path):
    train, ev = data(), data(n=48, seed=1)
    r = Recipe(bn_mlp(), train, nn.functional.cross_entropy, eval_data=ev, steps=20, name="t")
    run = probe(r, run_dir=tmp_path / "r", eval_every=5)
    assert run.meta["status"] == "complete" and run.steps == list(range(21))  # eval forwards land on step 20
    sc = run.scalars
    assert sc[sc.phase == "train"].step.tolist() == list(range(20))
    assert sc[sc.phase == "eval"].step.tolist() == [0, 5, 10, 15, 20]
    pr = read_probe(run.run_dir)
    assert pr["format"] == PROBE_FORMAT and pr["mode"] == "recipe" and pr["steps_run"] == 20
    assert pr["graph"]["source"] == "fx" and pr["optimizer"]["type"] == "SGD"
    assert set(pr["bn"]["1"]["passes"]) == {"train/eval", "eval/eval"}  # no dropout: no dropout-on passes
    assert pr["batch_size"] == 16 and pr["inputs"]["axis"] == -1


def test_bn_population_statistics_equal_brute_force(tmp_path):
    train = data()
    model = bn_mlp()
    run = probe(Recipe(model, train, nn.functional.cross_entropy, steps=10), run_dir=tmp_path / "r")
    pr = read_probe(run.run_dir)["bn"]["1"]
    captured = []
    h = model[1].register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().double()))
    model.eval()
    with torch.no_grad():
        for x, _ in train:
            model(x)
    h.remove()
    x = torch.cat(captured)
    np.testing.assert_allclose(pr["passes"]["train/eval"]["mean"], x.mean(0).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pr["passes"]["train/eval"]["var"], x.var(0, unbiased=False).numpy(), rtol=1e-9)
    np.testing.assert_allclose(pr["running_mean"], model[1].running_mean.double().numpy())
    # input features: per-column mean/std over the probe samples
    allx = torch.cat([b[0] for b in train]).double()
    inp = read_probe(run.run_dir)["inputs"]
    np.testing.assert_allclose(inp["mean"], allx.mean(0).numpy(), rtol=1e-9)
    np.testing.assert_allclose(inp["std"], allx.std(0, unbiased=False).numpy(), rtol=1e-9)


def test_probe_leaves_the_model_as_training_left_it(tmp_path):
    train = data()
    a, b = bn_mlp(), bn_mlp()
    probe(Recipe(a, train, nn.functional.cross_entropy, steps=12), run_dir=tmp_path / "r")
    opt = torch.optim.SGD(b.parameters(), lr=0.01)
    b.train()
    for i in range(12):
        x, y = train[i % len(train)]
        opt.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        opt.step()
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k  # bit-identical: measurement passes restored every buffer


def test_seeded_probe_is_reproducible_and_restores_rng(tmp_path):
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        return Recipe(m, data(), nn.functional.cross_entropy, steps=8)

    rec = make()
    state = torch.get_rng_state()
    r1 = probe(rec, run_dir=tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), state)
    r2 = probe(make(), run_dir=tmp_path / "b")
    assert r1.scalars.value.tolist() == r2.scalars.value.tolist()
    assert set(read_probe(r1.run_dir)["modules"]["2"]) >= {"type", "p"}


def test_probe_accepts_a_recipe_file_and_cycles_data(tmp_path):
    p = tmp_path / "rec.py"
    p.write_text(
        "import torch\nfrom torch import nn\nfrom normscope.probe import Recipe\n"
        "def recipe():\n"
        "    return Recipe(nn.Linear(3, 2), [(torch.randn(4, 3), torch.randint(0, 2, (4,)))] * 2,\n"
        "                  nn.functional.cross_entropy, steps=2)\n"
    )
    run = probe(str(p), steps=7, run_dir=tmp_path / "r")
    assert run.scalars.step.tolist() == list(range(7)) and run.meta["name"] == "rec"


def test_probe_stops_after_persistent_nan_and_never_crashes(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    loss = lambda out, y: nn.functional.cross_entropy(out, y) * float("nan")  # noqa: E731
    run = probe(Recipe(model, data(), loss, steps=50), run_dir=tmp_path / "r")
    pr = read_probe(run.run_dir)
    assert pr["steps_run"] == 5 and "non-finite" in pr["stopped_early"]
    assert pr["notes"]["bn"] == "the model's parameters are non-finite after training"


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, "steps must be a whole number"),
    ({"every": 2, "eval_every": 3}, "multiple of every"),
])  # fmt: skip
def test_probe_option_errors(tmp_path, kwargs, match):
    r = Recipe(bn_mlp(), data(), nn.functional.cross_entropy, eval_data=data(), steps=4)
    with pytest.raises(NormscopeError, match=match):
        probe(r, run_dir=tmp_path / "r", **kwargs)


def test_probe_bad_batches_and_loss(tmp_path):
    with pytest.raises(NormscopeError, match=r"\(inputs, targets\) pair"):
        probe(Recipe(bn_mlp(), [torch.randn(4, 6)], nn.functional.cross_entropy, steps=2), run_dir=tmp_path / "a")
    with pytest.raises(NormscopeError, match="must return a scalar tensor"):
        probe(Recipe(bn_mlp(), data(), lambda o, y: o, steps=2), run_dir=tmp_path / "b")
    with pytest.raises(NormscopeError, match="yielded no batch"):
        probe(Recipe(bn_mlp(), [], nn.functional.cross_entropy, steps=2), run_dir=tmp_path / "c")
    with pytest.raises(NormscopeError, match="needs a normscope.Recipe"):
        probe(3)
    r = Recipe(bn_mlp(), data(), nn.functional.cross_entropy, steps=2)
    probe(r, run_dir=tmp_path / "d")
    with pytest.raises(NormscopeError, match="already holds a normscope run"):
        probe(Recipe(bn_mlp(), data(), nn.functional.cross_entropy, steps=2), run_dir=tmp_path / "d")


def test_probe_with_tuple_and_dict_inputs(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    batches = [((torch.randn(8, 3), torch.randn(8, 3)), torch.randn(8, 4))]
    run = probe(Recipe(Two(), batches, nn.functional.mse_loss, steps=3), run_dir=tmp_path / "t")
    assert len(run.scalars) == 3

    class Kw(Two):
        def forward(self, x=None, z=None):
            return super().forward(x, z)

    batches = [({"x": torch.randn(8, 3), "z": torch.randn(8, 3)}, torch.randn(8, 4))]
    run = probe(Recipe(Kw(), batches, nn.functional.mse_loss, steps=3), run_dir=tmp_path / "k")
    assert json.loads((run.run_dir / "probe.json").read_text())["graph"]["source"] == "fx"


def test_probe_with_a_shuffling_dataloader_keeps_the_callers_rng(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    loader = DataLoader(ds, batch_size=16, shuffle=True)
    rec = Recipe(bn_mlp(), loader, nn.functional.cross_entropy, eval_data=DataLoader(ds, batch_size=32), steps=9)
    state = torch.get_rng_state()
    run = probe(rec, run_dir=tmp_path / "dl", eval_every=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert run.scalars[run.scalars.phase == "train"].step.tolist() == list(range(9))
    assert read_probe(run.run_dir)["bn"]["1"]["passes"]["eval/eval"]["samples"] == 64


def test_progress_callback(tmp_path):
    seen = []
    probe(Recipe(bn_mlp(), data(), nn.functional.cross_entropy, steps=4), run_dir=tmp_path / "p",
          progress=lambda step, steps, loss: seen.append((step, steps, round(loss, 6))))  # fmt: skip
    run_losses = [round(v, 6) for v in __import__("normscope").load(tmp_path / "p").scalars.value]
    assert [s[:2] for s in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)] and [s[2] for s in seen] == run_losses
