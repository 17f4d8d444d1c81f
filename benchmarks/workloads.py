"""The benchmark workloads of benchmarks/overhead.py, generated data only."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu(out)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool), BN + in-place ReLU."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        layers, c = [], 64
        for w, s in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(BasicBlock(c, w, s), BasicBlock(w, w, 1)))
            c = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def mlp(width=1024, depth=6, d_in=256, classes=10):
    layers, d = [], d_in
    for i in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh() if i % 2 == 0 else nn.Sigmoid()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


class Transformer(nn.Module):
    def __init__(self, d_model=256, heads=8, layers=6, vocab=1000, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


WORKLOADS = {
    # name: (model factory, batch maker)
    "resnet18": (
        ResNet18,
        lambda g: (torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)),
    ),
    "mlp": (mlp, lambda g: (torch.randn(256, 256, generator=g), torch.randint(0, 10, (256,), generator=g))),
    "transformer": (
        Transformer,
        lambda g: (torch.randint(0, 1000, (16, 128), generator=g), torch.randint(0, 10, (16,), generator=g)),
    ),
}


class HFLogits(nn.Module):
    """A transformers image classifier as a plain ``x -> logits`` module."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def mobilenetv2():
    """transformers' MobileNetV2 from config (random init): depth multiplier 0.5 at 64x64, the
    many-small-layers case (~150 hooked calls, small activations). Needs transformers."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(depth_multiplier=0.5, image_size=64, num_labels=10)
    return HFLogits(MobileNetV2ForImageClassification(cfg))


def has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


WORKLOADS["mobilenetv2"] = (
    mobilenetv2,
    lambda g: (torch.randn(16, 3, 64, 64, generator=g), torch.randint(0, 10, (16,), generator=g)),
)
