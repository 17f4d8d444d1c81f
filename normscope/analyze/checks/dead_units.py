"""dead-units: ReLU-family units that output ≤ 0 for every sample of a window of steps.

Reads the collector's per-unit activity counts (``active``: samples in which the unit was
> 0). A unit is dead in a window when its activity summed over every sampled batch of the
window is 0 — never a single batch. Born dead: never active at any sampled step; died: active
once, then silent (with the step it went silent). Dormant units (Sokar et al. 2023, score
s_i = E|h_i| / mean_k E|h_k| ≤ τ) are reported as info."""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num, pct, stack, steps_span
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import dormant_scores
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import RELU, SIGMOID, family_of, relu_layers

ID = "dead-units"


def dead_profile(ctx, layer: str, call: int, p: dict) -> dict | None:
    """Dead/born-dead/died/dormant units of one layer call over the final window: the last
    ``window_frac`` of the sampled steps (at least ``min_window_steps``), extended back until it
    holds ``min_samples`` samples (or covers the run)."""
    d = ctx.layer_series(layer, call)
    if not len(d):
        return None
    act = stack(d.active)
    steps = d.step.to_numpy()
    samples = d.samples.to_numpy(dtype=np.float64)
    t = len(d)
    start = t - ctx.window_rows(t, p["window_frac"], p["min_window_steps"])
    while start > 0 and samples[start:].sum() < p["min_samples"]:
        start -= 1
    win = act[start:]
    dead = np.nansum(win, axis=0) == 0
    ever = np.nansum(act, axis=0) > 0
    born = dead & ~ever
    died = dead & ever
    died_at = []
    for u in np.flatnonzero(died):
        last = int(np.flatnonzero(act[:, u] > 0).max())
        died_at.append(int(steps[min(last + 1, t - 1)]))
    mean_abs = np.nanmean(stack(d.ch_mean)[start:], axis=0)  # ReLU outputs are ≥ 0: E|h| = E[h]
    score = dormant_scores(mean_abs)
    dormant = (score <= p["dormant_tau"]) & ~dead
    return {
        "units": int(dead.size), "dead": dead, "born": born, "died": died, "died_at": died_at,
        "dormant": dormant, "window": (int(steps[start]), int(steps[-1])), "window_rows": int(t - start),
        "window_samples": int(samples[start:].sum()), "steps": steps,
        # one value per sample and unit: the layer sees a globally pooled descriptor (an SE bottleneck)
        "pooled": bool(np.all(d["count"].to_numpy(float) == samples * dead.size)),
    }  # fmt: skip


def excitation_bottlenecks(ctx) -> dict[str, str]:
    """{ReLU layer: its gate} for the ReLUs of squeeze-and-excitation blocks (Hu et al. 2018): in the
    recorded execution order, within one parent module, a convolution (the reduction of the pooled
    descriptor) → the ReLU → a convolution → a sigmoid-like gate, with layers after the gate (it
    scales features; it is not the network's output) — timm's conv_reduce → act1 → conv_expand →
    gate, torchvision's fc1 → activation → fc2 → scale_activation (1×1 convolutions),
    transformers' RegNet attention.0–3. An MLP head ending in a sigmoid is not one."""
    order = [r["layer"] for r in ctx.meta.get("execution_order") or []]
    mods = ctx.modules

    def parent(n: str) -> str:
        return n.rsplit(".", 1)[0] if "." in n else ""

    def conv(n: str) -> bool:
        return "Conv" in str(mods.get(n, {}).get("type") or "")

    out: dict[str, str] = {}
    for i in range(1, len(order) - 3):
        prev, name, nxt, gate = order[i - 1], order[i], order[i + 1], order[i + 2]
        if parent(name) == "" or any(parent(n) != parent(name) for n in (prev, nxt, gate)):
            continue
        g = mods.get(gate, {})
        gating = family_of(g) == SIGMOID or g.get("type") == "Hardsigmoid"
        if conv(prev) and conv(nxt) and gating and family_of(mods.get(name, {})) == RELU:
            out[name] = gate
    return out


@register(
    id=ID, severity="error",
    summary="ReLU units that output ≤ 0 for every sample over a window of steps (born dead or died); dormant units as info.",
    needs=("stats", "standard-stats"),
    thresholds={"warn": 0.10, "error": 0.40, "window_frac": 0.1, "min_window_steps": 5, "min_samples": 512,
            "min_judge_samples": 128, "dormant_tau": 0.025, "dormant_info": 0.10},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    layers = relu_layers(ctx.modules)
    pairs = [k for k in ctx.layer_calls() if k[0] in layers]
    if not pairs:
        raise SkipCheck("no ReLU-family layer (ReLU, ReLU6) was recorded")
    out = []
    too_few = []
    excitation = excitation_bottlenecks(ctx)
    for layer, call in pairs:
        prof = dead_profile(ctx, layer, call, t)
        if prof is None or prof["window_samples"] < t["min_judge_samples"]:
            too_few.append(layer)
            continue
        n, dead = prof["units"], prof["dead"]
        frac = float(dead.mean())
        nb, nd = int(prof["born"].sum()), int(prof["died"].sum())
        where = f"{layer}" + (f" (call {call})" if call else "")
        ev = {
            "dead_fraction": frac, "score": frac, "dead_units": int(dead.sum()), "units": n, "born_dead": nb, "died": nd,
            "died_at_steps": sorted(prof["died_at"])[:20],
            "died_at_median": float(np.median(prof["died_at"])) if prof["died_at"] else None,
            "window_steps": list(prof["window"]), "window_rows": prof["window_rows"],
            "window_samples": prof["window_samples"], "dead_unit_indices": np.flatnonzero(dead)[:64].tolist(),
            "call": call, "phase": ctx.acts_phase, "thresholds": {"warn": t["warn"], "error": t["error"]},
        }  # fmt: skip
        gate = excitation.get(layer) if dead.any() and prof["pooled"] else None
        if gate is not None:
            # born-dead units of an SE bottleneck are its init, not a fault: only units that died count
            ev["excitation_gate"] = gate
            sev = "error" if nd / n >= t["error"] else "warning" if nd / n >= t["warn"] else "info"
            born = (f"{nb} born dead in a squeeze-and-excitation bottleneck (the ReLU between the pooled "
                    f"descriptor and the gate {gate}): it sees one pooled value per sample and channel, whose mean "
                    f"lies several standard deviations from zero (RegNetY at init: 2–6, a conv's pre-activations "
                    f"0.3–0.5), so each unit's sign is nearly fixed and some start off for every input; the gate "
                    f"works through the live units") if nb else ""  # fmt: skip
            died = f"{nd} died during training (median step {num(ev['died_at_median'])})" if nd else ""
            msg = (f"{pct(frac)} of the units of {where} ({int(dead.sum())}/{n}) output ≤ 0 for every one of "
                   f"{prof['window_samples']} samples in {steps_span(prof['window'])}: "
                   f"{'; '.join(x for x in (born, died) if x)}.")  # fmt: skip
            rec = (
                "Nothing to do for the born-dead units of an SE bottleneck. Units that died during training point "
                "to a learning rate too high for it: lower it or add warmup; a SiLU in the bottleneck (as "
                "EfficientNet uses) cannot die."
            )
            out.append(Finding(ID, sev, layer, prof["window"], msg, ev, rec))
        elif dead.any():
            sev = "error" if frac >= t["error"] else "warning" if frac >= t["warn"] else "info"
            how = []
            if nb:
                how.append(f"{nb} born dead")
            if nd:
                how.append(f"{nd} died during training (median step {num(ev['died_at_median'])})")
            msg = (f"{pct(frac)} of the units of {where} ({int(dead.sum())}/{n}) output ≤ 0 for every one of "
                   f"{prof['window_samples']} samples in {steps_span(prof['window'])}: {', '.join(how)}.")  # fmt: skip
            if nb >= nd:
                rec = (
                    "Check the initialisation: a unit that starts with all pre-activations ≤ 0 (a negative bias, "
                    "a badly scaled init, unnormalised inputs) never receives a gradient. Use He init with zero "
                    "biases, normalise the inputs, or use LeakyReLU/ELU, which keep a gradient below zero."
                )
            else:
                rec = (
                    "Lower the learning rate or add warmup/gradient clipping: one large update can push a unit's "
                    "pre-activations below zero for every input, after which ReLU passes back no gradient and the "
                    "unit never recovers (CS231n: up to 40 % of a network can die this way). LeakyReLU/ELU or a "
                    "BatchNorm before the ReLU also keep units alive."
                )
            out.append(Finding(ID, sev, layer, prof["window"], msg, ev, rec))
        dormant = prof["dormant"]
        dfrac = float(dormant.mean())
        if dfrac >= t["dormant_info"]:
            ev2 = {"dormant_fraction": dfrac, "dormant_units": int(dormant.sum()), "units": n, "tau": t["dormant_tau"],
                   "window_steps": list(prof["window"]), "call": call}  # fmt: skip
            msg = (
                f"{pct(dfrac)} of the units of {where} are dormant (alive, but with a mean activation ≤ "
                f"{t['dormant_tau']} × the layer average in {steps_span(prof['window'])})."
            )
            rec = (
                "Dormant units add little capacity; Sokar et al. (2023) recycle them (re-initialise incoming "
                "weights, zero outgoing ones). Usually no action is needed unless the fraction keeps growing."
            )
            out.append(Finding(ID, "info", layer, prof["window"], msg, ev2, rec))
    if too_few and len(too_few) == len(pairs):
        raise SkipCheck(
            f"fewer than {t['min_judge_samples']} samples recorded per ReLU layer: too few to call a unit dead"
        )
    return out
