"""``normscope top``: follows a run that another thread is writing, until it ends."""

import threading
import time

import torch
from torch import nn
from typer.testing import CliRunner

from normscope import watch
from normscope_cli.app import app

runner = CliRunner()


def test_top_follows_a_run_being_written_until_it_ends(tmp_path):
    path = tmp_path / "live"
    started = threading.Event()

    def train():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
        with torch.no_grad():
            model[0].bias.fill_(-50.0)  # every ReLU unit dead: dead-units fires while the run is written
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with watch(model, path, every=1, flush_every=1) as scope:
            for _ in range(40):
                loss = model(torch.randn(64, 6)).pow(2).mean() + 1.0
                opt.zero_grad()
                loss.backward()
                opt.step()
                scope.log(loss=loss.item())
                started.set()
                time.sleep(0.04)

    t = threading.Thread(target=train)
    t.start()
    assert started.wait(30)
    t0 = time.monotonic()
    r = runner.invoke(app, ["top", str(path), "--refresh", "0.2", "--timeout", "60"], catch_exceptions=False)
    t.join()
    assert r.exit_code == 0, r.stderr
    assert time.monotonic() - t0 < 60  # it ended with the run, not at the timeout
    out = r.stdout
    assert "complete" in out and "steps sampled 40" in out and "last step 39" in out
    assert "loss 1." in out and "dead-units" in out and "still being written" not in out


def test_top_bad_input_one_line(tmp_path):
    r = runner.invoke(app, ["top", str(tmp_path)])
    assert r.exit_code == 2 and "not a normscope run directory" in r.stderr and "\n" not in r.stderr.strip()
    r = runner.invoke(app, ["top", str(tmp_path), "--refresh", "0"])
    assert r.exit_code == 2 and "--refresh" in r.stderr
