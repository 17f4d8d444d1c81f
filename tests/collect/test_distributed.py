"""torch.distributed (gloo, 2 CPU processes): one combined record, written once, no hang on failure."""

from pathlib import Path

import numpy as np
import pytest
from ranks import launch_ranks

from normscope import analyze, load

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_ranks(mode, run_dirs, world=2, timeout=120):
    return launch_ranks(
        WORKER, lambda r, port: [mode, str(run_dirs[r]), str(r), str(world), port], world, timeout, mode
    )


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    res = run_ranks("train", [base / "ddp", base / "rank1-dir"])
    assert all(code == 0 for code, _, _ in res), res
    single = run_ranks("train", [base / "single"], world=1)
    assert single[0][0] == 0, single
    return base, res


def test_run_directory_written_once(ddp_and_single):
    base, res = ddp_and_single
    assert "writer=True" in res[0][1] and "writer=False" in res[1][1]
    assert (base / "ddp" / "meta.json").exists() and not (base / "rank1-dir").exists()
    assert load(base / "ddp").meta["distributed"]["world_size"] == 2


def test_writer_scalars_flags_and_signals_share_the_transfer(ddp_and_single):
    """World > 1: the writer's logged scalar, its finiteness flags and its signals travel in one
    host transfer after the reduction; each lands in its own column (offsets right)."""
    base, res = ddp_and_single
    run = load(base / "ddp")
    want = {k: {} for k in ("LOSS", "LOGZ")}
    for line in res[0][1].splitlines():
        if line.startswith(("LOSS ", "LOGZ ")):
            k, step, v = line.split()
            want[k][int(step)] = float(v)
    sc = run.scalars[run.scalars.name == "loss"].sort_values("step")
    assert dict(zip(sc.step, sc.value)) == pytest.approx(want["LOSS"], rel=1e-6)
    lz = run.signal("logz_mean")
    assert dict(zip(lz.step, lz.value)) == pytest.approx(want["LOGZ"], rel=1e-5)
    assert not run.meta.get("nonfinite_modules")


def test_finiteness_flags_recorded_under_ddp(tmp_path):
    """Regression: with world > 1 every rank computed the flags and the writer dropped them."""
    res = run_ranks("nan", [tmp_path / "n0", tmp_path / "n1"])
    assert all(code == 0 for code, _, _ in res), res
    ev = load(tmp_path / "n0").meta["nonfinite_modules"]
    assert ev and ev[0]["layer"] == "0" and ev[0]["step"] == 2 and ev[0]["type"] == "Flatten"


def test_ddp_statistics_equal_single_process_full_batch(ddp_and_single):
    base, _ = ddp_and_single
    a, b = load(base / "ddp"), load(base / "single")
    sa = a.stats.sort_values(["step", "layer", "call"]).reset_index(drop=True)
    sb = b.stats.sort_values(["step", "layer", "call"]).reset_index(drop=True)
    assert len(sa) == len(sb) == 4 * 5
    assert (sa.forwards == 2).all() and (sb.forwards == 1).all()  # one forward per rank, merged
    for col in ("count", "samples", "nan_count", "hist_count"):
        np.testing.assert_array_equal(sa[col], sb[col])
    for col in ("mean", "std", "min", "max", "mean_abs", "frac_zero", "frac_nonpos", "frac_sat"):
        np.testing.assert_allclose(sa[col], sb[col], rtol=1e-5, atol=1e-6, err_msg=col)
    for i in range(len(sa)):
        np.testing.assert_allclose(sa.ch_mean[i], sb.ch_mean[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(sa.ch_var[i], sb.ch_var[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(sa.active[i], sb.active[i])
        np.testing.assert_array_equal(sa["hist"][i], sb["hist"][i])
    # each rank's loss is a mean over half the batch: output gradients are twice the full-batch ones
    ga = a.grads.sort_values(["step", "layer"]).reset_index(drop=True)
    gb = b.grads.sort_values(["step", "layer"]).reset_index(drop=True)
    np.testing.assert_allclose(ga.norm, 2 * gb.norm, rtol=1e-4)
    # DDP averages parameter gradients: parameters, gradients and updates match the single run
    pa = a.params.sort_values(["step", "param"]).reset_index(drop=True)
    pb = b.params.sort_values(["step", "param"]).reset_index(drop=True)
    for col in ("norm", "grad_norm", "update_norm"):
        np.testing.assert_allclose(pa[col], pb[col], rtol=1e-4, err_msg=col)


def test_no_hang_when_one_rank_raises(tmp_path):
    res = run_ranks("raise", [tmp_path / "r0", tmp_path / "r1"], timeout=120)
    (c0, _, e0), (c1, _, e1) = res
    assert c1 != 0 and "rank 1 failed on purpose" in e1
    assert c0 != 0  # rank 0's next collective fails instead of waiting forever
    meta = load(tmp_path / "r0").meta
    assert meta["status"].startswith("failed")


def test_syncbn_recommended_for_small_per_rank_batches(tmp_path):
    res = run_ranks("bn", [tmp_path / "bn", tmp_path / "bn1"])
    assert all(code == 0 for code, _, _ in res), res
    found = [f for f in analyze(load(tmp_path / "bn")) if f.check == "syncbn-recommended"]
    assert found and found[0].layer == "1" and found[0].evidence["batch_per_rank"] == 8
    # the same run seen as SyncBatchNorm (this CPU build cannot run SyncBatchNorm under gloo):
    # the check keys on the module type, so nothing may fire
    run = load(tmp_path / "bn")
    st = run.stats.copy()
    st.loc[st.layer == "1", "module_type"] = "SyncBatchNorm"
    run.stats = st
    assert not [f for f in analyze(run) if f.check == "syncbn-recommended"]
