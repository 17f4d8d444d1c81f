"""Massive-activations panel: max |x| / median |x| of each transformer block output (last sampled
step), in execution order, with the warning line."""

from __future__ import annotations

import numpy as np

from normscope_reports.panels import threshold


def panels(run, findings, F) -> list[dict]:
    s = run.signals
    if not len(s):
        return []
    s = s[s.name.isin(["massive_absmax", "massive_median"])]
    if not len(s):
        return []
    phase = "train" if (s.phase == "train").any() else "eval"
    s = s[(s.phase == phase) & (s.call == 0)]
    last = s[s.step == s.step.max()].pivot_table(index="layer", columns="name", values="value")
    order = {r["layer"]: i for i, r in enumerate(run.meta.get("execution_order") or [])}
    layers = sorted(last.index, key=lambda n: order.get(n, 1 << 30))
    a = last.loc[layers, "massive_absmax"].to_numpy(dtype=np.float64)
    m = last.loc[layers, "massive_median"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(m > 0, a / np.where(m > 0, m, 1.0), np.nan)
    warn = threshold(findings, "massive-activations", "warn")
    src, hover = F.layer_bars("max |x| / median |x| per transformer block", "max / median", list(layers), ratio,
                              log=True, threshold=warn, threshold_label=f"warning {warn:g}")  # fmt: skip
    return [{"check": "massive-activations", "title": "Massive activations", "src": src, "hover": hover,
             "note": f"block outputs at step {int(s.step.max())} ({phase}); docs/checks/massive-activations.md"}]  # fmt: skip
