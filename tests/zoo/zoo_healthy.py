"""Healthy training of the zoo, the standard way: AdamW 1e-3, batch 32, inputs standardised per
channel, on data scikit-learn ships (digits: upsampled to 32×32 RGB for the vision models; its
pixel rows as a token task for the text models). A warning or error here is a false positive."""

from __future__ import annotations

import math

import numpy as np
import torch
import zoo_models as Z
from torch import nn

import normscope

BATCH = 32
STEPS = 40
VOCAB = 64


class Logits(nn.Module):
    """HF model → a plain ``model(x) -> logits`` callable for a Recipe."""

    def __init__(self, hf: nn.Module, key: str, seq2seq: bool = False):
        super().__init__()
        self.hf = hf
        self.key = key
        self.seq2seq = seq2seq

    def forward(self, x):
        kw = {"decoder_input_ids": x} if self.seq2seq else {}
        return self.hf(**{self.key: x}, **kw).logits


# What a stock transformers model does that its user should hear about, on any data: MobileNetV2
# builds every BatchNorm with momentum=0.997, TensorFlow's decay written as PyTorch's momentum, so
# its running statistics are the last batch's (bn-momentum). Every other loud finding is a failure.
TRUE_FINDINGS = {"mobilenet_v2": {"bn-momentum"}}


def loud(analysis, name: str) -> list[str]:
    """The warnings and errors of a zoo run, less the true ones its stock model earns (TRUE_FINDINGS)."""
    known = TRUE_FINDINGS.get(name, set())
    return [str(f) for f in analysis.findings if f.severity != "info" and f.check not in known]


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)  # (1797, 8, 8) in 0..16


def vision_data(n: int = 512):
    img, y = _digits()
    x = torch.from_numpy(img[:n]).unsqueeze(1)
    x = nn.functional.interpolate(x, size=(Z.IMG, Z.IMG), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    # RGB from one plane: weight the channels differently, as real colour images differ per channel
    x = x * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1) + torch.tensor([0.0, 2.0, 4.0]).view(1, 3, 1, 1)
    mu = x.mean((0, 2, 3), keepdim=True)
    sd = x.std((0, 2, 3), keepdim=True)
    return (x - mu) / sd, torch.from_numpy(y[:n] % 3)  # per-channel standardisation; 3 classes


def token_data(n: int = 512):
    img, y = _digits()
    ids = torch.from_numpy(np.clip(img[:n].reshape(n, -1)[:, ::4], 0, 16).astype(np.int64) + 1)  # 16 tokens
    return ids, torch.from_numpy(y[:n] % 3)


def _lm_loss(logits, ids):
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def recipe(name: str) -> normscope.Recipe:
    z = Z.BY_NAME[name]
    torch.manual_seed(0)
    hf = z.build()
    if z.family == "text":
        ids, y = token_data()
        lm = name != "bert"
        model = Logits(hf, "input_ids", seq2seq=name == "t5")
        data = [(ids[i : i + BATCH], (ids if lm else y)[i : i + BATCH]) for i in range(0, len(ids), BATCH)]
        loss = _lm_loss if lm else nn.functional.cross_entropy
    else:
        x, y = vision_data()
        model = Logits(hf, "pixel_values")
        data = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
        loss = nn.functional.cross_entropy
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    return normscope.Recipe(model, data, loss, optimizer=opt, steps=STEPS, name=f"zoo-{name}")


def param_groups(model: nn.Module, weight_decay: float = 0.01) -> list[dict]:
    """The standard AdamW setup of transformers' Trainer and timm: no weight decay on biases and
    normalisation parameters (decaying them is what norm-weight-decay reports)."""
    no_decay = set()
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if Z.is_norm_module(m) or pname == "bias" or p.dim() <= 1:
                no_decay.add(f"{mname}.{pname}" if mname else pname)
    decay = [p for n, p in model.named_parameters() if n not in no_decay]
    rest = [p for n, p in model.named_parameters() if n in no_decay]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class LoRA(nn.Module):
    """A frozen linear layer plus a trainable low-rank update B·A with B at zero (Hu et al. 2021),
    as PEFT builds it (for nn.Linear and GPT-2's Conv1D alike)."""

    def __init__(self, base: nn.Module, r: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base = base
        fin, fout = (base.in_features, base.out_features) if isinstance(base, nn.Linear) else base.weight.shape
        self.lora_A = nn.Linear(fin, r, bias=False)
        self.lora_B = nn.Linear(r, fout, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


LORA_TARGETS = ("query", "value", "q_proj", "v_proj", "c_attn", "q", "v")  # PEFT's defaults per family


def lora_recipe(name: str, lr: float = 1e-3) -> normscope.Recipe:
    """Parameter-efficient fine-tuning: the model frozen, LoRA on the attention's query and value
    projections, the classification head trained (PEFT's ``modules_to_save``)."""
    r = recipe(name)
    model = r.model.requires_grad_(False)
    for m in list(model.modules()):
        for cname, c in list(m.named_children()):
            if cname in LORA_TARGETS and (isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D"):
                setattr(m, cname, LoRA(c))
    for mname, m in model.named_modules():
        if mname.endswith(("classifier", "score")):
            m.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    return normscope.Recipe(model, r.train_data, r.loss_fn, optimizer=opt, steps=STEPS, name=f"zoo-lora-{name}")
