"""weight-norm-init: output std of the weight-normalised layers over the steps (the scale g sets),
g's relative update ‖Δg‖/‖g‖ and v's effective learning rate η/‖v‖²."""

from __future__ import annotations

import numpy as np

from normscope_reports.panels import threshold

ID = "weight-norm-init"


def panels(run, findings: list[dict], F) -> list[dict]:
    from normscope.analyze.checks.weight_norm_init import layer_profile, weight_norm_layers
    from normscope.analyze.config import Config
    from normscope.analyze.context import Context

    ctx = Context(run)
    layers = weight_norm_layers(ctx)
    if not layers:
        return []
    t = {k: threshold(findings, ID, k) for k in Config().thresholds(ID)}
    profs = [layer_profile(ctx, layer, wn) for layer, wns in layers.items() for wn in wns]
    out = []
    std = {p["layer"]: (np.asarray(p["steps"]), np.asarray(p["output_std"])) for p in profs if "steps" in p}
    if std:
        uri, hover = F.step_series("Weight-normalised layers: output std over steps", "output std", std,
                                   threshold=float(t["low"]), threshold_label=f"low {t['low']:g}")  # fmt: skip
        out.append({"check": ID, "title": "weight-norm output std", "src": uri, "hover": hover,
                    "note": f"flagged when the first step's std is outside [{t['low']:g}, {t['high']:g}]; "
                            "data-dependent init starts every layer at 1"})  # fmt: skip
    g = {f"{p['layer']} g": (np.asarray(p["g_steps"]), np.asarray(p["g_rel_update"])) for p in profs
         if "g_steps" in p and np.isfinite(p["g_rel_update"]).any()}  # fmt: skip
    if g:
        uri, hover = F.step_series("Weight-normalised layers: g's relative update per step", "‖Δg‖ / ‖g‖", g)
        out.append({"check": ID, "title": "g's relative update", "src": uri, "hover": hover,
                    "note": "how fast the output scale can move"})  # fmt: skip
    v = {f"{p['layer']} v": (np.asarray(p["v_steps"]), np.asarray(p["v_effective_lr"])) for p in profs
         if "v_steps" in p and np.isfinite(p["v_effective_lr"]).any()}  # fmt: skip
    if v:
        uri, hover = F.step_series("Weight-normalised layers: v's effective learning rate", "η / ‖v‖²", v)
        out.append({"check": ID, "title": "v's effective learning rate", "src": uri, "hover": hover,
                    "note": "v is scale-invariant: its step shrinks as ‖v‖ grows"})  # fmt: skip
    return out
