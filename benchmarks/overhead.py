"""Collector overhead, measured side by side: seconds per training step and peak RSS.

    .venv/bin/python benchmarks/overhead.py [--quick] [--json] [--threads 1] [--workloads resnet18,mlp]
    .venv/bin/python benchmarks/overhead.py --device cuda      # the same workloads on a GPU

Workloads (benchmarks/workloads.py): resnet18, mlp, transformer (large activations) and
mobilenetv2 (transformers' MobileNetV2 from config, depth multiplier 0.5, 64x64, batch 16:
~150 hooked calls on small activations, where the fixed per-hook cost dominates; skipped with a
message when transformers is not installed).

Variants, each on its own copy of the same model and optimizer (SGD, momentum 0.9), run
interleaved in one process (rotating order every repeat) so that machine noise hits them alike:

- bare          no hooks
- floor         the one-read floor: a forward hook that sums each output once and a tensor hook
                that sums each gradient once (the least any collector can cost)
- handwritten   hooks computing mean, std and zero fraction of each output (what people write)
- tensorboard   SummaryWriter.add_histogram on every layer output and gradient, every step
- watch-every1  normscope.watch(every=1), the full statistic set (the fused CPU kernel when built)
- watch-every1-torch  the same with the torch reductions instead of the kernel (the kernel's gain,
                side by side)
- watch-default normscope.watch() at its default cadence
- watch-unsampled normscope.watch() with every step after the warm-up unsampled (the hooks'
                cost when they return at once)
- watch-minimal / watch-full   watch(every=1, stats="minimal" / "full")
- compiled-bare     torch.compile(model) (inductor), no hooks
- compiled-every1   watch(every=1), then torch.compile(model): the hooks' custom ops in the graph
- compiled-default  watch() at its default cadence, then torch.compile(model)

The compiled variants are printed as ratios to compiled-bare (``x cbare``); compilation happens
in the warm-up step and is not timed.

A repeat runs ``chunk`` steps of every variant; ``x bare`` is the median over repeats of
(variant time / bare time) within the repeat; ``(total)`` is total variant time / total bare time,
the right figure for the default cadence when a chunk holds fewer steps than the cadence (an
even number of repeats of every/2 steps covers whole cadence periods). Peak RSS is measured in a
fresh subprocess per variant (VmHWM: the high-water mark of that process image); it varies by
about ±4 % between identical processes here, so ``--rss-repeats N`` quotes the median of N.
Most of that spread, and most of what any hook adds to peak RSS, is glibc's dynamic mmap
threshold (freed large blocks raise it, later activations then come from the heap, which small
allocations in between keep from shrinking): ``--rss-mmap-threshold BYTES`` fixes it in the
child processes (``MALLOC_MMAP_THRESHOLD_``), and peak RSS then measures live memory,
reproducibly. ``--rss-only`` skips the timing.

``--device cuda`` moves every model and batch to the GPU, synchronises before reading the clock,
and counts the host synchronisations of one sampled step per variant with
``torch.cuda.set_sync_debug_mode("warn")`` (each sync raises one warning; normscope's sampled
step should cost exactly 1, its single device-to-host copy). Without a CUDA device it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, has_transformers  # noqa: E402

import normscope  # noqa: E402
from normscope.collect import DEFAULT_EVERY, native  # noqa: E402
from normscope.collect.outputs import iter_float_tensors  # noqa: E402
from normscope.collect.select import plan_hooks  # noqa: E402

VARIANTS = ["bare", "floor", "handwritten", "tensorboard", "watch-every1", "watch-every1-torch", "watch-default",
            "watch-unsampled", "watch-minimal", "watch-full", "compiled-bare", "compiled-every1",
            "compiled-default"]  # fmt: skip
WATCH = {  # variant: (every, stats)
    "watch-every1": (1, "standard"), "watch-every1-torch": (1, "standard"), "watch-default": (DEFAULT_EVERY, "standard"),
    "watch-unsampled": (10**9, "standard"),  # step 0 (the warm-up) sampled, every timed step not
    "watch-minimal": (1, "minimal"), "watch-full": (1, "full"),
    "compiled-every1": (1, "standard"), "compiled-default": (DEFAULT_EVERY, "standard"),
}  # fmt: skip
DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Instrumented:
    """One variant: a model copy, its optimizer, and whatever hooks the variant installs."""

    def __init__(self, variant: str, base: nn.Module, tmp: Path):
        self.variant = variant
        self.model = copy.deepcopy(base).to(DEVICE)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.handles = []
        self.scope = None
        self.writer = None
        self.sink = []
        self.step_no = 0
        targets = [(p.name, p.module) for p in plan_hooks(self.model)]
        if variant in WATCH:
            every, stats = WATCH[variant]
            kw = {} if stats == "standard" else {"stats": stats}
            self.scope = normscope.watch(self.model, tmp / variant, every=every, optimizer=self.opt, **kw).start()
        elif variant == "floor":
            for _, m in targets:
                self.handles.append(m.register_forward_hook(self._floor))
        elif variant == "handwritten":
            for _, m in targets:
                self.handles.append(m.register_forward_hook(self._handwritten))
        elif variant == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tmp / "tb"))
            for name, m in targets:
                self.handles.append(m.register_forward_hook(self._tb(name)))
        self.fwd = torch.compile(self.model) if variant.startswith("compiled") else self.model

    def _floor(self, mod, args, out):
        for _, t in iter_float_tensors(out):
            self.sink.append(t.detach().sum())
            if t.requires_grad:
                t.register_hook(lambda g: self.sink.append(g.sum()))

    def _handwritten(self, mod, args, out):
        for _, t in iter_float_tensors(out):
            x = t.detach()
            self.sink.append(torch.stack([x.mean(), x.std(), (x == 0).float().mean()]))

    def _tb(self, name):
        def hook(mod, args, out):
            for path, t in iter_float_tensors(out):
                tag = f"{name}{'.' + path if path else ''}"
                self.writer.add_histogram(f"act/{tag}", t.detach(), self.step_no)
                if t.requires_grad:
                    t.register_hook(lambda g, tag=tag: self.writer.add_histogram(f"grad/{tag}", g, self.step_no))

        return hook

    def train_step(self, x, y) -> None:
        kernel = native.KERNEL
        if self.variant == "watch-every1-torch":  # the torch reductions instead of the fused kernel
            native.KERNEL = None
        try:
            loss = nn.functional.cross_entropy(self.fwd(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        finally:
            native.KERNEL = kernel
        self.sink.clear()
        self.step_no += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if self.scope is not None:
            self.scope.close()
        if self.writer is not None:
            self.writer.close()


def time_workload(name: str, repeats: int, chunk: int, variants: list[str]) -> dict[str, dict]:
    factory, batch = WORKLOADS[name]
    torch.manual_seed(0)
    base = factory()
    g = torch.Generator().manual_seed(0)
    batches = [tuple(t.to(DEVICE) for t in batch(g)) for _ in range(4)]
    syncs: dict[str, int | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {v: Instrumented(v, base, Path(tmp)) for v in variants}
        for inst in runs.values():  # warm-up: allocator, lazy init, first-step meta writes
            inst.train_step(*batches[0])
        if DEVICE.type == "cuda":  # one more step per variant, its host synchronisations counted
            for v, inst in runs.items():
                syncs[v] = count_syncs(inst, batches[1])
        _sync()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(repeats):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                inst = runs[v]
                t0 = time.perf_counter()
                for i in range(chunk):
                    inst.train_step(*batches[i % len(batches)])
                _sync()
                times[v].append((time.perf_counter() - t0) / chunk)
        for inst in runs.values():
            inst.close()
    out = {}
    for v in variants:
        ratios = [t / b for t, b in zip(times[v], times["bare"])]
        out[v] = {
            "median_s": statistics.median(times[v]),
            "ratio_to_bare": statistics.median(ratios),
            "ratio_total": sum(times[v]) / sum(times["bare"]),
            "repeats": len(times[v]),
            "syncs_per_step": syncs.get(v),
        }
        if v.startswith("compiled") and "compiled-bare" in variants:
            cr = [t / b for t, b in zip(times[v], times["compiled-bare"])]
            out[v]["ratio_to_compiled_bare"] = statistics.median(cr)
            out[v]["ratio_total_compiled"] = sum(times[v]) / sum(times["compiled-bare"])
    return out


def count_syncs(inst: Instrumented, batch) -> int:
    """Host synchronisations during one training step (torch's CUDA sync debug mode warns on each).

    For watch-default this step is unsampled (step 1), for watch-every1 sampled."""
    import warnings

    _sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            inst.train_step(*batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def rss_child(name: str, variant: str, steps: int) -> None:
    factory, batch = WORKLOADS[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        inst = Instrumented(variant, factory(), Path(tmp))
        for _ in range(steps):
            inst.train_step(*(t.to(DEVICE) for t in batch(g)))
        inst.close()
    print(_vm_hwm_mib())


def _vm_hwm_mib() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the parent's over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss(name: str, variant: str, steps: int, threads: int, mmap_threshold: int | None = None) -> float:
    cmd = [sys.executable, __file__, "--rss-child", name, variant, str(steps), "--threads", str(threads),
           "--device", DEVICE.type]  # fmt: skip
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats (a few minutes)")
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--chunk", type=int)
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument(
        "--rss-repeats",
        type=int,
        default=1,
        help="fresh processes per variant for peak RSS, median quoted (it varies ±4%% run to run)",
    )
    ap.add_argument("--rss-mmap-threshold", type=int, metavar="BYTES",
                    help="MALLOC_MMAP_THRESHOLD_ for the RSS processes (glibc's dynamic threshold off)")  # fmt: skip
    ap.add_argument("--rss-only", action="store_true", help="peak RSS only, no timing")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rss-child", nargs=3, metavar=("WORKLOAD", "VARIANT", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    global DEVICE
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}); nothing measured. Run it on a machine with a GPU.")  # fmt: skip
        return
    DEVICE = torch.device(a.device)
    torch.set_num_threads(a.threads)
    if a.rss_child:
        rss_child(a.rss_child[0], a.rss_child[1], int(a.rss_child[2]))
        return
    repeats = a.repeats or (2 if a.quick else 6)
    chunk = a.chunk or (DEFAULT_EVERY // 4 if a.quick else DEFAULT_EVERY // 2)
    variants = [v for v in a.variants.split(",") if v]
    if "bare" not in variants:
        variants.insert(0, "bare")
    rows = []
    log = sys.stderr if a.json else sys.stdout
    print(f"# torch {torch.__version__}, device {DEVICE}"
          + (f" ({torch.cuda.get_device_name()})" if DEVICE.type == "cuda" else "")
          + f", {torch.get_num_threads()} thread(s), {repeats} repeats x {chunk} steps "
          f"per variant, interleaved; default cadence every={DEFAULT_EVERY}; "
          f"CPU kernel: {(native.load(background_build=False), native.STATE)[1]}", file=log)  # fmt: skip
    for name in [w for w in a.workloads.split(",") if w]:
        if name == "mobilenetv2" and not has_transformers():
            print("mobilenetv2: skipped, transformers is not installed (pip install transformers)", file=log)
            continue
        nan = {"median_s": math_nan(), "ratio_to_bare": math_nan(), "ratio_total": math_nan()}
        res = {v: nan for v in variants} if a.rss_only else time_workload(name, repeats, chunk, variants)
        for v in variants:
            rss = (
                math_nan()
                if a.no_rss
                else statistics.median(
                    peak_rss(name, v, 2 if a.quick else 4, a.threads, a.rss_mmap_threshold)
                    for _ in range(max(1, a.rss_repeats))
                )
            )
            rows.append({"workload": name, "variant": v, **res[v], "peak_rss_mib": rss})
        if not a.json:
            print_table([r for r in rows if r["workload"] == name])
    if a.json:
        keep = ("workload", "variant", "median_s", "ratio_to_bare", "ratio_total", "repeats", "syncs_per_step",
                "ratio_to_compiled_bare", "peak_rss_mib")  # fmt: skip
        print(json.dumps([{k: r[k] for k in keep if k in r} for r in rows], indent=1))


def math_nan() -> float:
    return float("nan")


def print_table(rows: list[dict]) -> None:
    bare_rss = next(r["peak_rss_mib"] for r in rows if r["variant"] == "bare")
    print(f"\n{rows[0]['workload']}")
    gpu = any(r.get("syncs_per_step") is not None for r in rows)
    print(f"  {'variant':<16} {'s/step':>8} {'x bare':>7} {'(total)':>8} {'peak RSS MiB':>13} {'x bare':>7}"
          + (f" {'syncs/step':>10}" if gpu else ""))  # fmt: skip
    for r in rows:
        print(f"  {r['variant']:<16} {r['median_s']:8.4f} {r['ratio_to_bare']:7.3f} {r['ratio_total']:8.3f} "
              f"{r['peak_rss_mib']:13.0f} {r['peak_rss_mib'] / bare_rss:7.3f}"
              + (f" {r['syncs_per_step']:>10}" if gpu else "")
              + (f"   x cbare {r['ratio_to_compiled_bare']:.3f} ({r['ratio_total_compiled']:.3f})"
                 if "ratio_to_compiled_bare" in r else ""))  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
