"""The mode audit on the zoo: every transformers architecture's Dropout/BatchNorm layers are found,
an evaluation that forgets model.eval() is caught, the right way records nothing, and a frozen
backbone's BatchNorm drift is measured (ResNet, MobileNetV2)."""

import pytest
import torch
import zoo_models as Z
from torch import nn

from normscope import load, watch

NAMES = [z.name for z in Z.ZOO]


def _expected(model):
    bn = sum(1 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats)
    drop = sum(1 for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0)
    # modules that call F.dropout with their own rate (read from transformers' sources, by class)
    functional = {"T5Attention": "dropout", "SwinDropPath": "drop_prob", "LlamaAttention": "attention_dropout",
                  "Qwen2Attention": "attention_dropout"}  # fmt: skip
    drop += sum(1 for m in model.modules() if getattr(m, functional.get(type(m).__name__, "-"), 0.0) > 0)
    return bn, drop


@pytest.mark.parametrize("name", NAMES)
def test_zoo_eval_in_train_mode_caught_and_proper_eval_silent(tmp_path, name):
    z = Z.BY_NAME[name]
    model = Z.build(z)
    bn, drop = _expected(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with watch(model, tmp_path / "r", every=1, optimizer=opt) as sc:
        for step in range(2):
            model.train()
            opt.zero_grad()
            model(**z.batch(step)).loss.backward()
            opt.step()
            with torch.no_grad():  # the bug: still in train mode
                sc.log(phase="eval", loss=model(**z.batch(10 + step)).loss)
            model.eval()  # the right way
            with torch.no_grad():
                model(**z.batch(20 + step))
    modes = load(tmp_path / "r").meta["modes"]
    assert (modes["batchnorm"], modes["dropout"]) == (bn, drop)
    assert modes["forwards"] == {"train": 2, "eval": 4}
    ev = modes["events"]
    if bn or drop:
        e = ev["eval-in-train-mode:no_grad"]
        assert e["forwards"] == 2 and (e["bn_train"], e["dropout_train"]) == (bn, drop)
        assert modes["metrics_fed"] == ["loss"] and set(ev) == {"eval-in-train-mode:no_grad"}
    else:
        assert ev == {}


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_zoo_frozen_backbone_bn_drift(tmp_path, name):
    z = Z.BY_NAME[name]
    model = Z.build(z)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier")]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("classifier"))
    opt = torch.optim.AdamW(head, lr=1e-3)
    with watch(model, tmp_path / "r", every=1, optimizer=opt):
        for step in range(3):
            opt.zero_grad()
            model(**z.batch(step)).loss.backward()
            opt.step()
    run = load(tmp_path / "r")
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert set(run.meta["modes"]["frozen_bn"]) == set(bns) and bns
    drift = run.signal("bn_mean_drift")
    assert set(drift.layer) == set(bns) and (drift.value > 0).all()  # random init stats (0, 1) move at once


def test_llama_functional_attention_dropout_is_audited(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = Z.BY_NAME["llama"]
    cfg = Z.BY_NAME["llama"].build().config
    cfg.attention_dropout = 0.1
    model = LlamaForCausalLM(LlamaConfig(**cfg.to_dict()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with watch(model, tmp_path / "r", every=1, optimizer=opt):
        opt.zero_grad()
        model(**base.batch(0)).loss.backward()
        opt.step()
        with torch.no_grad():
            model(**base.batch(1))
    modes = load(tmp_path / "r").meta["modes"]
    layers = cfg.num_hidden_layers
    assert modes["dropout"] == layers and modes["events"]["eval-in-train-mode:no_grad"]["dropout_train"] == layers
