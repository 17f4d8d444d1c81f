"""Build the one-file offline HTML report of a run (jinja2, autoescaped; images inline)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from normscope.store.writer import file_mode
from normscope_reports import data as D

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
MAX_DETAILS = 16  # flagged layers that get a detail section (the table stays complete)

COLUMNS = [
    ("label", "layer", True), ("module_type", "type", True), ("step", "step", False),
    ("mean", "mean", False), ("std", "std", False), ("frac_zero", "zero frac.", False),
    ("dead", "dead frac.", False), ("frac_sat", "saturated", False), ("nonfinite", "NaN/Inf", False),
    ("grad_rms", "grad RMS", False), ("update_ratio", "‖Δw‖/‖w‖", False),
]  # fmt: skip


def _as_dict(f: Any) -> dict:
    if isinstance(f, dict):
        return dict(f)
    if hasattr(f, "to_dict"):
        return f.to_dict()
    return {
        k: getattr(f, k, None) for k in ("check", "severity", "layer", "step", "message", "evidence", "recommendation")
    }


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "—"
        return f"{v:.4g}"
    return str(v)


def _step_text(step: Any) -> str:
    if step is None:
        return ""
    if isinstance(step, (list, tuple)) and len(step) == 2:
        return f"{step[0]}–{step[1]}"
    return str(step)


def _jinja_env():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("normscope_reports", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
    )


def _duration(meta: dict, state: dict) -> str:
    try:
        t0 = _dt.datetime.fromisoformat(meta["created"])
        t1 = _dt.datetime.fromisoformat(meta["ended"])
        return f"{(t1 - t0).total_seconds():.0f} s"
    except (KeyError, TypeError, ValueError):
        pass
    if state["state"] == "incomplete":
        try:  # up to the last flush: what the rows on disk cover
            t0 = _dt.datetime.fromisoformat(meta["created"])
            t1 = _dt.datetime.fromisoformat(meta["heartbeat"])
            return f"at least {(t1 - t0).total_seconds():.0f} s (the writer stopped without closing the run)"
        except (KeyError, TypeError, ValueError):
            return "unknown (the writer stopped without closing the run)"
    return "unknown (run still being written)" if state["state"] == "running" else "unknown"


def build_report(
    run,
    findings: Iterable[Any] | None = None,
    skipped: Iterable[Any] | None = None,
    out: str | os.PathLike | None = None,
    fold: dict | None = None,
    command: str | None = None,
    analyzed: bool | None = None,
) -> Path:
    """Write the report for ``run`` (a :class:`normscope.Run`) and return its path.

    ``findings``: Finding objects or dicts (check, severity, layer, step, message, evidence,
    recommendation); ``skipped``: checks that could not run (check, reason); ``fold``: a BN
    folding result dict (FoldResult.to_dict()). Default path: ``<run_dir>/report.html``.
    """
    from normscope_reports import figures as F

    meta = run.meta
    if fold is None:
        fold = _optional(lambda: run.fold)
    path = Path(out) if out is not None else Path(run.run_dir) / "report.html"
    fl = sorted((_as_dict(f) for f in (findings or [])), key=lambda f: SEVERITY_ORDER.get(f.get("severity"), 3))
    rows = D.layer_rows(run)
    index = {(r.layer, r.call): i for i, r in enumerate(rows.itertuples(index=False))}
    first_index = {}
    for (layer, _call), i in index.items():
        first_index.setdefault(layer, i)
    labels_by_layer = {}
    for r in rows.itertuples(index=False):
        labels_by_layer.setdefault(r.layer, r.label)
    flagged = {f["layer"] for f in fl if f.get("layer")}
    for f in fl:  # a grouped finding: one cause in several layers, every one flagged
        grouped = (f.get("evidence") or {}).get("layers") if isinstance(f.get("evidence"), dict) else None
        if isinstance(grouped, list):
            # entries are {"layer", "severity", …}; a bare name is read as one layer of the finding's severity
            entries = [r if isinstance(r, dict) else {"layer": r, "severity": f.get("severity")} for r in grouped]
            f["affected"] = [
                {"layer": r.get("layer"), "severity": r.get("severity")} for r in entries if r.get("layer")
            ]
            flagged |= {r["layer"] for r in f["affected"]}
    table = D.layer_table(run, flagged)

    # details for flagged layers (severity order), capped; the table keeps every layer
    detail_layers = []
    for f in fl:
        lay = f.get("layer")
        if lay and lay in first_index and lay not in detail_layers:
            detail_layers.append(lay)
    more_flagged = max(0, len(detail_layers) - MAX_DETAILS)
    detail_layers = detail_layers[:MAX_DETAILS]
    anchors = {lay: f"layer-{first_index[lay]}" for lay in detail_layers}
    for f in fl:
        lay = f.get("layer")
        f["anchor"] = anchors.get(lay) or (f"row-{first_index[lay]}" if lay in first_index else "layers")
        for r in f.get("affected", []):
            r["anchor"] = f"row-{first_index[r['layer']]}" if r["layer"] in first_index else "layers"
        f["step_text"] = _step_text(f.get("step"))
        f["layer_label"] = labels_by_layer.get(lay, lay)
        for r in f.get("affected", []):
            r["label"] = labels_by_layer.get(r["layer"], r["layer"])
        f["evidence"] = _evidence(f.get("evidence"))
    counts = {s: sum(1 for f in fl if f.get("severity") == s) for s in ("error", "warning", "info")}

    hms, not_shown = [], []
    for h in D.heatmaps(run):
        made = F.heatmap(h)
        if made is None:  # no empty placeholder panel: one line of text instead
            not_shown.append(f"{h.title}: {h.empty_text}")
            continue
        hms.append({"src": made[0], "hover": _hover_json(made[1]), "alt": h.title, "note": h.note})
    labels, gseries = D.gradient_flow(run)
    gradflow = _fig(F.gradient_flow(labels, gseries), "gradient flow") if gseries else None
    if not gseries:
        not_shown.append("Gradient flow: no gradient recorded")
    sigprop = _signal_figure(F, run, rows, index)
    from normscope_reports.panels import build_panels

    panels, failed = build_panels(run, fl, F)
    panels = [dict(p, hover=_hover_json(p.get("hover") or {})) for p in panels]
    not_shown += failed

    details = []
    probe = _optional(lambda: run.probe) or None
    hist_meta = meta.get("histograms", {})
    for lay in detail_layers:
        i = first_index[lay]
        r = rows.iloc[i]
        ser = D.thin(D.layer_series(run, lay, int(r.call)), 300)
        images = []
        if len(ser):
            hists = np.stack([np.asarray(h, dtype=np.float64) for h in ser["hist"]])
            edges = hist_meta.get(lay, {}).get("edges", [])
            made = F.layer_detail(ser.step.to_numpy(), hists, edges, ser["mean"].to_numpy(), ser["std"].to_numpy(),
                                  ser["min"].to_numpy(), ser["max"].to_numpy(), f"{r.label} ({r.module_type})")  # fmt: skip
            images.append(_fig(made, f"{r.label}: histogram over time and mean ± std"))
        extra = ""
        bn = (probe or {}).get("bn", {}).get(lay)
        if bn and bn.get("running_var") is not None:
            img, extra = _bn_detail(F, r.label, bn)
            if img:
                images.append({"src": img, "alt": f"{r.label}: running vs population statistics", "hover": ""})
        details.append({
            "anchor": anchors[lay], "label": r.label, "module_type": r.module_type,
            "findings": [f for f in fl if f.get("layer") == lay], "images": images, "extra": extra,
        })  # fmt: skip

    trows = []
    for i, t in enumerate(table.itertuples(index=False)):
        d = t._asdict()
        trows.append({
            "idx": i, "flagged": bool(d["flagged"]),
            "show": {k: _fmt(d[k]) for k, _, _ in COLUMNS},
            "sort": {k: (d[k] if isinstance(d[k], str) else ("" if d[k] is None else _num(d[k]))) for k, _, _ in COLUMNS},
        })  # fmt: skip

    train = run.stats[run.stats.phase == "train"]
    steps = sorted(train["step"].unique().tolist()) if len(train) else []
    options = meta.get("options", {})
    state = run.state
    ctx = {
        "model": {
            "name": meta.get("name", "model"), "cls": meta.get("model", {}).get("class", "?"),
            "params": int(meta.get("model", {}).get("params", 0)),
            "trainable": int(meta.get("model", {}).get("trainable", 0)), "layers": len(rows),
        },
        "run": {
            "steps_text": f"{len(steps)} sampled ({steps[0]}–{steps[-1]})" if steps else "none recorded yet",
            "every": options.get("every", "?"), "batch": D.batch_size_text(run),
            "duration": _duration(meta, state), "status": state["text"], "incomplete": state["state"] == "incomplete",
        },
        "repro": json.dumps({"versions": meta.get("versions", {}), "options": options, "command": command or meta.get("command")},
                            indent=1, default=str),  # fmt: skip
        "findings": fl, "counts": counts, "skipped": [_as_dict(s) if not isinstance(s, dict) else s for s in (skipped or [])],
        "analyzed": analyzed if analyzed is not None else findings is not None,
        "heatmaps": hms, "gradflow": gradflow, "sigprop": sigprop, "panels": panels, "not_shown": not_shown,
        "columns": [{"key": k, "title": t, "text": txt} for k, t, txt in COLUMNS], "table": trows,
        "details": details, "more_flagged": more_flagged, "fold": _fold_ctx(fold) if fold else None,
    }  # fmt: skip
    html = _jinja_env().get_template("report.html.j2").render(**ctx)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".html", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(html)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _hover_json(h: dict) -> str:
    return json.dumps(h, separators=(",", ":"), allow_nan=False)


def _fig(made: tuple[str, dict], alt: str) -> dict:
    return {"src": made[0], "hover": _hover_json(made[1]), "alt": alt, "note": ""}


def _sig(v: Any) -> str:
    """A number for people: 4 significant digits (3 for ≥ 1e4 in scientific form), ints whole."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}" if abs(int(v)) >= 10_000 else str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            return "NaN" if math.isnan(f) else ("∞" if f > 0 else "−∞")
        return f"{f:.4g}"
    return str(v)


def _evidence_value(v: Any, depth: int = 0) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_evidence_value(x, depth + 1)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        shown = [_evidence_value(x, depth + 1) for x in v[:8]]
        more = f", … ({len(v) - 8} more)" if len(v) > 8 else ""
        return ("[" + ", ".join(shown) + more + "]") if depth else ", ".join(shown) + more
    return _sig(v)


def _evidence(ev: Any) -> dict | None:
    """Evidence as the page shows it: key/value rows with 4 significant digits, and the grouped
    layers (a list of dicts) as a small table; never raw JSON."""
    if not ev:
        return None
    if not isinstance(ev, dict):
        return {"items": [{"key": "value", "text": _evidence_value(ev)}], "tables": []}
    items, tables = [], []
    for k, v in ev.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            cols = list(dict.fromkeys(c for x in v for c in x))
            tables.append({"key": k, "cols": cols, "rows": [[_evidence_value(x.get(c, ""), 1) for c in cols] for x in v[:50]],
                           "more": max(0, len(v) - 50)})  # fmt: skip
        else:
            items.append({"key": k, "text": _evidence_value(v)})
    return {"items": items, "tables": tables}


def _signal_figure(F, run, rows, index) -> dict | None:
    """Residual-block outputs (probe, with branch variance) when known, else every layer's output."""
    from normscope.analyze import signal_propagation

    sp = signal_propagation(run)
    if not len(sp):
        return None
    if (sp.kind == "block").any():
        b = sp[sp.kind == "block"]
        last = b[b.when == b.when.iloc[-1]].sort_values("order")
        return _fig(F.signal_propagation(last.layer.tolist(), last.avg_sq_mean.to_numpy(float),
                                         last.avg_var.to_numpy(float), f"{last.when.iloc[-1]} (residual blocks)",
                                         last.branch_var.to_numpy(float)), "signal propagation")  # fmt: skip
    last = sp[sp.step == sp.step.max()].set_index(["layer", "call"])
    keys = [(r.layer, r.call) for r in rows.itertuples(index=False) if (r.layer, r.call) in last.index]
    if not keys:
        return None
    sub = last.loc[keys]
    return _fig(F.signal_propagation([rows.label[index[k]] for k in keys], sub["avg_sq_mean"].to_numpy(float),
                                     sub["avg_var"].to_numpy(float), f"step {int(sp.step.max())}"),
                "signal propagation")  # fmt: skip


def _num(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return ""
    return repr(f) if math.isfinite(f) else ""


def _fold_ctx(fold: dict) -> dict:
    err = fold.get("error") or {}
    risky = [r for r in fold.get("fp16_risk", []) if r.get("exceeds_fp16") or r.get("tiny_var_channels")]
    return {
        "trace": fold.get("tracing") or "?",
        "max_abs": _fmt(err.get("max_abs")), "max_rel": _fmt(err.get("max_rel")),
        "folded": [{"producer": p.get("layer") or p.get("producer"), "bn": p.get("bn"), "pattern": p.get("pattern")}
                   for p in fold.get("folded", [])],
        "skipped": [{"bn": s.get("bn"), "reason": s.get("reason")} for s in fold.get("skipped", [])],
        "fp16": [{
            "layer": r.get("layer"), "bn": r.get("bn"), "w": _fmt(r.get("max_abs_weight")), "b": _fmt(r.get("max_abs_bias")),
            "scale": _fmt(r.get("max_scale")), "tiny": len(r.get("tiny_var_channels") or []),
            "exceeds": "yes" if r.get("exceeds_fp16") else "no",
        } for r in fold.get("fp16_risk", [])],
        "n_risky": len(risky),
    }  # fmt: skip


def _bn_detail(F, label: str, bn: dict) -> tuple[str | None, str]:
    """Running statistics against the population statistics the probe measured (dropout off)."""
    passes = bn.get("passes") or {}
    pop = passes.get("train/eval") or passes.get("eval/eval")
    if not pop:
        return None, ""
    rm, rv = np.asarray(bn["running_mean"], float), np.asarray(bn["running_var"], float)
    pm, pv = np.asarray(pop["mean"], float), np.asarray(pop["var"], float)
    if rm.shape != pm.shape or rv.shape != pv.shape:
        return None, ""
    ch = np.arange(len(rm))
    with np.errstate(all="ignore"):
        ratio = pv / rv
        dmu = np.abs(pm - rm) / np.sqrt(np.maximum(pv, 1e-12))
    img = F.bn_running_vs_batch(ch, rm, pm, rv, pv, f"{label}: running vs population statistics (dropout off)")
    text = (
        f"variance ratio population/running: median {np.nanmedian(ratio):.3g} (shift max(r, 1/r) = "
        f"{max(np.nanmedian(ratio), 1 / np.nanmedian(ratio)):.3g}); |Δμ|/σ: median {np.nanmedian(dmu):.3g}, "
        f"max {np.nanmax(dmu):.3g}; {pop.get('samples', '?')} samples"
    )
    return img, text


def _optional(read):
    """A side file of the run (probe.json, fold.json) that the report can do without: a corrupt
    one is left out (analyze reports it), never a failed report."""
    try:
        return read()
    except Exception:  # noqa: BLE001
        return None
