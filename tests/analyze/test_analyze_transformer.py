"""attention-logit-growth, output-logit-divergence, massive-activations: each threshold just above
and just below on synthetic runs (signals set to the value the check compares), and the skips."""

import numpy as np
import pytest
from synthetic import SyntheticRun

from normscope.analyze import analyze_full
from normscope.analyze.checks.massive_activations import ratio_of

MODS = {"blocks.0": {"type": "Block"}, "blocks.0.attn": {"type": "MultiheadAttention"},
        "blocks.1.ln1": {"type": "LayerNorm", "role": "norm"}, "blocks.1": {"type": "Block"},
        "norm": {"type": "LayerNorm", "role": "norm"}, "head": {"type": "Linear", "params": 10}}  # fmt: skip
STEPS = 10


def _run(path, signals: dict):
    """signals: layer → {name: per-step values (or a constant)}."""
    r = SyntheticRun(path, MODS)
    for step in range(STEPS):
        r.stat(step, "head")
        for layer, named in signals.items():
            for name, v in named.items():
                val = v[step] if isinstance(v, (list, np.ndarray)) else v
                r.w.append("signals", {"step": step, "phase": "train", "layer": layer, "call": 0, "name": name,
                                       "value": float(val)})  # fmt: skip
    return r.done()


def _got(run, check):
    a = analyze_full(run, checks=[check])
    return a, [f for f in a.findings if f.check == check]


def _attn(end, first):
    v = np.full(STEPS, float(end))
    v[0] = first
    return {"blocks.0.attn": {"attn_logit_max": v, "attn_logit_head_mean": v / 2, "attn_logit_bound": v * 2,
                              "attn_rotary": 0.0}}  # fmt: skip


@pytest.mark.parametrize("end,first,want", [
    (49.9, 49.9, []), (50.1, 49.0, ["warning"]), (499, 40, ["warning"]), (501, 400, ["error"]),
    (19.9, 1.0, []), (20.1, 2.0, ["warning"]), (30.0, 3.01, []), (30.0, 2.99, ["warning"]),
    # already above 50 at the first step and not growing 10x (a pretrained model): info below the error level
    (499, 400, ["info"]), (60.0, 50.0, ["info"]), (60.0, 49.9, ["warning"]),
])  # fmt: skip
def test_attention_logit_growth_ladder(tmp_path, end, first, want):
    _, fs = _got(_run(tmp_path / "r", _attn(end, first)), "attention-logit-growth")
    assert [f.severity for f in fs] == want
    if fs:
        ev = fs[0].evidence
        assert fs[0].layer == "blocks.0.attn" and ev["logit_first"] == first
        assert ev["logit_end"] == pytest.approx(end) and ev["growth"] == pytest.approx(end / first)


def _logz(end, first):
    v = np.full(STEPS, float(end))
    v[0] = first
    return {"output": {"logz_mean": v, "logz_std": 0.1, "z_absmax": v + 3, "z_mean": 0.0}}


@pytest.mark.parametrize("end,first,want", [
    (49.9, 2.3, []), (50.1, 2.3, ["warning"]), (99.9, 2.3, ["warning"]), (100.1, 2.3, ["error"]),
    (-50.1, 2.3, ["warning"]), (55.0, 45.1, []), (55.0, 44.9, ["warning"]), (60.0, 50.1, []),
    (80.0, 51.0, ["info"]),
])  # fmt: skip
def test_output_logit_divergence_ladder(tmp_path, end, first, want):
    _, fs = _got(_run(tmp_path / "r", _logz(end, first)), "output-logit-divergence")
    assert [f.severity for f in fs] == want
    if fs:
        assert fs[0].evidence["drift"] == pytest.approx(end - first)


@pytest.mark.parametrize("shift,want", [(None, ["warning"]), (0.009, ["warning"]), (0.011, [])])
def test_output_logit_divergence_judges_softmax_logits_only(tmp_path, shift, want):
    """A loss blind to a constant added to every logit (cross-entropy: Σ_j ∂L/∂z_j = 0) leaves log Z free
    to drift; a regression's squared error is not (its outputs growing are no runaway log Z)."""
    sig = _logz(60.0, 2.3)
    if shift is not None:
        sig["output"]["z_grad_shift"] = shift
    a, fs = _got(_run(tmp_path / "r", sig), "output-logit-divergence")
    assert [f.severity for f in fs] == want
    if fs and shift is not None:
        assert fs[0].evidence["grad_shift_sensitivity"] == pytest.approx(shift)
    if not want:
        reason = {s.check: s.reason for s in a.skipped}["output-logit-divergence"]
        assert "not blind to a constant" in reason and "0.011 > 0.01" in reason


def _massive(ratio0, ratio1, median=0.5, first=10.0):
    """Two blocks whose max/median ratio is ``first`` at step 0 (None: the same as later) and then
    ``ratio0`` / ``ratio1``: by default the outliers emerge during the run."""
    out = {}
    for layer, ratio in (("blocks.0", ratio0), ("blocks.1", ratio1)):
        r = np.full(STEPS, float(ratio))
        if first is not None:
            r[0] = min(first, ratio)
        out[layer] = {"massive_absmax": r * median, "massive_median": median, "massive_ch_0": 7,
                      "massive_val_0": r * median, "massive_pos_0": 0, "massive_ch_1": 3,
                      "massive_val_1": 2 * median, "massive_pos_1": 5}  # fmt: skip
    return out


@pytest.mark.parametrize("r0,r1,want", [
    (99, 50, []), (101, 50, ["info"]), (999, 50, ["info"]), (1001, 50, ["warning"]), (1001, 500, ["warning"]),  # the info block shares the fix: grouped into the warning
])  # fmt: skip
def test_massive_activations_ladder(tmp_path, r0, r1, want):
    _, fs = _got(_run(tmp_path / "r", _massive(r0, r1)), "massive-activations")
    assert [f.severity for f in fs] == want
    if fs:
        ev = fs[0].evidence
        assert ev["channels"] == [7] and ev["positions"] == [0] and fs[0].layer == "blocks.0"
        assert ev["ratio_max"] == pytest.approx(r0 if r0 >= 1000 or want == ["info"] else r1)
        assert ev["next_norm"] == "blocks.1.ln1"  # the next norm in execution order after blocks.0


def test_ratio_with_a_zero_median():
    assert list(ratio_of([4.0, 0.0, 2.0], [0.0, 0.0, 1.0])) == [np.inf, 1.0, 2.0]


@pytest.mark.parametrize("check,words", [("attention-logit-growth", "no attention block"),
                                         ("output-logit-divergence", "no output logits"),
                                         ("massive-activations", "no transformer block")])  # fmt: skip
def test_skips_without_the_signal(tmp_path, check, words):
    a, fs = _got(_run(tmp_path / "r", {}), check)
    assert not fs and words in {s.check: s.reason for s in a.skipped}[check]


def test_attention_logit_growth_from_zero_logits_uses_a_floor(tmp_path):
    """Regression: a zero-initialised query projection (logit 0 at step 0) read as infinite growth."""
    _, fs = _got(_run(tmp_path / "a", _attn(19.0, 0.0)), "attention-logit-growth")
    assert fs == []
    _, fs = _got(_run(tmp_path / "b", _attn(21.0, 0.0)), "attention-logit-growth")
    assert [f.severity for f in fs] == ["warning"] and fs[0].evidence["growth"] == pytest.approx(21.0)


def test_massive_activations_present_from_the_start_are_info(tmp_path):
    """A pretrained LLM has them from step 0 (Sun et al. 2024): info, not a warning."""
    _, fs = _got(_run(tmp_path / "r", _massive(3000, 50, first=None)), "massive-activations")
    assert [f.severity for f in fs] == ["info"] and fs[0].evidence["ratio_max"] == pytest.approx(3000)


def test_massive_activations_zero_median_is_reported(tmp_path):
    """Regression: a block whose median |x| became 0 (ratio inf) fell between the bands: no finding."""
    sig = _massive(3000, 50)
    med = np.full(STEPS, 0.0)
    med[0] = 0.5
    sig["blocks.0"]["massive_median"] = med
    _, fs = _got(_run(tmp_path / "r", sig), "massive-activations")
    assert [f.severity for f in fs] == ["warning"] and fs[0].layer == "blocks.0"
