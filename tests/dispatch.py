"""Counting the ops a piece of code dispatches (TorchDispatchMode): the tests that prove a step adds
no op (unsampled steps), or no host-synchronising op (sampled steps, the probes)."""

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# ops that read a value to the host, copy a Python value to the device, or have a data-dependent size
SYNC_OPS = ("lift_fresh", "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item")


class CountOps(TorchDispatchMode):
    """``with CountOps() as c: ...``; ``c.ops`` counts each op, by its full overload name
    (``aten.add.Tensor``) or, with ``short=True``, by its op name (``add``)."""

    def __init__(self, short: bool = False):
        super().__init__()
        self.short = short
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self.short and name.startswith("aten."):
            name = name.split(".")[1]
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))
