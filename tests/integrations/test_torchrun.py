"""The README's torchrun command: a 2-process CPU run of a fixture, written once by rank 0."""

import os
import subprocess
import sys
from pathlib import Path

from normscope import load

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_two_processes(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(ROOT / "examples" / "ddp_fixture.py"),
           str(ROOT / "fixtures" / "small_batch_bn.py"), "--out", str(out), "--steps", "12"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 ranks, 12 steps" in res.stdout
    assert "syncbn-recommended" in res.stdout and "small-batch-bn" in res.stdout
    run = load(out)
    assert run.meta["distributed"]["world_size"] == 2 and run.steps == list(range(12))
