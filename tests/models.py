"""Small models for collector tests."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)  # used twice: two call sites
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.short(x)
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class SharedMLP(nn.Module):
    """The same Linear+Tanh block applied twice per forward."""

    def __init__(self, d=6):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.block = nn.Linear(d, d)
        self.act = nn.Tanh()
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = self.act(self.block(h))
        h = self.act(self.block(h))
        return self.out(h)


@dataclass
class Out:
    logits: torch.Tensor
    hidden: torch.Tensor
    n: int


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return {"a": h, "pair": (h * 2, torch.arange(3)), "note": "text"}


class DataclassOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = DictOut()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        d = self.enc(x)
        return Out(logits=self.head(d["a"]), hidden=d["pair"][0], n=3)


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = checkpoint(lambda t: self.act(self.a(t)), x, use_reentrant=False)
        return self.b(h)


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if h.shape[0] == 3:
            raise RuntimeError("boom in forward")
        return h


class NonTensor(nn.Module):
    """A leaf with parameters whose forward returns a string and an int tensor."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return ("label", torch.tensor([1, 2]))


class WithNonTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.odd = NonTensor()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        self.odd(x)
        return self.lin(x)


def train(model, steps, scope=None, batch=8, shape=(3, 8, 8), classes=10, lr=0.05, seed=0):
    """Plain SGD loop on generated data; returns the list of losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        x = torch.randn((batch, *shape), generator=g)
        y = torch.randint(0, classes, (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
