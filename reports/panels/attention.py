"""Attention and output-logit panels: the largest attention logit per attention block over steps
(with the attention-logit-growth warning line) and the output logits' mean log Σ exp(z)."""

from __future__ import annotations

import numpy as np

from normscope_reports.panels import threshold


def _series(run, name: str, agg: str = "max") -> tuple[dict, str | None]:
    s = run.signals
    if not len(s):
        return {}, None
    s = s[s.name == name]
    phase = "train" if (s.phase == "train").any() else ("eval" if len(s) else None)
    s = s[s.phase == phase]
    out = {}
    for layer, d in s.groupby("layer", sort=False):
        g = d.groupby("step").value.agg(agg)
        out[layer] = (g.index.to_numpy(), g.to_numpy(dtype=np.float64))
    return out, phase


def panels(run, findings, F) -> list[dict]:
    out = []
    series, phase = _series(run, "attn_logit_max")
    if series:
        warn = threshold(findings, "attention-logit-growth", "warn")
        src, hover = F.step_series("Largest attention logit per attention block", "max |q·k|·scale", series,
                                   log=True, threshold=warn, threshold_label=f"warning {warn:g}")  # fmt: skip
        out.append({"check": "attention-logit-growth", "title": "Attention logits", "src": src, "hover": hover,
                    "note": f"max over heads and ≤ 2 sequences × 64 positions, {phase} forwards; "
                            "docs/checks/attention-logit-growth.md"})  # fmt: skip
    series, phase = _series(run, "logz_mean", "mean")
    if series:
        src, hover = F.step_series("Output logits: mean log Σ exp(z)", "log Z (nats)", series, log=False,
                                   threshold=0.0, threshold_label="log Z = 0 (what z-loss aims at)")  # fmt: skip
        out.append({"check": "output-logit-divergence", "title": "Output log-partition", "src": src,
                    "hover": hover, "note": f"{phase} forwards; docs/checks/output-logit-divergence.md"})  # fmt: skip
    return out
