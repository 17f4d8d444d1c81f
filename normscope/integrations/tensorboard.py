"""Export a run directory to TensorBoard event files, so people can keep their dashboard.

Scalars: per layer output ``act/<layer>/{mean,std,frac_zero,frac_sat,dead_fraction}``, per layer
``grad/<layer>/rms``, per parameter ``param/<name>/{norm,grad_norm,update_ratio}``, and logged
scalars as ``<phase>/<name>``. Histograms: ``act/<layer>`` from the recorded fixed-bin histograms
(bucket upper edges; the open outer bins are closed at the recorded min/max).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from normscope.errors import NormscopeError


def _tag(layer: str, call: int, output: str) -> str:
    tag = layer if call == 0 else f"{layer}#{call}"
    return tag if not output else f"{tag}/{output}"


def export_tensorboard(run_dir: str | Path, logdir: str | Path) -> dict[str, int]:
    """Write ``run_dir``'s series to ``logdir``; returns counts of scalars and histograms written."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise NormscopeError("TensorBoard export needs the tensorboard package: pip install tensorboard") from None
    from normscope.analyze.quantities import dead_fraction
    from normscope.roles import relu_layers
    from normscope.store import load

    run = load(run_dir)
    counts = {"scalars": 0, "histograms": 0}
    edges_by_layer = {k: v.get("edges") for k, v in run.meta.get("histograms", {}).items()}
    sat_layers = set(run.meta.get("saturation", {}))
    w = SummaryWriter(str(logdir))
    try:
        s = run.stats
        dead = dead_fraction(s, relu_layers(run.modules)).to_numpy()
        for r, dead_frac in zip(s.itertuples(index=False), dead):
            prefix = ("act" if r.phase == "train" else f"{r.phase}/act") + "/" + _tag(r.layer, r.call, r.output)
            vals = {"mean": r.mean, "std": r.std, "frac_zero": r.frac_zero}
            if r.layer in sat_layers:
                vals["frac_sat"] = r.frac_sat
            if math.isfinite(dead_frac):
                vals["dead_fraction"] = float(dead_frac)
            for k, v in vals.items():
                if v is not None and math.isfinite(v):
                    w.add_scalar(f"{prefix}/{k}", v, int(r.step))
                    counts["scalars"] += 1
            edges = edges_by_layer.get(r.layer)
            hist = np.asarray(r.hist, dtype=np.float64)
            if edges and hist.sum() > 0 and math.isfinite(r.min) and math.isfinite(r.max):
                upper = np.array([v if v is not None else math.inf for v in edges[1:]], dtype=np.float64)
                if not np.isfinite(upper[-1]):  # the open top bin: close it above both its edge and the max
                    prev = upper[-2] if len(upper) > 1 else r.max
                    upper[-1] = max(float(r.max), prev * 2 if prev > 0 else prev + 1)
                mid_sum = r.mean * hist.sum()
                w.add_histogram_raw(prefix, min=float(r.min), max=float(r.max), num=int(hist.sum()), sum=float(mid_sum),
                                    sum_squares=float((r.std**2 + r.mean**2) * hist.sum()),
                                    bucket_limits=upper.tolist(), bucket_counts=hist.tolist(), global_step=int(r.step))  # fmt: skip
                counts["histograms"] += 1
        skipped = run.skipped_steps  # a loss scaler's skipped steps: overflowed gradients it discarded
        for r in run.grads.itertuples(index=False):
            if math.isfinite(r.rms) and int(r.step) not in skipped:
                w.add_scalar(f"grad/{_tag(r.layer, r.call, r.output)}/rms", r.rms, int(r.step))
                counts["scalars"] += 1
        for r in run.params.itertuples(index=False):
            for k, v in (("norm", r.norm), ("grad_norm", r.grad_norm),
                         ("update_ratio", r.update_norm / r.norm if r.norm > 0 else math.nan)):  # fmt: skip
                if math.isfinite(v):
                    w.add_scalar(f"param/{r.param}/{k}", v, int(r.step))
                    counts["scalars"] += 1
        for r in run.scalars.itertuples(index=False):
            if math.isfinite(r.value):
                w.add_scalar(f"{r.phase}/{r.name}", r.value, int(r.step))
                counts["scalars"] += 1
    finally:
        w.close()
    return counts
