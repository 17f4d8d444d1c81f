"""Train a small BN CNN on scikit-learn's digits under normscope.watch and summarise the run.

python examples/quickstart.py [RUN_DIR]
"""

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

import normscope


def main(run_dir: str = "runs/quickstart") -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with normscope.watch(model, run_dir, every=5) as scope:
        for _step in range(60):
            idx = torch.randint(0, len(x), (64,))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.log(loss=loss.item())
    run = normscope.load(run_dir)
    last = run.stats[(run.stats.step == run.stats.step.max()) & (run.stats.output == "")]
    print(f"run {run.run_dir}: {run.meta['model']['params']} parameters, {len(run.layers)} hooked layer calls, "
          f"steps recorded {run.steps}")  # fmt: skip
    cols = ["layer", "module_type", "mean", "std", "frac_zero", "frac_sat"]
    print(last[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    g = run.grads[run.grads.step == run.grads.step.max()]
    print("gradient RMS by layer:", ", ".join(f"{r.layer}={r.rms:.2e}" for r in g.itertuples()))
    print("loss:", ", ".join(f"{r.step}:{r.value:.3f}" for r in run.scalars.itertuples()))


if __name__ == "__main__":
    main(*sys.argv[1:2])
