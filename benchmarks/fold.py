"""BN folding benchmark: normscope against its peers on the fold zoo, and the speed targets.

    .venv/bin/python benchmarks/fold.py [--models hf_resnet,repvgg_blocks] [--size 224]
    .venv/bin/python benchmarks/fold.py --latency [--quick] [--threads N] [--batch 1] [--size 224]

Default mode, per zoo model (tests/zoo/fold_models.py; randomised BN statistics; float64
reference), side by side: BN left / total and max relative error (against the unfolded model in
float64, on the example input) and time, for

- normscope ``fold_bn`` (PyTorch fold, with its float64 verification),
- normscope ``export_onnx`` (fold + dynamo export + onnxruntime verification),
- normscope ``fold_onnx`` on the unfolded file of each exporter (dynamo ``optimize=False``;
  legacy ``do_constant_folding=False``), verified in onnxruntime,
- torch's own dynamo export (default ``optimize=True``), BN left in its file,
- ``torch.fx.experimental.optimization.fuse`` (when fx traces the model),
- onnxoptimizer's ``fuse_bn_into_conv`` and onnxslim on the legacy file (skipped, with a note,
  when not installed: ``pip install -c constraints.txt 'normscope[bench]'``).

ONNX files run in onnxruntime with graph optimisations disabled. Then the speed targets:
``fold_bn`` of transformers' ResNet-50 at 224×224 (≤ 2 s) and ``export_onnx`` against the plain
dynamo export (≤ 1.3×).

``--latency`` (the previous benchmark, ResNet-50 layout from fixtures/deploy_models.py) prints (1) the time to fold, export (dynamo exporter) and verify (onnxruntime vs the unfolded
model in float64), and (2) inference latency of the folded vs the unfolded model, side by side,
in eager PyTorch and in onnxruntime with graph optimisations disabled (a runtime that does not
fuse BN by itself). Latency runs are interleaved (one call of each configuration per round, the
order reversed every other round) and reported as medians (and minima). For the onnxruntime comparison both files come from the same exporter
(TorchScript, constant folding off, so the unfolded file keeps its BatchNormalization nodes).

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


def latency_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="ResNet-50 fold/export/verify time and folded vs unfolded latency")
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
    print(
        f"ResNet-50 layout: {n_params / 1e6:.1f} M parameters, input {tuple(x.shape)}, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, threads {threads}"
    )

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
    print(
        f"   {'fold_bn (incl. float64 check)':<34}{t_fold:8.2f} s   folded {len(res.folded)} BN, skipped {len(res.skipped)}, "
        f"max rel err {res.error.max_rel:.1e}"
    )
    print(
        f"   {'export (' + used + ' exporter)':<34}{t_export:8.2f} s   "
        f"BatchNormalization nodes left: {count_ops(onnx.load(str(tmp / 'folded.onnx')))}"
    )
    print(f"   {'verify (onnxruntime vs float64)':<34}{t_verify:8.2f} s   max abs {max_abs:.1e}, max rel {max_rel:.1e}")
    print(f"   {'total':<34}{t_fold + t_export + t_verify:8.2f} s")

    # same exporter for both files: TorchScript without constant folding keeps BN nodes
    for name, m in (("unfolded", model), ("folded", res.model)):
        with quiet_export():
            torch.onnx.export(
                m, (x,), str(tmp / f"ts_{name}.onnx"), dynamo=False, do_constant_folding=False, opset_version=17
            )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    # idle ORT worker threads spin by default and would steal the cores of the next configuration
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {
        n: ort.InferenceSession(str(tmp / f"ts_{n}.onnx"), opts, providers=["CPUExecutionProvider"])
        for n in ("unfolded", "folded")
    }
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
            for key in order if r % 2 == 0 else order[::-1]:
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


def _rel(ref, got) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        return float("nan")
    return float(np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-300))


def _first(out):
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _ort(path, x):
    from normscope.fold.onnx_util import session

    sess = session(str(path))
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _row(table, model, tool, bn_left, total, rel, seconds, note=""):
    table.append(
        (
            model,
            tool,
            "–" if bn_left is None else f"{bn_left}/{total}",
            "–" if rel is None else f"{rel:.1e}",
            "–" if seconds is None else f"{seconds:.2f}",
            note,
        )
    )


def zoo_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="normscope vs peers on the fold zoo")
    parser.add_argument("--models", default=None, help="comma-separated zoo names (default: all)")
    parser.add_argument("--size", type=int, default=224, help="input size of the ResNet-50 speed check")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests" / "zoo"))
    import onnx
    from fold_models import ZOO, count_bn

    from normscope.fold import export_onnx, fold_bn, fold_onnx
    from normscope.fold.api import _run, _to_double
    from normscope.fold.onnx_util import count_ops, quiet_export

    try:
        import onnxoptimizer
    except ImportError:
        onnxoptimizer = None
        print("note: onnxoptimizer is not installed: its column is skipped")
    try:
        import onnxslim
    except ImportError:
        onnxslim = None
        print("note: onnxslim is not installed: its column is skipped")

    names = args.models.split(",") if args.models else list(ZOO)
    table: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="normscope-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for name in names:
            model, x, total = ZOO[name]()
            ref = _first(_run(copy.deepcopy(model).double(), _to_double((x,))))
            ref = ref.numpy() if isinstance(ref, torch.Tensor) else ref
            res, t = _timed(lambda: fold_bn(model, x))
            with torch.no_grad():
                _row(
                    table,
                    name,
                    "normscope fold_bn",
                    count_bn(res.model),
                    total,
                    _rel(ref, _first(res.model(x)).numpy()),
                    t,
                    res.tracing,
                )
            try:
                out, t = _timed(lambda: export_onnx(model, x, tmp / f"{name}.ns.onnx", exporter="dynamo"))
                _row(
                    table,
                    name,
                    "normscope export_onnx",
                    out.bn_nodes_left,
                    total,
                    _rel(ref, _ort(tmp / f"{name}.ns.onnx", x)),
                    t,
                    out.exporter,
                )
            except Exception as exc:  # noqa: BLE001
                _row(table, name, "normscope export_onnx", None, total, None, None, str(exc)[:60])
            files = {}
            for dynamo in (True, False):
                tag = "dynamo" if dynamo else "legacy"
                path = tmp / f"{name}.{tag}.onnx"
                opts = {"optimize": False} if dynamo else {"do_constant_folding": False}
                with quiet_export():
                    torch.onnx.export(model, (x,), str(path), dynamo=dynamo, opset_version=18, **opts)
                files[tag] = path
                r, t = _timed(lambda: fold_onnx(path, tmp / f"{name}.{tag}.folded.onnx", force=True))
                _row(
                    table,
                    name,
                    f"normscope fold_onnx ({tag} file)",
                    r.bn_nodes_left,
                    total,
                    _rel(ref, _ort(tmp / f"{name}.{tag}.folded.onnx", x)),
                    t,
                )
            path = tmp / f"{name}.torch.onnx"
            with quiet_export():
                _, t = _timed(lambda: torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18))
            _row(
                table,
                name,
                "torch dynamo export (optimize)",
                count_ops(onnx.load(str(path))),
                total,
                _rel(ref, _ort(path, x)),
                t,
            )
            try:
                from torch.fx.experimental.optimization import fuse

                fused, t = _timed(lambda: fuse(copy.deepcopy(model)))
                with torch.no_grad():
                    _row(table, name, "torch.fx fuse", count_bn(fused), total, _rel(ref, _first(fused(x)).numpy()), t)
            except Exception as exc:  # noqa: BLE001 - fx does not trace the model
                _row(table, name, "torch.fx fuse", None, total, None, None, f"fails: {type(exc).__name__}")
            src = onnx.load(str(files["legacy"]))
            if onnxoptimizer is not None:
                try:
                    opt, t = _timed(lambda: onnxoptimizer.optimize(src, ["eliminate_identity", "fuse_bn_into_conv"]))
                    onnx.save(opt, str(tmp / f"{name}.onnxopt.onnx"))
                    _row(
                        table,
                        name,
                        "onnxoptimizer fuse_bn_into_conv",
                        count_ops(opt),
                        total,
                        _rel(ref, _ort(tmp / f"{name}.onnxopt.onnx", x)),
                        t,
                    )
                except Exception as exc:  # noqa: BLE001
                    _row(
                        table,
                        name,
                        "onnxoptimizer fuse_bn_into_conv",
                        None,
                        total,
                        None,
                        None,
                        f"fails: {' '.join(str(exc).split())[:50]}",
                    )
            if onnxslim is not None:
                try:
                    with quiet_export():
                        slim, t = _timed(lambda: onnxslim.slim(src))
                    onnx.save(slim, str(tmp / f"{name}.slim.onnx"))
                    _row(
                        table,
                        name,
                        "onnxslim",
                        count_ops(slim),
                        total,
                        _rel(ref, _ort(tmp / f"{name}.slim.onnx", x)),
                        t,
                    )
                except Exception as exc:  # noqa: BLE001
                    _row(table, name, "onnxslim", None, total, None, None, f"fails: {' '.join(str(exc).split())[:50]}")
    widths = [max(len(str(r[i])) for r in table + [("model", "tool", "BN left", "max rel", "s", "")]) for i in range(6)]
    head = ("model", "tool", "BN left", "max rel", "s", "")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    last = None
    for r in table:
        if last is not None and r[0] != last:
            print()
        last = r[0]
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if not args.skip_speed:
        speed(args.size)


def speed(size: int) -> None:
    """The targets: fold_bn of transformers' ResNet-50 ≤ 2 s; export_onnx ≤ 1.3× plain export."""
    import transformers

    sys.path.insert(0, str(ROOT / "tests" / "zoo"))
    from fold_models import randomize_bn

    from normscope.fold import export_onnx, fold_bn
    from normscope.fold.onnx_util import quiet_export

    torch.manual_seed(0)
    model = randomize_bn(transformers.ResNetModel(transformers.ResNetConfig()))
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        model(x)  # warm-up
    folds = [_timed(lambda: fold_bn(model, x)) for _ in range(3)]
    res = folds[-1][0]
    print(
        f"\ntransformers ResNet-50 at {size}×{size}: fold_bn with verification "
        f"{min(t for _, t in folds):.2f} s best of 3 ({len(res.folded)}/{len(res.folded) + len(res.skipped)} BN, "
        f"max rel {res.error.max_rel:.1e}, tracing {res.tracing}); target ≤ 2 s"
    )
    plains, ourses = [], []
    with tempfile.TemporaryDirectory(prefix="normscope-bench-") as tmpdir:
        for _ in range(2):  # interleaved, best of 2 each: the machine may be shared
            with quiet_export():
                _, t = _timed(lambda: torch.onnx.export(model, (x,), f"{tmpdir}/plain.onnx", dynamo=True))
            plains.append(t)
            out, t = _timed(lambda: export_onnx(model, x, f"{tmpdir}/ours.onnx", exporter="dynamo"))
            ourses.append(t)
    plain, ours = min(plains), min(ourses)
    print(
        f"export_onnx (fold + dynamo export + onnxruntime check) {ours:.2f} s vs plain dynamo export "
        f"{plain:.2f} s: {ours / plain:.2f}× (target ≤ 1.3×); BN left {out.bn_nodes_left}, verified {out.verified}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--latency" in argv:
        latency_main([a for a in argv if a != "--latency"])
    else:
        zoo_main(argv)


if __name__ == "__main__":
    main()
