"""weight-norm-init and post-ln-gradient: recognition (weight-norm APIs, pre/post-LN blocks), the
block gradient ratio against p.grad, the thresholds just above and below, the skips, and the
data-dependent init helper."""

import warnings

import numpy as np
import pytest
import torch
from synthetic import SyntheticRun
from torch import nn
from torch.nn.utils import weight_norm as legacy_weight_norm
from torch.nn.utils.parametrizations import weight_norm

import normscope
from normscope import NormscopeError, roles
from normscope.analyze import analyze_full
from normscope.analyze.checks.post_ln_gradient import post_ln_stacks
from normscope.analyze.context import Context


def _legacy(m, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based API
        return legacy_weight_norm(m, **kw)


def _findings(run, check, **config):
    a = analyze_full(run, checks=[check], config={check: config} if config else None)
    return a, [f for f in a.findings if f.check == check]


def _skip(a, check):
    return {s.check: s.reason for s in a.skipped}.get(check)


def _train(model, run_dir, x, steps=2, lr=0.1, loss=lambda y: y.pow(2).mean(), opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr)
    with normscope.watch(model, run_dir, every=1, optimizer=opt):
        for _ in range(steps):
            opt.zero_grad()
            loss(model(x)).backward()
            opt.step()
    return normscope.load(run_dir), opt


# --- recognition: weight norm ---------------------------------------------------------------------------
def test_weight_norm_recognised_in_both_apis():
    a = weight_norm(nn.Linear(3, 4))
    b = weight_norm(nn.Conv2d(3, 4, 3), dim=None)
    c = _legacy(nn.Linear(3, 4))
    assert roles.weight_norm(a) == [{"tensor": "weight", "api": "parametrizations", "dim": 0,
                                     "g": "weight_original0", "v": "weight_original1"}]  # fmt: skip
    assert roles.weight_norm(b)[0]["dim"] is None
    assert roles.weight_norm(c) == [{"tensor": "weight", "api": "legacy", "dim": 0, "g": "weight_g", "v": "weight_v"}]
    assert roles.weight_norm(nn.Linear(3, 4)) == [] and roles.weight_norm(nn.LayerNorm(4)) == []
    assert roles.type_name(a) == "Linear" and type(a).__name__ == "ParametrizedLinear"
    assert roles.role(a.parametrizations.weight[0]) is None  # _WeightNorm computes a weight, it is no norm layer
    assert roles.role(nn.LayerNorm(4)) == "norm"


def test_weight_norm_run_records_layers_and_params(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(weight_norm(nn.Linear(8, 16, bias=False)), nn.ReLU(), _legacy(nn.Linear(16, 4)))
    run, _ = _train(net, tmp_path / "r", torch.randn(32, 8))
    mods = run.modules
    assert mods["0"]["type"] == "Linear" and mods["0"]["hooked"] and mods["0"]["params"] == 16 * 8 + 16
    assert mods["0"]["weight_norm"][0]["api"] == "parametrizations" and mods["2"]["weight_norm"][0]["api"] == "legacy"
    hooked = [e["layer"] for e in run.meta["execution_order"]]
    assert hooked == ["0", "1", "2"]  # the bias-free parametrised Linear is a layer; its ParametrizationList is not
    params = set(run.params.param)
    assert params == {"0.weight_original0", "0.weight_original1", "2.bias", "2.weight_g", "2.weight_v"}
    assert set(run.params[run.params.param.str.startswith("0.")].layer) == {"0"}
    # the recorded norms are the parameters' own
    p = run.params[(run.params.param == "0.weight_original1") & (run.params.step == 1)]
    assert float(p.norm.iloc[0]) == pytest.approx(
        float(net[0].parametrizations.weight.original1.detach().norm()), rel=1e-5
    )


def test_parametrized_param_names_are_canonical():
    from normscope.collect.select import canonical_names, canonical_param_name

    net = nn.Sequential(weight_norm(nn.Linear(2, 2)), nn.utils.parametrizations.spectral_norm(nn.Linear(2, 2)))
    names = canonical_names(net)
    got = [canonical_param_name(raw, names) for raw, _ in net.named_parameters()]
    assert got == ["0.bias", "0.weight_original0", "0.weight_original1", "1.bias", "1.weight_original"]
    assert roles.role(net[1].parametrizations.weight[0]) is None and roles.weight_norm(net[1]) == []
    root = weight_norm(nn.Linear(2, 2))
    assert [canonical_param_name(r, canonical_names(root)) for r, _ in root.named_parameters()] == [
        "bias", "weight_original0", "weight_original1"]  # fmt: skip
    assert canonical_param_name("enc.parametrizations.weight.original0", {"enc": "enc"}) == "enc.weight_original0"


# --- recognition: pre-LN / post-LN ----------------------------------------------------------------------
def _encoder(norm_first, layers=3):
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=norm_first)
    return nn.Sequential(nn.Embedding(20, 16), nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
                         nn.Linear(16, 5))  # fmt: skip


@pytest.mark.parametrize("norm_first,want", [(False, "post"), (True, "pre")])
def test_transformer_encoder_layer_placement(tmp_path, norm_first, want):
    torch.manual_seed(0)
    net = _encoder(norm_first)
    run, _ = _train(net, tmp_path / "r", torch.randint(0, 20, (4, 6)), steps=1)
    for ctx in (Context(run), Context(run, model=net)):  # execution order alone, and with the model's graph
        pl = ctx.norm_placement
        blocks = [f"1.layers.{i}" for i in range(3)]
        assert [pl[b]["placement"] for b in blocks] == [want] * 3
        assert roles.block_stacks(pl, want) == {"1.layers": blocks}
        assert post_ln_stacks(ctx) == ({"1.layers": blocks} if want == "post" else {})


def test_placement_from_order_and_graph():
    mods = {"b.0.fc": {"type": "Linear"}, "b.0.ln": {"type": "LayerNorm", "role": "norm"},
            "b.0.drop": {"type": "Dropout", "role": "dropout"}}  # fmt: skip
    order = [{"layer": n, "call": 0} for n in ("b.0.drop", "b.0.ln", "b.0.fc")]
    assert roles.norm_placement(order, mods)["b.0"]["placement"] == "pre"  # dropouts aside, the norm comes first
    order = [{"layer": n, "call": 0} for n in ("b.0.fc", "b.0.drop", "b.0.ln")]
    assert roles.norm_placement(order, mods)["b.0"]["placement"] == "post"
    order = [{"layer": n, "call": 0} for n in ("b.0.fc", "b.0.drop")]
    assert roles.norm_placement(order, mods)["b.0"]["placement"] is None


# --- the block gradient ratio against p.grad ------------------------------------------------------------
def test_block_gradient_ratio_matches_brute_force(tmp_path):
    torch.manual_seed(0)
    net = _encoder(False, layers=4)
    for p in net.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    x = torch.randint(0, 20, (8, 6))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the step leaves the weights (and p.grad) as they were
    run, _ = _train(net, tmp_path / "r", x, steps=1, opt=opt, loss=lambda y: y.logsumexp(-1).mean())
    brute = []
    for layer in net[1].layers:
        g = [p.grad for n, p in layer.named_parameters() if n.endswith("weight") and "norm" not in n]
        assert len(g) == 4  # in_proj_weight, out_proj.weight, linear1.weight, linear2.weight
        brute.append(float(torch.sqrt(sum((t.double() ** 2).sum() for t in g))))
    _, (f,) = _findings(run, "post-ln-gradient", ratio=0.0)
    got = [b["grad_norm"][0] for b in f.evidence["blocks"]]
    assert got == pytest.approx(brute, rel=1e-5)
    assert f.evidence["ratio_last_over_first"] == pytest.approx(brute[-1] / brute[0], rel=1e-5)
    assert f.evidence["first_block"] == "1.layers.0" and f.evidence["last_block"] == "1.layers.3"


# --- thresholds: post-ln-gradient ratio 10, warmup → info -----------------------------------------------
def _post_ln_run(path, ratio, placement="post", lrs=None, last_type="LayerNorm", weight="weight", wn=False):
    mods = {}
    for i in range(3):
        lin, ln = {"type": "Linear", "params": 10}, {"type": last_type, "role": "norm"}
        if wn:
            lin = dict(lin, weight_norm=[{"tensor": "weight", "api": "parametrizations", "dim": 0,
                                          "g": "weight_original0", "v": "weight_original1"}])  # fmt: skip
        mods |= {f"s.{i}.ln": ln, f"s.{i}.fc": lin} if placement == "pre" else {f"s.{i}.fc": lin, f"s.{i}.ln": ln}
    r = SyntheticRun(path, mods)
    for step in range(6):
        lr = lrs[step] if lrs else 1e-3
        for i in range(3):
            g = 1.0 if i == 0 else ratio if i == 2 else 3.0
            if step >= 3:
                g = 1.0  # after the first steps: balanced; only the first steps count
            r.param(step, f"s.{i}.fc.{weight}", norm=4.0, grad_norm=g, update_norm=1e-3, lr=lr)
            r.param(step, f"s.{i}.ln.weight", norm=4.0, grad_norm=100.0, update_norm=1e-3, lr=lr)  # norms: left out
    return r.done()


@pytest.mark.parametrize("ratio,want", [(9.9, []), (10.1, ["warning"])])
def test_post_ln_threshold(tmp_path, ratio, want):
    _, got = _findings(_post_ln_run(tmp_path / "r", ratio), "post-ln-gradient")
    assert [f.severity for f in got] == want
    if got:
        assert got[0].layer == "s.2" and got[0].evidence["ratio_last_over_first"] == pytest.approx(ratio)
        assert "does not warm up" in got[0].message and "10.1 ×" in got[0].message


def test_post_ln_with_warmup_is_info(tmp_path):
    lrs = [1e-4, 4e-4, 7e-4, 1e-3, 1e-3, 1e-3]
    _, (f,) = _findings(_post_ln_run(tmp_path / "r", 20.0, lrs=lrs), "post-ln-gradient")
    assert f.severity == "info" and f.evidence["warmup"] == {"start_lr": 1e-4, "peak_lr": 1e-3, "peak_step": 3}
    assert "warms up" in f.message and "handles this risk" in f.message
    # a decaying schedule is no warmup; warmup_start decides what counts as one
    _, (g,) = _findings(_post_ln_run(tmp_path / "d", 20.0, lrs=lrs[::-1]), "post-ln-gradient")
    assert g.severity == "warning" and g.evidence["warmup"] is None
    _, (h,) = _findings(_post_ln_run(tmp_path / "s", 20.0, lrs=lrs), "post-ln-gradient", warmup_start=0.05)
    assert h.severity == "warning"


def test_post_ln_first_steps_setting(tmp_path):
    # the ratio is 20 at steps 0-2 and 1 afterwards: median over the first 6 steps is (20 + 1) / 2
    _, (f,) = _findings(_post_ln_run(tmp_path / "r", 20.0), "post-ln-gradient", first_steps=6)
    assert f.evidence["ratio_last_over_first"] == pytest.approx(10.5) and f.evidence["steps"] == list(range(6))


@pytest.mark.parametrize("placement,last_type,reason", [
    ("pre", "LayerNorm", "no stack of two or more post-LayerNorm blocks (block norm placements: pre)"),
    ("post", "BatchNorm1d", "no stack of two or more post-LayerNorm blocks"),
])  # fmt: skip
def test_post_ln_skips(tmp_path, placement, last_type, reason):
    a, got = _findings(_post_ln_run(tmp_path / "r", 50.0, placement=placement, last_type=last_type),
                       "post-ln-gradient")  # fmt: skip
    assert got == [] and _skip(a, "post-ln-gradient").startswith(reason)


# --- thresholds: weight-norm-init, output std outside [0.1, 10] -------------------------------------------
WN = [{"tensor": "weight", "api": "parametrizations", "dim": 0, "g": "weight_original0", "v": "weight_original1"}]


def _wn_run(path, std, mods=None):
    mods = mods or {"0": {"type": "Linear", "params": 10, "weight_norm": WN}, "1": {"type": "ReLU"}}
    r = SyntheticRun(path, mods)
    for step in range(4):
        r.stat(step, "0", std=std * (1 + step))
        r.stat(step, "1")
        if "weight_norm" in mods["0"]:
            r.param(step, "0.weight_original0", norm=2.0, grad_norm=0.1, update_norm=0.002, lr=0.1)
            r.param(step, "0.weight_original1", norm=2.0 + step, grad_norm=0.1, update_norm=0.01, lr=0.1)
        else:
            r.param(step, "0.weight", norm=2.0, grad_norm=0.1, update_norm=0.01, lr=0.1)
    return r.done()


@pytest.mark.parametrize("std,want", [(0.099, "warning"), (0.101, "info"), (9.9, "info"), (10.1, "warning")])
def test_weight_norm_init_threshold(tmp_path, std, want):
    _, (f,) = _findings(_wn_run(tmp_path / "r", std), "weight-norm-init")
    assert f.severity == want and f.layer == "0"
    (p,) = f.evidence["layers"]
    assert p["std_first"] == pytest.approx(std) and p["std_drift"] == pytest.approx(4.0)
    assert p["g_rel_update_median"] == pytest.approx(0.001)  # ‖Δg‖/‖g‖ = 0.002 / 2
    assert p["v_effective_lr"] == pytest.approx([0.1 / (2.0 + s) ** 2 for s in range(4)])  # η/‖v‖²
    assert "0.001" in f.message and "0.025 → 0.004" in f.message
    if want == "warning":
        assert "weight_norm_data_init" in f.recommendation


def test_weight_norm_init_skips(tmp_path):
    a, got = _findings(_wn_run(tmp_path / "r", 0.01, mods={"0": {"type": "Linear"}, "1": {"type": "ReLU"}}),
                       "weight-norm-init")  # fmt: skip
    assert got == [] and _skip(a, "weight-norm-init").startswith("no weight-normalised layer")


# --- the data-dependent init helper -----------------------------------------------------------------------
def test_weight_norm_data_init_standardises_every_layer():
    torch.manual_seed(0)
    net = nn.Sequential(weight_norm(nn.Linear(8, 16)), nn.Tanh(), _legacy(nn.Linear(16, 16)), nn.ReLU(),
                        weight_norm(nn.Linear(16, 4), dim=None))  # fmt: skip
    x = torch.randn(256, 8) * 5 + 2
    out = normscope.weight_norm_data_init(net, x)
    assert list(out) == ["0", "2", "4"] and out["0"]["std_before"] > 2
    with torch.no_grad():
        h0 = net[0](x)
        h2 = net[2](net[1](h0))
        h4 = net[4](net[3](h2))
    for h in (h0, h2):  # per unit: mean 0, std 1 (Salimans & Kingma: g = 1/σ, b = −μ/σ)
        assert h.mean(0).abs().max() < 1e-5 and (h.std(0) - 1).abs().max() < 1e-4
    assert float(h4.std()) == pytest.approx(1.0, abs=1e-4) and abs(float(h4.mean())) < 1e-5  # one g for the tensor
    assert out["4"]["std_after"] == pytest.approx(float(h4.std()), rel=1e-4)
    assert net.training  # the mode is restored


def test_weight_norm_data_init_errors():
    with pytest.raises(NormscopeError, match="found no weight-normalised layer") as e:
        normscope.weight_norm_data_init(nn.Sequential(nn.Linear(2, 2)), torch.randn(4, 2))
    assert "\n" not in str(e.value)
    with pytest.raises(NormscopeError, match="needs a torch.nn.Module"):
        normscope.weight_norm_data_init("model", torch.randn(4, 2))
    with pytest.raises(NormscopeError, match="dim=1"):
        normscope.weight_norm_data_init(weight_norm(nn.Linear(2, 3), dim=1), torch.randn(4, 2))


def test_fixture_numbers(fixture_runs):
    """The fixtures' measurements (quoted in the doc pages): the ratio on post-LN, the std on weight norm."""
    _, _, a = fixture_runs.get("post_ln_transformer")
    (f,) = [f for f in a.findings if f.check == "post-ln-gradient"]
    assert f.evidence["stack"] == "tr.decoder.layers" and f.evidence["ratio_last_over_first"] > 15
    assert len(f.evidence["blocks"]) == 8 and f.evidence["warmup"] is None
    _, _, b = fixture_runs.get("weight_norm_no_data_init")
    (g,) = [f for f in b.findings if f.check == "weight-norm-init"]
    first = {p["layer"]: p["std_first"] for p in g.evidence["layers"]}
    assert first["10"] < 0.05 and all(first[k] < 0.1 for k in ("4", "6", "8", "10")) and first["0"] > 0.1
    _, _, c = fixture_runs.get("healthy_weight_norm_data_init")
    (h,) = [f for f in c.findings if f.check == "weight-norm-init"]
    assert h.severity == "info" and all(abs(p["std_first"] - 1) < 0.05 for p in h.evidence["layers"])
    assert np.isfinite([p["g_rel_update_median"] for p in h.evidence["layers"]]).all()


def test_report_shows_the_panels(fixture_runs, tmp_path):
    from normscope_reports import build_report

    for name, check, n in (("post_ln_transformer", "post-ln-gradient", 2), ("weight_norm_no_data_init",
                                                                          "weight-norm-init", 3)):  # fmt: skip
        _, run, a = fixture_runs.get(name)
        html = build_report(run, findings=a.findings, skipped=a.skipped, out=tmp_path / f"{name}.html").read_text()
        assert html.count(f'id="panel-{check}"') == n, name
        assert "panel:" not in html  # no panel module failed ("Not shown: <name> panel: ...")
    _, run, a = fixture_runs.get("healthy_pre_ln_transformer")  # pre-LN: nothing to show
    html = build_report(run, findings=a.findings, skipped=a.skipped, out=tmp_path / "pre.html").read_text()
    assert 'id="panel-post-ln-gradient"' not in html


def test_pre_ln_fixture_gradient_stays_even(fixture_runs):
    """The healthy pre-LN counterpart: the same last/first block ratio the check reads stays below 1."""
    from normscope.analyze.checks.post_ln_gradient import block_grad_norms

    _, run, a = fixture_runs.get("healthy_pre_ln_transformer")
    ctx = Context(run)
    blocks = roles.block_stacks(ctx.norm_placement, "pre")["tr.decoder.layers"]
    g, _ = block_grad_norms(ctx, blocks, sorted(int(s) for s in ctx.params.step.unique())[:3])
    assert len(blocks) == 8 and float(np.median(g[-1] / g[0])) < 1
    assert "post-ln-gradient" in {s.check for s in a.skipped}


def test_bug_vanishing_gradients_on_weight_normalised_layers(tmp_path):
    """vanishing-gradients failed with an IndexError on a model whose only matrices are weight-normalised
    (no parameter named *weight): it now reads v as the layer's weight, and skips without two weights."""
    mods = {str(i): {"type": "Linear", "params": 10, "weight_norm": WN} for i in range(3)}
    r = SyntheticRun(tmp_path / "a", mods)
    for step in range(4):
        for i in range(3):
            r.param(step, f"{i}.weight_original1", norm=2.0, grad_norm=1e-2 * (1e-4 if i == 0 else 1.0),
                    update_norm=1e-3)  # fmt: skip
            r.param(step, f"{i}.weight_original0", norm=2.0, grad_norm=1.0, update_norm=1e-3)
    a, got = _findings(r.done(), "vanishing-gradients")
    assert [f.severity for f in got] == ["warning"] and got[0].evidence["first_layer"] == "0"
    r = SyntheticRun(tmp_path / "b", {"0": {"type": "Linear", "params": 2}})
    r.param(0, "0.bias", 1.0, 0.1, 0.01)
    a, got = _findings(r.done(), "vanishing-gradients")
    assert got == [] and _skip(a, "vanishing-gradients").startswith("fewer than two conv/linear weights")


def test_post_ln_weight_normalised_blocks_and_no_silent_pass(tmp_path):
    """Regression: weight-normalised weights (v) were left out, and the check 'ran' with no finding
    and no reason when no stack could be judged."""
    _, (f,) = _findings(_post_ln_run(tmp_path / "a", 20.0, weight="weight_original1", wn=True), "post-ln-gradient")
    assert f.severity == "warning" and f.evidence["ratio_last_over_first"] == pytest.approx(20.0)
    a, got = _findings(_post_ln_run(tmp_path / "b", 20.0, weight="weight_original1"), "post-ln-gradient")
    assert got == [] and "no post-LN stack has weight gradients" in _skip(a, "post-ln-gradient")
