"""unnormalized-inputs: the first layer's input features on very different scales or off-centre.

Reads the probe's per-feature statistics of the model inputs (the collector does not record the
first layer's input). Features are columns of 2-D inputs, channels of image inputs, the last
axis of sequence inputs (the probe decides from the first layer's type)."""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "unnormalized-inputs"


@register(
    id=ID, severity="warning",
    summary="Input features on very different scales (std ratio > 100) or far from zero mean (|mean| > 3·std): elongated loss surface (LeCun, Efficient BackProp).",
    needs=("training", "probe-inputs"),
    thresholds={"std_ratio": 100.0, "mean_std": 3.0, "near_constant": 0.05},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    inp = ctx.probe["inputs"]  # the "probe-inputs" need guarantees it
    mean = np.asarray(inp["mean"], dtype=np.float64)
    std = np.asarray(inp["std"], dtype=np.float64)
    if mean.size == 0:
        raise SkipCheck("the inputs have no floating-point features")
    smax = float(np.max(std)) if std.size else 0.0
    const = std <= 1e-12 * max(smax, 1e-30)
    discrete = np.zeros(mean.size, dtype=bool)
    discrete[[i for i in inp.get("discrete", []) if 0 <= i < mean.size]] = True
    discrete &= ~const
    live = ~const & ~discrete  # one-hot and categorical columns have no "scale" to fix
    if not live.any():
        if const.all():
            raise SkipCheck("every input feature is constant over the probe data")
        return _constant_info(ctx, mean, const, discrete)
    # Near-constant features (std < 5 % of the median feature std: rare, mostly-zero columns such
    # as border pixels) say nothing about scale; they are listed, not used for the ratio.
    rare = live & (std < t["near_constant"] * float(np.median(std[live])))
    scaled = live & ~rare
    ratio = float(std[scaled].max() / std[scaled].min()) if scaled.any() else 1.0
    off = scaled & (np.abs(mean) > t["mean_std"] * std)
    bad_scale = int(scaled.sum()) > 1 and ratio > t["std_ratio"]
    if not bad_scale and not off.any():
        return _constant_info(ctx, mean, const, discrete)
    first = (ctx.meta.get("execution_order") or [{}])[0].get("layer")
    i_off = int(np.argmax(np.where(off, np.abs(mean) / np.maximum(std, 1e-30), -1))) if off.any() else None
    parts = []
    if bad_scale:
        parts.append(f"their standard deviations span {num(std[scaled].min())} to {num(smax)} (ratio {num(ratio)})")
    if off.any():
        parts.append(
            f"{int(off.sum())} of {mean.size} sit far from zero mean (feature {i_off}: mean "
            f"{num(mean[i_off])}, std {num(std[i_off])})"
        )
    msg = f"The model's {mean.size} input features are not normalised: " + " and ".join(parts) + "."
    ev = {"features": int(mean.size), "axis": inp.get("axis"), "samples": inp.get("samples"), "std_ratio": ratio,
          "off_centre": np.flatnonzero(off).tolist(), "constant_features": np.flatnonzero(const).tolist(),
          "categorical_features": np.flatnonzero(discrete).tolist(),
          "near_constant_features": np.flatnonzero(rare).tolist(),
          "mean": mean.tolist()[:256], "std": std.tolist()[:256], "thresholds": dict(t)}  # fmt: skip
    rec = (
        "Standardise each feature with the training set's mean and std (z-score, e.g. sklearn StandardScaler), "
        "min-max scale bounded features, or log-transform heavy-tailed ones: features on different scales make the "
        "loss surface elongated and gradient descent zig-zag (LeCun et al., Efficient BackProp §4.3)."
    )
    what = "channels" if (inp.get("axis") == 1 and len(inp.get("shape") or []) >= 3) else "features"
    msg = msg.replace("input features", f"input {what}", 1)
    return [Finding(ID, "warning", first, None, msg, ev, rec)] + _constant_info(ctx, mean, const, discrete)


def _constant_info(ctx, mean, const, discrete) -> list[Finding]:
    """Constant input features carry no information: said as info, never a scale warning."""
    if not const.any():
        return []
    first = (ctx.meta.get("execution_order") or [{}])[0].get("layer")
    idx = np.flatnonzero(const)
    msg = (f"{idx.size} of {mean.size} input features are constant over the probe data (e.g. feature {int(idx[0])} = "
           f"{num(mean[idx[0]])}): they carry no information.")  # fmt: skip
    rec = "Drop constant columns, or check the data pipeline if they should vary (a feature filled with a default)."
    ev = {"constant_features": idx.tolist()[:256], "features": int(mean.size),
          "categorical_features": np.flatnonzero(discrete).tolist()[:256]}  # fmt: skip
    return [Finding(ID, "info", first, None, msg, ev, rec)]
