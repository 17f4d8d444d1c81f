"""``normscope compare``: what changed between two runs, per check and per layer."""

from __future__ import annotations

import math
from typing import Any

from normscope_cli.common import RANK, STYLE, _esc

METRICS = ("std", "dead", "frac_sat", "grad_rms", "update_ratio")


def _last_layer_numbers(run) -> dict[tuple[str, int], dict[str, float]]:
    from normscope_reports.data import layer_table

    t = layer_table(run)
    return {(r.layer, int(r.call)): {m: float(getattr(r, m)) for m in METRICS} for r in t.itertuples(index=False)}


def _key(f: dict) -> tuple:
    return (f["check"], f.get("layer"), f["severity"])  # an escalation counts as new


def compare_runs(a, b, analysis_a, analysis_b) -> dict[str, Any]:
    fa = [f.to_dict() for f in analysis_a.findings]
    fb = [f.to_dict() for f in analysis_b.findings]
    checks = sorted({f["check"] for f in fa + fb} | set(analysis_a.checks_run) | set(analysis_b.checks_run))
    per_check = []
    for c in checks:
        ca = [f for f in fa if f["check"] == c]
        cb = [f for f in fb if f["check"] == c]
        worst = lambda fs: min((f["severity"] for f in fs), key=RANK.__getitem__, default=None)  # noqa: E731
        status = "same"
        if ca and not cb:
            status = "resolved"
        elif cb and not ca:
            status = "new"
        elif len(ca) != len(cb) or worst(ca) != worst(cb):
            status = "changed"
        per_check.append(
            {"check": c, "a": len(ca), "b": len(cb), "worst_a": worst(ca), "worst_b": worst(cb), "status": status}
        )
    ka, kb = {_key(f) for f in fa}, {_key(f) for f in fb}
    layers = []
    na, nb = _last_layer_numbers(a), _last_layer_numbers(b)
    ta, tb = _types(a), _types(b)
    union = list(na) + [k for k in nb if k not in na]  # A's order, then what only B has
    nan = dict.fromkeys(METRICS, math.nan)
    for key in union:
        where = "both" if key in na and key in nb else "a" if key in na else "b"
        row: dict[str, Any] = {"layer": key[0], "call": key[1], "in": where, "changed": [],
                               "type_a": ta.get(key[0]), "type_b": tb.get(key[0])}  # fmt: skip
        for m in METRICS:
            va, vb = na.get(key, nan)[m], nb.get(key, nan)[m]
            row[m] = {"a": _clean(va), "b": _clean(vb)}
            if where == "both" and _changed(m, va, vb):
                row["changed"].append(m)
        layers.append(row)
    only_a = [f"{k[0]}#{k[1]}" for k in na if k not in nb]
    only_b = [f"{k[0]}#{k[1]}" for k in nb if k not in na]
    retyped = [k[0] for k in na if k in nb and ta.get(k[0]) != tb.get(k[0])]
    warning = None
    if only_a or only_b or retyped or ta.get("<root>") != tb.get("<root>"):
        parts = [f"{len(only_a)} layer call(s) only in A", f"{len(only_b)} only in B"]
        if retyped:
            parts.append(f"{len(retyped)} with the same name but another type ({', '.join(retyped[:3])})")
        warning = (f"the runs have different architectures ({ta.get('<root>', '?')} vs {tb.get('<root>', '?')}; "
                   f"{', '.join(parts)}): layers are matched by name, and the table shows the union")  # fmt: skip
    return {
        "architecture_warning": warning, "retyped": retyped,
        "run_a": str(a.run_dir), "run_b": str(b.run_dir), "checks": per_check,
        "new_findings": [f for f in fb if _key(f) not in ka], "resolved_findings": [f for f in fa if _key(f) not in kb],
        "layers": layers, "only_in_a": only_a, "only_in_b": only_b,
    }  # fmt: skip


def _types(run) -> dict[str, str]:
    return {m["name"]: m.get("type") for m in run.meta.get("modules", [])}


def _clean(v: float) -> float | None:
    return v if isinstance(v, float) and math.isfinite(v) else None


def _changed(metric: str, va: float, vb: float) -> bool:
    """Fractions: an absolute change over 0.1; scales (std, RMS, ratio): a factor over 2."""
    if not (math.isfinite(va) and math.isfinite(vb)):
        return math.isfinite(va) != math.isfinite(vb)
    if metric in ("dead", "frac_sat"):
        return abs(vb - va) > 0.1
    lo, hi = sorted((abs(va), abs(vb)))
    return hi > 0 and (lo == 0 or hi / lo > 2.0)


def render_compare(doc: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"checks: {doc['run_a']} → {doc['run_b']}")
    for col in ("check", "A", "B", "status"):
        t.add_column(col)
    for c in doc["checks"]:
        if c["a"] == 0 and c["b"] == 0:
            continue
        style = {"new": "bold red", "resolved": "green", "changed": "yellow"}.get(c["status"], "")
        fmt = lambda n, w: f"{n} ({w})" if n else "0"  # noqa: E731
        t.add_row(
            c["check"],
            fmt(c["a"], c["worst_a"]),
            fmt(c["b"], c["worst_b"]),
            f"[{style}]{c['status']}[/]" if style else c["status"],
        )
    if doc.get("architecture_warning"):
        console.print(f"[bold yellow]warning:[/] {_esc(doc['architecture_warning'])}")
    console.print(t)
    changed = [
        r
        for r in doc["layers"]
        if r["changed"] or r.get("in", "both") != "both" or r["layer"] in doc.get("retyped", [])
    ]
    both = sum(1 for r in doc["layers"] if r.get("in", "both") == "both")
    extra = len(doc["layers"]) - both
    title = f"layers with changed numbers ({sum(1 for r in changed if r.get('in', 'both') == 'both')} of {both} in both"
    title += f"; {extra} in one run only)" if extra else ")"
    lt = Table(title=title)
    for col in ("layer", "in", *(m for m in METRICS)):
        lt.add_column(col)
    for r in changed:
        where = {"a": "A only", "b": "B only"}.get(r.get("in", "both"), "both")
        if r["layer"] in doc.get("retyped", []):
            where = f"{r.get('type_a')} → {r.get('type_b')}"
        cells = [where]
        for m in METRICS:
            a, b = r[m]["a"], r[m]["b"]
            txt = f"{_f(a)} → {_f(b)}"
            cells.append(f"[bold]{txt}[/]" if m in r["changed"] else txt)
        lt.add_row(_esc(r["layer"] + (f"#{r['call']}" if r["call"] else "")), *cells)
    console.print(lt)
    for label, key in (("new", "new_findings"), ("resolved", "resolved_findings")):
        for f in doc[key]:
            console.print(
                f"[{STYLE.get(f['severity'], '')}]{label}[/] {f['check']} {_esc(f.get('layer') or '')}: {_esc(f['message'])}"
            )


def _f(v: Any) -> str:
    return "—" if v is None else f"{v:.3g}"
