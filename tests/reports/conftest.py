import pytest
import torch
from torch import nn

from normscope import load, watch


class XssNet(nn.Module):
    """A small CNN whose ReLU is named like an XSS payload, with sigmoid saturation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.add_module("<script>alert(1)</script>", nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        h = getattr(self, "<script>alert(1)</script>")(self.bn(self.conv(x)))
        return self.gate(self.fc(torch.flatten(self.pool(h), 1)) * 8)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    torch.manual_seed(0)
    model = XssNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path_factory.mktemp("runs") / "small"
    with watch(model, path, every=1) as scope:
        for _ in range(6):
            x = torch.randn(16, 3, 8, 8)
            loss = (model(x) - 0.5).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.log(loss=loss.item())
    return load(path)
