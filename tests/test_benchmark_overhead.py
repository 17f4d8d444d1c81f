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
