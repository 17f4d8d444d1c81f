"""One rank of a gloo run started by test_scale.py, or its single-process baseline (WORLD = 1).

python scale_worker.py MODES RUN_BASE RANK WORLD PORT OUT_DIR

MODES (comma-separated, run one after the other in one process group; rank 0 writes the run of
mode M to RUN_BASE/M, every rank its JSON to OUT_DIR/M-<rank>.json):
- ``bytes``: a small CNN under DDP; every call normscope makes to a torch.distributed collective is
  counted (bytes of the tensors each rank receives), per sampled step;
- ``fsdp``: an MLP under FSDP2 (``fully_shard`` per Linear and at the root; WORLD = 1: the same
  model unsharded over the full batch), then ``recalibrate_bn`` of a BN model under FSDP2;
- ``poison``: DDP where rank 1 fails to prepare its step-1 reduction (it still enters the check);
- ``nosync``: DDP with gradient accumulation, the first micro-batch of each step under
  ``no_sync()`` (WORLD = 1: the full batch at once).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import normscope
from normscope.collect import scope as S

MODES, RUN_BASE, RANK, WORLD, PORT, OUT_DIR = (sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]),
                                               int(sys.argv[4]), sys.argv[5], sys.argv[6])  # fmt: skip
RUN_DIR = ""
FULL_BATCH, STEPS = 16, 3

# --- what normscope hands to collectives ----------------------------------------------------------
_steps: list[int] = []
_current = [0, 0]  # bytes, calls


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def _counting(fn, received):
    def wrapper(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("normscope"):
            _current[0] += _nbytes(received(args, kwargs))
            _current[1] += 1
        return fn(*args, **kwargs)

    return wrapper


def _install_counters():
    _steps.clear()
    if getattr(dist, "_normscope_counted", False):
        return
    dist._normscope_counted = True
    first = lambda a, k: a[0] if a else k.get("tensor")  # noqa: E731
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "gather", "all_gather_object", "all_to_all", "reduce"):  # fmt: skip
        if hasattr(dist, name):
            setattr(dist, name, _counting(getattr(dist, name), first))
    finish = S.Scope._finish_step

    def finish_counted(self, *a, **k):
        _current[:] = [0, 0]
        finish(self, *a, **k)
        _steps.append(list(_current))

    S.Scope._finish_step = finish_counted


# --- models and data ----------------------------------------------------------------------------
def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 17), nn.Tanh(), nn.Linear(17, 3))


def offset_mlp():
    """A LayerNorm first, fed inputs offset by 3e4: its recorded input has channel means ~1e4 times
    its std, so the first sampled step's m2 takes the second pass about the global mean."""
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 3))


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 5), nn.BatchNorm1d(5))


def batches(shape, classes):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(FULL_BATCH, *shape, generator=g) * 2 + 0.5, torch.randint(0, classes, (FULL_BATCH,), generator=g))
            for _ in range(STEPS)]  # fmt: skip


def shard(x, world=WORLD, rank=RANK):
    per = x.shape[0] // world
    return x[rank * per : (rank + 1) * per]


# --- modes --------------------------------------------------------------------------------------
def run_bytes():
    _install_counters()
    model = cnn()
    net = nn.parallel.DistributedDataParallel(model) if WORLD > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with normscope.watch(model, RUN_DIR, every=1, optimizer=opt, hist_max=0):
        for x, y in batches((3, 8, 8), 10):
            loss = nn.functional.cross_entropy(net(shard(x)), shard(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"steps": _steps, "inputs": [(shard(x) + 3e4).tolist() for x, _ in batches((8,), 3)]}


def run_fsdp():
    from torch.distributed.fsdp import fully_shard

    out = {}
    model = mlp()
    scope = normscope.watch(model, RUN_DIR, every=1)  # before fully_shard: start() tracks the new parameters
    if WORLD > 1:
        for i in (0, 2, 4):
            fully_shard(model[i])
        fully_shard(model)
        out["types"] = [type(m).__name__ for m in model]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with scope:  # the step advances with the optimizer's global hook
        for x, y in batches((8,), 3):
            loss = nn.functional.cross_entropy(model(shard(x)), shard(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
    # recalibrate_bn under FSDP2: every rank's population statistics over all ranks' batches
    bn = bn_model()
    if WORLD > 1:
        fully_shard(bn)
    data = [x for x, _ in batches((8,), 3)]
    # BN normalises with each batch's statistics during the pass: the baseline sees the ranks' batches
    # one after the other
    mine = [shard(x) for x in data] if WORLD > 1 else [shard(x, 2, r) for x in data for r in (0, 1)]
    res = normscope.recalibrate_bn(bn, mine)
    out["bns"] = res.bns
    out["running"] = {i: [bn[i].running_mean.tolist(), bn[i].running_var.tolist()] for i in (1, 4)}
    return out


def run_poison():
    from normscope.collect import distributed as D

    build = D.StepReduction.build
    calls = [0]

    def failing(*a, **k):
        calls[0] += 1
        if RANK == 1 and calls[0] == 2:
            raise RuntimeError("rank 1 could not prepare its step on purpose")
        return build(*a, **k)

    D.StepReduction.build = failing
    try:
        model = mlp()
        net = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with normscope.watch(model, RUN_DIR, every=1, optimizer=opt) as scope:
            for x, y in batches((8,), 3):
                loss = nn.functional.cross_entropy(net(shard(x)), shard(y))
                opt.zero_grad()
                loss.backward()
                opt.step()
        return {"errors": scope._hook_errors}
    finally:
        D.StepReduction.build = build


def run_nosync():
    _install_counters()
    model = offset_mlp()
    net = nn.parallel.DistributedDataParallel(model) if WORLD > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    acc = 2 if WORLD > 1 else 1
    with normscope.watch(model, RUN_DIR, every=1, optimizer=opt):
        for x, y in batches((8,), 3):
            xs, ys = (shard(x) + 3e4).chunk(acc), shard(y).chunk(acc)
            opt.zero_grad()
            for i, (xm, ym) in enumerate(zip(xs, ys)):
                loss = nn.functional.cross_entropy(net(xm), ym) / acc
                if i < acc - 1:
                    with net.no_sync():
                        loss.backward()
                else:
                    loss.backward()
            opt.step()
    return {"steps": _steps, "inputs": [(shard(x) + 3e4).tolist() for x, _ in batches((8,), 3)]}


def main():
    torch.set_num_threads(1)
    if WORLD > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT)
        dist.init_process_group("gloo", rank=RANK, world_size=WORLD)
    global RUN_DIR
    try:
        for mode in MODES:
            RUN_DIR = os.path.join(RUN_BASE, mode if RANK == 0 else f"{mode}-rank{RANK}")
            out = {"bytes": run_bytes, "fsdp": run_fsdp, "nosync": run_nosync, "poison": run_poison}[mode]()
            with open(os.path.join(OUT_DIR, f"{mode}-{RANK}.json"), "w") as f:
                json.dump(out, f)
    finally:
        if WORLD > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads may abort during interpreter teardown (see ddp_worker.py)
