"""Train a fixture recipe under torch.distributed (DDP, gloo on CPU) with normscope watching.

    .venv/bin/torchrun --nproc-per-node 2 examples/ddp_fixture.py fixtures/small_batch_bn.py --out runs/ddp

Each rank trains on its own shard of every batch; normscope combines the ranks' statistics on
rank 0, which alone writes the run directory, then analyses it and prints the findings.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import normscope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", help="a recipe file (file.py or file.py:function)")
    ap.add_argument("--out", default="runs/ddp")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--every", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        r = normscope.load_recipe(a.recipe)
        torch.manual_seed(0)  # identical initial weights on every rank (DDP also broadcasts them)
        ddp = nn.parallel.DistributedDataParallel(r.model)
        opt = r.make_optimizer()
        steps = a.steps or r.steps
        with normscope.watch(r.model, a.out, every=a.every, optimizer=opt, name=r.name) as scope:
            step = 0
            while step < steps:
                for x, y in r.train_data:
                    if step >= steps:
                        break
                    x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]  # this rank's shard
                    loss = r.loss_fn(ddp(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    scope.log(loss=loss.item())
                    step += 1
        if scope.is_writer:
            findings = normscope.analyze(a.out, model=r.model, optimizer=opt)
            print(f"{world} ranks, {steps} steps -> {a.out}")
            for f in findings:
                print(f"{f.severity:8} {f.check:28} {f.layer or '-':12} {f.message}")
        dist.barrier()  # every rank done before the group goes away
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
