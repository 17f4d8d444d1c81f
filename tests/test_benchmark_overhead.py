"""benchmarks/overhead.py: the GPU mode exits cleanly without a GPU, and the many-layer workload
builds with ~150 hooked calls (no timing asserted here: speed lives in the benchmark)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmark would run in full")
def test_device_cuda_without_gpu_says_so_and_exits_0():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--device", "cuda"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "no CUDA device" in out.stdout


def test_mobilenetv2_workload_has_many_small_hooked_calls():
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from workloads import WORKLOADS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from normscope.collect.select import plan_hooks

    factory, batch = WORKLOADS["mobilenetv2"]
    model = factory()
    assert 120 <= len(plan_hooks(model)) <= 180
    x, y = batch(torch.Generator().manual_seed(0))
    assert x.shape == (16, 3, 64, 64) and model(x).shape == (16, 10)


def test_rss_only_with_a_fixed_mmap_threshold_reports_peak_rss_per_variant():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--workloads", "mlp", "--variants",
                          "bare,watch-every1", "--rss-only", "--rss-mmap-threshold", "131072", "--quick"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith("  ")}
    assert set(rows) >= {"bare", "watch-every1"}
    assert rows["bare"][1] == "nan" and float(rows["bare"][4]) > 100  # no timing; a peak RSS in MiB
    assert 0.9 < float(rows["watch-every1"][5]) < 1.5
