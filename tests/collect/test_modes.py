"""The train/eval mode audit (normscope.collect.modes) and the signals it emits: every kind of
forward classified as the check expects, and the frozen-BN drift against the buffers themselves."""

import numpy as np
import pytest
import torch
from torch import nn

from normscope import load, watch


def net(dropout=0.3, bn=True, track=True):
    layers = [nn.Linear(8, 16, bias=False)]
    if bn:
        layers.append(nn.BatchNorm1d(16, track_running_stats=track))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)]
    torch.manual_seed(0)
    return nn.Sequential(*layers)


X, Y = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 3


def train_step(m, opt):
    opt.zero_grad()
    nn.functional.cross_entropy(m(X), Y).backward()
    opt.step()


def audit(tmp_path, m, loop, every=1):
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with watch(m, tmp_path / "r", every=every, optimizer=opt) as sc:
        loop(m, opt, sc)
    return load(tmp_path / "r").meta["modes"]


def test_no_grad_eval_in_train_mode_counted_with_the_metric_it_fed(tmp_path):
    def loop(m, opt, sc):
        for _ in range(4):
            train_step(m, opt)
            with torch.no_grad():
                sc.log(phase="eval", acc=float((m(X).argmax(1) == Y).float().mean()))

    modes = audit(tmp_path, net(), loop)
    e = modes["events"]["eval-in-train-mode:no_grad"]
    assert e["forwards"] == 4 and e["bn_train"] == 1 and e["dropout_train"] == 1
    assert modes["metrics_fed"] == ["acc"] and modes["forwards"] == {"train": 4, "eval": 4}
    assert modes["batchnorm"] == 1 and modes["dropout"] == 1


def test_every_kind_of_evaluation_forward(tmp_path):
    def loop(m, opt, sc):
        train_step(m, opt)
        with torch.inference_mode():
            m(X)
        m(X)  # grad enabled, never backpropagated: an evaluation that forgot no_grad
        train_step(m, opt)

    modes = audit(tmp_path, net(), loop)
    ev = modes["events"]
    assert ev["eval-in-train-mode:inference_mode"]["forwards"] == 1
    assert ev["eval-in-train-mode:no_backward"]["forwards"] == 1
    assert modes["forwards"] == {"train": 2, "eval": 2} and not modes["metrics_fed"]


def test_the_right_way_and_harmless_cases_record_nothing(tmp_path):
    def proper(m, opt, sc):
        for _ in range(3):
            train_step(m, opt)
            m.eval()
            with torch.no_grad():
                m(X)
            m.train()

    assert audit(tmp_path / "a", net(), proper)["events"] == {}

    def accumulate(m, opt, sc):  # micro-batches: several forwards, each backpropagated, one step
        for _ in range(2):
            opt.zero_grad()
            for i in range(3):
                nn.functional.cross_entropy(m(X[i::3]), Y[i::3]).backward()
            opt.step()

    m = audit(tmp_path / "b", net(), accumulate)
    assert m["events"] == {} and m["forwards"] == {"train": 6, "eval": 0}

    def eval_in_train(m, opt, sc):
        train_step(m, opt)
        with torch.no_grad():
            m(X)

    # Dropout p=0 and BN without running statistics: the mode changes nothing, so nothing to report
    assert audit(tmp_path / "c", net(dropout=0.0, track=False), eval_in_train)["events"] == {}
    d = audit(tmp_path / "d", net(dropout=0.0, bn=False), eval_in_train)
    assert d["batchnorm"] == 0 and d["events"] == {}


def test_backward_through_any_output_counts_as_training(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net()

        def forward(self, x):
            h = self.body(x)
            return {"features": h * 2, "logits": h}  # the loss uses the second output only

    def loop(m, opt, sc):
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(m(X)["logits"], Y).backward()
            opt.step()

    modes = audit(tmp_path, Two(), loop)
    assert modes["events"] == {} and modes["forwards"]["train"] == 2


def test_training_after_a_forgotten_model_eval(tmp_path):
    def loop(m, opt, sc):
        train_step(m, opt)
        m.eval()
        with torch.no_grad():
            m(X)
        for _ in range(3):  # no model.train()
            train_step(m, opt)

    modes = audit(tmp_path, net(), loop)
    e = modes["events"]["train-in-eval-mode"]
    assert e["forwards"] == 3 and e["bn_eval"] == 1 and e["dropout_eval"] == 1 and e["steps"] == [1, 2, 3]


def test_bn_frozen_on_purpose_is_not_training_in_eval_mode(tmp_path):
    def loop(m, opt, sc):
        for _ in range(3):
            m.train()
            m[1].eval()
            train_step(m, opt)

    modes = audit(tmp_path, net(), loop)
    assert modes["events"] == {}


def frozen_model():
    m = net(dropout=0.0)
    for p in m[1].parameters():
        p.requires_grad_(False)
    return m


@pytest.mark.parametrize("why", ["requires_grad=False", "in no optimizer param group", "affine=False"])
def test_frozen_bn_found_and_its_drift_matches_the_buffers(tmp_path, why):
    torch.manual_seed(0)
    m = net(dropout=0.0)
    bn = m[1]
    if why == "requires_grad=False":
        for p in bn.parameters():
            p.requires_grad_(False)
        params = [p for p in m.parameters() if p.requires_grad]
    elif why == "in no optimizer param group":
        params = [m[0].weight, m[4].weight, m[4].bias]
    else:
        m[1] = bn = nn.BatchNorm1d(16, affine=False)
        params = list(m.parameters())
    rm0, rv0 = bn.running_mean.clone().double(), bn.running_var.clone().double()
    opt = torch.optim.SGD(params, lr=0.05)
    want = []
    with watch(m, tmp_path / "r", every=2, optimizer=opt):
        for _ in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(m(X * 3 + 1), Y).backward()
            opt.step()
            sd0 = (rv0 + bn.eps).sqrt()
            dm = ((bn.running_mean.double() - rm0) / sd0).abs()
            lr = ((bn.running_var.double() + bn.eps) / (rv0 + bn.eps)).log()
            want.append([float(dm.pow(2).mean().sqrt()), float(dm.max()), float(lr.mean()), float(lr.abs().max())])
    run = load(tmp_path / "r")
    assert run.meta["modes"]["frozen_bn"] == {"1": why}
    for k, name in enumerate(["bn_mean_drift", "bn_mean_drift_max", "bn_var_log_ratio", "bn_var_log_ratio_max"]):
        s = run.signal(name)
        assert s.step.tolist() == [0, 2, 4] and set(s.layer) == {"1"}
        np.testing.assert_allclose(s.value.to_numpy(), [want[i][k] for i in (0, 2, 4)], rtol=1e-9, atol=1e-12)
    assert run.signal("bn_train_forwards").value.tolist() == [1.0, 1.0, 1.0]
    assert want[-1][0] > 0.1  # the inputs' scale moved the statistics: the test can fail


def test_trainable_bn_emits_no_drift_signal(tmp_path):
    m = net(dropout=0.0)
    audit(tmp_path, m, lambda m, opt, sc: [train_step(m, opt) for _ in range(2)])
    run = load(tmp_path / "r")
    assert run.meta["modes"]["frozen_bn"] == {} and not run.signals.name.str.startswith("bn_").any()


def test_emit_joins_the_step_transfer_and_checks_its_names(tmp_path):
    m = net(dropout=0.0, bn=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with watch(m, tmp_path / "r", every=2, optimizer=opt) as sc:
        for s in range(4):
            if sc._sampling:
                sc.emit("train", "custom", 0, ("a", "b"), torch.tensor([s, -s], dtype=torch.float64))
            train_step(m, opt)
        with pytest.raises(ValueError):
            sc.emit("train", "custom", 0, ("a",), torch.zeros(2))
    run = load(tmp_path / "r")
    mine = run.signals[run.signals.layer == "custom"]  # (the output-logit probe emits its own rows too)
    assert mine[["step", "layer", "name", "value"]].values.tolist() == [
        [0, "custom", "a", 0.0], [0, "custom", "b", 0.0], [2, "custom", "a", 2.0], [2, "custom", "b", -2.0]]  # fmt: skip
    assert run.signal("b").value.tolist() == [0.0, -2.0]


def test_audit_failure_never_breaks_training(tmp_path, monkeypatch):
    from normscope.collect import modes as MO

    def boom(self):
        raise RuntimeError("audit bug")

    monkeypatch.setattr(MO.ModeAudit, "on_forward", boom)
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with watch(m, tmp_path / "r", every=1, optimizer=opt):
        for _ in range(2):
            train_step(m, opt)
    run = load(tmp_path / "r")
    assert run.meta["hook_errors"] == ["modes: RuntimeError: audit bug"]
    assert "modes" not in run.meta and len(run.stats)  # the audit stopped; the statistics did not


def test_inference_mode_forward_does_not_stop_recording(tmp_path):
    """Regression: a reduction cached for an inference-mode output read its version counter,
    which raises, and every layer stopped recording for the rest of the run."""
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with watch(m, tmp_path / "r", every=1, optimizer=opt):
        for _ in range(3):
            train_step(m, opt)
            m.eval()
            with torch.inference_mode():
                m(X)
            m.train()
    run = load(tmp_path / "r")
    assert run.meta["hook_errors"] == []
    train = run.stats[run.stats.phase == "train"]
    assert sorted(train.step.unique()) == [0, 1, 2] and set(run.stats.phase) == {"train", "eval"}


def test_functional_dropout_counts_as_dropout(tmp_path):
    class Attn(nn.Module):
        def __init__(self, rate):
            super().__init__()
            self.lin = nn.Linear(8, 3)
            self.attention_dropout = rate  # applied with F.dropout, as Llama's attention does

        def forward(self, x):
            return nn.functional.dropout(self.lin(x), self.attention_dropout, self.training)

    def loop(m, opt, sc):
        train_step(m, opt)
        with torch.no_grad():
            m(X)

    modes = audit(tmp_path / "a", Attn(0.1), loop)
    assert modes["dropout"] == 1 and modes["events"]["eval-in-train-mode:no_grad"]["dropout_train"] == 1
    assert audit(tmp_path / "b", Attn(0.0), loop)["dropout"] == 0  # rate 0: the mode changes nothing
    # a rate stored next to a Dropout child is that child's, counted once
    m = nn.Sequential(nn.Linear(8, 3), nn.Dropout(0.2))
    m.dropout_rate = 0.2
    assert audit(tmp_path / "c", m, loop)["dropout"] == 1


def test_drift_reference_is_the_start_even_when_the_optimizer_is_found_late(tmp_path):
    """Regression: with the optimizer found by the global hook (watch() without optimizer=), a BN
    judged frozen at the first step took its reference after that step's forward had moved it."""
    m = net(dropout=0.0)
    bn = m[1]
    rm0 = bn.running_mean.clone().double()
    rv0 = bn.running_var.clone().double()
    opt = torch.optim.SGD([m[0].weight, m[4].weight, m[4].bias], lr=0.05)  # BN in no param group
    with watch(m, tmp_path / "r", every=1):
        opt.zero_grad()
        nn.functional.cross_entropy(m(X * 3 + 1), Y).backward()
        opt.step()
    want = float((((bn.running_mean.double() - rm0) / (rv0 + bn.eps).sqrt()).pow(2)).mean().sqrt())
    run = load(tmp_path / "r")
    assert run.meta["modes"]["frozen_bn"] == {"1": "in no optimizer param group"}
    assert run.signal("bn_mean_drift").value.tolist() == pytest.approx([want], rel=1e-9) and want > 0.05


def test_signals_queued_at_close_are_written_and_empty_log_is_refused(tmp_path):
    from normscope import NormscopeError

    m = net(dropout=0.0, bn=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with watch(m, tmp_path / "r", every=1, optimizer=opt) as sc:
        train_step(m, opt)
        sc.emit("train", "late", 0, ("x",), torch.tensor([3.0], dtype=torch.float64))  # no step ends after it
        with pytest.raises(NormscopeError, match="empty tensor") as e:
            sc.log(loss=torch.zeros(0))
        assert "\n" not in str(e.value)
    assert load(tmp_path / "r").signal("x").value.tolist() == [3.0]
