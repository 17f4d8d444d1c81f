"""The transformer probes (normscope/collect/attention.py) against brute force, on the zoo.

Attention logits: the reference is each model's own pre-softmax logits, q·kᵀ·scaling as its eager
attention function receives them (after rotary embeddings, QK-norm and the head split; key heads
repeated for GQA), max |·| over the pairs the model's mask leaves visible, on the first two
sequences (the probe's subsample is every position when L ≤ 64). Output log Z: torch.logsumexp
over every row. Massive activations: torch.median over every element of the block output.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import normscope
from normscope.collect import attention as A
from normscope.roles import attention_modules, transformer_blocks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "zoo"))
import zoo_models as Z  # noqa: E402

MODELING = {"vit": "vit", "swin": "swin", "bert": "bert", "gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2",
            "t5": "t5"}  # fmt: skip
EXPECT = {  # zoo model → (attention modules, q child, k child, heads, kv heads, scale, causal modules, blocks)
    "vit": (2, "q_proj", "k_proj", 2, 2, 0.25, 0, 2),
    "swin": (2, "q_proj", "k_proj", 2, 2, None, 0, 2),
    "bert": (2, "query", "key", 2, 2, 0.25, 0, 2),
    "gpt2": (2, "c_attn", "c_attn", 2, 2, 0.25, 2, 2),
    "llama": (2, "q_proj", "k_proj", 2, 1, 0.25, 2, 2),
    "qwen2": (2, "q_proj", "k_proj", 2, 1, 0.25, 2, 2),
    "t5": (6, "q", "k", 2, 2, 1.0, 2, 4),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(n)


@pytest.mark.parametrize("name", [z.name for z in Z.ZOO])
def test_recognition_finds_the_q_and_k_of_every_zoo_model(name):
    m = Z.build(Z.BY_NAME[name])
    specs = attention_modules(m)
    if name not in EXPECT:
        assert specs == {} and transformer_blocks(m, specs) == []
        return
    n, qn, kn, h, kvh, scale, causal, nblocks = EXPECT[name]
    assert len(specs) == n
    for raw, s in specs.items():
        mod = m.get_submodule(raw)
        assert s.q[0] == qn and s.k[0] == kn and s.heads == h and s.kv_heads == kvh
        q_out = getattr(mod, qn)
        width = q_out.nf if hasattr(q_out, "nf") else q_out.out_features
        if qn == kn:  # fused: q, k, v side by side
            assert (s.q[1], s.q[2], s.k[1], s.k[2]) == (0, width // 3, width // 3, 2 * width // 3)
        assert s.scale == pytest.approx(scale if scale is not None else s.head_dim**-0.5)
    assert sum(s.causal for s in specs.values()) == causal
    blocks = transformer_blocks(m, specs)
    assert len(blocks) == nblocks and all(Z.submodule(m, b) is not None for b in blocks)


def _record_eager(model, name, store):
    """Patch the model's eager attention function to record its logits (max over visible pairs)."""
    mod = importlib.import_module(f"transformers.models.{MODELING[name]}.modeling_{MODELING[name]}")
    orig = mod.eager_attention_forward
    names = {id(m): n for n, m in model.named_modules()}

    def rec(module, query, key, value, attention_mask, scaling=None, *a, **kw):
        s = scaling if scaling is not None else query.size(-1) ** -0.5
        k = key
        if k.shape[1] != query.shape[1]:
            k = k.repeat_interleave(query.shape[1] // k.shape[1], dim=1)
        logits = (query[:2].float() @ k[:2].float().transpose(-1, -2)).abs() * s
        if attention_mask is not None:
            visible = attention_mask[: logits.shape[0]].float() > -1e4
            logits = torch.where(visible.expand_as(logits), logits, torch.zeros(()))
        store.setdefault(names[id(module)], []).append(float(logits.max()))
        return orig(module, query, key, value, attention_mask, scaling, *a, **kw)

    model.config._attn_implementation = "eager"
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "eager"
    return mod, orig, rec


@pytest.mark.parametrize("name", list(MODELING))
def test_attention_logit_max_matches_the_models_own_logits(tmp_path, name):
    z = Z.BY_NAME[name]
    m = Z.build(z)
    ref: dict[str, list[float]] = {}
    mod, orig, rec = _record_eager(m, name, ref)
    mod.eager_attention_forward = rec
    try:
        with normscope.watch(m, tmp_path / "r", every=1):
            Z.train(m, z, steps=1)
    finally:
        mod.eager_attention_forward = orig
    run = normscope.load(tmp_path / "r")
    got = run.signal("attn_logit_max")
    assert len(got) == len(ref) and len(ref) == EXPECT[name][0]
    for _, r in got.iterrows():
        assert r.value == pytest.approx(ref[r.layer][0], rel=1e-5), r.layer
    rot = run.signal("attn_rotary")
    assert set(rot.value) == ({1.0} if name in ("llama", "qwen2") else {0.0})
    bound = run.signal("attn_logit_bound").set_index("layer").value
    assert all(bound[r.layer] >= r.value * (1 - 1e-6) for _, r in got.iterrows())  # Cauchy–Schwarz


def test_rotary_changes_the_logit_the_probe_reports(tmp_path):
    """Llama: the probe applies the model's rotary embedding (the eager test above shows the result
    is the model's own logit); off the diagonal the pre-rotary q·k of the same projections is a
    different number (docs/checks/attention-logit-growth.md quotes the gap after healthy training:
    at initialisation the maximum sits on the diagonal, which rotary leaves unchanged)."""
    z = Z.BY_NAME["llama"]
    m = Z.build(z)
    specs = attention_modules(m)
    cap: dict[str, dict] = {}
    hs = []
    for raw in specs:
        mod = m.get_submodule(raw)
        hs.append(
            mod.register_forward_pre_hook(
                lambda md, a, kw, raw=raw: cap.setdefault(raw, {}).update(pe=kw["position_embeddings"]),
                with_kwargs=True,
            )
        )
        hs.append(mod.q_proj.register_forward_hook(lambda md, a, o, raw=raw: cap[raw].update(q=o.detach())))
        hs.append(mod.k_proj.register_forward_hook(lambda md, a, o, raw=raw: cap[raw].update(k=o.detach())))  # fmt: skip
    with normscope.watch(m, tmp_path / "r", every=1):
        Z.train(m, z, steps=1)
    for h in hs:
        h.remove()
    got = normscope.load(tmp_path / "r").signal("attn_logit_max").set_index("layer").value
    for raw, c in cap.items():
        pos = torch.arange(c["q"].shape[1])
        rot = tuple(t[:2].detach() for t in c["pe"])
        with_rot = float(A.head_logits(c["q"][:2], c["k"][:2], specs[raw], pos, pos, True, rot)[:-1].max())
        assert got[raw] == pytest.approx(with_rot, rel=1e-6)
        # off the diagonal (offset 0 is not rotated) the pre-rotary maximum is another number
        off = torch.eye(len(pos), dtype=torch.bool).unsqueeze(0)
        a = float(A.head_logits(c["q"][:2], c["k"][:2], specs[raw], pos, pos, True, rot, off)[:-1].max())
        b = float(A.head_logits(c["q"][:2], c["k"][:2], specs[raw], pos, pos, True, None, off)[:-1].max())
        assert abs(b / a - 1) > 1e-3


class MHAModel(nn.Module):
    def __init__(self, batch_first: bool, kdim: int | None = None, causal: bool = False):
        super().__init__()
        self.bf, self.causal = batch_first, causal
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.kin = nn.Linear(16, kdim) if kdim else nn.Identity()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        k = self.kin(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if self.causal else None
        if not self.bf:
            x, k = x.transpose(0, 1), k.transpose(0, 1)
        y = self.attn(x, k, k, attn_mask=mask, need_weights=False)[0]
        y = y if self.bf else y.transpose(0, 1)
        return self.head(y)


def _mha_reference(model: MHAModel, x: torch.Tensor) -> float:
    a = model.attn
    e, h = a.embed_dim, a.num_heads
    k_in = model.kin(x)[:2]
    if a._qkv_same_embed_dim:
        wq, wk = a.in_proj_weight[:e], a.in_proj_weight[e : 2 * e]
    else:
        wq, wk = a.q_proj_weight, a.k_proj_weight
    q = nn.functional.linear(x[:2], wq, a.in_proj_bias[:e]).view(2, -1, h, e // h).transpose(1, 2)
    k = nn.functional.linear(k_in, wk, a.in_proj_bias[e : 2 * e]).view(2, -1, h, e // h).transpose(1, 2)
    s = (q @ k.transpose(-1, -2)).abs() / (e // h) ** 0.5
    if model.causal:
        s = s.tril()
    return float(s.max())


@pytest.mark.parametrize("batch_first,kdim,causal,length", [(True, None, False, 10), (False, None, True, 10),
                                                            (True, 8, False, 10), (True, None, True, 40)])  # fmt: skip
def test_multihead_attention_logits_match_brute_force(tmp_path, batch_first, kdim, causal, length):
    torch.manual_seed(0)
    m = MHAModel(batch_first, kdim, causal)
    x = torch.randn(3, length, 16) * 3
    with normscope.watch(m, tmp_path / "r", every=1):
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        m(x).sum().backward()
        opt.step()
    (v,) = normscope.load(tmp_path / "r").signal("attn_logit_max").value
    with torch.no_grad():
        assert v == pytest.approx(_mha_reference(m, x), rel=1e-5)


def test_long_sequences_are_subsampled_and_bounded_by_the_full_maximum(tmp_path):
    torch.manual_seed(0)
    m = MHAModel(True)
    x = torch.randn(4, 300, 16)
    with normscope.watch(m, tmp_path / "r", every=1):
        m(x).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()
    (v,) = normscope.load(tmp_path / "r").signal("attn_logit_max").value
    with torch.no_grad():
        full = _mha_reference(m, x)
        pos = A.spaced(300, A.POSITIONS, "cpu")
        assert len(pos) == A.POSITIONS and pos[0] == 0 and pos[-1] == 299
        sub = _mha_reference(m, x[:, pos])
    assert v == pytest.approx(sub, rel=1e-5) and v <= full * (1 + 1e-6)


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_output_log_partition_and_massive_stats_match_brute_force(tmp_path, name):
    z = Z.BY_NAME[name]
    m = Z.build(z)
    outs, blocks = [], {}
    specs = attention_modules(m)
    names = transformer_blocks(m, specs)

    def keep(b):
        def hook(mod, a, o):
            blocks.setdefault(b, (o[0] if isinstance(o, tuple) else o).detach().clone())

        return hook

    hs = [m.register_forward_hook(lambda mod, a, o: outs.append(o.logits.detach().clone()) and None)]
    hs += [m.get_submodule(b).register_forward_hook(keep(b)) for b in names]
    with normscope.watch(m, tmp_path / "r", every=1):
        Z.train(m, z, steps=1)
    for h in hs:
        h.remove()
    run = normscope.load(tmp_path / "r")
    lz = torch.logsumexp(outs[0].double(), dim=-1)
    sig = {n: run.signal(n).value.iloc[0] for n in A.LOGIT_NAMES}
    assert sig["logz_mean"] == pytest.approx(float(lz.mean()), rel=1e-5)
    assert sig["logz_std"] == pytest.approx(float(lz.std(unbiased=False)), rel=1e-4, abs=1e-6)
    assert sig["z_absmax"] == pytest.approx(float(outs[0].abs().max()), rel=1e-6)
    for b, x in blocks.items():
        rows = run.signals[(run.signals.layer == b) & (run.signals.call == 0)].set_index("name").value
        assert rows["massive_absmax"] == pytest.approx(float(x.abs().max()), rel=1e-6)
        assert rows["massive_median"] == pytest.approx(float(x.abs().flatten().median()), rel=1e-6)
        ch = x.abs().amax(dim=(0, 1))
        assert int(rows["massive_ch_0"]) == int(ch.argmax())
        assert int(rows["massive_pos_0"]) == int(x[..., int(ch.argmax())].abs().amax(0).argmax())


def _shift_reference(g: torch.Tensor) -> float:
    rows = g.double().reshape(-1, g.shape[-1]).numpy()
    return float(np.abs(rows.sum(-1)).sum() / np.abs(rows).sum())


@pytest.mark.parametrize("head", ["softmax", "regression", "scalar"])
def test_output_gradient_tells_softmax_logits_from_a_regression(tmp_path, head):
    """z_grad_shift against the gradient the loss sent to the output, read by a hook of our own:
    ~0 under cross-entropy, the squared error's own value for a 4-output regression; a 1-D output
    (a batch of scalars) is not read as rows of logits at all."""
    torch.manual_seed(0)
    k = 1 if head == "scalar" else 4
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, k), *([nn.Flatten(0)] if k == 1 else []))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    grads = []
    with normscope.watch(m, tmp_path / "r", every=1):
        for _ in range(2):
            x = torch.randn(32, 6)
            z = m(x)
            z.register_hook(lambda g: grads.append(g.detach().clone()))
            if head == "softmax":
                loss = nn.functional.cross_entropy(z, torch.randint(0, 4, (32,)), label_smoothing=0.1)
            else:
                loss = nn.functional.mse_loss(z, 3.0 * torch.randn_like(z))
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = normscope.load(tmp_path / "r")
    got = run.signal("z_grad_shift")
    if head == "scalar":
        assert not len(got) and not len(run.signal("logz_mean"))
        return
    assert got.step.tolist() == [0, 1]
    ref = [_shift_reference(g) for g in grads]
    assert got.value.tolist() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    if head == "softmax":
        assert max(ref) < 1e-6
    else:
        assert min(ref) > 0.1


def test_massive_median_on_a_large_output_is_exact_on_its_row_subsample():
    torch.manual_seed(0)
    x = torch.randn(8, 512, 64)
    x[0, 0, 3] = 5000.0
    names, v = A.massive_values(x, 1)
    d = dict(zip(names, v.tolist()))
    rows = x.reshape(-1, 64)[A.spaced(8 * 512, A.MEDIAN_MAX // 64, "cpu")].abs().flatten()
    assert d["massive_median"] == pytest.approx(float(rows.median()), rel=1e-6)
    assert d["massive_median"] == pytest.approx(float(x.abs().median()), rel=0.02)  # ≈ 0.674 of N(0, 1)
    assert d["massive_absmax"] == 5000.0 and d["massive_ch_0"] == 3 and d["massive_pos_0"] == 0


def test_probes_cost_nothing_on_unsampled_steps_and_a_failure_does_not_stop_training(tmp_path):
    z = Z.BY_NAME["gpt2"]
    m = Z.build(z)
    with normscope.watch(m, tmp_path / "r", every=2):
        Z.train(m, z, steps=3)
    s = normscope.load(tmp_path / "r").signals
    assert set(s.step) == {0, 2}
    m2 = Z.build(z)
    orig = A.head_logits
    A.head_logits = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        with normscope.watch(m2, tmp_path / "r2", every=1):
            losses = Z.train(m2, z, steps=2)
    finally:
        A.head_logits = orig
    run = normscope.load(tmp_path / "r2")
    assert len(losses) == 2 and any("boom" in e for e in run.meta["hook_errors"])
    assert not len(run.signal("attn_logit_max")) and len(run.signal("logz_mean")) == 2


def test_a_sampled_step_adds_no_host_synchronising_op(tmp_path):
    """The probes' work on a sampled step is device-side only: compared with the same step without
    the probes, no op that reads a value to the host (``.item()``/``bool(t)`` →
    _local_scalar_dense) or has a data-dependent size (nonzero, masked_select, unique) is added."""
    from dispatch import SYNC_OPS as sync
    from dispatch import CountOps

    from normscope.collect import scope as S

    def ops(name, probes: bool):
        z = Z.BY_NAME[name]
        m = Z.build(z)
        orig = S.transformer_probes
        if not probes:
            S.transformer_probes = lambda scope: []
        try:
            with normscope.watch(m, tmp_path / f"{name}-{probes}", every=1):
                opt = torch.optim.SGD(m.parameters(), lr=0.0)
                with CountOps(short=True) as c:
                    m(**z.batch(0)).loss.backward()
                opt.step()
        finally:
            S.transformer_probes = orig
        return c.ops

    for name in ("llama", "gpt2"):
        on, off = ops(name, True), ops(name, False)
        assert sum((on - off).values()) > 0  # the probes did run
        assert {k: on[k] for k in sync} == {k: off[k] for k in sync}, name


def test_call_indices_restart_every_step_without_a_root_forward(tmp_path):
    torch.manual_seed(0)
    m = MHAModel(True)
    x = torch.randn(2, 6, 16)
    with normscope.watch(m, tmp_path / "r", every=1) as scope:
        for _ in range(2):
            for _ in range(2):  # the attention module called directly, twice per step
                m.attn(x, x, x, need_weights=False)[0].sum().backward()
            scope.step()
    s = normscope.load(tmp_path / "r").signal("attn_logit_max")
    assert sorted(zip(s.step, s.call)) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("batch_first", [True, False])
def test_massive_channel_and_position_on_a_torch_encoder(tmp_path, batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=True)
    m = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(3, 10, 16)
    x[1, 4, 5] = 1000.0  # sequence 1, position 4, channel 5
    with normscope.watch(m, tmp_path / "r", every=1) as scope:
        m(x if batch_first else x.transpose(0, 1)).sum().backward()
        scope.step()
    s = normscope.load(tmp_path / "r").signals
    for blk in ("layers.0", "layers.1"):
        r = s[s.layer == blk].set_index("name").value
        assert r["massive_ch_0"] == 5 and r["massive_pos_0"] == 4 and r["massive_absmax"] > 900


def test_a_failing_registration_leaves_no_hook_and_records_the_error(tmp_path, monkeypatch):
    z = Z.BY_NAME["gpt2"]
    m = Z.build(z)

    def boom(model, attention=None):
        raise RuntimeError("no blocks today")

    monkeypatch.setattr(A, "transformer_blocks", boom)
    with normscope.watch(m, tmp_path / "r", every=1) as scope:
        n = scope.hook_count
        Z.train(m, z, steps=1)
    monkeypatch.undo()
    with normscope.watch(Z.build(z), tmp_path / "r2", every=1) as scope2:
        assert scope2.hook_count > n  # the probes' hooks, when registration works
    run = normscope.load(tmp_path / "r")
    assert any("no blocks today" in e for e in run.meta["hook_errors"]) and not len(run.signals)
