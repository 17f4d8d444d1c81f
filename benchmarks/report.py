"""Report size and build time for a large run: 200 layers x 2,000 sampled steps (budget: < 5 MB, < 15 s).

    .venv/bin/python benchmarks/report.py [--layers 200] [--steps 2000] [--channels 64]

The run directory is synthesised with the collector's own writer (realistic statistics for a
Conv/BN/ReLU stack drifting over training), then loaded and rendered as in ``normscope report``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from normscope.collect.reducers import SYMLOG_BINS, HistSpec
from normscope.store import load
from normscope.store.writer import FORMAT, RunWriter, write_json


def synthesise(run_dir: Path, layers: int, steps: int, channels: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    types = ["Conv2d", "BatchNorm2d", "ReLU"]
    names = [f"block{i // 3}.{types[i % 3].lower()}" for i in range(layers)]
    modules = [
        {"name": n, "type": types[i % 3], "params": 0, "trainable": 0, "hooked": True} for i, n in enumerate(names)
    ]
    meta = {
        "format": FORMAT, "name": "synthetic", "status": "complete", "created": "2026-01-01T00:00:00+00:00",
        "ended": "2026-01-01T01:00:00+00:00", "versions": {"normscope": "bench", "torch": "-", "python": "-"},
        "model": {"class": "Synthetic", "params": 1_000_000, "trainable": 1_000_000, "hooked_layers": layers},
        "modules": modules, "execution_order": [{"layer": n, "call": 0, "type": types[i % 3]} for i, n in enumerate(names)],
        "options": {"every": 1}, "histograms": {n: HistSpec("symlog").to_json() for n in names}, "saturation": {},
    }  # fmt: skip
    write_json(run_dir / "meta.json", meta)
    w = RunWriter(run_dir)
    base_mean = rng.normal(0, 0.5, (layers, channels))
    base_var = rng.uniform(0.2, 2.0, (layers, channels))
    for step in range(steps):
        drift = 1 + 0.3 * step / steps
        for i, n in enumerate(names):
            relu = i % 3 == 2
            ch_mean = (base_mean[i] * drift + rng.normal(0, 0.02, channels)).astype(np.float32)
            ch_var = (base_var[i] * drift).astype(np.float32)
            active = rng.integers(0 if i % 17 == 2 else 20, 33, channels)
            hist = rng.multinomial(16384, np.full(SYMLOG_BINS, 1.0 / SYMLOG_BINS))
            w.append("stats", {
                "step": step, "phase": "train", "layer": n, "call": 0, "output": "", "module_type": types[i % 3],
                "channel_axis": 1, "forwards": 1, "count": 32 * channels * 64, "samples": 32,
                "mean": float(ch_mean.mean()), "std": float(np.sqrt(ch_var.mean())), "min": -3.0, "max": 3.0,
                "mean_abs": 0.8, "frac_zero": 0.5 if relu else 0.0, "frac_nonpos": 0.5 if relu else 0.5,
                "frac_sat": 0.0, "nan_count": 0, "inf_count": 0, "ch_mean": ch_mean, "ch_var": ch_var,
                "active": active, "hist": hist, "hist_count": 16384,
            })  # fmt: skip
            w.append("grads", {
                "step": step, "phase": "train", "layer": n, "call": 0, "output": "", "count": 32 * channels * 64,
                "norm": 1e-2 * (i + 1) ** 0.5, "rms": 1e-4 * (1 + i / layers), "max_abs": 1e-3, "nan_count": 0,
                "inf_count": 0,
            })  # fmt: skip
        if step % 200 == 199:
            w.flush()
    w.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--keep", help="write the run and report here instead of a temporary folder")
    a = ap.parse_args()
    from normscope_reports import build_report

    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp())
    run_dir = tmp / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    synthesise(run_dir, a.layers, a.steps, a.channels)
    t1 = time.perf_counter()
    run = load(run_dir)
    n_rows = len(run.stats)
    t2 = time.perf_counter()
    findings = [{"check": "dead-units", "severity": "warning", "layer": f"block{k}.relu", "step": [0, a.steps - 1],
                 "message": "dead units", "evidence": {}, "recommendation": ""} for k in range(0, a.layers // 3, 3)]  # fmt: skip
    path = build_report(run, findings=findings, out=tmp / "report.html")
    t3 = time.perf_counter()
    size = path.stat().st_size
    print(f"run: {a.layers} layers x {a.steps} sampled steps ({n_rows:,} activation rows, {a.channels} channels)")
    print(
        f"synthesise {t1 - t0:6.1f} s   load {t2 - t1:6.1f} s   report {t3 - t2:6.1f} s   (budget: load + report < 15 s)"
    )
    print(f"report size {size / 1e6:.2f} MB (budget < 5 MB), {len(findings)} flagged layers -> {path}")
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if size < 5e6 and (t3 - t1) < 15 else 1)


if __name__ == "__main__":
    main()
