"""BN folding benchmark on a ResNet-50-size model (Bottleneck [3, 4, 6, 3], ~25.6 M parameters).

Prints (1) the time to fold, export (dynamo exporter) and verify (onnxruntime vs the unfolded
model in float64), and (2) inference latency of the folded vs the unfolded model, side by side,
in eager PyTorch and in onnxruntime with graph optimisations disabled (a runtime that does not
fuse BN by itself). Latency runs are interleaved (one call of each configuration per round, the
order reversed every other round) and reported as medians (and minima). For the onnxruntime comparison both files come from the same exporter
(TorchScript, constant folding off, so the unfolded file keeps its BatchNormalization nodes).

    .venv/bin/python benchmarks/fold.py [--quick] [--threads N] [--batch 1] [--size 224]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer latency repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from fixtures.deploy_models import resnet50

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    repeats, warmup = (6, 2) if args.quick else (20, 4)
    model = resnet50()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ResNet-50 layout: {n_params / 1e6:.1f} M parameters, input {tuple(x.shape)}, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, threads {threads}")

    with tempfile.TemporaryDirectory(prefix="normscope-bench-") as tmpdir:
        run(model, x, Path(tmpdir), threads, repeats, warmup, args.batch)


def run(model, x, tmp: Path, threads: int, repeats: int, warmup: int, batch: int) -> None:
    import onnx
    import onnxruntime as ort

    from normscope.fold import fold_bn
    from normscope.fold.api import _run, _to_double
    from normscope.fold.onnx_export import _export, run_onnx
    from normscope.fold.onnx_util import compare_arrays, count_ops, quiet_export

    res, t_fold = _timed(lambda: fold_bn(model, x))
    (used, _, _), t_export = _timed(lambda: _export(res.model, (x,), tmp / "folded.onnx", "auto", None))

    def verify_run():
        reference = _run(copy.deepcopy(model).double(), _to_double((x,)))
        got = run_onnx(str(tmp / "folded.onnx"), (x,))
        return compare_arrays([r.numpy() for r in reference], got)

    (max_abs, max_rel), t_verify = _timed(verify_run)
    print("\n1. Fold, export, verify")
    print(f"   {'fold_bn (incl. float64 check)':<34}{t_fold:8.2f} s   folded {len(res.folded)} BN, skipped {len(res.skipped)}, "
          f"max rel err {res.error.max_rel:.1e}")
    print(f"   {'export (' + used + ' exporter)':<34}{t_export:8.2f} s   "
          f"BatchNormalization nodes left: {count_ops(onnx.load(str(tmp / 'folded.onnx')))}")
    print(f"   {'verify (onnxruntime vs float64)':<34}{t_verify:8.2f} s   max abs {max_abs:.1e}, max rel {max_rel:.1e}")
    print(f"   {'total':<34}{t_fold + t_export + t_verify:8.2f} s")

    # same exporter for both files: TorchScript without constant folding keeps BN nodes
    for name, m in (("unfolded", model), ("folded", res.model)):
        with quiet_export():
            torch.onnx.export(m, (x,), str(tmp / f"ts_{name}.onnx"), dynamo=False, do_constant_folding=False,
                              opset_version=17)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    # idle ORT worker threads spin by default and would steal the cores of the next configuration
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {n: ort.InferenceSession(str(tmp / f"ts_{n}.onnx"), opts, providers=["CPUExecutionProvider"])
                for n in ("unfolded", "folded")}
    bn_nodes = {n: count_ops(onnx.load(str(tmp / f"ts_{n}.onnx"))) for n in sessions}
    feed = {sessions["unfolded"].get_inputs()[0].name: x.numpy()}
    feed_f = {sessions["folded"].get_inputs()[0].name: x.numpy()}
    folded_model = res.model.eval()
    configs = {
        ("eager", "unfolded"): lambda: model(x),
        ("eager", "folded"): lambda: folded_model(x),
        ("onnxruntime", "unfolded"): lambda: sessions["unfolded"].run(None, feed),
        ("onnxruntime", "folded"): lambda: sessions["folded"].run(None, feed_f),
    }
    times: dict = {k: [] for k in configs}
    order = list(configs)
    with torch.inference_mode():
        for r in range(warmup + repeats):
            # interleaved: one call of each per round, alternating the order to cancel order effects
            for key in (order if r % 2 == 0 else order[::-1]):
                fn = configs[key]
                start = time.perf_counter()
                fn()
                if r >= warmup:
                    times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    low = {k: min(v) * 1e3 for k, v in times.items()}
    print(f"\n2. Inference latency, median (min) of {repeats} interleaved runs ({warmup} warm-up), batch {batch}")
    print(f"   {'runtime':<32}{'unfolded':>18}{'folded':>18}{'unfolded/folded':>18}")
    for rt, label in (("eager", "eager PyTorch"), ("onnxruntime", "onnxruntime, ORT_DISABLE_ALL")):
        u, f = med[(rt, "unfolded")], med[(rt, "folded")]
        cells = [f"{med[(rt, v)]:.1f} ({low[(rt, v)]:.1f}) ms" for v in ("unfolded", "folded")]
        print(f"   {label:<32}{cells[0]:>18}{cells[1]:>18}{u / f:17.2f}x")
    print(f"   (onnxruntime files: {bn_nodes['unfolded']} vs {bn_nodes['folded']} BatchNormalization nodes)")
    with torch.no_grad():
        same = np.abs(sessions["folded"].run(None, feed_f)[0] - model(x).numpy()).max()
    print(f"   folded ONNX vs unfolded eager, max abs difference: {same:.1e}")


if __name__ == "__main__":
    main()
