"""The collector under torch.compile: the same rows as eager, no graph break, no recompilation.

Compiling costs seconds per graph on two cores: tiny models, ``aot_eager`` (the real dynamo and
AOTAutograd tracing, no inductor codegen) everywhere but one inductor test.
"""

import copy
import warnings

import models
import numpy as np
import pytest
import torch
from torch import nn

from normscope import load, watch

pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

KEY = ["step", "phase", "layer", "call", "output"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts like a fresh process: watch() turns dynamo's hook guards on for the whole
    process (skip_nnmodule_hook_guards=False), which would hide the compiled-before-watch cases."""
    default = torch._dynamo.config.skip_nnmodule_hook_guards
    torch._dynamo.config.skip_nnmodule_hook_guards = True
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch._dynamo.config.skip_nnmodule_hook_guards = default


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def breaks() -> int:
    return sum(counters["graph_break"].values())


def assert_same_rows(eager, comp, steps=None):
    """Every eager row has its compiled twin, moments within 1e-4 relative; gradients likewise."""
    for table, cols in (("stats", ["mean", "std", "min", "max", "mean_abs", "frac_zero", "frac_nonpos", "frac_sat",
                                   "count", "channel_axis", "ch_mean", "ch_var"]),
                        ("grads", ["norm", "rms", "max_abs", "count"])):  # fmt: skip
        e, c = getattr(eager, table), getattr(comp, table)
        if steps is not None:
            e, c = e[e.step.isin(steps)], c[c.step.isin(steps)]
        assert len(e) > 0
        assert sorted(map(tuple, e[KEY].values.tolist())) == sorted(map(tuple, c[KEY].values.tolist()))
        if table == "stats":  # histograms: the same total, bins within 1% of it (inductor's rounding)
            m = e.merge(c, on=KEY, suffixes=("_e", "_c"))
            for he, hc in zip(m.hist_e, m.hist_c):
                assert he.sum() == hc.sum() and np.abs(he - hc).sum() <= 0.01 * he.sum()
        m = e.merge(c, on=KEY, suffixes=("_e", "_c"))
        for col in cols:
            a, b = m[f"{col}_e"], m[f"{col}_c"]
            if col.startswith("ch_"):  # per-channel lists: same lengths, flattened
                assert [len(v) for v in a] == [len(v) for v in b]
                a, b = np.concatenate(list(a)), np.concatenate(list(b))
            a, b = np.asarray(a, float), np.asarray(b, float)
            # relative to the value, or to the tensor's own scale for a value near 0 (a BN output's mean)
            floor = m["mean_abs_e"] if table == "stats" else m["max_abs_e"]
            if col.startswith("ch_"):
                floor = np.repeat(floor.to_numpy(float), [len(v) for v in m[f"{col}_e"]])
            scale = np.maximum(np.abs(a), np.asarray(floor, float)) + 1e-30
            np.testing.assert_array_less(np.abs(a - b) / scale, 1e-4 + 1e-12, err_msg=f"{table}.{col}")


def run_pair(tmp_path, make, train, compile_kw, every=1, steps=2, **opts):
    torch.manual_seed(3)
    base = make()
    eager, comp = copy.deepcopy(base), copy.deepcopy(base)
    with watch(eager, tmp_path / "eager", every=every, **opts):
        train(eager, steps)
    counters.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with watch(comp, tmp_path / "comp", every=every, **opts):
            train(torch.compile(comp, **compile_kw), steps)
    assert not [x for x in w if "normscope" in str(x.message)], [str(x.message) for x in w]
    return load(tmp_path / "eager"), load(tmp_path / "comp")


def test_fullgraph_after_watch_equals_eager(tmp_path):
    """TinyResNet: in-place ReLUs shared by call sites, BN inputs, gradients; fullgraph=True."""
    e, c = run_pair(tmp_path, models.TinyResNet, models.train, dict(backend="aot_eager", fullgraph=True))
    assert breaks() == 0 and graphs() == 1
    assert_same_rows(e, c)
    assert c.meta["hook_errors"] == [] and c.meta["status"] == "complete"
    calls = c.stats[(c.stats.step == 0) & (c.stats.layer == "layer1.relu")]["call"].tolist()
    assert sorted(calls) == [0, 1]
    # the transformer probes do not run compiled: a check on their signals says so, not "no block found"
    assert c.meta["compiled"] is True and "compiled" not in e.meta
    from normscope.analyze import analyze_full

    skip = {s.check: s.reason for s in analyze_full(c, checks=["output-logit-divergence"]).skipped}
    assert "torch.compile" in skip["output-logit-divergence"]
    # the mode audit still counts the compiled forwards (their outputs are not followed: training)
    assert c.meta["modes"]["forwards"]["train"] == e.meta["modes"]["forwards"]["train"] > 0


def test_shared_module_call_sites_without_fullgraph(tmp_path):
    def train(m, steps):
        return models.train(m, steps, shape=(4,), classes=2)

    e, c = run_pair(tmp_path, models.SharedMLP, train, dict(backend="aot_eager"))
    assert breaks() == 0
    assert_same_rows(e, c)
    assert sorted(c.stats[(c.stats.step == 0) & (c.stats.layer == "act")]["call"]) == [0, 1, 2]


def test_cadence_never_recompiles_200_steps(tmp_path, caplog):
    """Sampled and unsampled steps, train and eval forwards: one graph each, 200 steps, no
    recompile-limit warning; the sampled steps equal eager's."""
    torch.manual_seed(0)
    base = models.SharedMLP()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(4)]

    def loop(model, fwd, steps=200):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for i in range(steps):
            x, y = data[i % 4]
            loss = nn.functional.cross_entropy(fwd(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i in (6, 48, 104):  # eval forwards in sampled steps 7, 49, 105
                with torch.no_grad():
                    fwd(x)

    eager, comp = copy.deepcopy(base), copy.deepcopy(base)
    with watch(eager, tmp_path / "eager", every=7, grad_every=2):
        loop(eager, eager)
    counters.clear()
    with watch(comp, tmp_path / "comp", every=7, grad_every=2), caplog.at_level("WARNING"):
        loop(comp, torch.compile(comp, backend="aot_eager", fullgraph=True))
    assert graphs() <= 2 and breaks() == 0
    assert not [r for r in caplog.records if "recompile" in r.getMessage()]
    e, c = load(tmp_path / "eager"), load(tmp_path / "comp")
    assert sorted(c.stats.step.unique()) == list(range(0, 200, 7))
    assert set(c.grads.step.unique()) == set(range(0, 200, 14))
    assert set(c.stats.phase) == {"train", "eval"}
    assert_same_rows(e, c, steps=[0, 7, 14, 49, 56])


def _seq():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(4 * 64, 10))  # fmt: skip


def test_inductor_sequential_root_hooks_traced(tmp_path):
    """Inductor, fullgraph: a Sequential's own hooks are traced into its graph (the root op)."""
    e, c = run_pair(tmp_path, _seq, models.train, dict(fullgraph=True), steps=1)
    assert breaks() == 0 and graphs() == 1
    assert_same_rows(e, c)


@pytest.mark.parametrize("case", ["cold", "warm", "wrapper"])
def test_compiled_before_watch(tmp_path, case):
    torch.manual_seed(3)
    base = models.TinyResNet()
    eager, comp = copy.deepcopy(base), copy.deepcopy(base)
    if case != "cold":
        models.train(eager, 1, seed=5)
    with watch(eager, tmp_path / "eager", every=1):  # first: watch() of a TinyResNet drops the class's compiled code
        models.train(eager, 2)
    cm = torch.compile(comp, backend="aot_eager", fullgraph=True)
    pre = 0
    if case != "cold":  # already run: code cached without hooks
        models.train(cm, 1, seed=5)
        pre = graphs()
    with watch(cm if case == "wrapper" else comp, tmp_path / "comp", every=1):
        models.train(cm, 2)
    assert breaks() == 0 and graphs() - pre == 1
    e, c = load(tmp_path / "eager"), load(tmp_path / "comp")
    assert_same_rows(e, c)
    if case != "cold":
        assert any("recompiles the model once" in n for n in c.meta["notes"])


def test_unseen_compiled_code_warns_once_and_notes(tmp_path):
    """A compiled function that calls the model, traced before watch(): normscope cannot drop that
    code, so it says so at the first step (warning + meta.json), never an empty run in silence."""
    torch.manual_seed(3)
    model = models.SharedMLP()
    fwd = torch.compile(lambda x: model(x), backend="aot_eager")

    class Caller(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return fwd(x)

    def train(steps):
        return models.train(Caller(), steps, shape=(4,), classes=2)

    train(1)
    with pytest.warns(UserWarning, match="without calling normscope's hooks") as rec:
        with watch(model, tmp_path / "r", every=1):
            train(3)
    assert sum("normscope's hooks" in str(r.message) for r in rec) == 1
    run = load(tmp_path / "r")
    assert any("without calling normscope's hooks" in n for n in run.meta["notes"])


@pytest.mark.parametrize("guards", ["on", "dynamo-arrived-later"])
def test_compiled_while_the_hooks_were_off_recompiles_once_with_them(tmp_path, guards):
    """The modules' hooks are off on unsampled steps (step_hooks.py). A model first compiled on
    such a step is traced without them; the next sampled step attaches them, and the code without
    them is not reused in silence: dynamo's hook guards (on since watch(), or, when dynamo came
    into the process after watch(), turned on and the hook-less code dropped at the next step)
    recompile it with the hooks once; then they stay on (pinned), with no further graph."""
    torch.manual_seed(3)
    model = models.SharedMLP()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(4)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cm = torch.compile(model, backend="aot_eager")

    def step(fwd, i):
        x, y = data[i % 4]
        loss = nn.functional.cross_entropy(fwd(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with watch(model, tmp_path / "c", every=3) as scope:
        step(model, 0)  # sampled, eager
        step(model, 1)  # unsampled: the hooks are off
        if guards != "on":  # as if dynamo had been imported only now, after watch()
            scope._hook_guards = False
            torch._dynamo.config.skip_nnmodule_hook_guards = True
        step(cm, 2)  # unsampled: compiled without the hooks
        counters.clear()
        for i in range(3, 9):
            step(cm, i)
        assert scope._step_hooks.pinned
    assert graphs() == 1 and breaks() == 0  # the recompilation at step 3, then none
    c = load(tmp_path / "c")
    assert sorted(c.stats.step.unique()) == [0, 3, 6]
    assert c.meta.get("compiled") is True
