"""Host side of a sampled step: packs → merged raw fields per entry → rows for the run directory."""

from __future__ import annotations

import math

import numpy as np

from normscope.collect import reducers as R
from normscope.collect.reducers import N_ACT_SCALARS, N_FAST_SCALARS, ActLayout, GradLayout


class StepAccumulator:
    """Merges packs of the same entry (micro-batches, eval batches, ranks) in arrival order."""

    def __init__(self) -> None:
        self.acts: dict[tuple, list] = {}
        self.grads: dict[tuple, dict] = {}
        self.order: list[tuple] = []

    def add_act(self, key: tuple, raw: dict, mtype: str, axis: int) -> None:
        if key not in self.acts:
            self.acts[key] = [raw, 1, mtype, axis]
            self.order.append(key)
        else:
            ent = self.acts[key]
            ent[0] = combine_act(ent[0], raw)
            ent[1] += 1

    def add_grad(self, key: tuple, raw: dict) -> None:
        self.grads[key] = combine_grad(self.grads[key], raw) if key in self.grads else raw

    def decode(self, pending: list, host: np.ndarray, full: bool = False) -> int:
        """Split one host vector laid out like ``pending``; ``full``: every pack in the full layout."""
        off = 0
        for kind, key, lay, _ in pending:
            if kind == "act":
                layout, mtype, fast = lay
                fast = fast and not full
                size = layout.pack_size(fast)
                self.add_act(key, split_act(host[off : off + size], layout, fast), mtype, layout.axis)
            else:
                glayout, fast = lay
                fast = fast and not full
                size = glayout.pack_size(fast)
                self.add_grad(key, split_grad(host[off : off + size], glayout, fast))
            off += size
        return off

    def write(self, writer, step: int) -> None:
        for key in self.order:
            raw, nfwd, mtype, axis = self.acts[key]
            row = finish_act(raw)
            phase, layer, call, path = key
            row.update(step=step, phase=phase, layer=layer, call=call, output=path, module_type=mtype,
                       channel_axis=axis, forwards=nfwd)  # fmt: skip
            writer.append("layers", row)
        for key, raw in self.grads.items():
            row = finish_grad(raw)
            phase, layer, call, path = key
            row.update(step=step, phase=phase, layer=layer, call=call, output=path)
            writer.append("grads", row)


def expand_pending(pending: list) -> list:
    """Every pack in the full layout (device ops), for cross-rank gathering."""
    out = []
    for kind, key, lay, pack in pending:
        if kind == "act":
            out.append(R.expand_act(pack, lay[0], lay[2]))
        else:
            out.append(R.expand_grad(pack, lay[0], lay[1]))
    return out


def entry_signature(pending: list) -> list[tuple]:
    sig = []
    for kind, key, lay, _ in pending:
        size = lay[0].size  # full-layout size: fixed by shapes, equal on every rank
        sig.append((kind, key, size))
    return sig


# --- raw fields of packs: split, merge, finish --------------------------------------------------


def split_act(pack: np.ndarray, layout: ActLayout, fast: bool = False) -> dict:
    """Raw (combinable) fields of one activation pack."""
    c = layout.channels
    if fast:
        o = N_FAST_SCALARS
        mn, mx, abs_sum, n_zero, n_nonpos, n_sat = pack[:o]
        n = float(layout.numel)
        return {
            "n": n, "min": mn, "max": mx, "abs_sum": abs_sum, "n_zero": n_zero, "n_nonpos": n_nonpos,
            "n_sat": n_sat, "n_nan": 0.0, "n_inf": 0.0,
            "hist_n": float(pack[o + 3 * c : o + 3 * c + layout.hist_bins].sum()),
            "cnt": np.full(c, n / c), "s1": pack[o : o + c], "m2": pack[o + c : o + 2 * c],
            "active": pack[o + 2 * c : o + 3 * c], "hist": pack[o + 3 * c : o + 3 * c + layout.hist_bins],
            "samples": float(layout.samples),
        }  # fmt: skip
    o = N_ACT_SCALARS
    sc = pack[:o]
    return {
        "n": sc[0],
        "min": sc[1],
        "max": sc[2],
        "abs_sum": sc[3],
        "n_zero": sc[4],
        "n_nonpos": sc[5],
        "n_sat": sc[6],
        "n_nan": sc[7],
        "n_inf": sc[8],
        "hist_n": sc[9],
        "samples": sc[10],
        "cnt": pack[o : o + c],
        "s1": pack[o + c : o + 2 * c],
        "m2": pack[o + 2 * c : o + 3 * c],
        "active": pack[o + 3 * c : o + 4 * c],
        "hist": pack[o + 4 * c : o + 4 * c + layout.hist_bins],
    }


def combine_act(a: dict, b: dict) -> dict:
    """Merge raw fields of two packs of the same layer call (e.g. two micro-batches)."""
    if a["cnt"].shape != b["cnt"].shape:
        raise ValueError("channel count changed between forwards")
    out = {k: a[k] + b[k] for k in ("n", "abs_sum", "n_zero", "n_nonpos", "n_sat", "n_nan", "n_inf", "hist_n")}
    out["min"] = min(a["min"], b["min"])
    out["max"] = max(a["max"], b["max"])
    na, nb = a["cnt"], b["cnt"]
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(nb > 0, b["s1"] / np.maximum(nb, 1), 0) - np.where(na > 0, a["s1"] / np.maximum(na, 1), 0)
        extra = np.where(n > 0, delta * delta * na * nb / np.maximum(n, 1), 0)
    out["cnt"] = n
    out["s1"] = a["s1"] + b["s1"]
    out["m2"] = a["m2"] + b["m2"] + extra
    out["active"] = a["active"] + b["active"]
    out["hist"] = a["hist"] + b["hist"]
    out["samples"] = a["samples"] + b["samples"]
    return out


def finish_act(r: dict) -> dict:
    """Derived statistics (what the run directory stores) from raw fields."""
    n = r["n"]
    cnt, s1, m2 = r["cnt"], r["s1"], r["m2"]
    with np.errstate(invalid="ignore", divide="ignore"):
        ch_mean = np.where(cnt > 0, s1 / np.maximum(cnt, 1), np.nan)
        ch_var = np.where(cnt > 0, m2 / np.maximum(cnt, 1), np.nan)
    if n > 0:
        mean = s1.sum() / n
        m2_all = m2.sum() + (cnt * (np.nan_to_num(ch_mean) - mean) ** 2).sum()
        std = math.sqrt(max(m2_all / n, 0.0))
        mn, mx = float(r["min"]), float(r["max"])
    else:
        mean = std = mn = mx = math.nan
    frac = (lambda k: float(r[k] / n)) if n > 0 else (lambda k: math.nan)
    return {
        "count": int(n + r["n_nan"] + r["n_inf"]),
        "samples": int(r["samples"]),
        "mean": float(mean),
        "std": float(std),
        "min": mn,
        "max": mx,
        "mean_abs": frac("abs_sum"),
        "frac_zero": frac("n_zero"),
        "frac_nonpos": frac("n_nonpos"),
        "frac_sat": frac("n_sat"),
        "nan_count": int(r["n_nan"]),
        "inf_count": int(r["n_inf"]),
        "ch_mean": ch_mean.astype(np.float32),
        "ch_var": ch_var.astype(np.float32),
        "active": r["active"].astype(np.int64),
        "hist": r["hist"].astype(np.int64),
        "hist_count": int(r["hist_n"]),
    }


def split_grad(pack: np.ndarray, layout: GradLayout, fast: bool = False) -> dict:
    if fast:
        return {"n": float(layout.numel), "sumsq": pack[0], "max_abs": pack[1], "n_nan": 0.0, "n_inf": 0.0}
    return {"n": pack[0], "sumsq": pack[1], "max_abs": pack[2], "n_nan": pack[3], "n_inf": pack[4]}


def combine_grad(a: dict, b: dict) -> dict:
    return {
        "n": a["n"] + b["n"],
        "sumsq": a["sumsq"] + b["sumsq"],
        "max_abs": max(a["max_abs"], b["max_abs"]),
        "n_nan": a["n_nan"] + b["n_nan"],
        "n_inf": a["n_inf"] + b["n_inf"],
    }


def finish_grad(r: dict) -> dict:
    n = r["n"]
    return {
        "count": int(n + r["n_nan"] + r["n_inf"]),
        "norm": float(math.sqrt(r["sumsq"])),
        "rms": float(math.sqrt(r["sumsq"] / n)) if n > 0 else math.nan,
        "max_abs": float(r["max_abs"]) if n > 0 else math.nan,
        "nan_count": int(r["n_nan"]),
        "inf_count": int(r["n_inf"]),
    }
