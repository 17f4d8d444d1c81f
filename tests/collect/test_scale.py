"""Scale: reductions whose size does not grow with the world, FSDP2, DDP no_sync, the knobs that bound
the pack, and the sizing function behind docs/scale.md (gloo CPU processes via scale_worker.py)."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from ranks import launch_ranks
from torch import nn

import normscope
from normscope import load
from normscope.collect import distributed as D
from normscope.collect import packs as P
from normscope.collect import reducers as R
from normscope.collect import scope as S
from normscope.errors import NormscopeError

WORKER = Path(__file__).with_name("scale_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def launch(modes: str, base: Path, world: int, timeout: int = 240) -> dict[str, list[dict]]:
    """Run ``world`` ranks of the worker over ``modes``; {mode: JSON outputs in rank order}. Rank 0
    writes the run of each mode to base/<mode>."""
    base.mkdir(parents=True, exist_ok=True)
    res = launch_ranks(WORKER, lambda r, port: [modes, str(base), str(r), str(world), port, str(base)], world,
                       timeout, modes)  # fmt: skip
    assert all(c == 0 for c, _, _ in res), res
    return {m: [json.loads((base / f"{m}-{r}.json").read_text()) for r in range(world)] for m in modes.split(",")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three process groups: 1 rank (the baselines), 2 ranks (DDP, FSDP2, DDP no_sync), 4 ranks (DDP)."""
    base = tmp_path_factory.mktemp("scale")
    out = {1: launch("bytes,fsdp,nosync", base / "w1", 1), 2: launch("bytes,fsdp,nosync,poison", base / "w2", 2)}
    out[4] = launch("bytes", base / "w4", 4)
    return base, out


def _sorted(df, keys):
    return df.sort_values(keys).reset_index(drop=True)


def assert_stats_equal(sa, sb):
    for col in ("count", "samples", "nan_count", "hist_count"):
        np.testing.assert_array_equal(sa[col], sb[col], err_msg=col)
    for col in ("mean", "std", "min", "max", "mean_abs", "frac_zero", "frac_nonpos", "frac_sat"):
        np.testing.assert_allclose(sa[col], sb[col], rtol=1e-5, atol=1e-6, err_msg=col)
    for i in range(len(sa)):
        np.testing.assert_allclose(sa.ch_mean[i], sb.ch_mean[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(sa.ch_var[i], sb.ch_var[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(sa.active[i], sb.active[i])
        np.testing.assert_array_equal(sa["hist"][i], sb["hist"][i])


# --- reductions: bytes per rank at 2 and 4 ranks ---------------------------------------------------
def test_collective_bytes_per_rank_do_not_grow_with_the_world(runs):
    base, outs = runs
    per_world = {}
    for w in (2, 4):
        steps = [o["steps"] for o in outs[w]["bytes"]]
        assert all(s == steps[0] for s in steps), steps  # every rank hands the same bytes
        sampled = steps[0][:3]  # three sampled steps; the last entry is close()'s empty check
        assert all(calls == 3 for _, calls in sampled), sampled  # check + SUM + MAX
        assert steps[0][3] == [32, 1]  # close(): the signature check alone
        per_world[w] = [b for b, _ in sampled]
    b2, b4 = np.array(per_world[2]), np.array(per_world[4])
    np.testing.assert_allclose(b4, b2, rtol=0.10)  # the bound; the sizes are in fact identical
    assert (b2 == b4).all()
    # the sizing function of docs/scale.md predicts the measured bytes from the recorded entries
    run = load(base / "w2" / "bytes")
    s0, g0 = run.stats[run.stats.step == 0], run.grads[run.grads.step == 0]
    entries = [("act", len(r.ch_mean), len(r.hist)) for r in s0.itertuples()] + [("grad", 1, 0)] * len(g0)
    assert D.step_bytes(entries) == b2[0]


def test_four_ranks_merge_like_one_process_over_the_full_batch(runs):
    base, _ = runs
    a, b = load(base / "w4" / "bytes"), load(base / "w1" / "bytes")
    assert a.meta["distributed"]["world_size"] == 4
    # the first conv's output does not depend on how BN splits the batch; only step 0 (BN statistics
    # per rank change the gradients afterwards)
    sa = _sorted(a.stats[(a.stats.step == 0) & (a.stats.layer == "0")], ["call"])
    sb = _sorted(b.stats[(b.stats.step == 0) & (b.stats.layer == "0")], ["call"])
    assert len(sa) == 1 and int(sa.forwards[0]) == 4 and int(sb.forwards[0]) == 1
    assert_stats_equal(sa, sb)


def test_a_rank_that_cannot_prepare_its_step_still_enters_the_check(runs):
    """Rank 1's step-1 preparation raises: it enters the signature check with an impossible signature,
    every rank skips the reductions of that step (no hang), rank 0 keeps its own statistics for it."""
    base, outs = runs
    e0, e1 = (o["errors"] for o in outs[2]["poison"])
    assert any("could not prepare its step on purpose" in e for e in e1)
    assert any("ranks recorded different layers" in e for e in e0)
    st = load(base / "w2" / "poison").stats
    assert sorted(set(st.step)) == [0, 1, 2]
    assert dict(st.groupby("step").forwards.max()) == {0: 2, 1: 1, 2: 2}  # step 1: rank 0's own forward


def test_shard_weights_undo_replication_and_refuse_what_cannot_add_up():
    from torch.distributed.tensor import Partial, Replicate, Shard

    from normscope.collect.params import shard_weight

    class Mesh:  # the two DeviceMesh methods shard_weight reads
        def __init__(self, *shape):
            self.shape = shape

        def size(self, dim=None):
            return int(np.prod(self.shape)) if dim is None else self.shape[dim]

    class Fake:
        def __init__(self, mesh, placements):
            self.device_mesh, self.placements = mesh, placements

    assert shard_weight(Fake(Mesh(4), (Shard(0),)), 4) == 1.0  # FSDP2: shards add up
    assert shard_weight(Fake(Mesh(2, 2), (Replicate(), Shard(0))), 4) == 0.5  # HSDP: two copies of each shard
    assert shard_weight(Fake(Mesh(4), (Replicate(),)), 4) == 0.25
    assert np.isnan(shard_weight(Fake(Mesh(4), (Partial(),)), 4))  # partial sums: squares do not add
    assert np.isnan(shard_weight(Fake(Mesh(2), (Shard(0),)), 4))  # a mesh of 2 of 4 ranks


# --- FSDP2 --------------------------------------------------------------------------------------
def test_fsdp2_parameter_norms_are_the_full_parameters(runs):
    base, outs = runs
    assert outs[2]["fsdp"][0]["types"] == ["FSDPLinear", "ReLU", "FSDPLinear", "Tanh", "FSDPLinear"]  # really sharded
    a, b = load(base / "w2" / "fsdp"), load(base / "w1" / "fsdp")
    assert a.meta["hook_errors"] == [] and a.meta["optimizer_steps"] == 3  # FSDP's optimizer drives the steps
    pa, pb = _sorted(a.params, ["step", "param"]), _sorted(b.params, ["step", "param"])
    assert len(pa) == len(pb) == 3 * 6 and list(pa.param) == list(pb.param)
    assert sorted(set(pa.step)) == [0, 1, 2]
    np.testing.assert_array_equal(pa.numel, pb.numel)
    for col in ("norm", "grad_norm", "update_norm"):
        np.testing.assert_allclose(pa[col], pb[col], rtol=1e-5, err_msg=col)
    # 4.weight (3 × 17) is split 2 + 1 rows: a shard's norm would be visibly smaller
    w = pa[(pa.param == "4.weight")].norm.to_numpy()
    assert np.isfinite(w).all() and (w > 0).all()


def test_fsdp2_statistics_and_names_equal_one_process_over_the_batch(runs):
    base, _ = runs
    a, b = load(base / "w2" / "fsdp"), load(base / "w1" / "fsdp")
    types = {m["name"]: m["type"] for m in a.meta["modules"]}
    assert types == {m["name"]: m["type"] for m in b.meta["modules"]}  # Linear, not FSDPLinear
    assert a.meta["model"]["class"] == "Sequential"
    sa, sb = _sorted(a.stats, ["step", "layer", "call"]), _sorted(b.stats, ["step", "layer", "call"])
    assert len(sa) == len(sb) == 3 * 5 and list(sa.layer) == list(sb.layer)
    assert set(sa.module_type) == {"Linear", "ReLU", "Tanh"}
    first_a, first_b = _sorted(sa[sa.layer == "0"], ["step"]), _sorted(sb[sb.layer == "0"], ["step"])
    assert (first_a.forwards == 2).all()
    assert_stats_equal(first_a, first_b)
    assert_stats_equal(sa, sb)  # every layer: no BN, so the sharded run computes the same forward
    ga, gb = _sorted(a.grads, ["step", "layer"]), _sorted(b.grads, ["step", "layer"])
    np.testing.assert_allclose(ga.norm, 2 * gb.norm, rtol=1e-4)  # per-rank mean loss over half the batch


def test_recalibrate_bn_under_fsdp2(runs):
    _, outs = runs
    single = outs[1]["fsdp"]
    for o in outs[2]["fsdp"]:
        assert o["bns"] == ["1", "4"]
        for i in ("1", "4"):
            for got, want in zip(o["running"][i], single[0]["running"][i]):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# --- DDP with no_sync gradient accumulation ---------------------------------------------------------
def test_ddp_no_sync_accumulation_merges_every_micro_batch(runs):
    base, outs = runs
    single = outs[1]["nosync"]
    # step 0: the LayerNorm's input (means ~1e4 std) takes the exact second pass about the global mean
    assert [c for _, c in outs[2]["nosync"][0]["steps"][:3]] == [4, 3, 3]
    a, b = load(base / "w2" / "nosync"), load(base / "w1" / "nosync")
    sa, sb = (
        _sorted(a.stats, ["step", "layer", "call", "output"]),
        _sorted(b.stats, ["step", "layer", "call", "output"]),
    )
    assert len(sa) == len(sb) == 3 * 5
    assert (sa.forwards == 4).all() and (sb.forwards == 1).all()  # 2 micro-batches × 2 ranks
    is_in = ((sa.layer == "0") & (sa.output == "input")).to_numpy()
    assert_stats_equal(sa[~is_in].reset_index(drop=True), sb[~is_in].reset_index(drop=True))
    # the LayerNorm's input (mean / std ≈ 1.5e4), against float64 brute force, within what float32
    # packs of such values hold (the reducers work in float32: d = x − mean keeps ~4 digits here);
    # the single-process run is no better a reference, its float32 sums over 16 rows drift as much
    ln_in = _sorted(sa[is_in], ["step"])
    for r, x in zip(ln_in.itertuples(), single[0]["inputs"]):
        x = np.asarray(x, dtype=np.float64)
        assert r.mean == pytest.approx(x.mean(), rel=1e-7) and r.mean > 2.9e4
        assert r.std == pytest.approx(x.std(), rel=2e-4)
        assert r.min == x.min() and r.max == x.max()
        np.testing.assert_allclose(r.ch_mean, x.mean(0), rtol=1e-7)
        np.testing.assert_allclose(r.ch_var, x.var(0), rtol=3e-3)
    # the loss is divided by the accumulation steps: parameters follow the full-batch run
    pa, pb = _sorted(a.params, ["step", "param"]), _sorted(b.params, ["step", "param"])
    for col in ("norm", "grad_norm", "update_norm"):
        np.testing.assert_allclose(pa[col], pb[col], rtol=1e-4, err_msg=col)
    ga, gb = _sorted(a.grads, ["step", "layer"]), _sorted(b.grads, ["step", "layer"])
    np.testing.assert_allclose(ga.norm, 2 * gb.norm, rtol=1e-4)  # (1/2)·mean over 4 vs mean over 16


# --- the reduction math, in one process ------------------------------------------------------------
@pytest.mark.parametrize("shift", [None, "near", "far"])
def test_sum_and_max_buffers_rebuild_the_merge_of_every_pack(shift):
    """Two "ranks" of two micro-batches each: adding SUM parts and taking the max of MAX parts
    gives what merging the four packs one by one (Chan) gives, whatever the shared shift."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 5, 3, generator=g) * 0.5 + 40 for n in (4, 6, 3, 7)]
    xs[1][0, 2, 0] = float("nan")  # a masked pack among fast ones
    hist = R.HistSpec("symlog")
    packs = []
    for x in xs:
        lay = R.act_layout(x, 1, hist)
        pk, fast = R.reduce_act(x, lay, hist, None, 0, R.Scratch())
        packs.append((P.expand(pk, lay, fast), lay))
    k = {None: None, "near": torch.full((5,), 40.0, dtype=torch.float64), "far": torch.full((5,), -50.0, dtype=torch.float64)}[shift]  # fmt: skip
    sums, exts = [], []
    for rank in (0, 1):
        st = torch.stack([p for p, _ in packs[2 * rank : 2 * rank + 2]])
        sums.append(P.sum_part(st, packs[0][1], k))
        exts.append(P.ext_part(st, packs[0][1]))
    lay = packs[0][1]
    got = P.from_reduced(
        (sums[0] + sums[1]).numpy(), torch.maximum(exts[0], exts[1]).numpy(), lay, None if k is None else k.numpy()
    )
    want = P.split(packs[0][0].numpy(), packs[0][1])
    for p, la in packs[1:]:
        want = P.combine(want, P.split(p.numpy(), la))
    for f in P.ACT_FIELDS:
        np.testing.assert_allclose(got[f.name], want[f.name], rtol=1e-9, atol=1e-9, err_msg=f.name)
    # the second pass: the chan fields again, about the merged mean M, where m2 = Σ(x−M)² exactly
    m = torch.from_numpy(P.global_mean(got))
    again = sum(P.chan_part(torch.stack([p for p, _ in packs[2 * r : 2 * r + 2]]), lay, m) for r in (0, 1))
    np.testing.assert_allclose(again.numpy(), want["m2"], rtol=1e-12)
    m2, ratio = P.m2_about_mean(again.numpy(), got, m.numpy())
    np.testing.assert_allclose(m2, want["m2"], rtol=1e-12)
    assert (ratio < 1e-20).all()
    both = torch.cat(xs).double()
    fin = torch.isfinite(both)
    assert got["n_nan"] == 1 and got["min"] == float(both[fin].min()) and got["max"] == float(both[fin].max())
    assert P.sum_width(lay) + P.ext_width(lay) == lay.size  # every field travels once


# --- knobs: max_channels, grad_every ---------------------------------------------------------------
def test_max_channels_turns_per_channel_statistics_off_above_the_limit(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 6))
    x = torch.randn(32, 8) * 3
    with normscope.watch(model, tmp_path / "r", every=1, max_channels=16, hist_max=0) as sc:
        out = model(x)
        sc.step()
    h = model[0](x).detach().double()
    run = load(tmp_path / "r")
    assert run.meta["options"]["max_channels"] == 16
    rows = {r.layer: r for r in run.stats.itertuples()}
    for layer, t in (("0", h), ("1", torch.relu(h)), ("2", out.detach().double())):
        r = rows[layer]
        assert r.count == t.numel() and r.samples == 32
        assert r.mean == pytest.approx(float(t.mean()), rel=1e-6, abs=1e-9)
        assert r.std == pytest.approx(float(t.std(unbiased=False)), rel=1e-5)
        assert r.min == pytest.approx(float(t.min()), rel=1e-6) and r.max == pytest.approx(float(t.max()), rel=1e-6)
        assert r.frac_zero == pytest.approx(float((t == 0).double().mean()))
        assert int(np.sum(r.hist)) == t.numel()
        if layer == "2":  # 6 channels ≤ 16: per channel as before
            np.testing.assert_allclose(r.ch_mean, t.mean(0).numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(r.ch_var, t.var(0, unbiased=False).numpy(), rtol=1e-4)
            np.testing.assert_array_equal(r.active, (t > 0).sum(0).numpy())
        else:  # 40 channels > 16: none
            assert len(r.ch_mean) == len(r.ch_var) == len(r.active) == 0
    normscope.analyze(run)  # the checks read a run without per-channel lists


def test_grad_every_records_gradients_every_kth_sampled_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with normscope.watch(model, tmp_path / "r", every=2, grad_every=2, optimizer=opt):
        for _ in range(10):
            model(torch.randn(5, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    run = load(tmp_path / "r")
    assert sorted(set(run.stats.step)) == [0, 2, 4, 6, 8]
    assert sorted(set(run.grads.step)) == [0, 4, 8]  # sampled steps 0, 2, 4 of 0..4
    assert sorted(set(run.params.step)) == [0, 2, 4, 6, 8] and np.isfinite(run.params.grad_norm).all()


@pytest.mark.parametrize("opt", [{"max_channels": 0}, {"max_channels": 2.5}, {"grad_every": 0}, {"grad_every": True}])
def test_bad_knob_values_are_one_line_errors(opt):
    with pytest.raises(NormscopeError) as e:
        normscope.watch(nn.Linear(2, 2), "unused", **opt)
    assert "\n" not in str(e.value) and next(iter(opt)) in str(e.value)


# --- the sizing of docs/scale.md against a real Llama -------------------------------------------
def _pack_sizes():
    spec = importlib.util.spec_from_file_location("pack_sizes", ROOT / "benchmarks" / "pack_sizes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("max_channels", [None, 40])
def test_llama_entries_and_step_bytes_match_a_real_llama(tmp_path, monkeypatch, max_channels):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    inner = S.Scope._finish_step_inner

    def capture(self, params, skipped=False):
        if self._pending:
            red = D.StepReduction.build(self._pending, None, {}, torch.device("cpu"))
            seen.append((red.size, [(g.kind, g.layout) for g in red.groups]))
        return inner(self, params, skipped)

    monkeypatch.setattr(S.Scope, "_finish_step_inner", capture)
    ids = torch.randint(0, 96, (2, 10))
    with normscope.watch(model, tmp_path / "r", every=1, optimizer=opt, max_channels=max_channels):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    size, groups = seen[0]
    mod = _pack_sizes()
    want = mod.llama_entries(layers=2, hidden=32, mlp=88, vocab=96)
    got = [("grad", 1, 0) if k == "grad" else ("act", lay.channels, lay.hist_bins) for k, lay in groups]
    if max_channels is None:
        assert Counter(got) == Counter(want)
    else:  # the MLP (88) and LM-head (96) outputs are reduced as one channel, the 32-wide ones are not
        collapsed = [lay for k, lay in groups if k == "act" and not lay.per_channel]
        assert len(collapsed) == sum(1 for k, c, _ in want if k == "act" and c > max_channels) == 2 * 3 + 1
    assert len(groups) == len(want)
    assert 8 * (size + 4) == D.step_bytes(want, 0, max_channels=max_channels)  # + the 4-value check
    assert mod.llama_params(2) == sum(1 for _ in model.parameters())
