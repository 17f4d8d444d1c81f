"""The store owns the whole run directory: probe.json and fold.json included, and the legacy table name."""

import shutil

import pytest
import torch
from torch import nn

from normscope import NormscopeError, load, watch
from normscope.store import read_fold, read_probe, write_fold, write_probe


def _run(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with watch(model, tmp_path / "r", every=1) as scope:
        model(torch.randn(8, 3)).sum().backward()
        scope.step()
    return tmp_path / "r"


def test_probe_and_fold_round_trip_through_run(tmp_path):
    d = _run(tmp_path)
    run = load(d)
    assert run.probe == {} and run.fold is None
    write_probe(d, {"mode": "recipe", "bn": {"0": {"eps": 1e-5}}})
    write_fold(d, {"folded": [{"bn": "1"}], "skipped": []})
    run = load(d)
    assert run.probe["bn"] == {"0": {"eps": 1e-5}} and run.probe["format"] == "normscope-probe/1"
    assert run.fold["folded"] == [{"bn": "1"}] and read_fold(d) == run.fold and read_probe(d) == run.probe


def test_untagged_fold_json_from_older_runs_is_read(tmp_path):
    d = _run(tmp_path)
    (d / "fold.json").write_text('{"folded": [], "skipped": []}')
    assert load(d).fold == {"folded": [], "skipped": []}


@pytest.mark.parametrize("name, text, msg", [
    ("probe.json", "{not json", "probe.json is corrupt"),
    ("probe.json", '{"mode": "recipe"}', "is not a normscope probe file"),
    ("fold.json", "[1, 2]", "is not a normscope fold file"),
])  # fmt: skip
def test_corrupt_side_files_are_one_line_errors(tmp_path, name, text, msg):
    d = _run(tmp_path)
    (d / name).write_text(text)
    run = load(d)
    with pytest.raises(NormscopeError, match=msg) as e:
        _ = run.probe if name == "probe.json" else run.fold
    assert "\n" not in str(e.value)


def test_stats_table_is_named_stats_and_legacy_layers_dir_still_reads(tmp_path):
    d = _run(tmp_path)
    assert (d / "stats" / "stats").is_dir() and not (d / "stats" / "layers").exists()
    n = len(load(d).stats)
    assert n > 0
    shutil.move(d / "stats" / "stats", d / "stats" / "layers")  # a run written before the rename
    assert len(load(d).stats) == n
