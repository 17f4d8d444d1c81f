"""Fold zoo: real architectures from tiny configs (random init, no downloads) plus test-local
modules mirroring timm's ``BatchNormAct2d``, RepVGG and MobileOne blocks. Not a test module.

``ZOO[name]() -> (model in eval mode with randomised BN statistics, example input, expected)``
where ``expected`` is the number of BN modules that fold (all of them here)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial eval statistics on every BN (negative γ included), then eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(c, generator=g).abs() + 0.2)
                    m.weight[0] = -m.weight[0]
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


class BatchNormAct2d(nn.BatchNorm2d):
    """Mirror of timm.layers.BatchNormAct2d: BN (F.batch_norm), then drop, then act."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        apply_act=True,
        act_layer=nn.ReLU,
        drop_layer=None,
    ):
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class ConvNormAct(nn.Module):
    """timm's ConvNormAct: conv (no bias) → BatchNormAct2d."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, apply_act=True, act_layer=nn.SiLU):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act=apply_act, act_layer=act_layer)

    def forward(self, x):
        return self.bn(self.conv(x))


class BNActNet(nn.Module):
    """A small timm-style CNN: every BN is a BatchNormAct2d (SiLU, ReLU, or no act)."""

    def __init__(self):
        super().__init__()
        self.stem = ConvNormAct(3, 8, stride=2)
        self.dw = ConvNormAct(8, 8, groups=8, act_layer=nn.ReLU)
        self.pw = ConvNormAct(8, 16, k=1, apply_act=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        return self.head(x.mean((2, 3)))


class RepVggBlock(nn.Module):
    """Mirror of timm's RepVggBlock (training-time form): kxk ConvNormAct + 1x1 ConvNormAct
    + BN-only identity branch (when in = out channels and stride 1), summed, then the act."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        use_ident = cin == cout and stride == 1
        self.identity = nn.BatchNorm2d(cout) if use_ident else None
        self.conv_kxk = ConvNormAct(cin, cout, 3, stride, groups=groups, apply_act=False)
        self.conv_1x1 = ConvNormAct(cin, cout, 1, stride, groups=groups, apply_act=False)
        self.drop_path = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x += identity
        return self.act(x)


class RepVggNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(
            RepVggBlock(3, 8, stride=2),
            RepVggBlock(8, 8),
            RepVggBlock(8, 8, groups=2),
            RepVggBlock(8, 16, stride=2),
            RepVggBlock(16, 16),
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.stages(x).mean((2, 3)))


class MobileOneBlock(nn.Module):
    """Mirror of timm's MobileOneBlock (training-time form): BN-only identity branch, 1x1 scale
    branch and several kxk branches, summed with in-place adds."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, branches=2):
        super().__init__()
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.conv_kxk = nn.ModuleList(
            [ConvNormAct(cin, cout, k, stride, groups=groups, apply_act=False) for _ in range(branches)]
        )
        self.conv_scale = ConvNormAct(cin, cout, 1, stride, groups=groups, apply_act=False) if k > 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        for ck in self.conv_kxk:
            out += ck(x)
        return self.act(out)


class MobileOneNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(
            MobileOneBlock(3, 8, stride=2),
            MobileOneBlock(8, 8, groups=8),
            MobileOneBlock(8, 16, k=1),
            MobileOneBlock(16, 16),
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.stages(x).mean((2, 3)))


def _hf(build: Callable[[], nn.Module], size: int = 32) -> Callable:
    def make():
        torch.manual_seed(0)
        model = randomize_bn(build())
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        return model, x, count_bn(model)

    return make


def _resnet():
    import transformers as T

    cfg = T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 2, 1, 1], layer_type="bottleneck", num_labels=5
    )
    return T.ResNetForImageClassification(cfg)


def _mobilenet_v1():
    import transformers as T

    return T.MobileNetV1ForImageClassification(T.MobileNetV1Config(depth_multiplier=0.25, image_size=32, num_labels=5))


def _mobilenet_v2():
    import transformers as T

    return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(depth_multiplier=0.25, image_size=32, num_labels=5))


def _efficientnet():
    import transformers as T

    cfg = T.EfficientNetConfig(
        width_coefficient=0.1, depth_coefficient=0.1, image_size=32, hidden_dim=128, num_labels=5
    )
    return T.EfficientNetForImageClassification(cfg)


def _regnet():
    import transformers as T

    cfg = T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 2, 1], groups_width=8, num_labels=5)
    return T.RegNetForImageClassification(cfg)


def _levit():
    import transformers as T

    cfg = T.LevitConfig(
        image_size=32,
        patch_size=16,
        hidden_sizes=[16, 32, 48],
        num_attention_heads=[1, 2, 2],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        num_labels=5,
    )
    return T.LevitForImageClassification(cfg)


ZOO: dict[str, Callable] = {
    "hf_resnet": _hf(_resnet),
    "hf_mobilenet_v1": _hf(_mobilenet_v1),
    "hf_mobilenet_v2": _hf(_mobilenet_v2),
    "hf_efficientnet": _hf(_efficientnet),
    "hf_regnet": _hf(_regnet),
    "hf_levit": _hf(_levit),
    "timm_style_bnact": _hf(BNActNet, 16),
    "repvgg_blocks": _hf(RepVggNet, 16),
    "mobileone_blocks": _hf(MobileOneNet, 16),
}
