"""frozen-bn-drift: the running mean's drift (RMS over channels, in σ₀) of each frozen BatchNorm
layer over the sampled steps, with the check's threshold."""

from __future__ import annotations

import numpy as np

from normscope_reports.panels import threshold

MAX_LAYERS = 12


def panels(run, findings: list[dict], F) -> list[dict]:
    s = run.signal("bn_mean_drift")
    if not len(s):
        return []
    flagged = [f.get("layer") for f in findings if f.get("check") == "frozen-bn-drift"]
    layers = list(dict.fromkeys([lay for lay in flagged if lay] + list(s.layer.unique())))[:MAX_LAYERS]
    series = {lay: (d.step.to_numpy(), d.value.to_numpy(dtype=np.float64)) for lay, d in s.groupby("layer", sort=False)
              if lay in layers}  # fmt: skip
    thr = threshold(findings, "frozen-bn-drift", "mean_warn")
    src, hover = F.step_series("Frozen BatchNorm: running-mean drift from the start (RMS over channels)",
                               "|μ − μ₀| / σ₀ (RMS)", series, log=False, threshold=thr,
                               threshold_label=f"frozen-bn-drift threshold {thr:g}σ")  # fmt: skip
    note = f"{len(series)} frozen BatchNorm layer(s)" + (" (the first 12)" if s.layer.nunique() > MAX_LAYERS else "")
    return [{"check": "frozen-bn-drift", "title": "frozen BatchNorm running-mean drift", "src": src, "hover": hover,
             "note": note}]  # fmt: skip
