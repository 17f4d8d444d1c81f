"""``probe(recipe)``: train a recipe under ``watch``, then run the extra measurement passes.

``probe_model(factory, input_shape)``: initialisation-time diagnostics without data (synthetic
standard-normal inputs and targets, learning rate 0).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normscope.analyze.graph import build_graph
from normscope.analyze.modinfo import model_modules
from normscope.errors import NormscopeError
from normscope.probe import measure as M
from normscope.probe.recipe import Recipe, as_recipe
from normscope.store.sidecars import write_probe

NAN_PATIENCE = 5  # consecutive non-finite losses before the probe stops training


def _default_run_dir(name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path("runs") / f"{safe}-{stamp}"


def _cycle(data):
    while True:
        empty = True
        for b in data:
            empty = False
            yield b
        if empty:
            raise NormscopeError("train_data yielded no batch: give the recipe at least one (inputs, targets) batch.")


def _check_int(label: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise NormscopeError(f"{label} must be a whole number ≥ {lo}, got {v!r}.")
    return v


def _loss_value(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise NormscopeError(
            f"loss_fn must return a scalar tensor (e.g. nn.functional.cross_entropy(out, y)), got "
            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}."
        )
    return loss


def _training_failed(e: Exception, step: int | None, run_dir: Path) -> NormscopeError:
    """The error of a recipe whose training raised: what, at which step, and the partial run kept."""
    from normscope.probe.recipe import _first_line
    from normscope.store import load

    try:
        last = load(run_dir).state["last_step"]
    except Exception:  # noqa: BLE001 - the message must not fail
        last = None
    what = str(e) if isinstance(e, NormscopeError) else f"{type(e).__name__}: {_first_line(e)}"
    kept = f"last recorded step {last}" if last is not None else "no step recorded"
    return NormscopeError(
        f"{'the evaluation before step 0' if step is None else f'training at step {step}'} raised: {what}. The partial run is kept in {run_dir} (status failed, {kept}): "
        f"open it with `normscope report {run_dir}` or `normscope inspect {run_dir}`."
    )


def _as_metrics(v: Any, where: str) -> dict[str, float]:
    if isinstance(v, dict):
        items = v.items()
    else:
        items = (("loss", v),)
    out = {}
    for k, x in items:
        if isinstance(x, torch.Tensor) and x.numel() == 1:
            x = float(x.detach())
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise NormscopeError(
                f"{where} must return a number, a scalar tensor or a {{metric: number}} dict, got {type(x).__name__} "
                f"for {k!r}."
            )
        out[str(k)] = float(x)
    return out


def _eval_metrics(model: nn.Module, recipe: Recipe, dev) -> dict[str, float]:
    """The eval metrics over ``eval_data``: the user's ``eval_step`` run as written, or the default
    (eval mode, no grad, the loss)."""
    if recipe.eval_step is None:
        return {"loss": _eval_loss(model, recipe, dev)}
    sums: dict[str, float] = {}
    n = 0
    for b in recipe.eval_data:
        x, y = M.split_batch(b)
        x, y = M.to_device(x, dev), M.to_device(y, dev)
        k = M.batch_size(x)
        for name, v in _as_metrics(recipe.eval_step(model, (x, y)), "Recipe.eval_step").items():
            sums[name] = sums.get(name, 0.0) + v * k
        n += k
    return {name: v / n for name, v in sums.items()} if n else {"loss": math.nan}


def _train_step(model: nn.Module, recipe: Recipe, opt, x, y, scaler=None) -> float:
    if recipe.train_step is not None:
        loss = recipe.train_step(model, (x, y), opt)
        if isinstance(loss, torch.Tensor):
            loss = _loss_value(loss)
        return float(_as_metrics(loss, "Recipe.train_step")["loss"])
    opt.zero_grad(set_to_none=True)
    if recipe.amp is None:
        loss = _loss_value(recipe.loss_fn(M.forward(model, x), y))
        loss.backward()
        opt.step()
        return float(loss.detach())
    with torch.autocast(M.device_of(model).type, dtype=getattr(torch, recipe.amp)):
        loss = _loss_value(recipe.loss_fn(M.forward(model, x), y))
    if scaler is None:  # bfloat16: fp32's range, nothing to scale
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return float(loss.detach())


def _eval_loss(model: nn.Module, recipe: Recipe, dev) -> float:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for b in recipe.eval_data:
                x, y = M.split_batch(b)
                x, y = M.to_device(x, dev), M.to_device(y, dev)
                k = M.batch_size(x)
                total += float(_loss_value(recipe.loss_fn(M.forward(model, x), y))) * k
                n += k
    finally:
        model.train(was)
    return total / n if n else math.nan


def probe(recipe: Recipe | str | os.PathLike, steps: int | None = None, run_dir: str | os.PathLike | None = None,
          every: int = 1, eval_every: int | None = None, seed: int | None = 0, max_probe_samples: int = 2048,
          flush_every: int = 50, progress: Callable[[int, int, float], None] | None = None):  # fmt: skip
    """Train ``recipe`` for ``steps`` (default ``recipe.steps``) under :func:`normscope.watch`,
    run the measurement passes (BN population statistics in eval mode, train/eval output gap,
    input-feature statistics, module graph, weight sparsity, signal propagation), write them to
    ``<run_dir>/probe.json`` and return the :class:`~normscope.store.Run`.

    ``every``: the collector's sampling cadence; ``eval_every``: how often the eval loss is
    measured (default: ~20 points over the run); ``seed``: seeds dropout and data shuffling
    inside the probe (the caller's RNG state is restored; None keeps the current state);
    ``progress(step, steps, loss)`` is called after every training step (0-based step).
    """
    from normscope.collect import watch
    from normscope.store import load

    recipe = as_recipe(recipe)
    steps = _check_int("steps", recipe.steps if steps is None else steps)
    every = _check_int("every", every)
    if eval_every is None:
        eval_every = every * max(1, round(steps / (20 * every)))
    eval_every = _check_int("eval_every", eval_every)
    if eval_every % every:
        raise NormscopeError(
            f"eval_every ({eval_every}) must be a multiple of every ({every}) so eval losses land on sampled steps."
        )
    model = recipe.model
    opt = recipe.make_optimizer()
    sched = recipe.make_scheduler(opt)
    name = recipe.name or type(model).__name__
    run_dir = Path(run_dir) if run_dir is not None else _default_run_dir(name)
    dev = M.device_of(model)
    notes: dict[str, str] = {}
    scaler = torch.amp.GradScaler(dev.type) if recipe.amp == "float16" and recipe.train_step is None else None

    with M.fork_rng(seed):  # data order, dropout masks and passes are seeded; the caller's RNG is restored
        probe_x = M.take_samples(recipe.train_data, max_probe_samples)
        if not probe_x:
            raise NormscopeError("train_data yielded no batch: give the recipe at least one (inputs, targets) batch.")
        x0 = M.to_device(probe_x[0], dev)
        example = None if isinstance(x0, dict) else tuple(x0) if isinstance(x0, (tuple, list)) else (x0,)
        graph, why = build_graph(model, example)
        if why:
            notes["graph"] = f"fx tracing failed ({why})" + ("; used hooks" if graph is not None else "")
        signal = M.measure_signal(model, x0, graph, "init", 0, seed or 0)

        was_training = model.training
        batches_seen: list[int] = []
        stopped = None
        bad = 0
        step = None  # None while the evaluation before the first step runs
        model.train()
        started = False
        try:
            with watch(model, run_dir, every=every, optimizer=opt, name=name, flush_every=flush_every) as scope:
                started = True
                if recipe.eval_data is not None:
                    scope.log(phase="eval", **_eval_metrics(model, recipe, dev))
                it = _cycle(recipe.train_data)
                for step in range(steps):
                    x, y = M.split_batch(next(it))
                    x, y = M.to_device(x, dev), M.to_device(y, dev)
                    batches_seen.append(M.batch_size(x))
                    value = _train_step(model, recipe, opt, x, y, scaler)
                    if sched is not None:
                        sched.step()
                    scope.log(loss=value)
                    if progress is not None:
                        progress(step, steps, value)
                    if recipe.eval_data is not None and (step + 1) % eval_every == 0:
                        scope.log(phase="eval", **_eval_metrics(model, recipe, dev))
                    bad = bad + 1 if not math.isfinite(value) else 0
                    if bad >= NAN_PATIENCE:
                        stopped = f"stopped after step {step}: the loss was non-finite for {NAN_PATIENCE} steps"
                        break
        except Exception as e:
            if not started:
                raise
            raise _training_failed(e, step, run_dir) from e
    model.train(was_training)

    data = {
        "mode": "recipe", "name": name, "steps": steps, "steps_run": step + 1, "every": every,
        "eval_every": eval_every if recipe.eval_data is not None else None, "stopped_early": stopped,
        "batch_size": float(sorted(batches_seen)[len(batches_seen) // 2]) if batches_seen else None,
        "distributed": M.distributed_info(), "modules": model_modules(model),
        "graph": graph.to_json() if graph is not None else None, "optimizer": M.optimizer_groups(model, opt),
    }  # fmt: skip
    with M.fork_rng(seed):
        data.update(_after_training(model, recipe, probe_x, graph, max_probe_samples, seed or 0, notes, steps))
    data["signal"] = signal + data.pop("signal_final", [])
    data["notes"] = notes
    write_probe(run_dir, data)
    return load(run_dir)


def _after_training(model, recipe, probe_x, graph, max_samples, seed, notes, step) -> dict:
    from normscope.analyze.quantities import weight_sparsity

    out: dict[str, Any] = {"weights": weight_sparsity(model)}
    first_type = None
    if graph is not None:
        for n in graph.nodes.values():
            if n.op == "module":
                first_type = n.type
                break
    tx = M.first_tensor(probe_x[0])
    if tx is not None and tx.is_floating_point():
        out["inputs"] = M.input_stats(probe_x, M.feature_axis(model, first_type, tx))
    else:
        notes["inputs"] = "the inputs are not floating-point tensors (token ids?)"
    if not M.params_finite(model):
        notes["bn"] = "the model's parameters are non-finite after training"
        return out
    data = {"train": probe_x}
    eval_x = M.take_samples(recipe.eval_data, max_samples) if recipe.eval_data is not None else []
    if eval_x:
        data["eval"] = eval_x
    bn = M.bn_passes(model, data, seed)
    if bn:
        out["bn"] = bn
        deploy = eval_x or probe_x
        gap = M.bn_output_gap(model, M.concat_inputs(deploy, 512), seed)
        if gap is not None:
            out["bn_gap"] = {"data": "eval" if eval_x else "train", "samples": min(512, sum(M.batch_size(x) for x in deploy)),
                             "rel_gap": gap, "dropout_on": M.has_dropout(model)}  # fmt: skip
    else:
        notes["bn"] = "the model has no BatchNorm layer"
    out["signal_final"] = M.measure_signal(model, probe_x[0], graph, "final", step, seed)
    return out


def _token_vocab(model: nn.Module, shape: tuple, dev, seed: int | None) -> int | None:
    """None when the model runs on standard-normal inputs of ``shape``; the vocabulary size when
    it only runs on token ids (its first nn.Embedding's, which is the token embedding in
    transformers' models). Anything else: a one-line error saying what the model did."""
    from normscope.probe.recipe import _first_line

    def attempt(x):
        with M.preserved(model), torch.no_grad(), M.fork_rng(seed):
            model.train()
            model(x)

    gen = torch.Generator().manual_seed(seed or 0)  # (the caller's random state is not touched)
    try:
        attempt(torch.randn(shape, generator=gen).to(dev))
        return None
    except Exception as e:  # noqa: BLE001 - told to the user in one line below
        first = e
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is not None:
        try:
            attempt(torch.randint(0, emb.num_embeddings, shape, generator=gen).to(dev))
            return emb.num_embeddings
        except Exception as e:  # noqa: BLE001
            raise NormscopeError(
                f"probe_model: the model raised on standard-normal inputs of shape {shape} "
                f"({type(first).__name__}: {_first_line(first)}) and on token ids below {emb.num_embeddings} "
                f"({type(e).__name__}: {_first_line(e)}); probe it with a recipe and real batches instead."
            ) from None
    raise NormscopeError(
        f"probe_model: the model raised on standard-normal inputs of shape {shape} "
        f"({type(first).__name__}: {_first_line(first)}); check --input-shape (batch size first), or probe "
        "it with a recipe and real batches."
    ) from None


def probe_model(model_or_factory: nn.Module | Callable[[], nn.Module], input_shape: Sequence[int], steps: int = 8,
                run_dir: str | os.PathLike | None = None, every: int = 1, seed: int | None = 0,
                name: str | None = None):  # fmt: skip
    """Initialisation-time diagnostics without data: dead-at-init, saturation-at-init, gradient
    flow, signal propagation and structural checks.

    ``input_shape`` includes the batch dimension, e.g. ``(32, 3, 32, 32)``. Each step draws fresh
    standard-normal inputs, or, for a model that embeds its input (a language model: it raises
    on floats and has an nn.Embedding), token ids uniform below its first embedding's size, with
    ``input_shape`` (batch, sequence); targets are standard-normal tensors shaped like the output
    (MSE loss). The optimizer is SGD with learning rate 0, so the weights stay at initialisation.
    """
    from normscope.collect import watch
    from normscope.store import load

    model = model_or_factory
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise NormscopeError(
                f"probe_model() needs an nn.Module or a factory returning one, got {type(model).__name__}."
            )
        model = model()
        if not isinstance(model, nn.Module):
            raise NormscopeError(f"the model factory returned {type(model).__name__}, expected a torch.nn.Module.")
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise NormscopeError(
            f"input_shape must be a sequence of ints including the batch size, e.g. (32, 3, 32, 32); got {input_shape!r}."
        ) from None
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise NormscopeError(
            f"input_shape must be positive sizes including the batch size, e.g. (32, 3, 32, 32); got {input_shape!r}."
        )
    steps = _check_int("steps", steps)
    every = _check_int("every", every)
    name = name or type(model).__name__
    run_dir = Path(run_dir) if run_dir is not None else _default_run_dir(name + "-init")
    dev = M.device_of(model)
    gen = torch.Generator().manual_seed(seed or 0)
    vocab = _token_vocab(model, shape, dev, seed)
    if vocab is None:
        xs = [torch.randn(shape, generator=gen).to(dev) for _ in range(steps)]
    else:  # a model that embeds its input: uniform token ids
        xs = [torch.randint(0, vocab, shape, generator=gen).to(dev) for _ in range(steps)]
    notes: dict[str, str] = {}
    graph, why = build_graph(model, (xs[0],))
    if why:
        notes["graph"] = f"fx tracing failed ({why})" + ("; used hooks" if graph is not None else "")
    signal = M.measure_signal(model, xs[0], graph, "init", 0, seed or 0)
    with M.preserved(model), torch.no_grad(), M.fork_rng(seed):
        model.train()
        out = M.first_tensor(model(xs[0]))
    if out is None or not out.is_floating_point():
        raise NormscopeError("probe_model needs a model whose output is a floating-point tensor (it uses an MSE loss).")
    ys = [torch.randn(out.shape, generator=gen).to(dev) for _ in range(steps)]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    was = model.training
    model.train()
    with M.fork_rng(seed):
        with watch(model, run_dir, every=every, optimizer=opt, name=name) as scope:
            for x, y in zip(xs, ys):
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.mse_loss(M.first_tensor(model(x)), y)
                loss.backward()
                opt.step()
                scope.log(loss=float(loss.detach()))
    model.train(was)
    from normscope.analyze.quantities import weight_sparsity

    data = {
        "mode": "model", "name": name, "steps": steps, "steps_run": steps, "every": every, "input_shape": list(shape),
        "batch_size": float(shape[0]), "distributed": M.distributed_info(), "modules": model_modules(model),
        "graph": graph.to_json() if graph is not None else None, "optimizer": M.optimizer_groups(model, opt),
        "weights": weight_sparsity(model), "signal": signal, "notes": dict(notes, inputs="synthetic inputs",
                                                                           bn="synthetic inputs"),
        "synthetic_inputs": "standard normal" if vocab is None else f"token ids uniform in [0, {vocab})",
    }  # fmt: skip
    write_probe(run_dir, data)
    return load(run_dir)
