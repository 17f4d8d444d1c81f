"""Overhead of the transformer probes (normscope/collect/attention.py), side by side.

    .venv/bin/python benchmarks/transformer_probes.py [--repeats 10] [--every 1]

The transformer workload of benchmarks/workloads.py (6 nn.TransformerEncoderLayer blocks, d 256,
batch 16 × 128 tokens), three copies: bare, watch(every=N) with the probes and watch(every=N) with
the probes switched off, stepped interleaved (rotating order). Prints the median over repeats of
time / bare time, and probes-on / probes-off.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402

import normscope  # noqa: E402
from normscope.collect import scope as S  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    make, batch = workloads.WORKLOADS["transformer"]
    torch.manual_seed(0)
    base = make()
    x, y = batch(torch.Generator().manual_seed(0))
    tmp = Path(tempfile.mkdtemp())
    runs = {}
    for v in ("bare", "probes-on", "probes-off"):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        scope = None
        if v != "bare":
            orig = S.transformer_probes
            if v == "probes-off":
                S.transformer_probes = lambda scope: []
            scope = normscope.watch(m, tmp / v, every=a.every, optimizer=opt).start()
            S.transformer_probes = orig
        runs[v] = (m, opt, scope)

    def step(v):
        m, opt, _ = runs[v]
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for v in runs:  # warm-up
        step(v)
    times = {v: [] for v in runs}
    names = list(runs)
    for r in range(a.repeats):
        for v in names[r % 3 :] + names[: r % 3]:
            t0 = time.perf_counter()
            step(v)
            times[v].append(time.perf_counter() - t0)
    for v in runs:
        if runs[v][2] is not None:
            runs[v][2].close()
    ratio = lambda v, w: statistics.median(t / b for t, b in zip(times[v], times[w]))  # noqa: E731
    print(f"bare {statistics.median(times['bare']) * 1e3:.0f} ms/step (median of {a.repeats})")
    print(f"watch(every={a.every}) probes on  x bare {ratio('probes-on', 'bare'):.3f}")
    print(f"watch(every={a.every}) probes off x bare {ratio('probes-off', 'bare'):.3f}")
    print(f"probes on / probes off {ratio('probes-on', 'probes-off'):.3f}")


if __name__ == "__main__":
    main()
