"""saturation: sigmoid/tanh/hardtanh outputs stuck where the derivative is ~0.

The collector counts saturated outputs per layer (sigmoid < 0.01 or > 0.99, tanh |y| > 0.97,
hardtanh-family at its bounds). For ReLU6 (and Hardtanh(0, x)) only the upper bound counts:
its lower bound is the ReLU off-region, which dead-units judges. Reports the final window's
saturated fraction and the steps where the layer entered and left saturation."""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import pct
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "saturation"


_DESC = {"sigmoid": "sigmoid outputs < 0.01 or > 0.99", "tanh": "tanh outputs with |y| > 0.97",
         "bounds": "outputs at the clamp bounds"}  # fmt: skip


_PRE = {"sigmoid": "|z| > 4.6", "tanh": "|z| > 2.1"}


def episodes(steps, saturated) -> list[list]:
    """[entered, left] step pairs of consecutive saturated rows (left = None while still in)."""
    out, cur = [], None
    for s, flag in zip(steps, saturated):
        if flag and cur is None:
            cur = [int(s), None]
        elif not flag and cur is not None:
            cur[1] = int(s)
            out.append(cur)
            cur = None
    if cur is not None:
        out.append(cur)
    return out


@register(
    id=ID, severity="error",
    summary="Saturating activations (sigmoid, tanh, hardtanh) stuck in their flat regions, with when each layer entered and left saturation.",
    needs=("stats", "standard-stats"),
    thresholds={"warn": 0.2, "error": 0.5, "window_frac": 0.1, "min_window_steps": 3},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    kinds = ctx.meta.get("saturation") or {}
    pairs = [k for k in ctx.layer_calls() if k[0] in kinds]
    if not pairs:
        raise SkipCheck("no saturating activation (Sigmoid, Tanh, Hardtanh family) was recorded")
    out = []
    for layer, call in pairs:
        d = ctx.layer_series(layer, call)
        kind = kinds[layer]
        frac = d.frac_sat.to_numpy(dtype=np.float64)
        info = ctx.modules.get(layer, {})
        lower_is_relu = kind == "bounds" and (info.get("type") == "ReLU6" or info.get("min_val") == 0.0)
        if lower_is_relu:
            frac = np.clip(frac - d.frac_nonpos.to_numpy(dtype=np.float64), 0.0, 1.0)
        steps = d.step.to_numpy()
        n_rows = len(d)
        w = ctx.window_rows(n_rows, t["window_frac"], t["min_window_steps"])
        end = float(np.nanmean(frac[n_rows - w :]))
        eps = episodes(steps, frac >= t["warn"])
        where = layer + (f" (call {call})" if call else "")
        ev = {
            "saturated_fraction_end": end, "score": end, "saturated_fraction_max": float(np.nanmax(frac)),
            "saturated_fraction_first": float(frac[0]), "kind": kind, "episodes": eps,
            "window_steps": [int(steps[n_rows - w]), int(steps[-1])], "call": call,
            "series": {"step": steps[:: max(1, n_rows // 50)].tolist(), "frac": frac[:: max(1, n_rows // 50)].tolist()},
            "preactivation_equivalent": _PRE.get(kind), "upper_bound_only": lower_is_relu,
            "phase": ctx.acts_phase, "thresholds": {"warn": t["warn"], "error": t["error"]},
        }  # fmt: skip
        rec = (
            "Scale the initialisation to the activation (Glorot/Xavier for tanh and sigmoid, gain 5/3 for tanh), "
            "normalise pre-activations (BatchNorm/LayerNorm before the nonlinearity), lower the learning rate, or "
            "use ReLU-family activations in hidden layers: a saturated unit passes back almost no gradient "
            "(Glorot & Bengio 2010 saw the top sigmoid layer saturate at 0 early and recover only slowly)."
        )
        if end >= t["warn"]:
            sev = "error" if end >= t["error"] else "warning"
            since = f" since step {eps[-1][0]}" if eps and eps[-1][1] is None else ""
            msg = f"{pct(end)} of the {_DESC.get(kind, 'outputs')} of {where} are saturated at the end of training{since}."
            out.append(Finding(ID, sev, layer, (int(steps[n_rows - w]), int(steps[-1])), msg, ev, rec))
        elif eps:
            e0 = eps[0]
            span = f"entered saturation at step {e0[0]} and left it at step {e0[1]}"
            msg = (
                f"{where} {span} (peak {pct(ev['saturated_fraction_max'])} of {_DESC.get(kind, 'outputs')}); "
                f"it ends at {pct(end)}."
            )
            out.append(
                Finding(
                    ID,
                    "info",
                    layer,
                    (e0[0], e0[1]),
                    msg,
                    ev,
                    "No action needed if training recovered; watch the early steps' learning rate.",
                )
            )
    return out
