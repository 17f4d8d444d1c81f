"""Helpers for the analyze tests: the recipe fixtures, run once per session."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"


def fixture_files() -> list[Path]:
    """Recipe fixtures: files in fixtures/ that define a top-level recipe() function."""
    out = []
    for p in sorted(FIXTURES.glob("*.py")):
        if p.name.startswith("_"):
            continue
        tree = ast.parse(p.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "recipe" for n in tree.body):
            out.append(p)
    return out


def fixture_module(path: Path):
    """The fixture module (for EXPECTED / EXPECTED_INFO), imported like the recipe loader does."""
    from normscope.probe.recipe import _import_file

    return _import_file(path)


class FixtureRuns:
    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[str, tuple] = {}

    def get(self, name: str):
        """(module, run, analysis) of fixtures/<name>.py, probed once per session."""
        if name not in self.cache:
            from normscope.analyze import analyze_full
            from normscope.probe import load_recipe, probe

            path = FIXTURES / f"{name}.py"
            mod = fixture_module(path)
            run = probe(load_recipe(path), run_dir=self.root / name)
            self.cache[name] = (mod, run, analyze_full(run))
        return self.cache[name]


def capture(model, names, store, grads=None):
    """Forward hooks that keep a copy of each named module's output (per call), and optionally
    its gradient; returns the handles."""
    handles = []
    for n in names:
        mod = model.get_submodule(n)

        def hook(m, a, out, n=n):
            store.setdefault(n, []).append(out.detach().clone())
            if grads is not None and out.requires_grad:
                k = len(store[n]) - 1
                out.register_hook(lambda g, n=n, k=k: grads.setdefault(n, {}).__setitem__(k, g.detach().clone()))

        handles.append(mod.register_forward_hook(hook))
    return handles


def train_watched(model, run_dir, steps, make_batch, lr=0.05, every=1, on_step=None, names=(), optimizer=None):
    """Train ``model`` under ``watch`` on ``make_batch(i) → (x, y)`` with cross-entropy (SGD at ``lr``,
    or ``optimizer(params)``), keeping each named module's outputs (:func:`capture`); returns them."""
    import torch
    from torch import nn

    from normscope import watch

    store: dict = {}
    handles = capture(model, names, store)
    opt = optimizer(model.parameters()) if optimizer else torch.optim.SGD(model.parameters(), lr=lr)
    with watch(model, run_dir, every=every):
        for i in range(steps):
            if on_step:
                on_step(i, model)
            x, y = make_batch(i)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for h in handles:
        h.remove()
    return store
