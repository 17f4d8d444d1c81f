"""non-finite: the first module, in execution order, whose output holds NaN or Inf.

Forward: at the first step with a non-finite activation, the earliest row in execution order
(a normalisation layer's recorded *input* comes before its output, so a NaN created by
unhooked code between two modules is reported as "the input of X"). Backward: gradients flow
in reverse, so the origin is the *last* module in execution order whose output gradient is
non-finite (the first one the backward pass reached). A forward NaN at the same or an earlier
step is the root cause and wins. Parameter norms and the logged loss are checked too."""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num
from normscope.analyze.context import BIG_ORDER, Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "non-finite"


_REC = ("Look at what this module computes at that step: lower the learning rate or clip gradients "
        "(torch.nn.utils.clip_grad_norm_) if weights or activations overflowed, guard log/sqrt/division with an "
        "epsilon, check the data batch for NaN, and rerun that step under torch.autograd.set_detect_anomaly(True) "
        "to get the exact operation.")  # fmt: skip


def _row_stats(r) -> dict:
    return {"mean": float(r["mean"]), "std": float(r["std"]), "min": float(r["min"]), "max": float(r["max"]),
            "nan_count": int(r["nan_count"]), "inf_count": int(r["inf_count"]), "count": int(r["count"])}  # fmt: skip


def _input_row(ctx, rows_at_step, layer: str, call: int, output: str):
    """Statistics of the offending module's input at that step, and where they came from."""
    same = rows_at_step[(rows_at_step.layer == layer) & (rows_at_step.call == call)]
    own = same[same.output == "input"]
    if output != "input" and len(own):
        return own.iloc[0], "the module's recorded input"
    g = ctx.graph
    hooked = set(rows_at_step.layer)
    if g is not None and g.source != "execution-order":
        nodes = g.module_nodes(layer)
        if nodes:
            node = nodes[min(call, len(nodes) - 1)]
            for prod in g.upstream(node.id, stop=lambda n: n.op == "module" and n.module in hooked):
                if prod.op == "module" and prod.module in hooked:
                    r = rows_at_step[(rows_at_step.layer == prod.module) & (rows_at_step.output == "")]
                    if len(r):
                        return r.iloc[0], f"output of producer {prod.module} ({g.source} graph)"
    k = ctx.call_order.get((layer, call))
    if k is not None and k > 0:
        prev = (ctx.meta.get("execution_order") or [])[k - 1]
        r = rows_at_step[
            (rows_at_step.layer == prev["layer"]) & (rows_at_step.call == prev["call"]) & (rows_at_step.output == "")
        ]
        if len(r):
            return r.iloc[0], f"output of {prev['layer']}, the previous module in execution order"
    return None, "unknown (first module, or its producer is not hooked)"


def _first_unhooked(ctx, sf: int | None) -> dict | None:
    """The first non-finite output of a module the collector does not hook (the finiteness flags in
    meta.json), when it comes before the first hooked module's: at an earlier step, or at the same
    step when that hooked module's input was already non-finite (or unknown)."""
    events = [e for e in ctx.meta.get("nonfinite_modules") or [] if isinstance(e, dict)]
    if not events:
        return None
    first = min(events, key=lambda e: (e["step"], e.get("seq", 0)))
    if sf is None or first["step"] < sf:
        return first
    if first["step"] > sf:
        return None
    s = ctx.stats
    rows = s[(s.step == sf) & ((s.nan_count > 0) | (s.inf_count > 0))].copy()
    rows["_o"] = [ctx.call_order.get((r.layer, int(r.call)), BIG_ORDER) for r in rows.itertuples()]
    head = int(rows["_o"].min())
    # the unhooked module finished before the first non-finite hooked one: it made the NaN/Inf
    after = first.get("after")
    before = -1 if not after else ctx.call_order.get((str(after[0]), int(after[1])), BIG_ORDER)
    return first if before < head else None


def _unhooked_finding(ctx, e: dict, bad_f, common: dict) -> Finding:
    at = bad_f[bad_f.step == e["step"]] if len(bad_f) else bad_f
    after = []
    if len(at):
        at = at.assign(_o=[ctx.call_order.get((r.layer, int(r.call)), BIG_ORDER) for r in at.itertuples()])
        after = list(dict.fromkeys(at.sort_values("_o").layer.astype(str)))[:8]
    ev = dict(common, step=e["step"], phase=e["phase"], module_type=e["type"], hooked=False,
              source="finiteness flag on an unhooked module", downstream_nonfinite=after)  # fmt: skip
    msg = (f"{e['layer']} ({e['type']}, a module the collector does not hook) is the first module whose output holds "
           f"NaN/Inf in the {e['phase']} forward pass, at step {e['step']}"
           + (f"; the hooked modules after it ({', '.join(after[:3])}{', …' if len(after) > 3 else ''}) only "
              "passed it on." if after else "."))  # fmt: skip
    return Finding(ID, "error", e["layer"], e["step"], msg, ev, _REC)


@register(
    id=ID, severity="error",
    summary="The first module (in execution order) whose output, or output gradient, holds NaN or Inf, with its input statistics.",
    needs=(),
    thresholds={},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    s, g = ctx.stats, ctx.grads_all
    if not len(s) and not len(g):
        raise SkipCheck("no activation or gradient statistics in the run")
    bad_f = s[(s.nan_count > 0) | (s.inf_count > 0)] if len(s) else s
    bad_b = g[(g.nan_count > 0) | (g.inf_count > 0)] if len(g) else g
    sf = int(bad_f.step.min()) if len(bad_f) else None
    sb = int(bad_b.step.min()) if len(bad_b) else None
    loss = ctx.scalars
    bad_loss = loss[~np.isfinite(loss.value.to_numpy(float))] if len(loss) else loss
    sl = int(bad_loss.step.min()) if len(bad_loss) else None
    par = ctx.params_all
    bad_par = par[~np.isfinite(par.norm.to_numpy(float))] if len(par) else par
    sp = int(bad_par.step.min()) if len(bad_par) else None
    affected = sorted(set(bad_f.step.tolist()) | set(bad_b.step.tolist())) if (sf is not None or sb is not None) else []
    common = {"first_forward_step": sf, "first_backward_step": sb, "first_nonfinite_loss_step": sl,
              "first_nonfinite_param_step": sp, "steps_affected": len(affected)}  # fmt: skip
    sentinel = _first_unhooked(ctx, sf)
    if sentinel is not None and (sb is None or sentinel["step"] <= sb):
        return [_unhooked_finding(ctx, sentinel, bad_f, common)]
    if sf is not None and (sb is None or sf <= sb):
        rows = bad_f[bad_f.step == sf].copy()
        rows["_o"] = [ctx.call_order.get((r.layer, int(r.call)), BIG_ORDER) for r in rows.itertuples()]
        rows["_in"] = [0 if o == "input" else 1 for o in rows.output]
        first = rows.sort_values(["_o", "_in"]).iloc[0]
        layer, call, output, phase = str(first.layer), int(first.call), str(first.output), str(first.phase)
        at = s[(s.step == sf) & (s.phase == phase)]
        ev = dict(
            common,
            step=sf,
            phase=phase,
            call=call,
            output=output,
            module_type=ctx.type_of(layer),
            **{"nan_count": int(first.nan_count), "inf_count": int(first.inf_count), "count": int(first["count"])},
        )
        if output == "input":
            msg = (
                f"The input of {layer} ({ctx.type_of(layer)}) is the first non-finite tensor in the forward pass at "
                f"step {sf} ({int(first.nan_count)} NaN, {int(first.inf_count)} Inf of {int(first['count'])} values): "
                f"it comes from code between the hooked modules."
            )
            ev["input_source"] = "recorded input of the normalisation layer"
        else:
            inp, src = _input_row(ctx, at, layer, call, output)
            ev["input_source"] = src
            if inp is not None:
                ev["input"] = _row_stats(inp)
            clean = inp is not None and int(inp.nan_count) == 0 and int(inp.inf_count) == 0
            what = f"{layer}" + (f" (call {call})" if call else "") + (f", output {output!r}" if output else "")
            tail = (
                f"; its input was finite (mean {num(inp['mean'])}, std {num(inp['std'])}, max |x| "
                f"{num(max(abs(inp['min']), abs(inp['max'])))})"
                if clean
                else ""
            )
            msg = (
                f"{what} ({ctx.type_of(layer)}) is the first module whose output holds NaN/Inf in the "
                f"{phase} forward pass, at step {sf} ({int(first.nan_count)} NaN, {int(first.inf_count)} Inf of "
                f"{int(first['count'])} values){tail}."
            )
        return [Finding(ID, "error", layer, sf, msg, ev, _REC)]
    if sb is not None:
        rows = bad_b[bad_b.step == sb].copy()
        rows["_o"] = [ctx.call_order.get((r.layer, int(r.call)), -1) for r in rows.itertuples()]
        first = rows.sort_values("_o").iloc[-1]
        layer, call = str(first.layer), int(first.call)
        last_key = max(ctx.call_order, key=ctx.call_order.get) if ctx.call_order else None
        ev = dict(common, step=sb, call=call, module_type=ctx.type_of(layer), nan_count=int(first.nan_count),
                  inf_count=int(first.inf_count), count=int(first["count"]))  # fmt: skip
        if last_key is not None and last_key[0] == layer:
            msg = (
                f"The gradient of the loss w.r.t. the output of {layer}, the last module, is non-finite at step {sb} "
                f"while the forward pass was finite: the loss or its gradient produced the NaN/Inf."
            )
            rec = (
                "Check the loss function: log of 0 (use log_softmax / cross_entropy on logits, or clamp), division "
                "by zero, sqrt at 0; " + _REC
            )
        else:
            msg = (
                f"The gradient w.r.t. the output of {layer} ({ctx.type_of(layer)}) is the first non-finite one in the "
                f"backward pass at step {sb}, while the forward pass was finite: the NaN/Inf arises in the backward "
                f"of the module after it."
            )
            rec = _REC
        return [Finding(ID, "error", layer, sb, msg, ev, rec)]
    if sl is not None or sp is not None:
        step = min(x for x in (sl, sp) if x is not None)
        what = "the logged loss" if sl is not None and (sp is None or sl <= sp) else "a parameter norm"
        msg = (
            f"{what[0].upper() + what[1:]} became non-finite at step {step} while every recorded activation was finite."
        )
        return [Finding(ID, "error", None, step, msg, common, _REC)]
    return []
