"""Pre-LN vs post-LN per repeated block, on every zoo architecture, from one recorded step.

What a reader of each architecture would say: BERT is post-LN (its LayerNorms follow the residual
sums); GPT-2, Llama, Qwen2, T5, ViT and Swin are pre-LN; the conv nets have no post-LayerNorm
stack (MobileNetV2's blocks end in a BatchNorm before their add, which post-ln-gradient never
judges). The weight-gradient ratio post-ln-gradient reads on BERT is checked against p.grad.
"""

import warnings

import pytest
import torch
import zoo_models as Z

from normscope import load, watch
from normscope.analyze.checks.post_ln_gradient import block_grad_norms, post_ln_stacks
from normscope.analyze.context import Context
from normscope.roles import block_stacks

PRE = {"vit": "vit.layers", "swin": "swin.encoder.layers", "gpt2": "transformer.h", "llama": "model.layers",
       "qwen2": "model.layers", "t5": "encoder.block.0.layer"}  # fmt: skip
POST = {"bert": "bert.encoder.layer"}


@pytest.mark.parametrize("name", [z.name for z in Z.ZOO])
def test_zoo_norm_placement(tmp_path, name):
    z = Z.BY_NAME[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Z.build(z)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: p.grad stays what the step recorded
        with watch(model, tmp_path / "r", optimizer=opt):
            out = model(**z.batch(0))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    ctx = Context(load(tmp_path / "r"))
    pl = ctx.norm_placement
    post = post_ln_stacks(ctx)
    if name in POST:
        stack = POST[name]
        blocks = [f"{stack}.{i}" for i in range(2)]
        assert post == {stack: blocks} and block_stacks(pl, "pre") == {}
        assert [pl[b]["last"] for b in blocks] == [f"{b}.output.LayerNorm" for b in blocks]
        g, used = block_grad_norms(ctx, blocks, [0])
        for i, b in enumerate(blocks):
            names = {f"{b}.{n}" for n, _ in model.get_submodule(b).named_parameters()}
            assert set(used[b]) == {n for n in names if n.endswith("weight") and "LayerNorm" not in n}
            brute = sum(float(p.grad.double().pow(2).sum()) for n, p in model.named_parameters() if n in used[b])
            assert g[i, 0] == pytest.approx(brute**0.5, rel=1e-5)
    else:
        assert post == {}
    if name in PRE:
        stacks = block_stacks(pl, "pre")
        assert PRE[name] in stacks and all(pl[b]["placement"] == "pre" for b in stacks[PRE[name]])
        assert all(v["placement"] != "post" for v in pl.values())
