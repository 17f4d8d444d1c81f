"""The zoo trained the healthy, standard way raises no warning and no error (a false positive is a bug).

Each transformers architecture of the zoo is probed like `normscope inspect` does it: 40 AdamW
steps (lr 1e-3, batch 32, no decay on biases and norms) on scikit-learn's digits — upsampled to
32×32 RGB and standardised per channel for the vision models, its pixel rows as tokens for the
text models — then every check runs. Info findings are allowed (and printed); nothing louder.
"""

import warnings

import pytest
import zoo_healthy as H
import zoo_models as Z

import normscope

NAMES = [z.name for z in Z.ZOO]


@pytest.mark.parametrize("name", NAMES)
def test_healthy_zoo_training_raises_no_warning(tmp_path, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own config chatter
        run = normscope.probe(H.recipe(name), run_dir=tmp_path / name)
    a = normscope.analyze_full(run)
    loud = [str(f) for f in a.findings if f.severity != "info"]
    assert not loud, "\n".join(loud)
    assert not [s for s in a.skipped if s.reason.startswith("check failed")], a.skipped
    ran = set(a.checks_run)
    assert {"vanishing-gradients", "exploding-gradients", "update-ratio", "non-finite"} <= ran
    if any(m.get("family") == "relu" for m in run.meta["modules"]):
        assert "dead-units" in ran
    if any("BatchNorm" in m["type"] for m in run.meta["modules"]):
        assert "stale-running-stats" in ran  # judged (lag told apart from staleness), not skipped
