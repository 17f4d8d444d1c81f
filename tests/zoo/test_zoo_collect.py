"""The zoo, collected: every architecture trains bit-identically under watch, and is seen as it is built.

For each transformers architecture (tiny config, random init): losses equal bare training bit for
bit; every normalisation module records its input; every activation module is recorded; the
per-channel moments of one norm and one activation (and of a block where its layout is the
point) equal a brute-force reference on the captured output, over the channel axis a reader of
the architecture would name; reentrant and non-reentrant checkpointing both give train-phase
rows with gradients under the same layer names as the unwrapped model.
"""

import numpy as np
import pytest
import zoo_models as Z

from normscope import load, watch

STEPS = 2


def _track(model, names):
    """Forward hooks (the test's own) that note which modules ran and capture outputs at step 0."""
    ran, captured, handles = set(), {}, []
    for name, m in model.named_modules():

        def hook(mod, args, out, name=name):
            ran.add(name)
            if name in names and name not in captured:
                captured[name] = out.detach().double().clone()

        handles.append(m.register_forward_hook(hook))
    return ran, captured, handles


@pytest.fixture(scope="module")
def zoo_runs(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            z = Z.BY_NAME[name]
            bare = Z.train(Z.build(z), z, STEPS)
            model = Z.build(z)
            ran, captured, handles = _track(model, set(z.probes))
            d = tmp_path_factory.mktemp(name) / "run"
            with watch(model, d, every=1):
                losses = Z.train(model, z, STEPS)
            for h in handles:
                h.remove()
            cache[name] = (z, model, bare, losses, load(d), ran, captured)
        return cache[name]

    return get


NAMES = [z.name for z in Z.ZOO]


def test_zoo_covers_the_families():
    fams = {z.family for z in Z.ZOO}
    assert {"conv", "vision-transformer", "text"} <= fams and len(Z.ZOO) >= 8
    assert {"resnet", "convnext", "mobilenet_v2", "vit", "swin", "bert", "gpt2", "llama"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_losses_bit_identical_bare_vs_watched(zoo_runs, name):
    z, model, bare, losses, run, ran, _ = zoo_runs(name)
    assert losses == bare  # exact: hooks never change the computation
    assert run.meta["status"] == "complete" and not run.meta.get("hook_errors")


@pytest.mark.parametrize("name", NAMES)
def test_every_norm_records_its_input_and_every_activation_is_recorded(zoo_runs, name):
    z, model, _, _, run, ran, _ = zoo_runs(name)
    s = run.stats
    tr = s[s.phase == "train"]
    with_input = set(tr[tr.output == "input"].layer)
    recorded = set(tr.layer)
    norms = {n for n, m in model.named_modules() if Z.is_norm_module(m) and n in ran}
    acts = {n for n, m in model.named_modules() if Z.is_activation_module(m) and n in ran}
    assert norms and acts
    assert norms <= with_input, sorted(norms - with_input)
    assert acts <= recorded, sorted(acts - recorded)
    roles = {m["name"]: m.get("role") for m in run.meta["modules"]}
    assert all(roles[n] == "norm" for n in norms) and all(roles[n] == "activation" for n in acts)


@pytest.mark.parametrize("name", NAMES)
def test_per_channel_moments_equal_brute_force(zoo_runs, name):
    z, model, _, _, run, _, captured = zoo_runs(name)
    s = run.stats
    for layer, (axis, channels) in z.probes.items():
        row = s[(s.layer == layer) & (s.step == 0) & (s.phase == "train") & (s.output == "") & (s.call == 0)]
        assert len(row) == 1, layer
        row = row.iloc[0]
        x = captured[layer]
        ax = axis % x.dim()
        assert x.shape[ax] == channels, (layer, tuple(x.shape))
        assert row.channel_axis % x.dim() == ax, (layer, row.channel_axis, tuple(x.shape))
        assert len(row.ch_mean) == channels
        flat = x.movedim(ax, -1).reshape(-1, channels)
        np.testing.assert_allclose(row.ch_mean, flat.mean(0).numpy(), rtol=1e-4, atol=1e-5, err_msg=layer)
        np.testing.assert_allclose(row.ch_var, flat.var(0, unbiased=False).numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=layer)  # fmt: skip
        assert row["mean"] == pytest.approx(float(x.mean()), rel=1e-4, abs=1e-6)
        assert row["std"] == pytest.approx(float(x.std(unbiased=False)), rel=1e-4)


CKPT = [z.name for z in Z.ZOO if z.blocks]


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("name", CKPT)
def test_checkpointed_blocks_give_train_rows_with_gradients(zoo_runs, tmp_path, name, reentrant):
    z, _, _, _, plain, _, _ = zoo_runs(name)
    bare = Z.build(z)
    Z.wrap_checkpoint(bare, z.blocks, reentrant)
    bare_losses = Z.train(bare, z, STEPS)
    model = Z.build(z)
    Z.wrap_checkpoint(model, z.blocks, reentrant)
    with watch(model, tmp_path / "ck", every=1):
        losses = Z.train(model, z, STEPS)
    assert losses == bare_losses  # bit-identical under checkpointing too
    run = load(tmp_path / "ck")
    s, g = run.stats, run.grads
    assert set(s.layer) == set(plain.stats.layer)  # canonical names: the wrapper's part is stripped
    for block in z.blocks:
        inside = s[s.layer.str.startswith(block + ".")]
        assert len(inside) and set(inside.phase) == {"train"}, (block, set(inside.phase))
        # the recomputation is not counted twice
        assert (inside.groupby(["step", "layer", "call", "output"]).size() == 1).all()
        assert (inside.forwards == 1).all()
        gl = set(g[g.layer.str.startswith(block + ".")].layer)
        assert gl == set(plain.grads[plain.grads.layer.str.startswith(block + ".")].layer) and gl, block
