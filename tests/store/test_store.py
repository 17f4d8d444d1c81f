"""Run directories: atomic parts, live reading, SIGKILL survival, clear errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from normscope import NormscopeError, load, watch


def small_run(path, steps=3, **kw):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with watch(model, path, every=1, **kw) as scope:
        for _ in range(steps):
            model(torch.randn(8, 4)).sum().backward()
            scope.step()
    return path


def test_meta_and_tables(tmp_path):
    run = load(small_run(tmp_path / "r"))
    m = run.meta
    assert m["format"] == "normscope-run/1" and m["status"] == "complete"
    assert m["versions"]["torch"] == torch.__version__
    assert m["model"]["params"] == 4 * 4 + 4 + 4 + 1
    assert [r["layer"] for r in m["execution_order"]] == ["0", "1", "2"]
    assert {mod["name"]: mod["type"] for mod in m["modules"]}["1"] == "ReLU"
    assert m["options"]["every"] == 1 and m["steps_recorded"] == 3
    assert len(run.stats) == 9 and len(run.grads) == 9 and len(run.params) == 12
    assert list(run.layers.layer) == ["0", "1", "2"]
    row = run.stats.iloc[0]
    assert len(row["ch_mean"]) == 4 and len(row["hist"]) == 71


def test_read_while_written(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with watch(model, tmp_path / "live", every=1, flush_every=1) as scope:
        for i in range(3):
            model(torch.randn(8, 4)).sum().backward()
            scope.step()
            live = load(tmp_path / "live")
            assert live.meta["status"] == "running"
            assert live.steps == list(range(i + 1))


def test_missing_and_corrupt_run_dirs(tmp_path):
    with pytest.raises(NormscopeError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NormscopeError, match="meta.json is missing"):
        load(tmp_path / "empty")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NormscopeError, match="not a directory"):
        load(f)
    bad = small_run(tmp_path / "bad")
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(NormscopeError, match=r"meta.json is corrupt"):
        load(bad)
    (bad / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(NormscopeError, match="not a normscope run"):
        load(bad)
    r = small_run(tmp_path / "badpart")
    part = sorted((r / "stats" / "stats").glob("part-*.parquet"))[0]
    part.write_bytes(b"PAR1garbage")
    with pytest.raises(NormscopeError, match=part.name):
        _ = load(r).stats


def test_error_messages_are_one_line(tmp_path):
    try:
        load(tmp_path / "nope")
    except NormscopeError as e:
        assert "\n" not in str(e)


def test_temp_files_are_ignored(tmp_path):
    r = small_run(tmp_path / "t")
    (r / "stats" / "stats" / ".tmp-abc.parquet").write_bytes(b"half a file")
    assert load(r).steps == [0, 1, 2]


CHILD = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import normscope
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with normscope.watch(model, sys.argv[1], every=1, flush_every=1) as scope:
        step = 0
        while True:
            loss = model(torch.randn(64, 16)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            print(step, flush=True)  # step `step` has been flushed (flush_every=1)
            step += 1
    """
)


def test_sigkill_loses_only_unflushed_steps(tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    done = -1
    deadline = time.monotonic() + 120
    try:
        while done < 20 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            done = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert done >= 20, "child never trained"
    run = load(run_dir)
    assert run.meta["status"] == "running"  # it never got to close
    steps = run.steps
    assert steps[: done + 1] == list(range(done + 1))  # every flushed step is readable
    assert set(run.params.step) >= set(range(done + 1))


def test_meta_name_is_the_run_name_not_a_module_name(tmp_path):
    """Regression: a loop variable once shadowed the run name in meta.json."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with watch(model, tmp_path / "n", every=1, name="my-run"):
        model(torch.randn(1, 2))
    assert load(tmp_path / "n").meta["name"] == "my-run"
    with watch(model, tmp_path / "d", every=1):
        model(torch.randn(1, 2))
    assert load(tmp_path / "d").meta["name"] == "Sequential"
