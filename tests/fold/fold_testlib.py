"""Helpers shared by the BN-folding tests (not a test module).

Importing this module makes ``normscope.fold`` importable even while ``normscope/__init__``
cannot be imported yet (the collect/store layers are built in parallel): a bare ``normscope``
package pointing at the source folder is registered instead. Worker processes (the
torch.distributed test) import this module too, so the same holds there.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
try:
    importlib.import_module("normscope")
except ImportError:
    for key in [k for k in sys.modules if k == "normscope" or k.startswith("normscope.")]:
        del sys.modules[key]
    _pkg = types.ModuleType("normscope")
    _pkg.__path__ = [str(ROOT / "normscope")]
    sys.modules["normscope"] = _pkg

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

STAT_VARIANTS = ("neg_gamma", "tiny_var", "large_var", "affine_false")


def set_bn_stats(bn: _BatchNorm, variant: str, seed: int = 0) -> None:
    """Random eval statistics: negative γ, σ² = 1e-8 or 1e3 on every channel, or affine=False
    (the module must then have been built with affine=False)."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 2)
        var = torch.rand(c, generator=g) * 2 + 0.1
        if variant == "tiny_var":
            var = torch.full((c,), 1e-8)
        elif variant == "large_var":
            var = torch.full((c,), 1e3)
        bn.running_var.copy_(var)
        if bn.affine:
            gamma = torch.randn(c, generator=g)
            gamma[0] = -abs(float(gamma[0])) - 0.5  # always at least one negative γ
            bn.weight.copy_(gamma)
            bn.bias.copy_(torch.randn(c, generator=g))


def randomize_all(model: nn.Module, variant: str, seed: int = 0) -> nn.Module:
    for i, m in enumerate(model.modules()):
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            set_bn_stats(m, variant, seed + i)
    return model.eval()


def bn_left(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out − ref| / max |ref|, in float64."""
    ref, out = ref.detach().double(), out.detach().double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def recal_worker(rank: int, world: int, init_file: str, batches: list, state: dict, out: str) -> None:
    """torch.distributed worker: recalibrate on this rank's share of the batches."""
    import torch.distributed as dist

    from normscope.fold import recalibrate_bn

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = small_recal_net()
        model.load_state_dict(state)
        res = recalibrate_bn(model, batches[rank::world])
        torch.save({"state": model.state_dict(), "world": res.world_size, "dist": res.distributed}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


class RecalNet(nn.Module):
    """conv → BN → ReLU → Dropout → conv → BN → BN again (reused) → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(4, 5, 1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn1(self.conv1(x))))
        h = self.bn2(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def small_recal_net() -> RecalNet:
    torch.manual_seed(0)
    return RecalNet()


class Untraceable(nn.Module):
    """Wraps a model in a forward that torch.fx cannot trace (``int()`` of a proxy, control flow
    on a shape), so folding goes through the data flow recorded from one real forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(x.shape[0]) < 0:  # never true; a Python int, so not data-dependent
            x = -x
        return self.inner(x)


def both_paths(model: nn.Module) -> list:
    """[(path, model)]: the model as is (torch.fx traces it) and wrapped in ``Untraceable``."""
    from normscope.fold.api import clone_model  # copy.deepcopy fails on pruned modules

    return [("torch.fx", model), ("dataflow", Untraceable(clone_model(model)))]
