"""Issue 16, "Wrong or misleading": one regression test per defect a new user hit."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import normscope
from normscope import watch
from normscope.errors import NormscopeError
from normscope_cli.app import app
from normscope_cli.common import findings_table

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, contains=""):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("normscope: error:") and "\n" not in err and "Traceback" not in err, err
    assert contains in err, err
    return err


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    """dropout_before_bn for --steps 5: batches of 64, eval passes of 449 samples merged per step."""
    out = tmp_path_factory.mktemp("i16") / "five"
    r = invoke("inspect", FIX / "dropout_before_bn.py", "--steps", "5", "--out", out, "--quiet")
    assert r.exit_code == 0, r.stderr
    return out


def _header(html: str, key: str) -> str:
    m = re.search(rf"<span>{key}</span>\s*(.*?)</div>", html, re.S)
    assert m, key
    return re.sub(r"<[^>]+>", "", m.group(1)).strip()


def test_header_batch_size_and_sampled_steps_come_from_training(five):
    html = (five / "report.html").read_text()
    assert _header(html, "batch size").startswith("64"), _header(html, "batch size")
    assert "449" not in _header(html, "batch size")
    assert _header(html, "steps") == "5 sampled (0–4)"


def test_inspect_folder_without_meta_says_not_a_run_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    err = one_line_error(invoke("inspect", tmp_path / "empty"), contains="not a normscope run directory")
    assert "recipe file" not in err


def test_training_that_raises_names_the_step_and_the_partial_run(tmp_path):
    rec = tmp_path / "boom.py"
    rec.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from normscope.probe import Recipe

            calls = {"n": 0}

            def loss(out, y):
                calls["n"] += 1
                if calls["n"] == 4:  # the fourth training step (step 3)
                    raise RuntimeError("CUDA-like failure in the loss")
                return nn.functional.mse_loss(out, y)

            def recipe():
                torch.manual_seed(0)
                net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
                data = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(4)]
                return Recipe(model=net, train_data=data, loss_fn=loss,
                              optimizer=torch.optim.SGD(net.parameters(), lr=0.01), steps=10, name="boom")
            """
        )
    )
    out = tmp_path / "run"
    err = one_line_error(invoke("inspect", rec, "--out", out, "--quiet"), contains="at step 3")
    assert "CUDA-like failure in the loss" in err and str(out) in err
    assert "status failed" in err and "last recorded step 3" in err and f"normscope report {out}" in err
    run = normscope.load(out)
    assert run.meta["status"].startswith("failed") and run.state["last_step"] == 3  # the failed step's forward
    assert invoke("report", out).exit_code == 0  # the partial run opens as the message says


def test_inspect_run_dir_never_replaces_its_report(five, tmp_path):
    first = (five / "report.html").read_bytes()
    inode = (five / "report.html").stat().st_ino  # a replaced report is a new file (atomic rename)
    r = invoke("inspect", five)
    assert r.exit_code == 0, r.stderr
    assert (five / "report.html").read_bytes() == first and (five / "report.html").stat().st_ino == inode
    assert (five / "report-2.html").is_file() and "report-2.html" in r.stdout and "--force" in r.stdout
    cfg = tmp_path / "strict.toml"
    cfg.write_text("[dead-units]\nwarn = 0.01\nerror = 0.02\n")
    assert invoke("inspect", five, "--config", cfg, "--quiet").exit_code == 0
    assert (five / "report.html").read_bytes() == first and (five / "report-3.html").is_file()
    assert invoke("report", five).stdout.strip().endswith("report-4.html")
    forced = invoke("inspect", five, "--force", "--quiet")
    assert forced.exit_code == 0 and (five / "report.html").stat().st_ino != inode
    assert not (five / "report-5.html").exists()


WRITER = """
import os, signal, sys, torch
from torch import nn
from normscope import watch
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
with watch(model, sys.argv[1], every=1, flush_every=1) as scope:
    for step in range(3):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        scope.log(loss=loss.item())
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_writer_shows_incomplete_last_flushed_step(tmp_path):
    out = tmp_path / "killed"
    p = subprocess.run([sys.executable, "-c", WRITER, str(out)], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    run = normscope.load(out)
    assert run.meta["status"] == "running" and run.meta["writer"]["pid"] > 0 and run.meta["heartbeat"]
    assert run.state["state"] == "incomplete" and run.state["last_step"] == 2
    r = invoke("inspect", out)
    assert r.exit_code == 0, r.stderr
    assert "incomplete: last flushed step 2" in r.stdout
    html = (out / "report.html").read_text()
    assert "incomplete: last flushed step 2" in _header(html, "status")
    assert "still being written" not in html


def test_live_writer_is_running_and_a_silent_remote_one_is_not():
    from normscope.store import writer_state

    alive = {"status": "running", "writer": {"pid": os.getpid(), "host": os.uname().nodename}}
    assert writer_state(alive, 4)["state"] == "running"
    remote = {"status": "running", "writer": {"pid": 1, "host": "elsewhere"}, "heartbeat": "2020-01-01T00:00:00+00:00"}
    assert writer_state(remote, 4)["text"].startswith("incomplete: last flushed step 4")
    fresh = dict(remote, heartbeat="2020-01-01T00:00:00+00:00")
    assert writer_state(fresh, 4, now=1577836800.0 + 60)["state"] == "running"


def _small_run(path, model):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, path, every=1) as scope:
        for _ in range(4):
            loss = model(torch.randn(32, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.log(loss=loss.item())
    return path


def test_compare_across_architectures_warns_and_shows_the_union(tmp_path):
    a = _small_run(tmp_path / "a", nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)))
    b = _small_run(
        tmp_path / "b", nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    )
    doc = json.loads(invoke("compare", a, b, "--format", "json").stdout)
    assert doc["architecture_warning"] and "different architectures" in doc["architecture_warning"]
    names = {(r["layer"], r["in"]) for r in doc["layers"]}
    assert {("3", "b"), ("4", "b")} <= names and ("0", "both") in names
    assert "1" in doc["retyped"]  # ReLU in A, Tanh in B under the same name
    t = invoke("compare", a, b)
    assert t.exit_code == 0 and "warning:" in t.stdout and "different architectures" in t.stdout
    assert "B only" in t.stdout and "ReLU → Tanh" in t.stdout
    same = invoke("compare", a, a, "--format", "json")
    assert json.loads(same.stdout)["architecture_warning"] is None


def test_config_with_warn_and_error_inverted_is_rejected(tmp_path, five):
    cfg = tmp_path / "inverted.toml"
    cfg.write_text("[dead-units]\nwarn = 0.9\nerror = 0.1\n")
    one_line_error(invoke("inspect", five, "--config", cfg), contains="dead-units: warn = 0.9 must be at or below")
    with pytest.raises(NormscopeError, match="must be at or above"):
        normscope.Config.from_dict({"small-batch-bn": {"warn": 2, "error": 8}})  # smaller batches are worse
    normscope.Config.from_dict({"small-batch-bn": {"warn": 32, "error": 8}, "dead-units": {"warn": 0.2}})


def test_report_into_a_missing_folder_creates_nothing(five, tmp_path):
    one_line_error(invoke("report", five, "-o", tmp_path / "missing" / "dir" / "x.html"), contains="does not exist")
    assert not (tmp_path / "missing").exists()
    root = Path("/normscope-issue16-missing")
    assert not root.exists()
    one_line_error(invoke("report", five, "-o", root / "dir" / "x.html"), contains="create it first")
    assert not root.exists()


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_respect_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        run = _small_run(tmp_path / "run", nn.Sequential(nn.Linear(6, 4), nn.ReLU()))
        invoke("report", run)
    finally:
        os.umask(old)
    files = [run / "meta.json", run / "report.html", *sorted((run / "stats").rglob("*.parquet"))]
    assert len(files) > 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == mode, f


def test_help_shows_no_type_after_plain_flags():
    for cmd in ("inspect", "report", "compare", "checks", "fold", "top"):
        h = invoke(cmd, "--help")
        assert h.exit_code == 0 and "--help" in h.stdout, cmd
        assert "<bool>" not in h.stdout, cmd
    assert "<int>" in invoke("inspect", "--help").stdout  # options that take a value keep their type


def test_table_numbers_never_wrap_mid_value():
    f = {"check": "dropout-bn-variance-shift", "severity": "warning", "layer": "encoder.layers.11.mlp.norm",
         "message": "BatchNorm after dropout learns inflated running variance " * 3,
         "evidence": {"measured_shift": 1.23456789, "affected_layers": 3}}  # fmt: skip
    con = Console(width=80, record=True, no_color=True)
    con.print(findings_table([f]))
    text = con.export_text()
    assert "measured_shift=1.235" in text, text
