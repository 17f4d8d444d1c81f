"""``normscope top RUN_DIR``: a live terminal view of a run being written (rich Live).

Every refresh re-reads the run directory (complete Parquet parts only: the writer renames them
into place), runs the checks, and shows steps, the loss, the current findings and the worst
layers per check; it stops when the run ends (complete, failed, or its writer is gone).
"""

from __future__ import annotations

import math
import time
import warnings

from normscope_cli.common import RANK, STYLE, _esc, key_number


def snapshot(run_dir) -> dict:
    """What one frame shows, read fresh from the run directory."""
    from normscope.analyze import analyze_full
    from normscope.store import load

    run = load(run_dir)
    state = run.state
    train = run.stats[run.stats.phase == "train"] if len(run.stats) else run.stats
    sc = run.scalars
    loss = sc[(sc.name == "loss") & (sc.phase == "train")].sort_values("step") if len(sc) else sc
    findings = []
    if len(train):
        try:
            with warnings.catch_warnings():  # numpy's all-NaN notes on a half-written run: not for the view
                warnings.simplefilter("ignore", RuntimeWarning)
                findings = [f.to_dict() for f in analyze_full(run).findings]
        except Exception as e:  # noqa: BLE001 - a half-written run must not end the view
            findings = [{"check": "(analysis)", "severity": "info", "layer": None, "message": f"not yet: {e}",
                         "evidence": {}}]  # fmt: skip
    return {
        "name": run.meta.get("name", "run"), "run_dir": str(run_dir), "state": state,
        "steps": int(train.step.nunique()) if len(train) else 0,
        "last_step": int(train.step.max()) if len(train) else None,
        "loss": float(loss.value.iloc[-1]) if len(loss) else math.nan,
        "loss_first": float(loss.value.iloc[0]) if len(loss) else math.nan,
        "findings": sorted(findings, key=lambda f: RANK.get(f["severity"], 9)),
    }  # fmt: skip


def render(snap: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    st = snap["state"]
    head = Text()
    head.append(f"normscope top — {snap['name']}  ", style="bold")
    head.append(st["text"], style="bold green" if st["state"] == "running" else "bold yellow")
    loss = "—" if not math.isfinite(snap["loss"]) else f"{snap['loss']:.4g} (first {snap['loss_first']:.4g})"
    head.append(f"\nsteps sampled {snap['steps']}  last step {snap['last_step']}  loss {loss}  {snap['run_dir']}")
    ft = Table(title=f"findings ({len(snap['findings'])})", expand=False)
    for col in ("severity", "check", "worst layers", "key number"):
        ft.add_column(col, no_wrap=col != "worst layers", overflow="fold")
    for f in snap["findings"]:
        ev = f.get("evidence") or {}
        layers = [r.get("layer") for r in ev.get("layers") or [] if isinstance(r, dict) and r.get("layer")]
        layers = layers or ([f["layer"]] if f.get("layer") else [])
        n = ev.get("affected_layers") or len(layers)
        shown = ", ".join(layers[:3]) + (f" (+{n - 3} more)" if n > 3 else "")
        ft.add_row(f"[{STYLE.get(f['severity'], '')}]{f['severity']}[/]", f["check"], _esc(shown), key_number(ev))
    return Group(head, ft)


def follow(run_dir, refresh: float, console, timeout: float | None = None) -> dict:
    """Show the run live until it ends (or ``timeout`` seconds pass); returns the last snapshot."""
    from rich.live import Live

    t0 = time.monotonic()
    snap = snapshot(run_dir)
    with Live(render(snap), console=console, refresh_per_second=4, transient=False) as live:
        while snap["state"]["state"] == "running":
            if timeout is not None and time.monotonic() - t0 > timeout:
                break
            time.sleep(refresh)
            snap = snapshot(run_dir)
            live.update(render(snap))
    return snap
