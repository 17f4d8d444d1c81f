"""One finding per check and cause: grouped layers, worst first, shown in the table and the report."""

import torch
from torch import nn

from normscope import analyze_full, load, watch
from normscope_cli import common as C
from normscope_reports import build_report


def _dead_run(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 2))  # fmt: skip
    with torch.no_grad():
        model[0].bias[:20] = -60.0  # 62 % born dead: error
        model[2].bias[:6] = -60.0  # 19 %: warning
        model[4].bias[:8] = -60.0  # 25 %: warning
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with watch(model, tmp_path / "r", every=1):
        for _ in range(10):
            loss = model(torch.randn(64, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return load(tmp_path / "r")


def test_one_finding_per_cause_worst_first_and_rendered(tmp_path):
    run = _dead_run(tmp_path)
    a = analyze_full(run)
    dead = [f for f in a.findings if f.check == "dead-units" and f.severity != "info"]
    assert len(dead) == 1
    f = dead[0]
    order = [(r["layer"], r["severity"]) for r in f.evidence["layers"]]
    assert order == [("1", "error"), ("5", "warning"), ("3", "warning")]  # severity, then dead fraction
    assert f.layer == "1" and f.severity == "error" and f.evidence["affected_layers"] == 3
    assert "2 more layer(s): 5, 3" in f.message and f.recommendation.count("LeakyReLU") == 1
    table = C.findings_table([x.to_dict() for x in a.findings])
    from rich.console import Console

    con = Console(width=200, record=True)
    con.print(table)
    assert "1 (+2 more)" in con.export_text()
    html = build_report(run, findings=a.findings, out=tmp_path / "r.html").read_text()
    assert "3 layers, worst first" in html
