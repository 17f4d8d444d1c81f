"""Recipes: model + data + loss + optimizer, and loading them from files or modules.

A recipe file is a Python file with a function ``recipe()`` returning a :class:`Recipe`;
``load_recipe`` accepts ``path.py``, ``path.py:function`` and ``package.module:function``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normscope.errors import NormscopeError

DEFAULT_LR = 0.01
AMP_DTYPES = ("float16", "bfloat16")  # Recipe.amp: autocast to this dtype (float16 with a GradScaler)


@dataclass
class Recipe:
    """What the probe needs to train a model for a few steps.

    - ``train_data``: any re-iterable of ``(inputs, targets)`` batches (a DataLoader, a list),
      cycled until ``steps``. ``inputs`` may be a tensor, a tuple (``model(*inputs)``) or a dict
      (``model(**inputs)``).
    - ``loss_fn(outputs, targets)`` → scalar tensor.
    - ``optimizer``: an optimizer over the model's parameters, a factory ``params → optimizer``,
      or None for ``torch.optim.SGD(lr=0.01)``.
    - ``eval_data``: optional held-out batches (enables overfitting/underfitting and measures
      BN statistics on the data you evaluate on).
    - ``scheduler``: optional learning-rate scheduler, or a factory ``optimizer → scheduler``;
      stepped once after every training step (warmup, cosine, ...).
    - ``amp``: mixed precision for the default training step: ``"float16"`` (autocast to fp16,
      the loss scaled by a ``torch.amp.GradScaler``) or ``"bfloat16"`` (autocast to bf16, no
      scaler); None (the default) trains in the model's own precision. A ``train_step`` of your
      own does its own mixed precision.

    Your own loop, when the default one is not how you train:

    - ``train_step(model, batch, optimizer) → loss``: one training step as your loop writes it
      (zero the gradients, forward, backward, ``optimizer.step()``; freeze layers, clip, ...).
      ``batch`` is the ``(inputs, targets)`` pair already on the model's device. Return the loss
      (a tensor or a float). The probe puts the model in train mode once, before the first step,
      as a loop does at the start of an epoch; every other mode switch is yours.
    - ``eval_step(model, batch) → loss | {metric: value}``: one evaluation batch as your loop
      writes it. The probe does not touch the model's mode or the grad mode around it (your
      evaluation runs exactly as written, and normscope watches what it does: a missing
      ``model.eval()`` or ``torch.no_grad()`` is reported by eval-in-train-mode). Values are
      averaged over ``eval_data`` weighted by batch size and logged as eval metrics.
    """

    model: Any
    train_data: Iterable
    loss_fn: Callable | None = None
    optimizer: Any = None
    eval_data: Iterable | None = None
    steps: int = 100
    name: str | None = None
    scheduler: Any = None
    train_step: Callable | None = None
    eval_step: Callable | None = None
    amp: str | None = None

    def __post_init__(self) -> None:
        from torch import nn

        if not isinstance(self.model, nn.Module):
            raise NormscopeError(f"Recipe.model must be a torch.nn.Module, got {type(self.model).__name__}.")
        _check_reiterable("train_data", self.train_data)
        if self.eval_data is not None:
            _check_reiterable("eval_data", self.eval_data)
        if self.loss_fn is None and (
            self.train_step is None or (self.eval_data is not None and self.eval_step is None)
        ):
            raise NormscopeError(
                "Recipe.loss_fn is needed by the default training and evaluation steps: pass loss_fn(outputs, targets), "
                "or your own train_step (and eval_step when eval_data is given)."
            )
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise NormscopeError(
                f"Recipe.loss_fn must be callable as loss_fn(outputs, targets), got {type(self.loss_fn).__name__}."
            )
        for label, fn, sig in (("train_step", self.train_step, "train_step(model, batch, optimizer) -> loss"),
                               ("eval_step", self.eval_step, "eval_step(model, batch) -> loss or {metric: value}")):  # fmt: skip
            if fn is not None and not callable(fn):
                raise NormscopeError(f"Recipe.{label} must be callable as {sig}, got {type(fn).__name__}.")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise NormscopeError(f"Recipe.amp must be None, 'float16' or 'bfloat16', got {self.amp!r}.")
        if self.amp is not None and self.train_step is not None:
            raise NormscopeError("Recipe.amp applies to the default training step: with your own train_step, "
                                 "autocast (and scale the loss) inside it, and leave amp=None.")  # fmt: skip
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise NormscopeError(f"Recipe.steps must be a whole number ≥ 1, got {self.steps!r}.")
        import torch

        if self.optimizer is not None and not (
            isinstance(self.optimizer, torch.optim.Optimizer) or callable(self.optimizer)
        ):
            raise NormscopeError(
                f"Recipe.optimizer must be a torch.optim.Optimizer, a factory params → optimizer, or None (SGD), "
                f"got {type(self.optimizer).__name__}."
            )

    def make_optimizer(self):
        import torch

        if self.optimizer is None:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=DEFAULT_LR)
        elif not isinstance(self.optimizer, torch.optim.Optimizer):
            opt = self.optimizer(self.model.parameters())
            if not isinstance(opt, torch.optim.Optimizer):
                raise NormscopeError(
                    f"Recipe.optimizer factory returned {type(opt).__name__}, expected a torch.optim.Optimizer."
                )
            self.optimizer = opt
        return self.optimizer

    def make_scheduler(self, optimizer):
        """The scheduler (built from its factory on first use), or None."""
        import torch

        s = self.scheduler
        if s is None or hasattr(s, "step") and not isinstance(s, type):
            return s
        if not callable(s):
            raise NormscopeError(
                f"Recipe.scheduler must be an lr scheduler or a factory optimizer → scheduler, got {type(s).__name__}."
            )
        made = s(optimizer)
        if not hasattr(made, "step"):
            raise NormscopeError(
                f"Recipe.scheduler factory returned {type(made).__name__}, expected a scheduler with .step() "
                f"(e.g. {torch.optim.lr_scheduler.LinearLR.__name__})."
            )
        self.scheduler = made
        return made


def _check_reiterable(label: str, data: Any) -> None:
    try:
        it = iter(data)
    except TypeError:
        raise NormscopeError(
            f"Recipe.{label} must be an iterable of (inputs, targets) batches, got {type(data).__name__}."
        ) from None
    if it is data:
        raise NormscopeError(
            f"Recipe.{label} is a one-shot iterator ({type(data).__name__}): pass something that can be iterated "
            f"again, such as a DataLoader or list(...) of batches."
        )


def _split_spec(spec: str) -> tuple[str, str | None]:
    # "C:\x\y.py" has a drive colon; only a colon after the last path separator splits a function name
    head, sep, tail = spec.rpartition(":")
    if sep and tail and "/" not in tail and "\\" not in tail and head and not (len(head) == 1 and head.isalpha()):
        return head, tail
    return spec, None


def _import_file(path: Path, what: str = "recipe"):
    name = "normscope_recipe_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise NormscopeError(f"{what} file {path} cannot be loaded as Python: pass a .py file.")
    module = importlib.util.module_from_spec(spec)
    try:
        with _on_path(path):
            sys.modules[name] = module
            spec.loader.exec_module(module)
    except NormscopeError:
        sys.modules.pop(name, None)
        raise
    except BaseException as e:
        sys.modules.pop(name, None)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise NormscopeError(f"{what} file {path} raised {type(e).__name__} on import: {_first_line(e)}") from e
    return module


@contextlib.contextmanager
def _on_path(path: Path | None):
    """Put a recipe file's folder first on sys.path while it is imported and called, so it can
    import helpers that sit next to it."""
    if path is None:
        yield
        return
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            try:
                sys.path.remove(folder)
            except ValueError:
                pass


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else "(no message)"


def resolve_callable(spec: str | os.PathLike, defaults: tuple[str, ...], what: str,
                     allow_bare_module: bool = False) -> tuple[Callable, str, Path | None]:  # fmt: skip
    """A function named by ``path.py[:func]`` or ``module:func`` (the first of ``defaults`` when no
    name is given): ``(function, where, file path or None)``. One-line errors name the file.

    Shared by recipe loading and the CLI's model factories (``normscope fold``/``inspect -s``).
    """
    target, func_name = _split_spec(os.fspath(spec))
    is_file = target.endswith(".py") or os.sep in target or "/" in target or Path(target).exists()
    path = None
    if is_file:
        path = Path(target)
        if not path.is_file():
            raise NormscopeError(f"{what} file {path} does not exist: pass a Python file that defines {defaults[0]}().")
        module = _import_file(path, what)
        where = str(path)
    else:
        if func_name is None and not allow_bare_module:
            raise NormscopeError(
                f"{what} spec {target!r} is neither a .py file nor 'module:function': pass e.g. path/to/{what}.py or package.module:{defaults[0]}."
            )
        try:
            module = importlib.import_module(target)
        except NormscopeError:
            raise
        except Exception as e:
            raise NormscopeError(
                f"{what} module {target} could not be imported ({type(e).__name__}: {_first_line(e)})."
            ) from e
        where = target
    names = (func_name,) if func_name else defaults
    for name in names:
        fn = getattr(module, name, None)
        if fn is None:
            continue
        if not callable(fn):
            raise NormscopeError(f"{where}: {name} is a {type(fn).__name__}, not a function returning a {what}.")
        return fn, where, path
    wanted = " or ".join(f"{n}()" for n in names)
    raise NormscopeError(f"{where} has no function {wanted}: define it, or name one with {where}:FUNCTION.")


def load_recipe(spec: str | os.PathLike) -> Recipe:
    """Load a recipe from ``path.py`` (function ``recipe``), ``path.py:func`` or ``module:function``."""
    if isinstance(spec, Recipe):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise NormscopeError(f"a recipe spec must be a path or 'module:function' string, got {type(spec).__name__}.")
    fn, where, path = resolve_callable(spec, ("recipe",), "recipe")
    func_name = fn.__name__
    try:
        with _on_path(path):
            out = fn()
    except NormscopeError:
        raise
    except Exception as e:
        raise NormscopeError(f"{where}: {func_name}() raised {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(out, Recipe):
        raise NormscopeError(f"{where}: {func_name}() returned {type(out).__name__}, expected a normscope.Recipe.")
    if out.name is None:
        out.name = path.stem if path is not None else f"{where}:{func_name}"
    return out


def as_recipe(recipe: Any) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    raise NormscopeError(f"probe() needs a normscope.Recipe or a recipe file/spec, got {type(recipe).__name__}.")
