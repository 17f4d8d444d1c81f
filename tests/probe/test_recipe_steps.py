"""Recipe(train_step=, eval_step=, scheduler=): the user's own loop runs as written."""

import pytest
import torch
from torch import nn

import normscope
from normscope import NormscopeError
from normscope.probe import Recipe

X = torch.randn(48, 5, generator=torch.Generator().manual_seed(0))
Y = torch.arange(48) % 3
DATA = [(X[i : i + 16], Y[i : i + 16]) for i in range(0, 48, 16)]


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def test_train_step_and_eval_metrics_are_the_users(tmp_path):
    seen = []

    def train_step(m, batch, opt):
        x, y = batch
        seen.append((m.training, x.shape[0]))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        return loss

    def eval_step(m, batch):
        x, y = batch
        m.eval()
        with torch.no_grad():
            out = m(x)
        m.train()
        return {"loss": nn.functional.cross_entropy(out, y), "acc": float((out.argmax(1) == y).float().mean())}

    eval_data = [(X[:10], Y[:10]), (X[10:40], Y[10:40])]  # unequal batches: the mean is weighted
    net = model()
    r = Recipe(net, DATA, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), eval_data=eval_data,
               train_step=train_step, eval_step=eval_step, steps=6)  # fmt: skip
    run = normscope.probe(r, run_dir=tmp_path / "r", eval_every=3)
    assert seen == [(True, 16)] * 6
    ev = run.scalars[run.scalars.phase == "eval"]
    assert set(ev.name) == {"loss", "acc"} and len(ev) == 2 * 3  # before training, after steps 3 and 6
    # the last eval loss is the sample-weighted mean of eval_step's per-batch values (brute force)
    with torch.no_grad():
        net.eval()
        want = sum(float(nn.functional.cross_entropy(net(x), y)) * len(x) for x, y in eval_data) / 40
        unweighted = sum(float(nn.functional.cross_entropy(net(x), y)) for x, y in eval_data) / 2
    got = ev[ev.name == "loss"].sort_values("step").value.iloc[-1]
    assert got == pytest.approx(want, rel=1e-6) and abs(want - unweighted) > 1e-4
    m = run.scalars[(run.scalars.phase == "train") & (run.scalars.name == "loss")]
    assert len(m) == 6 and m.value.notna().all()
    assert run.meta["modes"]["events"] == {}


def test_default_loop_equals_an_equivalent_train_step(tmp_path):
    def step(m, batch, opt):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(m(batch[0]), batch[1])
        loss.backward()
        opt.step()
        return float(loss.detach())

    runs = []
    for k, ts in enumerate((None, step)):
        r = Recipe(model(), DATA, nn.functional.cross_entropy, train_step=ts, steps=5,
                   optimizer=lambda p: torch.optim.SGD(p, lr=0.1))  # fmt: skip
        run = normscope.probe(r, run_dir=tmp_path / f"r{k}")
        runs.append(run.scalars[run.scalars.name == "loss"].value.tolist())
    assert runs[0] == runs[1]


def test_scheduler_is_stepped_after_every_step(tmp_path):
    r = Recipe(model(), DATA, nn.functional.cross_entropy, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), steps=4,
               scheduler=lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=3))  # fmt: skip
    run = normscope.probe(r, run_dir=tmp_path / "r")
    lr = run.params.groupby("step").lr.first()
    assert lr.tolist() == pytest.approx([0.025, 0.05, 0.075, 0.1])  # the lr each step used


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"loss_fn": None}, "Recipe.loss_fn is needed"),
        ({"train_step": 3}, "Recipe.train_step must be callable"),
        ({"eval_step": "x", "eval_data": DATA}, "Recipe.eval_step must be callable"),
        ({"loss_fn": None, "train_step": lambda m, b, o: 0.0, "eval_data": DATA}, "Recipe.loss_fn is needed"),
    ],
)
def test_bad_loop_arguments_get_one_line_errors(kwargs, text):
    base = {"model": model(), "train_data": DATA, "loss_fn": nn.functional.cross_entropy}
    with pytest.raises(NormscopeError, match=text) as e:
        Recipe(**{**base, **kwargs})
    assert "\n" not in str(e.value)


def test_bad_returns_get_one_line_errors(tmp_path):
    r = Recipe(model(), DATA, nn.functional.cross_entropy, eval_data=DATA, steps=2, eval_step=lambda m, b: "high")
    with pytest.raises(NormscopeError, match="Recipe.eval_step must return a number") as e:
        normscope.probe(r, run_dir=tmp_path / "a")
    assert "\n" not in str(e.value) and str(e.value).startswith("the evaluation before step 0 raised")
    r = Recipe(model(), DATA, steps=2, train_step=lambda m, b, o: [1.0])
    with pytest.raises(NormscopeError, match="Recipe.train_step must return a number"):
        normscope.probe(r, run_dir=tmp_path / "b")
    r = Recipe(model(), DATA, nn.functional.cross_entropy, steps=2, scheduler=lambda opt: 3)
    with pytest.raises(NormscopeError, match="Recipe.scheduler factory returned int"):
        normscope.probe(r, run_dir=tmp_path / "c")
