"""One rank of a 2-process gloo run (started by test_distributed.py), or the single-process baseline.

python ddp_worker.py MODE RUN_DIR RANK WORLD PORT
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import normscope

MODE, RUN_DIR, RANK, WORLD, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
FULL_BATCH, STEPS = 16, 4


def make_model(bn: bool):
    torch.manual_seed(0)
    if bn:
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    # the Flatten is not hooked: it gets a finiteness flag, so flags share the step's transfer too
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(FULL_BATCH, 8, generator=g), torch.randint(0, 3, (FULL_BATCH,), generator=g)) for _ in range(STEPS)
    ]


def main():
    torch.set_num_threads(1)
    if WORLD > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT)
        dist.init_process_group("gloo", rank=RANK, world_size=WORLD)
    try:
        model = make_model(bn=MODE == "bn")
        net = nn.parallel.DistributedDataParallel(model) if WORLD > 1 else model
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        per = FULL_BATCH // WORLD
        with normscope.watch(model, RUN_DIR, every=1, optimizer=opt) as scope:
            for step, (x, y) in enumerate(batches()):
                x, y = x[RANK * per : (RANK + 1) * per], y[RANK * per : (RANK + 1) * per]
                if MODE == "nan" and step == 2:  # an Inf input: the unhooked Flatten's flag names it first
                    x = x.clone()
                    x[0, 0] = float("inf")
                if MODE == "raise" and RANK == 1 and step == 2:
                    raise RuntimeError("rank 1 failed on purpose")
                out = net(x)
                loss = nn.functional.cross_entropy(out, y)
                opt.zero_grad()
                loss.backward()
                scope.log(loss=loss.detach())  # a tensor before the step ends: it joins the step's transfer
                if RANK == 0:  # what the writer must record as its own scalar and output log Z
                    print(f"LOSS {step} {float(loss):.17g}", flush=True)
                    print(f"LOGZ {step} {float(torch.logsumexp(out.detach().double(), -1).mean()):.17g}", flush=True)
                opt.step()
        print(f"rank {RANK} writer={scope.is_writer}", flush=True)
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
    # gloo's background threads can abort ("terminate called without an active exception") during
    # interpreter teardown after destroy_process_group; the work is done, so leave without it
    os._exit(0)
