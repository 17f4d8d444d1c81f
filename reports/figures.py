"""Matplotlib figures rendered to inline PNG data URIs (no file, no network).

Colour maps are perceptually uniform with monotonic lightness (cividis, viridis), so they
survive grayscale printing; layers are always in execution order, top to bottom.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from normscope_reports.data import Heatmap  # noqa: E402

DPI = 100
WIDTH_IN = 11.3  # ≈ the report's content width (1,132 px): shown 1:1, never scaled down
TICK_PT = 10  # tick labels: 10 pt at 100 dpi ≈ 14 px on the page
MAX_LAYER_TICKS = 30


def _render(fig, axes, tight: bool = True) -> tuple[str, list[list[float]]]:
    """PNG data URI and, per axes, its box [left, top, right, bottom] as fractions of the image
    (what the page's hover script maps the mouse through)."""
    buf = io.BytesIO()
    if tight:
        fig.tight_layout()
    boxes = []
    for ax in axes:
        b = ax.get_position()
        boxes.append([round(b.x0, 5), round(1 - b.y1, 5), round(b.x1, 5), round(1 - b.y0, 5)])
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(_palette_png(buf.getvalue())).decode(), boxes


def _palette_png(data: bytes) -> bytes:
    """Re-encode as a 256-colour palette PNG: a third of the bytes, no visible change for these
    plots (flat colours, one colour map), which keeps a 200-layer report under 5 MB."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, format="PNG", optimize=True
    )
    return out.getvalue() if out.tell() < len(data) else data


def _uri(fig, tight: bool = True) -> str:
    return _render(fig, [], tight)[0]


def _short(labels: list[str], limit: int = 28) -> list[str]:
    return [s if len(s) <= limit else "…" + s[-(limit - 1) :] for s in labels]


def _g(v) -> float | None:
    """A value for the hover data: 4 significant digits, None for NaN/Inf (keeps the file small)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(f):
        return None
    return float(f"{f:.4g}")


def _layer_ticks(ax, labels: list[str], axis: str = "x") -> None:
    n = len(labels)
    if not n:
        return
    idx = np.unique(np.linspace(0, n - 1, min(n, MAX_LAYER_TICKS)).round().astype(int))
    if axis == "x":
        ax.set_xticks(idx)
        ax.set_xticklabels(_short([labels[i] for i in idx], 22), rotation=40, ha="right", fontsize=TICK_PT)
    else:
        ax.set_yticks(idx)
        ax.set_yticklabels(_short([labels[i] for i in idx]), fontsize=TICK_PT)


def heatmap_figure(hm: Heatmap):
    """The matplotlib figure of a heatmap (None when it holds no finite value: no empty panel)."""
    rows, cols = hm.values.shape
    if cols == 0 or rows == 0 or not np.isfinite(hm.values).any():
        return None
    n_lab = min(rows, MAX_LAYER_TICKS)
    h = max(3.2, min(0.24 * n_lab + 2.0, 9.0))
    fig, ax = plt.subplots(figsize=(WIDTH_IN, h))
    fig.subplots_adjust(left=0.2, right=0.93, bottom=0.75 / h + 0.05, top=1 - (0.95 if hm.note else 0.6) / h)
    cmap = plt.get_cmap("cividis").with_extremes(bad="#e6e6e6")
    vals = np.ma.masked_invalid(hm.values)
    kw = {}
    extend = "neither"
    if hm.fixed is not None:
        kw = {"vmin": hm.fixed[0], "vmax": hm.fixed[1]}
    elif hm.clip:
        fin = hm.values[np.isfinite(hm.values)]
        lo, hi = np.percentile(fin, [1, 99]) if len(fin) else (0, 1)
        if hi > lo:
            kw, extend = {"vmin": lo, "vmax": hi}, "both"
    im = ax.imshow(vals, aspect="auto", interpolation="nearest", cmap=cmap, **kw)
    cb = fig.colorbar(im, ax=ax, pad=0.01, extend=extend)
    cb.set_label(hm.unit + (" (clipped)" if extend == "both" else ""), fontsize=TICK_PT)
    cb.ax.tick_params(labelsize=TICK_PT)
    _layer_ticks(ax, hm.rows, "y")
    ticks = np.unique(np.linspace(0, cols - 1, min(cols, 8)).round().astype(int))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(int(hm.steps[t])) for t in ticks], fontsize=TICK_PT)
    ax.set_xlabel("training step", fontsize=TICK_PT + 1)
    ax.set_ylabel("layer (execution order)", fontsize=TICK_PT + 1)
    na_rows = ~np.isfinite(hm.values).any(axis=1)
    if na_rows.any() and hm.na_text:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(facecolor="#e6e6e6", edgecolor="#999", label=f"n/a: {hm.na_text}")],
                  loc="upper left", bbox_to_anchor=(0, -0.09 - 0.5 / h), fontsize=TICK_PT, frameon=False)  # fmt: skip
    if hm.irregular is not None and hm.irregular.any():
        xs = np.flatnonzero(hm.irregular)
        ax.plot(xs, np.full(len(xs), -0.5), "v", ms=5, color="#c0392b", clip_on=False, zorder=5)
    ax.set_title(hm.title, fontsize=TICK_PT + 2, loc="left", pad=20 if hm.note else 6)
    if hm.note:
        ax.text(0, 1.02, hm.note, transform=ax.transAxes, fontsize=TICK_PT - 1, color="#7a1f14", va="bottom")
    return fig, ax


def heatmap(hm: Heatmap) -> tuple[str, dict] | None:
    """(PNG URI, hover data) of a heatmap; None when it holds no data (the page says so in text)."""
    made = heatmap_figure(hm)
    if made is None:
        return None
    fig, ax = made
    uri, boxes = _render(fig, [ax], tight=False)
    vals = 10.0**hm.values if hm.log else hm.values
    hover = {"kind": "heat", "box": boxes[0], "rows": list(hm.rows), "steps": [int(t) for t in hm.steps],
             "v": [[_g(v) for v in row] for row in vals], "unit": hm.unit.replace("log10 ", ""),
             "irregular": [int(i) for i in np.flatnonzero(hm.irregular)] if hm.irregular is not None else []}  # fmt: skip
    return uri, hover


def _curve_hover(ax, box, x, series: dict[str, np.ndarray], xlabels=None, xname="step") -> dict:
    return {"kind": "curve", "box": box, "xlim": [float(v) for v in ax.get_xlim()], "x": [_g(v) for v in x],
            "xname": xname, "xlabels": list(xlabels) if xlabels is not None else None,
            "series": [{"name": k, "y": [_g(v) for v in np.asarray(y, dtype=float)]} for k, y in series.items()]}  # fmt: skip


def gradient_flow(labels: list[str], series: dict[int, np.ndarray]) -> tuple[str, dict]:
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.6))
    x = np.arange(len(labels))
    markers = "osd^v<>"
    for i, (step, vals) in enumerate(series.items()):
        shade = 0.15 + 0.7 * i / max(1, len(series) - 1)
        ax.plot(x, vals, marker=markers[i % len(markers)], ms=4, lw=1.4, color=plt.get_cmap("viridis")(shade),
                label=f"step {step}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("layer (execution order, input → output)", fontsize=TICK_PT + 1)
    ax.set_ylabel("gradient RMS (log)", fontsize=TICK_PT + 1)
    ax.set_title("Gradient flow: RMS of ∂loss/∂(layer output) along depth", fontsize=TICK_PT + 2, loc="left")
    _layer_ticks(ax, labels, "x")
    ax.tick_params(axis="y", labelsize=TICK_PT)
    if series:
        ax.legend(fontsize=TICK_PT)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    hover = _curve_hover(ax, None, x, {f"step {k}": v for k, v in series.items()}, labels, "layer")
    uri, boxes = _render(fig, [ax], tight=False)
    hover["box"] = boxes[0]
    return uri, hover


def signal_propagation(labels: list[str], sq_mean: np.ndarray, var: np.ndarray, when: str,
                       branch_var: np.ndarray | None = None) -> tuple[str, dict]:  # fmt: skip
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.4))
    x = np.arange(len(labels))
    ax.plot(x, var, "o-", ms=4, color="#1f3b73", label="average channel variance")
    ax.plot(x, sq_mean, "s--", ms=4, color="#c98a0a", label="average channel squared mean")
    series = {"variance": var, "squared mean": sq_mean}
    if branch_var is not None and np.isfinite(branch_var).any():
        ax.plot(x, branch_var, "^:", ms=4, color="#5a5a5a", label="residual branch variance")
        series["branch variance"] = branch_var
    ax.set_yscale("log")
    ax.set_xlabel("layer (execution order)", fontsize=TICK_PT + 1)
    ax.set_ylabel("value (log)", fontsize=TICK_PT + 1)
    ax.set_title(f"Signal propagation, {when} (Brock, De & Smith 2021)", fontsize=TICK_PT + 2, loc="left")
    _layer_ticks(ax, labels, "x")
    ax.tick_params(axis="y", labelsize=TICK_PT)
    ax.legend(fontsize=TICK_PT)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    hover = _curve_hover(ax, None, x, series, labels, "layer")
    uri, boxes = _render(fig, [ax], tight=False)
    hover["box"] = boxes[0]
    return uri, hover


def layer_detail(steps, hists, edges: list, mean, std, vmin, vmax, label: str) -> tuple[str, dict]:
    """One figure per flagged layer: histogram over time (left, when recorded), mean ± std band."""
    has_hist = hists.size > 0 and np.isfinite(hists).any() and np.nansum(hists) > 0
    if has_hist:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(WIDTH_IN, 4.2), gridspec_kw={"width_ratios": [1.15, 1]})
    else:  # no histogram recorded: no empty panel, the band takes the width
        fig, bx = plt.subplots(figsize=(WIDTH_IN, 4.0))
    if has_hist:
        tot = hists.sum(1, keepdims=True)
        dens = np.where(tot > 0, hists / np.maximum(tot, 1), np.nan).T
        nz = np.flatnonzero(np.nansum(dens, 1) > 0)
        lo, hi = (nz.min(), nz.max() + 1) if len(nz) else (0, dens.shape[0])
        im = ax.imshow(dens[lo:hi], aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
        cb = fig.colorbar(im, ax=ax, pad=0.01)
        cb.set_label("fraction of values", fontsize=TICK_PT)
        cb.ax.tick_params(labelsize=TICK_PT)
        e = [(-np.inf if v is None and i == 0 else np.inf if v is None else v) for i, v in enumerate(edges)]
        ticks = np.unique(np.linspace(0, hi - lo - 1, min(7, hi - lo)).round().astype(int))
        ax.set_yticks(ticks)
        ax.set_yticklabels([_fmt_edge(e[lo + t]) if lo + t < len(e) else "" for t in ticks], fontsize=TICK_PT)
        xt = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int))
        ax.set_xticks(xt)
        ax.set_xticklabels([str(int(steps[t])) for t in xt], fontsize=TICK_PT)
        ax.set_xlabel("training step", fontsize=TICK_PT + 1)
        ax.set_ylabel("activation value (bin lower edge)", fontsize=TICK_PT + 1)
        ax.set_title("histogram over time", fontsize=TICK_PT + 1)
    bx.fill_between(steps, vmin, vmax, color="#d9d9d9", label="min–max")
    bx.fill_between(steps, mean - std, mean + std, color="#7a8fb8", alpha=0.8, label="mean ± std")
    bx.plot(steps, mean, color="#1f3b73", lw=1.6, label="mean")
    bx.set_xlabel("training step", fontsize=TICK_PT + 1)
    bx.set_ylabel("activation value", fontsize=TICK_PT + 1)
    bx.set_title("mean ± std", fontsize=TICK_PT + 1)
    bx.tick_params(labelsize=TICK_PT)
    bx.legend(fontsize=TICK_PT)
    bx.grid(alpha=0.3)
    fig.suptitle(label, fontsize=TICK_PT + 2)
    fig.tight_layout()
    hover = _curve_hover(bx, None, steps, {"mean": mean, "std": std, "min": vmin, "max": vmax})
    uri, boxes = _render(fig, [bx], tight=False)
    hover["box"] = boxes[0]
    return uri, hover


def _fmt_edge(v: float) -> str:
    if not np.isfinite(v):
        return "−∞" if v < 0 else "∞"
    return f"{v:.3g}"


def bn_running_vs_batch(channels: np.ndarray, running_mean, batch_mean, running_var, batch_var, title: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH_IN, 3.8))
    for ax, r, b, name in ((axes[0], running_mean, batch_mean, "mean"), (axes[1], running_var, batch_var, "variance")):
        ax.plot(channels, r, "o", ms=3, color="#1f3b73", label=f"running {name}")
        ax.plot(channels, b, "x", ms=4, color="#c98a0a", label=f"batch / population {name}")
        ax.set_xlabel("channel", fontsize=TICK_PT + 1)
        ax.set_ylabel(name, fontsize=TICK_PT + 1)
        ax.tick_params(labelsize=TICK_PT)
        ax.legend(fontsize=TICK_PT)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=TICK_PT + 1)
    return _uri(fig)


def step_series(
    title: str,
    ylabel: str,
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    log: bool = True,
    threshold: float | None = None,
    threshold_label: str | None = None,
) -> tuple[str, dict]:
    """One curve per label over training steps (``series``: label → (steps, values)), with an
    optional dashed threshold line: the generic plot of a per-step diagnostic signal."""
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.2))
    cmap = plt.get_cmap("viridis")
    labels = list(series)
    steps_all = sorted({int(s) for st, _ in series.values() for s in np.asarray(st)})
    for i, lab in enumerate(labels):
        st, v = series[lab]
        ax.plot(np.asarray(st), np.asarray(v, dtype=float), marker="o", ms=3, lw=1.3,
                color=cmap(0.1 + 0.75 * i / max(1, len(labels) - 1)), label=_short([lab])[0])  # fmt: skip
    if threshold is not None:
        ax.axhline(threshold, ls="--", lw=1, color="0.35", label=threshold_label or f"threshold {threshold:g}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=TICK_PT + 1)
    ax.set_ylabel(ylabel, fontsize=TICK_PT + 1)
    ax.set_title(title, fontsize=TICK_PT + 2, loc="left")
    ax.tick_params(labelsize=TICK_PT)
    if len(labels) <= 12 or threshold is not None:
        ax.legend(fontsize=TICK_PT - 1, ncol=2 if len(labels) > 6 else 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    x = np.asarray(steps_all, dtype=float)
    ys = {}
    for lab, (st, v) in series.items():
        m = dict(zip((int(s) for s in np.asarray(st)), np.asarray(v, dtype=float)))
        ys[lab] = np.array([m.get(int(s), np.nan) for s in steps_all])
    hover = _curve_hover(ax, None, x, ys)
    uri, boxes = _render(fig, [ax], tight=False)
    hover["box"] = boxes[0]
    return uri, hover


def layer_bars(
    title: str,
    ylabel: str,
    labels: list[str],
    values: np.ndarray,
    log: bool = True,
    threshold: float | None = None,
    threshold_label: str | None = None,
) -> tuple[str, dict]:
    """One value per layer (execution order), e.g. the max/median |x| ratio, with a threshold line."""
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.2))
    x = np.arange(len(labels))
    v = np.asarray(values, dtype=float)
    ax.plot(x, v, marker="o", ms=4, lw=1.2, color=plt.get_cmap("viridis")(0.3))
    if threshold is not None:
        ax.axhline(threshold, ls="--", lw=1, color="0.35", label=threshold_label or f"threshold {threshold:g}")
        ax.legend(fontsize=TICK_PT - 1)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("layer (execution order, input → output)", fontsize=TICK_PT + 1)
    ax.set_ylabel(ylabel, fontsize=TICK_PT + 1)
    ax.set_title(title, fontsize=TICK_PT + 2, loc="left")
    _layer_ticks(ax, labels, "x")
    ax.tick_params(axis="y", labelsize=TICK_PT)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    hover = _curve_hover(ax, None, x, {ylabel: v}, labels, "layer")
    uri, boxes = _render(fig, [ax], tight=False)
    hover["box"] = boxes[0]
    return uri, hover
