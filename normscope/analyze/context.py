"""What a check sees: the run, the model (optional), probe measurements, and derived views.

Everything is computed lazily and cached, so checks stay small and independent. Data after
the first non-finite step is cut from the views checks read (``train``, ``grads``, ``params``):
once a NaN has spread, every other statistic is a consequence, and only ``non-finite``
should speak about it.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from normscope.analyze.graph import Graph, build_graph, from_execution_order
from normscope.analyze.modinfo import model_modules

if TYPE_CHECKING:
    import pandas as pd

    from normscope.store import Run

BIG_ORDER = 10**9


class Context:
    def __init__(self, run: Run, model=None, optimizer=None):
        self.run = run
        self.model = model
        self.optimizer = optimizer
        self.meta = run.meta
        self.probe: dict = run.probe
        self.graph_note: str | None = None

    # --- identity -----------------------------------------------------------------------------
    @property
    def model_only(self) -> bool:
        return self.probe.get("mode") == "model"

    @cached_property
    def order_index(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, r in enumerate(self.meta.get("execution_order") or []):
            out.setdefault(r["layer"], i)
        return out

    def order(self, layer: str | None) -> int:
        if layer is None:
            return BIG_ORDER
        return self.order_index.get(layer, BIG_ORDER)

    @cached_property
    def call_order(self) -> dict[tuple[str, int], int]:
        return {(r["layer"], int(r.get("call", 0))): i for i, r in enumerate(self.meta.get("execution_order") or [])}

    @cached_property
    def modules(self) -> dict[str, dict[str, Any]]:
        """name → {type, bias, p, ...}: from the model, else the probe file, else the run's meta."""
        if self.model is not None:
            return model_modules(self.model)
        if self.probe.get("modules"):
            return dict(self.probe["modules"])
        keep = ("family", "role", "weight_norm", "bn", "momentum", "track_running_stats")
        return {name: {"type": m["type"], "own_params": m.get("params", 0)} | {k: m[k] for k in keep if k in m}
                for name, m in self.run.modules.items()}  # fmt: skip

    def type_of(self, layer: str | None) -> str | None:
        info = self.modules.get(layer or "")
        return info.get("type") if info else None

    # --- tables -------------------------------------------------------------------------------
    @cached_property
    def stats(self) -> pd.DataFrame:
        return self.run.stats

    @cached_property
    def grads_all(self) -> pd.DataFrame:
        """Every phase's gradient rows but those of steps a loss scaler skipped (an overflowed
        backward it discarded: expected, harmless; the loss-scaling check speaks of them)."""
        g = self.run.grads
        skipped = self.run.skipped_steps
        return g[~g.step.isin(skipped)] if skipped and len(g) else g

    @cached_property
    def params_all(self) -> pd.DataFrame:
        return self.run.params

    @cached_property
    def signals(self) -> pd.DataFrame:
        """The run's ``signals`` table (named per-layer measurements of the collector's probes)."""
        return self.run.signals

    def signal(self, name: str, phase: str | None = "train") -> pd.DataFrame:
        """One signal's rows (step, phase, layer, call, name, value), sorted by layer, call and step."""
        return self.run.signal(name, phase)

    @cached_property
    def scalars(self) -> pd.DataFrame:
        return self.run.scalars

    @cached_property
    def nonfinite_step(self) -> int | None:
        """First step where any statistic, gradient, parameter norm or loss is NaN/Inf."""
        steps = []
        s = self.stats
        if len(s):
            bad = s[(s.nan_count > 0) | (s.inf_count > 0)]
            if len(bad):
                steps.append(int(bad.step.min()))
        g = self.grads_all
        if len(g):
            bad = g[(g.nan_count > 0) | (g.inf_count > 0)]
            if len(bad):
                steps.append(int(bad.step.min()))
        p = self.params_all
        if len(p):
            bad = p[~np.isfinite(p.norm.to_numpy(float))]
            if len(bad):
                steps.append(int(bad.step.min()))
        sc = self.scalars
        if len(sc):
            bad = sc[~np.isfinite(sc.value.to_numpy(float))]
            if len(bad):
                steps.append(int(bad.step.min()))
        return min(steps) if steps else None

    def _finite(self, df: pd.DataFrame) -> pd.DataFrame:
        if self.nonfinite_step is None or not len(df):
            return df
        return df[df.step < self.nonfinite_step]

    @cached_property
    def train(self) -> pd.DataFrame:
        """Train-phase activation rows before the first non-finite step."""
        s = self.stats
        return self._finite(s[s.phase == "train"]) if len(s) else s

    @cached_property
    def grads(self) -> pd.DataFrame:
        g = self.grads_all
        return self._finite(g[g.phase == "train"]) if len(g) else g

    @cached_property
    def params(self) -> pd.DataFrame:
        return self._finite(self.params_all)

    def loss_series(self, phase: str, name: str = "loss") -> pd.DataFrame:
        sc = self.scalars
        if not len(sc):
            return sc
        d = sc[(sc.phase == phase) & (sc.name == name)]
        d = self._finite(d).sort_values("step")
        return d.groupby("step", as_index=False)["value"].mean()

    @cached_property
    def acts_phase(self) -> str:
        """The phase the activation checks judge: "train", or "eval" for an inference-only run."""
        s = self.stats
        return "eval" if len(s) and not (s.phase == "train").any() else "train"

    @cached_property
    def acts(self) -> pd.DataFrame:
        """Activation rows the activation checks judge (dead units, saturation): the train rows, or
        for an inference-only run (eval + no_grad, nothing trained) the eval rows; before the
        first non-finite step."""
        if self.acts_phase == "train":
            return self.train
        s = self.stats
        return self._finite(s[s.phase == "eval"])

    @cached_property
    def _train_groups(self) -> dict:
        tr = self.acts
        if not len(tr):
            return {}
        return {
            (str(k[0]), int(k[1]), str(k[2])): g.sort_values("step")
            for k, g in tr.groupby(["layer", "call", "output"], sort=False)
        }

    def layer_series(self, layer: str, call: int = 0, output: str = "", df=None) -> pd.DataFrame:
        """Rows of one layer call (:attr:`acts` by default: train rows), sorted by step."""
        if df is None:
            d = self._train_groups.get((layer, int(call), output))
            return d if d is not None else self.acts.iloc[:0]
        d = df[(df.layer == layer) & (df.call == call) & (df.output == output)]
        return d.sort_values("step")

    def layer_calls(self, df=None, output: str = "") -> list[tuple[str, int]]:
        """(layer, call) pairs present in ``df`` (:attr:`acts` by default), in execution order."""
        df = self.acts if df is None else df
        if not len(df):
            return []
        keys = df[df.output == output][["layer", "call"]].drop_duplicates()
        pairs = [(str(layer), int(call)) for layer, call in keys.itertuples(index=False)]
        return sorted(pairs, key=lambda k: (self.call_order.get(k, BIG_ORDER), k))

    # --- structure ----------------------------------------------------------------------------
    @cached_property
    def graph(self) -> Graph | None:
        if self.model is not None:
            g, why = build_graph(self.model)
            if g is not None:
                return g
            self.graph_note = f"fx tracing failed ({why})"
        if self.probe.get("graph"):
            return Graph.from_json(self.probe["graph"])
        order = self.meta.get("execution_order") or []
        if order:
            return from_execution_order(order, {k: v.get("type") for k, v in self.modules.items()})
        return None

    @cached_property
    def norm_placement(self) -> dict[str, dict]:
        """Per repeated block, where its norm sits ("pre", "post", "both", None): from the recorded
        execution order (:func:`normscope.roles.norm_placement`), and where the graph records
        functional ops (fx, hooks), a "post" block's last norm must take a residual sum (an add)
        as input — a BatchNorm closing a conv branch before the add (MobileNetV2) is not post-norm.
        Each block says what decided it (``"by"``: "graph" or "execution-order")."""
        from normscope.analyze.graph import _ADD_NAMES
        from normscope.roles import norm_placement

        out = norm_placement(self.meta.get("execution_order") or [], self.modules)
        g = self.graph
        functional = g is not None and g.source in ("fx", "hooks")
        for v in out.values():
            v["by"] = "execution-order"
            if v["placement"] not in ("post", "both") or not functional:
                continue
            nodes = g.module_nodes(v["last"])
            if not nodes:
                continue  # the graph treats the block as one leaf: the order alone decides
            v["by"] = "graph"
            if not any(p.op == "function" and p.type in _ADD_NAMES for n in nodes for p in g.producers(n.id)):
                v["placement"] = "pre" if v["placement"] == "both" else None
        return out

    def node_type(self, node) -> str | None:
        if node.op != "module":
            return node.type
        return self.type_of(node.module) or node.type

    # --- helpers for checks -----------------------------------------------------------------
    def window_rows(self, n_rows: int, frac: float, min_rows: int) -> int:
        return max(1, min(n_rows, max(min_rows, int(math.ceil(frac * n_rows)))))
