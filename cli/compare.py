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
    for key in [k for k in na if k in nb]:
        row: dict[str, Any] = {"layer": key[0], "call": key[1], "changed": []}
        for m in METRICS:
            va, vb = na[key][m], nb[key][m]
            row[m] = {"a": _clean(va), "b": _clean(vb)}
            if _changed(m, va, vb):
                row["changed"].append(m)
        layers.append(row)
    return {
        "run_a": str(a.run_dir), "run_b": str(b.run_dir), "checks": per_check,
        "new_findings": [f for f in fb if _key(f) not in ka], "resolved_findings": [f for f in fa if _key(f) not in kb],
        "layers": layers, "only_in_a": [f"{k[0]}#{k[1]}" for k in na if k not in nb],
        "only_in_b": [f"{k[0]}#{k[1]}" for k in nb if k not in na],
    }  # fmt: skip


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
    console.print(t)
    changed = [r for r in doc["layers"] if r["changed"]]
    lt = Table(title=f"layers with changed numbers ({len(changed)} of {len(doc['layers'])})")
    for col in ("layer", *(m for m in METRICS)):
        lt.add_column(col)
    for r in changed:
        cells = []
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
