"""Synthetic run directories with statistics chosen by the test, written through the store.

The per-check harness builds runs whose numbers sit just above or just below a threshold, so
every check's decision (and severity ladder) is tested on exactly the value it compares.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from normscope.analyze import analyze_full
from normscope.store import RunWriter, load, write_json, write_probe
from normscope.store.writer import FORMAT

LIN = {"type": "Linear", "params": 10}  # a plain linear layer's module entry


def judge(run, check: str, **config):
    """Run one check on a synthetic run (``config``: its thresholds); (analysis, [(severity, layer)])."""
    a = analyze_full(run, checks=[check], config={check: config} if config else None)
    return a, [(f.severity, f.layer) for f in a.findings if f.check == check]


def skip_reason(analysis, check: str) -> str | None:
    return {s.check: s.reason for s in analysis.skipped}.get(check)


STAT_DEFAULTS = {
    "phase": "train", "call": 0, "output": "", "module_type": "Linear", "channel_axis": -1, "forwards": 1,
    "count": 1024, "samples": 64, "mean": 0.0, "std": 1.0, "min": -3.0, "max": 3.0, "mean_abs": 0.8,
    "frac_zero": 0.0, "frac_nonpos": 0.5, "frac_sat": 0.0, "nan_count": 0, "inf_count": 0, "hist_count": 0,
}  # fmt: skip


class SyntheticRun:
    def __init__(self, path: Path, modules: dict[str, dict], name: str = "synthetic"):
        self.path = Path(path)
        self.w = RunWriter(self.path)
        self.modules = modules
        self.order = [{"layer": n, "call": 0, "type": m["type"]} for n, m in modules.items() if m.get("hooked", True)]
        self.meta = {
            "format": FORMAT, "name": name, "status": "complete", "execution_order": self.order,
            "modules": [{"name": n, "type": m["type"], "params": m.get("params", 0), "hooked": m.get("hooked", True),
                         **{k: m[k] for k in ("family", "role", "weight_norm", "bn", "momentum", "track_running_stats") if k in m}} for n, m in modules.items()],
            "options": {}, "histograms": {}, "saturation": {n: m["sat"] for n, m in modules.items() if "sat" in m},
        }  # fmt: skip

    def stat(self, step: int, layer: str, channels: int = 4, **kw) -> None:
        row = dict(STAT_DEFAULTS, step=step, layer=layer, module_type=self.modules[layer]["type"])
        row.update(ch_mean=np.zeros(channels, np.float32), ch_var=np.ones(channels, np.float32),
                   active=np.full(channels, row["samples"], np.int64), hist=np.zeros(0, np.int64))  # fmt: skip
        for k, v in kw.items():
            row[k] = (
                np.asarray(v, dtype=np.float32 if k in ("ch_mean", "ch_var") else np.int64)
                if k in ("ch_mean", "ch_var", "active")
                else v
            )
        self.w.append("stats", row)

    def grad(self, step: int, layer: str, norm: float, count: int = 1024, **kw) -> None:
        row = {"step": step, "phase": "train", "layer": layer, "call": 0, "output": "", "count": count, "norm": norm,
               "rms": norm / math.sqrt(count), "max_abs": norm, "nan_count": 0, "inf_count": 0} | kw  # fmt: skip
        self.w.append("grads", row)

    def param(self, step: int, name: str, norm: float, grad_norm: float, update_norm: float, numel: int = 256,
              lr: float = 0.01, wd: float = 0.0, requires_grad: bool = True) -> None:  # fmt: skip
        layer = name.rsplit(".", 1)[0]
        self.w.append("params", {"step": step, "param": name, "layer": layer, "numel": numel, "requires_grad":
                                 requires_grad, "norm": norm, "grad_norm": grad_norm, "update_norm": update_norm,
                                 "lr": lr, "weight_decay": wd})  # fmt: skip

    def scalar(self, step: int, value: float, phase: str = "train", name: str = "loss") -> None:
        self.w.append("scalars", {"step": step, "phase": phase, "name": name, "value": value})

    def signal(self, step: int, layer: str, name: str, value: float, phase: str = "train", call: int = 0) -> None:
        self.w.append("signals", {"step": step, "phase": phase, "layer": layer, "call": call, "name": name,
                                  "value": value})  # fmt: skip

    def done(self, probe: dict | None = None, **meta):
        self.w.flush()
        write_json(self.path / "meta.json", self.meta | meta)
        if probe is not None:
            write_probe(self.path, probe)
        return load(self.path)
