"""Module graphs (fx, hooks fallback, execution order) and the structural checks on them."""

import json

import models
import pytest
import torch
from torch import nn

from normscope import load, watch
from normscope.analyze import analyze_full, trace_fx, trace_hooks
from normscope.analyze.graph import Graph, build_graph, from_execution_order


class DataDependent(nn.Module):
    """fx cannot trace the Python branch on a tensor value: the hooks fallback must take over."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # bias=True before BN: redundant
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.4)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        if h.mean() > -1e9:  # data-dependent control flow
            h = self.drop(h)
        h = self.bn2(self.conv2(h))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def edges(g: Graph, a: str, b: str) -> bool:
    ids_a = [n.id for n in g.module_nodes(a)]
    ids_b = [n.id for n in g.module_nodes(b)]
    return any(j in g.succs[i] for i in ids_a for j in ids_b)


def test_fx_and_hooks_agree_on_a_resnet():
    model = models.TinyResNet()
    fx = trace_fx(model)
    hk = trace_hooks(model, (torch.randn(2, 3, 8, 8),))
    for g in (fx, hk):
        assert edges(g, "stem.0", "stem.1") and edges(g, "layer2.short.0", "layer2.short.1")
        assert g.residual_blocks() == ["layer1", "layer2"]
    assert fx.source == "fx" and hk.source == "hooks"
    # the shared in-place ReLU is two nodes in both graphs
    assert len(fx.module_nodes("layer1.relu")) == 2 and len(hk.module_nodes("layer1.relu")) == 2
    assert Graph.from_json(json.loads(json.dumps(fx.to_json()))).to_json() == fx.to_json()


def test_hooks_fallback_when_fx_fails_and_buffers_restored():
    model = DataDependent()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g, why = build_graph(model, (torch.randn(4, 3, 6, 6),))
    assert g.source == "hooks" and "TraceError" in why
    assert edges(g, "conv", "bn") and edges(g, "drop", "conv2") and edges(g, "conv2", "bn2")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the tracing forward left BN statistics alone
    g2, why2 = build_graph(model)  # no inputs: nothing to fall back on
    assert g2 is None and why2


def test_structural_checks_through_the_hooks_graph(tmp_path):
    from normscope.probe import Recipe, probe

    batches = [(torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))) for _ in range(3)]
    run = probe(Recipe(DataDependent(), batches, nn.functional.cross_entropy, steps=6), run_dir=tmp_path / "r")
    a = analyze_full(run)
    rb = [f for f in a.findings if f.check == "redundant-bias"]
    assert [f.layer for f in rb] == ["conv"] and rb[0].evidence["graph"] == "hooks"
    vs = [f for f in a.findings if f.check == "dropout-bn-variance-shift"]
    assert [f.layer for f in vs] == ["bn2"] and vs[0].evidence["dropouts"][0]["module"] == "drop"
    assert a.graph_source == "hooks"


def test_structural_checks_from_a_watched_run_and_the_model(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8, bias=False),
                          nn.BatchNorm1d(8), nn.Linear(8, 2))  # fmt: skip
    opt = torch.optim.SGD([{"params": [p for n, p in model.named_parameters() if n.startswith("1.")], "weight_decay": 1e-4},
                           {"params": [p for n, p in model.named_parameters() if not n.startswith("1.")]}], lr=0.1)  # fmt: skip
    with watch(model, tmp_path / "w", every=1):
        for _ in range(3):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    # without the model: the bias presence is unknown → skipped, with the reason
    a0 = analyze_full(tmp_path / "w")
    assert "bias presence unknown" in {s.check: s.reason for s in a0.skipped}["redundant-bias"]
    a = analyze_full(tmp_path / "w", model=model)
    assert [f.layer for f in a.findings if f.check == "redundant-bias"] == ["0"]
    wd = [f for f in a.findings if f.check == "norm-weight-decay"]
    assert wd[0].severity == "warning" and set(wd[0].evidence["normalisation_params"]) == {"1.weight", "1.bias"}
    assert wd[0].evidence["source"] == "run"  # the collector recorded the groups' weight decay
    a2 = analyze_full(tmp_path / "w", model=model, optimizer=opt)
    assert [f for f in a2.findings if f.check == "norm-weight-decay"][0].evidence["source"] == "optimizer"
    el = [f for f in a.findings if f.check == "effective-lr"]
    # both feed a BN directly (its mean subtraction cancels 0.bias too): both are scale-invariant
    assert el and set(el[0].evidence["weights"]) == {"0.weight", "3.weight"}


def test_execution_order_graph_is_the_last_resort():
    order = [{"layer": "a", "call": 0, "type": "Linear"}, {"layer": "b", "call": 0, "type": "BatchNorm1d"},
             {"layer": "a", "call": 1, "type": "Linear"}]  # fmt: skip
    g = from_execution_order(order)
    assert g.source == "execution-order" and g.succs["a"] == ["b"] and g.succs["b"] == ["a#1"]


def test_bn_in_sequence_model_embeddings_only_when_bn_sees_time(tmp_path):
    class Tabular(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.bn = nn.BatchNorm1d(4)
            self.out = nn.Linear(4, 1)

        def forward(self, t):
            return self.out(self.bn(self.emb(t)))

    class Seq(Tabular):
        def forward(self, t):  # (N, L) tokens → BN over (N, C, L)
            return self.out(self.bn(self.emb(t).transpose(1, 2)).mean(2))

    for cls, flagged, shape in ((Tabular, False, (16,)), (Seq, True, (16, 5))):
        m = cls()
        d = tmp_path / cls.__name__
        with watch(m, d, every=1) as scope:
            m(torch.randint(0, 10, shape)).sum().backward()
            scope.step()
        a = analyze_full(d)
        assert bool([f for f in a.findings if f.check == "bn-in-sequence-model"]) == flagged, cls.__name__


def test_legacy_lrn_from_run_alone(tmp_path):
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LocalResponseNorm(3), nn.ReLU())
    with watch(m, tmp_path / "l", every=1) as scope:
        m(torch.randn(2, 1, 5, 5)).sum().backward()
        scope.step()
    (f,) = [f for f in analyze_full(tmp_path / "l").findings if f.check == "legacy-lrn"]
    assert f.layer == "1" and f.severity == "info"


def test_syncbn_recommended_reads_the_world_size(tmp_path):
    from normscope.store.sidecars import read_probe, write_probe

    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.SyncBatchNorm(4))
    with watch(m, tmp_path / "d", every=1) as scope:
        nn.Sequential(m[0], m[1])(torch.randn(8, 3)).sum().backward()  # SyncBN needs a process group to run
        scope.step()
    a = analyze_full(tmp_path / "d")
    assert "torch.distributed" in {s.check: s.reason for s in a.skipped}["syncbn-recommended"]
    write_probe(tmp_path / "d", {"mode": "recipe", "distributed": {"initialized": True, "world_size": 4}})
    assert read_probe(tmp_path / "d")["distributed"]["world_size"] == 4
    (f,) = [f for f in analyze_full(tmp_path / "d").findings if f.check == "syncbn-recommended"]
    assert f.layer == "1" and f.evidence == {"batch_per_rank": 8.0, "world_size": 4, "threshold": 16}
    assert "32" in f.message


@pytest.mark.parametrize("lr,expect", [(0.0, "warning"), (1e-6, "warning"), (3e-2, None), (5.0, "warning")])
def test_update_ratio_levels(tmp_path, lr, expect):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    with watch(m, tmp_path / "u", every=1):
        for _ in range(6):
            loss = m(torch.randn(64, 32)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    a = analyze_full(tmp_path / "u")
    ur = [f for f in a.findings if f.check == "update-ratio"]
    loud = [f for f in ur if f.severity == "warning"]
    if expect is None:
        assert not loud
    else:
        assert loud and all(set(f.evidence["params"]) <= {"0.weight", "2.weight"} for f in ur)


def test_effective_lr_splits_schedule_and_norm(tmp_path):
    """Under a schedule, effective-lr's change η/‖w‖² (end / start) is split into the schedule's factor
    and the weight norm's; each is checked against the recorded lr and norms, and the two multiply to
    the change."""

    def trained(path, steps, schedule):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5) if schedule else None
        with watch(model, path, every=1):
            for _ in range(steps):
                loss = model(torch.randn(16, 4)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
        return analyze_full(path, model=model)

    a = trained(tmp_path / "s", 40, True)
    (f,) = [f for f in a.findings if f.check == "effective-lr"]
    ev = f.evidence["weights"]["0.weight"]
    d = load(tmp_path / "s").params
    d = d[d.param == "0.weight"].sort_values("step")
    lr, n2 = d.lr.to_numpy(), d.norm.to_numpy() ** 2
    k = max(1, len(d) // 20)
    assert ev["lr_change"] == pytest.approx(lr[-k:].mean() / lr[:k].mean())  # 0.125 / 0.5
    assert ev["ratio"] == pytest.approx((lr[-k:] / n2[-k:]).mean() / (lr[:k] / n2[:k]).mean())
    assert ev["lr_change"] * ev["norm_change"] == pytest.approx(ev["ratio"])
    assert "schedule accounts for ×0.125" in f.message
    # without a schedule the message has no split
    (g,) = [f for f in trained(tmp_path / "c", 10, False).findings if f.check == "effective-lr"]
    assert "schedule" not in g.message and g.evidence["weights"]["0.weight"]["lr_change"] == pytest.approx(1.0)
