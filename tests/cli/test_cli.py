"""The real CLI: typer's CliRunner for every command and format, plus the installed console script."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normscope_cli.app import app

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
runner = CliRunner()


def invoke(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kw)


def one_line_error(result, code=2, contains=""):
    assert result.exit_code == code, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("normscope: error:") and "\n" not in err and "Traceback" not in err, err
    assert contains in err, err


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "healthy"
    r = invoke("inspect", FIX / "healthy_mlp_wine.py", "--out", out, "--format", "json", "--quiet")
    assert r.exit_code == 0, r.stderr
    return out, json.loads(r.stdout)


@pytest.fixture(scope="module")
def dead(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "dead"
    r = invoke("inspect", FIX / "dead_relu_high_lr.py", "--out", out, "--format", "junit", "--fail-on", "warning")
    return out, r


def test_inspect_json_is_the_only_stdout(healthy):
    out, doc = healthy
    assert doc["run_dir"] == str(out)
    assert set(doc) >= {"run_dir", "findings", "summary", "skipped", "report"}
    assert doc["summary"]["error"] == 0 and doc["summary"]["warning"] == 0
    for f in doc["findings"]:
        assert set(f) == {"check", "severity", "layer", "step", "message", "evidence", "recommendation"}
    assert Path(doc["report"]).is_file() and (out / "report.html").is_file()


def test_inspect_junit_and_fail_on(dead):
    out, r = dead
    assert r.exit_code == 1  # a warning at/above --fail-on warning
    suite = ET.fromstring(r.stdout)
    assert suite.tag == "testsuite" and int(suite.get("failures")) >= 1
    failing = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert "dead-units" in failing


def test_inspect_existing_run_dir_table(dead):
    out, _ = dead
    r = invoke("inspect", out, "--fail-on", "error")
    assert r.exit_code == 0, r.stderr
    assert "dead-units" in r.stdout and "report:" in r.stdout
    assert "\x1b[" not in r.stdout  # no colour when stdout is not a terminal


def test_fail_on_levels(dead):
    out, _ = dead
    assert invoke("inspect", out, "--quiet", "--fail-on", "info").exit_code == 1
    assert invoke("inspect", out, "--quiet").exit_code == 0


def test_model_factory_with_input_shape(tmp_path):
    f = tmp_path / "factory.py"
    f.write_text(
        "from torch import nn\n\ndef model():\n    return nn.Sequential(nn.Linear(6, 16), nn.Sigmoid(), nn.Linear(16, 3))\n"
    )
    r = invoke(
        "inspect", f"{f}:model", "--input-shape", "32,6", "--steps", "3", "--out", tmp_path / "m", "--format", "json"
    )
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (tmp_path / "m" / "meta.json").exists() and isinstance(doc["findings"], list)


def test_report_command(dead, tmp_path):
    out, _ = dead
    r = invoke("report", out, "-o", tmp_path / "r.html")
    assert r.exit_code == 0, r.stderr
    html = (tmp_path / "r.html").read_text()
    assert "dead-units" in html and r.stdout.strip() == str(tmp_path / "r.html")


def test_compare_table_and_json(healthy, dead):
    r = invoke("compare", healthy[0], dead[0], "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    by = {c["check"]: c for c in doc["checks"]}
    du = by["dead-units"]  # the healthy run may hold dead-units info (dormant units); B has the warning
    assert du["status"] in ("new", "changed") and du["worst_b"] in ("warning", "error")
    assert du["worst_a"] in (None, "info")
    assert any(f["check"] == "dead-units" and f["severity"] != "info" for f in doc["new_findings"])
    t = invoke("compare", healthy[0], dead[0])
    assert t.exit_code == 0 and "dead-units" in t.stdout and du["status"] in t.stdout


def test_checks_list_and_doc():
    r = invoke("checks")
    assert r.exit_code == 0
    for cid in ("dead-units", "saturation", "dropout-bn-variance-shift", "small-batch-bn", "legacy-lrn"):
        assert cid in r.stdout
    d = invoke("checks", "dropout-bn-variance-shift")
    assert d.exit_code == 0 and "Li" in d.stdout
    one_line_error(invoke("checks", "no-such-check"), contains="no check")


def test_bad_inputs_exit_2_one_line(tmp_path, dead):
    one_line_error(invoke("inspect", tmp_path / "missing.py"), contains="missing.py")
    norecipe = tmp_path / "norecipe.py"
    norecipe.write_text("x = 1\n")
    one_line_error(invoke("inspect", norecipe), contains="recipe")
    raises = tmp_path / "raises.py"
    raises.write_text("raise ValueError('broken import')\n")
    one_line_error(invoke("inspect", raises), contains="broken import")
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def recipe():\n    return 42\n")
    one_line_error(invoke("inspect", wrong), contains="wrong.py")
    bad_run = tmp_path / "badrun"
    bad_run.mkdir()
    (bad_run / "meta.json").write_text("{corrupt")
    one_line_error(invoke("inspect", bad_run), contains="corrupt")
    one_line_error(invoke("report", bad_run), contains="corrupt")
    one_line_error(invoke("report", tmp_path / "nope"), contains="does not exist")
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[dead-units\nwarn = ")
    one_line_error(invoke("inspect", dead[0], "--config", cfg), contains="TOML")
    cfg2 = tmp_path / "unknown.toml"
    cfg2.write_text("[dead-units]\nno_such_threshold = 3\n")
    one_line_error(invoke("inspect", dead[0], "--config", cfg2), contains="no_such_threshold")
    one_line_error(invoke("inspect", dead[0], "--format", "yaml"), contains="--format")
    one_line_error(invoke("inspect", dead[0], "--fail-on", "fatal"), contains="--fail-on")
    usage = invoke("inspect")
    assert usage.exit_code == 2  # missing argument: click's usage error


def test_config_thresholds_change_findings(dead, tmp_path):
    cfg = tmp_path / "lenient.toml"
    cfg.write_text("[dead-units]\nwarn = 0.99\nerror = 1.0\n")
    r = invoke("inspect", dead[0], "--config", cfg, "--format", "json")
    assert r.exit_code == 0, r.stderr
    sev = [f["severity"] for f in json.loads(r.stdout)["findings"] if f["check"] == "dead-units"]
    assert "warning" not in sev and "error" not in sev


def test_version_and_help_with_examples():
    from normscope import __version__

    assert invoke("--version").stdout.strip() == f"normscope {__version__}"
    for cmd in ("inspect", "report", "compare", "checks", "fold"):
        h = invoke(cmd, "--help")
        assert h.exit_code == 0 and "Example" in h.stdout, cmd


def test_debug_shows_traceback(tmp_path):
    r = invoke("--debug", "report", tmp_path / "nope")
    assert r.exit_code == 2 and "Traceback" in r.stderr


def test_installed_console_script(dead, tmp_path):
    exe = Path(sys.executable).parent / "normscope"
    assert exe.exists()
    env = {**os.environ, "NO_COLOR": "1"}
    ok = subprocess.run(
        [str(exe), "inspect", str(dead[0]), "--format", "json"], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["run_dir"] == str(dead[0])
    bad = subprocess.run([str(exe), "inspect", str(tmp_path / "x.py")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
