"""Train/eval mode audit: which forwards ran in which mode, and whether they reached a backward.

Two mistakes live in the modes, not in the tensors (eval-in-train-mode, frozen-bn-drift):

- an *evaluation* forward — grad disabled, inference mode, or an output that never reached a
  backward before the step ended — while Dropout (p > 0) or BatchNorm with running statistics is
  in train mode: dropout still drops, BN normalises with the batch's statistics and updates its
  running statistics on the evaluation data;
- a *training* forward (its output reached a backward) with the root module in eval mode (a
  ``model.eval()`` never undone): BN never updates and never sees batch statistics, dropout is off.

Every root forward is audited, sampled step or not, because evaluation loops rarely land on
sampled steps: the audit reads a few ``.training`` flags (no tensor op) and, when grad is enabled,
registers one tensor hook on the forward's output to learn whether a backward reached it. Results
are counts kept on the host and written to ``meta.json`` (``modes``) with the run's meta.

BatchNorm layers whose affine parameters do not train (``requires_grad=False``, ``affine=False``,
or in no optimizer param group) are the frozen-bn-drift candidates: their running statistics are
snapshotted when the scope starts and, on sampled steps, their drift is emitted as signals
(``bn_mean_drift``: RMS over channels of |Δμ|/σ₀; ``bn_mean_drift_max``; ``bn_var_log_ratio``:
mean of log(σ²/σ₀²); ``bn_var_log_ratio_max``: the largest |log(σ²/σ₀²)|; ``bn_train_forwards``:
training forwards of this step with the layer in train mode).
"""

from __future__ import annotations

import weakref
from itertools import islice
from typing import Any

import torch
from torch import nn

from normscope.collect.outputs import iter_float_tensors

MAX_STEPS_LISTED = 20


def _is_running_bn(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and bool(m.track_running_stats)
        and (getattr(m, "running_mean", None) is not None)
    )


def _is_active_dropout(m: nn.Module) -> bool:
    """A Dropout module with p > 0, or a module that applies dropout functionally: a float
    attribute named like a dropout rate in (0, 1) (``attention_dropout`` of Llama/Qwen2
    attention, ``dropout_p``, ``attn_drop``…) and no dropout module among its children — it calls
    ``F.dropout(x, p, self.training)``, so its own train flag decides."""
    from normscope.roles import role

    if role(m) == "dropout":
        return float(getattr(m, "p", 0.0) or 0.0) > 0.0
    rates = [v for k, v in vars(m).items() if isinstance(v, float) and not isinstance(v, bool)
             and "drop" in k.lower() and 0.0 < v < 1.0]  # fmt: skip
    return bool(rates) and not any(role(c) == "dropout" for c in m.children())


MAX_FOLLOWED = 8  # output tensors a forward's backward is watched on


class _Forward:
    __slots__ = ("grad", "inference", "root_train", "bn_train", "bn_eval", "drop_train", "drop_eval",
                 "frozen_train", "backward", "logged", "__weakref__")  # fmt: skip

    def __init__(self):
        self.backward = False
        self.logged: list[str] = []


class ModeAudit:
    """Counts forwards by mode; see the module docstring."""

    def __init__(self, model: nn.Module, names: dict[str, str], optimizer=None):
        self.root = model
        self.bn = [m for m in model.modules() if _is_running_bn(m)]
        self.dropout = [m for m in model.modules() if _is_active_dropout(m)]
        self.names = names  # raw module name → canonical name
        raw = {id(m): n for n, m in model.named_modules()}
        self.bn_names = [names.get(raw[id(m)], raw[id(m)]) for m in self.bn]
        self.frozen: list[tuple[str, nn.Module]] = []
        self.frozen_why: dict[str, str] = {}
        # the drift reference of every BN, taken now (a layer may be found frozen only at the first
        # optimizer step, after its statistics already moved): μ₀, σ₀ = √(σ₀² + ε), log(σ₀² + ε)
        self._refs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for name, m in zip(self.bn_names, self.bn):
                v0 = m.running_var.detach().double() + float(m.eps)
                self._refs[name] = (m.running_mean.detach().double().clone(), v0.sqrt(), v0.log())
        self._opt_ids = self._optimizer_ids(optimizer)
        self._find_frozen()
        self.current: list[_Forward] = []
        self.events: dict[str, dict] = {}
        self.totals = {"train": 0, "eval": 0}  # classified forwards: reached a backward or not
        self.metrics_fed: list[str] = []

    @staticmethod
    def _optimizer_ids(optimizer) -> set[int] | None:
        if optimizer is None:
            return None
        return {id(p) for g in optimizer.param_groups for p in g["params"]}

    def set_optimizer(self, optimizer) -> None:
        """The optimizer became known (first step): re-judge which BN layers are frozen."""
        ids = self._optimizer_ids(optimizer)
        if ids is not None and ids != self._opt_ids:
            self._opt_ids = ids
            self._find_frozen()

    def _find_frozen(self) -> None:
        frozen, why = [], {}
        for name, m in zip(self.bn_names, self.bn):
            ps = [p for p in (m.weight, m.bias) if p is not None]
            if not ps:
                reason = "affine=False"
            elif not any(p.requires_grad for p in ps):
                reason = "requires_grad=False"
            elif self._opt_ids is not None and not any(id(p) in self._opt_ids for p in ps):
                reason = "in no optimizer param group"
            else:
                continue
            frozen.append((name, m))
            why[name] = reason
        self.frozen, self.frozen_why = frozen, why

    # --- per forward -----------------------------------------------------------------------------
    def on_forward(self) -> None:
        f = _Forward()
        f.grad = torch.is_grad_enabled()
        f.inference = torch.is_inference_mode_enabled()
        f.root_train = self.root.training
        f.bn_train = sum(1 for m in self.bn if m.training)
        f.bn_eval = len(self.bn) - f.bn_train
        f.drop_train = sum(1 for m in self.dropout if m.training)
        f.drop_eval = len(self.dropout) - f.drop_train
        f.frozen_train = [name for name, m in self.frozen if m.training]
        self.current.append(f)

    def after_forward(self, output: Any) -> None:
        if not self.current:
            return
        f = self.current[-1]
        if not f.grad or f.inference:
            return
        floats = [t for _, t in islice(iter_float_tensors(output), 64)] if output is not None else []
        ts = [t for t in floats if t.requires_grad][:MAX_FOLLOWED]
        if not ts:
            # no output seen (a compiled root) or none we can follow (a custom output object):
            # unknown, so counted as training, never reported; float outputs without grad cannot
            # reach a backward
            f.backward = not floats
            return
        ref = weakref.ref(f)

        def reached(g):
            fw = ref()
            if fw is not None:
                fw.backward = True

        for t in ts:
            t.register_hook(reached)

    def on_log(self, phase: str, names: list[str]) -> None:
        """Eval metrics were logged: they were computed from the forwards since the last log."""
        if phase == "train":
            return
        for f in self.current:
            f.logged += names

    # --- step end --------------------------------------------------------------------------------
    def end_step(self, step: int) -> dict[str, int]:
        """Classify this step's forwards; returns per frozen BN the training forwards in train mode."""
        frozen_train: dict[str, int] = {}
        for f in self.current:
            trained = f.grad and not f.inference and f.backward
            self.totals["train" if trained else "eval"] += 1
            if trained:
                for name in f.frozen_train:
                    frozen_train[name] = frozen_train.get(name, 0) + 1
                if not f.root_train and (f.bn_eval or f.drop_eval):
                    self._event("train-in-eval-mode", step, f)
            elif f.bn_train or f.drop_train:
                kind = "inference_mode" if f.inference else "no_grad" if not f.grad else "no_backward"
                self._event(f"eval-in-train-mode:{kind}", step, f)
                for n in f.logged:
                    if n not in self.metrics_fed:
                        self.metrics_fed.append(n)
        self.current = []
        return frozen_train

    def _event(self, kind: str, step: int, f: _Forward) -> None:
        e = self.events.setdefault(kind, {"forwards": 0, "first_step": step, "last_step": step, "steps": [],
                                          "bn_train": 0, "bn_eval": 0, "dropout_train": 0, "dropout_eval": 0,
                                          "metrics": []})  # fmt: skip
        e["forwards"] += 1
        e["last_step"] = step
        if (not e["steps"] or e["steps"][-1] != step) and len(e["steps"]) < MAX_STEPS_LISTED:
            e["steps"].append(step)
        for k, v in (("bn_train", f.bn_train), ("bn_eval", f.bn_eval), ("dropout_train", f.drop_train),
                     ("dropout_eval", f.drop_eval)):  # fmt: skip
            e[k] = max(e[k], v)
        for n in f.logged:
            if n not in e["metrics"]:
                e["metrics"].append(n)

    def drift(self, frozen_train: dict[str, int]) -> list[tuple[str, tuple[str, ...], torch.Tensor]]:
        """Per frozen BN: its running statistics' drift from the reference, as device tensors."""
        out = []
        names = ("bn_mean_drift", "bn_mean_drift_max", "bn_var_log_ratio", "bn_var_log_ratio_max",
                 "bn_train_forwards")  # fmt: skip
        for name, m in self.frozen:
            ref = self._refs.get(name)
            if ref is None or m.running_mean is None or ref[0].shape != m.running_mean.shape:
                continue
            rm0, sd0, logv0 = ref
            with torch.no_grad():
                dm = ((m.running_mean.double() - rm0) / sd0).abs()
                lr = (m.running_var.double() + float(m.eps)).log_() - logv0
                vals = torch.stack([dm.square().mean().sqrt(), dm.max(), lr.mean(), lr.abs().max(),
                                    torch.full((), float(frozen_train.get(name, 0)), dtype=torch.float64,
                                               device=dm.device)])  # fmt: skip
            out.append((name, names, vals))
        return out

    def to_json(self) -> dict:
        return {
            "batchnorm": len(self.bn), "dropout": len(self.dropout),
            "forwards": dict(self.totals), "events": self.events, "metrics_fed": self.metrics_fed,
            "frozen_bn": dict(self.frozen_why),
        }  # fmt: skip
