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

DPI = 72


def _uri(fig, tight: bool = True) -> str:
    buf = io.BytesIO()
    if tight:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _short(labels: list[str], limit: int = 28) -> list[str]:
    return [s if len(s) <= limit else "…" + s[-(limit - 1) :] for s in labels]


def heatmap(hm: Heatmap) -> str:
    rows, cols = hm.values.shape
    h = max(2.4, min(0.13 * min(rows, 40) + 1.4, 7.0))
    fig, ax = plt.subplots(figsize=(9, h))
    fig.subplots_adjust(left=0.22, right=0.96, bottom=0.5 / h + 0.08, top=1 - 0.35 / h)
    if cols == 0 or rows == 0 or not np.isfinite(hm.values).any():
        ax.text(0.5, 0.5, hm.empty_text, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        cmap = plt.get_cmap("cividis").with_extremes(bad="#e6e6e6")
        vals = np.ma.masked_invalid(hm.values)
        im = ax.imshow(vals, aspect="auto", interpolation="nearest", cmap=cmap)
        cb = fig.colorbar(im, ax=ax, pad=0.01)
        cb.set_label(hm.unit)
        yt = np.arange(0, rows, max(1, -(-rows // 40)))  # at most ~40 labels
        ax.set_yticks(yt)
        ax.set_yticklabels(_short([hm.rows[i] for i in yt]), fontsize=7 if rows > 30 else 8)
        ticks = np.unique(np.linspace(0, cols - 1, min(cols, 8)).round().astype(int))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(int(hm.steps[t])) for t in ticks])
        ax.set_xlabel("training step")
        ax.set_ylabel("layer (execution order)")
    ax.set_title(hm.title)
    return _uri(fig, tight=False)


def gradient_flow(labels: list[str], series: dict[int, np.ndarray]) -> str:
    fig, ax = plt.subplots(figsize=(9, 3.4))
    x = np.arange(len(labels))
    markers = "osd^v<>"
    for i, (step, vals) in enumerate(series.items()):
        shade = 0.15 + 0.7 * i / max(1, len(series) - 1)
        ax.plot(x, vals, marker=markers[i % len(markers)], ms=3, lw=1.2, color=plt.get_cmap("viridis")(shade),
                label=f"step {step}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("layer (execution order, input → output)")
    ax.set_ylabel("gradient RMS (log)")
    ax.set_title("Gradient flow: RMS of ∂loss/∂(layer output) along depth")
    if len(labels) <= 40:
        ax.set_xticks(x)
        ax.set_xticklabels(_short(labels, 18), rotation=60, ha="right", fontsize=7)
    if series:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _uri(fig)


def signal_propagation(labels: list[str], sq_mean: np.ndarray, var: np.ndarray, when: str,
                       branch_var: np.ndarray | None = None) -> str:  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, 3.2))
    x = np.arange(len(labels))
    ax.plot(x, var, "o-", ms=3, color="#1f3b73", label="average channel variance")
    ax.plot(x, sq_mean, "s--", ms=3, color="#c98a0a", label="average channel squared mean")
    if branch_var is not None and np.isfinite(branch_var).any():
        ax.plot(x, branch_var, "^:", ms=3, color="#5a5a5a", label="residual branch variance")
    ax.set_yscale("log")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("value (log)")
    ax.set_title(f"Signal propagation, {when} (Brock, De & Smith 2021)")
    if len(labels) <= 40:
        ax.set_xticks(x)
        ax.set_xticklabels(_short(labels, 18), rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _uri(fig)


def layer_detail(steps, hists, edges: list, mean, std, vmin, vmax, label: str) -> str:
    """One figure per flagged layer: histogram over time (left), mean ± std band (right)."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.2, 3.0), gridspec_kw={"width_ratios": [1.15, 1]})
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.17, top=0.88, wspace=0.35)
    if hists.size == 0 or not np.isfinite(hists).any():
        ax.text(0.5, 0.5, "no histogram", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        tot = hists.sum(1, keepdims=True)
        dens = np.where(tot > 0, hists / np.maximum(tot, 1), np.nan).T
        nz = np.flatnonzero(np.nansum(dens, 1) > 0)
        lo, hi = (nz.min(), nz.max() + 1) if len(nz) else (0, dens.shape[0])
        im = ax.imshow(dens[lo:hi], aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
        fig.colorbar(im, ax=ax, pad=0.01).set_label("fraction of values")
        e = [(-np.inf if v is None and i == 0 else np.inf if v is None else v) for i, v in enumerate(edges)]
        ticks = np.unique(np.linspace(0, hi - lo - 1, min(6, hi - lo)).round().astype(int))
        ax.set_yticks(ticks)
        ax.set_yticklabels([_fmt_edge(e[lo + t]) if lo + t < len(e) else "" for t in ticks], fontsize=7)
        xt = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int))
        ax.set_xticks(xt)
        ax.set_xticklabels([str(int(steps[t])) for t in xt])
        ax.set_xlabel("training step")
        ax.set_ylabel("value (bin lower edge)")
    ax.set_title("histogram over time", fontsize=9)
    bx.fill_between(steps, vmin, vmax, color="#d9d9d9", label="min–max")
    bx.fill_between(steps, mean - std, mean + std, color="#7a8fb8", alpha=0.8, label="mean ± std")
    bx.plot(steps, mean, color="#1f3b73", lw=1.4, label="mean")
    bx.set_xlabel("training step")
    bx.set_ylabel("activation value")
    bx.set_title("mean ± std", fontsize=9)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.suptitle(label, fontsize=10)
    return _uri(fig, tight=False)


def _fmt_edge(v: float) -> str:
    if not np.isfinite(v):
        return "−∞" if v < 0 else "∞"
    return f"{v:.3g}"


def bn_running_vs_batch(channels: np.ndarray, running_mean, batch_mean, running_var, batch_var, title: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
    for ax, r, b, name in ((axes[0], running_mean, batch_mean, "mean"), (axes[1], running_var, batch_var, "variance")):
        ax.plot(channels, r, "o", ms=3, color="#1f3b73", label=f"running {name}")
        ax.plot(channels, b, "x", ms=4, color="#c98a0a", label=f"batch / population {name}")
        ax.set_xlabel("channel")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return _uri(fig)
