"""‖Δw‖ of an optimizer step read back from the optimizer's own state: no copy of the weights.

A step of torch's SGD, Adam or AdamW is, per parameter, ``w_after = (1 − c)·w_before + A`` with
``A`` an element-wise function of the state the step leaves behind (g: the gradient, s = −1 when
maximising; λ: weight decay; ``t``: the parameter's step count after the step):

- SGD with momentum μ, not Nesterov: ``A = −lr·buf`` and c = 0 (the decay is inside ``buf``);
- SGD without momentum: ``A = −lr·s·g``; Nesterov: ``A = −lr·(s·g + μ·buf)``; c = lr·λ;
- Adam: ``A = −lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)`` (v: ``max_exp_avg_sq`` with amsgrad),
  c = 0 (L2 decay is inside m); AdamW (decoupled decay): the same A, c = lr·λ;

so ``Δ = w_after − w_before = (A − c·w_after) / (1 − c)`` needs only the weights after the step and
the state. It is the update the optimizer computed; the weights' change differs from it by the
float rounding of ``w + A``. Before any use the algebra is checked against the weights' real change
on a sample of elements (:meth:`OptimizerUpdate.probe` / :meth:`OptimizerUpdate.check`), again
every ``VERIFY_EVERY`` updates; a disagreement hands the run back to the weight snapshot.

Any other optimizer (or subclass, whose ``step`` may differ), a step given a closure (it recomputes
the gradients inside the step), float16 / bfloat16 parameters (an update smaller than half a unit
in the last place is lost in the weights, and their real change is what such a run must see),
capturable / differentiable / complex / sparse cases, and hyperparameters on a device go back to
the snapshot.
"""

from __future__ import annotations

import math

import torch

from normscope.collect import native

VERIFY_EVERY = 50  # updates between two checks of the algebra (besides the first two)
PROBE = 64  # elements per parameter compared in a check
_SLICE = 1 << 20  # elements per slice in the torch path (bounds its temporaries)

# a term: (kind, t1, t2, a, b, k, eps, c); kind 0: A = a·t1 + b·t2 (t2 None: b = 0), kind 1: Adam
ZERO = None  # the parameter did not move in this step (no gradient, frozen, not in the optimizer)


def _host(v) -> float | None:
    """A hyperparameter as a float, None when reading it would need a device sync (a host
    tensor is read through numpy: a memory read, no dispatched op)."""
    if isinstance(v, torch.Tensor):
        return float(v.detach().numpy().reshape(-1)[0]) if v.numel() == 1 and v.device.type == "cpu" else None
    return float(v)


class OptimizerUpdate:
    """Reads the update of a step of one torch SGD / Adam / AdamW from its state (see the module)."""

    KINDS = {torch.optim.SGD: "SGD", torch.optim.Adam: "Adam", torch.optim.AdamW: "AdamW"}

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self.name = self.KINDS[type(opt)]
        self.updates = 0  # steps whose update was read
        self._probe: dict[int, torch.Tensor] | None = None
        self._gprobe: dict[int, torch.Tensor] = {}  # the probed gradients, on a check step
        self._evidence: list = []  # the last check's (index, real, predicted, ok, "weights" | "gradient")

    @classmethod
    def of(cls, opt) -> OptimizerUpdate | None:
        return cls(opt) if type(opt) in cls.KINDS else None  # exact types: a subclass may step otherwise

    def unreadable(self, params: list[torch.Tensor], closure: bool = False) -> str | None:
        """Why this step's update cannot be read from the state (None: it can). Checked before the
        step, so that the snapshot is taken when it cannot. ``closure``: the step was given one
        (it recomputes the gradients inside the step, after this check has read them)."""
        if closure:
            return "a closure recomputes the gradients inside step()"
        for g in self.opt.param_groups:
            for key in ("capturable", "differentiable"):
                if g.get(key):
                    return f"{key}=True"
            if g.get("fused") and any(p.device.type != "cpu" for p in g["params"]):
                return "fused on an accelerator"
            for key in ("lr", "weight_decay", "momentum", "dampening", "eps"):
                if key in g and _host(g[key]) is None:
                    return f"{key} is a device tensor"
            if any(_host(b) is None for b in g.get("betas", ())):
                return "betas are device tensors"
        for p in params:
            if p.is_complex() or (p.grad is not None and p.grad.is_sparse):
                return "complex or sparse parameters"
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                # an update below half a unit in the last place is lost in the weights: their
                # real change (the snapshot) is what such a run needs to see, not the intended one
                return f"{p.dtype} parameters"
        return None

    def keeps_grads(self) -> bool:
        """Whether this step leaves every ``p.grad`` as it found it, so that the gradient norms
        may be read after it, in one pass with the weights and the state: torch's per-tensor
        implementation (CPU parameters, neither ``foreach`` nor ``fused``) only ever writes
        copies of the gradient (``-g``, ``g + λ·w``). Its multi-tensor one adds in place (Nesterov
        momentum), and a fused one may unscale in place. The check steps confirm it (:meth:`check`)."""
        for g in self.opt.param_groups:
            if g.get("foreach") or g.get("fused") or isinstance(g.get("weight_decay"), torch.Tensor):
                return False
            if not all(p.is_cpu for p in g["params"]):  # (is_cpu: 5x cheaper than .device per parameter)
                return False
        return True

    def _groups(self) -> dict[int, dict]:
        return {id(p): g for g in self.opt.param_groups for p in g["params"]}

    def terms(self, params: list[torch.Tensor]) -> list:
        """Per parameter, after the step: ZERO, a term, or ``math.nan`` (the state is not there)."""
        groups = self._groups()
        out = []
        for p in params:
            g = groups.get(id(p))
            if g is None or p.grad is None or not p.requires_grad:
                out.append(ZERO)
                continue
            out.append(self._term(p, g, self.opt.state.get(p, {})))
        return out

    def _term(self, p, g: dict, st: dict):
        lr, wd = _host(g["lr"]), _host(g.get("weight_decay", 0.0))
        if self.name == "SGD":
            mu = _host(g.get("momentum", 0.0))
            buf = st.get("momentum_buffer")
            if mu and buf is None:
                return math.nan
            sign = -1.0 if g.get("maximize") else 1.0
            if mu and not g.get("nesterov"):
                return (0, buf, None, -lr, 0.0, 1.0, 0.0, 0.0)
            if mu:
                return (0, p.grad, buf, -lr * sign, -lr * mu, 1.0, 0.0, lr * wd)
            return (0, p.grad, None, -lr * sign, 0.0, 1.0, 0.0, lr * wd)
        b1, b2 = (_host(b) for b in g["betas"])
        v = st.get("max_exp_avg_sq") if g.get("amsgrad") else st.get("exp_avg_sq")
        m, step = st.get("exp_avg"), st.get("step")
        if m is None or v is None or step is None or _host(step) is None:
            return math.nan
        t = _host(step)
        c = lr * wd if g.get("decoupled_weight_decay", self.name == "AdamW") else 0.0
        return (1, m, v, -lr / (1 - b1**t), 0.0, (1 - b2**t) ** 0.5, _host(g["eps"]), c)

    # -- squared norms ---------------------------------------------------------------------------

    def norms_after(self, params, terms, weights, grads, grad_sq: torch.Tensor | None, kernel_ok: bool):
        """``(‖w‖², ‖g‖² or None, ‖Δ‖²)`` per parameter after the step (float64; of the local shards
        for DTensors). ``grads``: the gradients to take in the same pass (None: ``grad_sq`` holds
        their norms from before the step); the other arguments as :meth:`sq_norms`. CPU float32
        parameters: one pass over each parameter's tensors through the fused kernel
        (:func:`step_sq_norms`); else the weights' norms and :meth:`sq_norms`, and no gradient norms."""
        from normscope.collect.params import local  # (params imports this module)

        if kernel_ok and native.KERNEL is not None:
            kterms = []
            for i, tm in enumerate(terms):
                if tm is ZERO:
                    kterms.append(None)
                elif not isinstance(tm, tuple):
                    kterms.append(UNKNOWN)  # no state after the step
                elif tm[0] == 0 and tm[2] is None and tm[7] == 0 and tm[1] is params[i].grad:
                    kterms.append((3, None, None, *tm[3:]))  # Δ = a·g: the gradient's norm, scaled
                else:
                    kterms.append((tm[0], local(tm[1]).detach(), _d(local(tm[2])), *tm[3:]))
            out = step_sq_norms(weights, grads, kterms, grad_sq)
            if out is not None:
                w, g, du = out.unbind(0)
                return w, (g if grads is not None else None), du
        w = sq_norms_of(weights, kernel_ok, last_first=True)
        return w, None, self.sq_norms(params, terms, weights, grad_sq, kernel_ok).to(w.device)

    def sq_norms(self, params, terms, weights, grad_sq: torch.Tensor | None, kernel_ok: bool) -> torch.Tensor:
        """‖Δ‖² per parameter (float64, on the parameters' device; of the local shards for DTensors).

        ``terms``: :meth:`terms` of this step (the check reads the same); ``weights``: the local
        weights after the step; ``grad_sq``: this step's squared gradient norms (Δ = a·g needs
        nothing more). Δ = a·t1 is a scaled norm; the rest goes through torch ops on slices of at
        most ``_SLICE`` elements (CPU float32 parameters take :meth:`norms_after`'s kernel pass
        first). No host sync and no host-to-device copy: the values stay on the device for the
        step's single transfer.
        """
        from normscope.collect.params import local  # (params imports this module)

        dev = weights[0].device if weights else torch.device("cpu")
        vals: list = [None] * len(params)  # 0-d float64 tensors on dev; None: Δ = 0
        by_grad, scaled, todo = [], [], []
        for i, tm in enumerate(terms):
            if tm is ZERO:
                continue
            if not isinstance(tm, tuple):
                vals[i] = torch.full((), math.nan, dtype=torch.float64, device=dev)
                continue
            kind, t1, t2, a, _b, _k, _eps, c = tm
            if kind == 0 and t2 is None and c == 0:  # Δ = a·t1: a scaled norm
                if t1 is params[i].grad and grad_sq is not None:
                    by_grad.append((i, a * a))
                else:
                    scaled.append((i, local(t1).detach(), a * a))
                continue
            todo.append((i, weights[i], (kind, local(t1).detach(), _d(local(t2)), *tm[3:])))
        if by_grad:  # (unbind and foreach: a few ops for all, no host-to-device copy of the scales)
            g = grad_sq.to(device=dev, dtype=torch.float64).unbind()
            for (i, _), v in zip(by_grad, torch._foreach_mul([g[i] for i, _ in by_grad], [a2 for _, a2 in by_grad])):
                vals[i] = v
        if scaled:
            sq = sq_norms_of([t for _, t, _ in scaled], kernel_ok, last_first=True).to(dev).unbind()
            for (i, _, _), v in zip(scaled, torch._foreach_mul(list(sq), [a2 for *_, a2 in scaled])):
                vals[i] = v
        for i, w, tm in reversed(todo):  # the step wrote the last parameters last: read them first
            vals[i] = _sq_sliced(w, tm).to(dev)
        if all(v is None for v in vals):
            return torch.zeros(len(params), dtype=torch.float64, device=dev)
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        return torch.stack([zero if v is None else v for v in vals])

    # -- the check against the weights' real change ----------------------------------------------

    def due(self) -> bool:
        return self.updates < 2 or self.updates % VERIFY_EVERY == 0

    @property
    def probed(self) -> bool:
        """A check is pending: :meth:`probe` ran before this step."""
        return self._probe is not None

    def probe(self, weights: list[torch.Tensor], grads: list[torch.Tensor | None] | None = None) -> None:
        """Before the step: keep the first ``PROBE`` elements of every parameter (float64), and of
        every gradient (``grads``: the check also confirms that the step left them as they were)."""
        self._probe = {
            i: w.reshape(-1)[:PROBE].to(torch.float64, copy=True) for i, w in enumerate(weights) if w.numel()
        }
        self._gprobe = {
            i: g.detach().reshape(-1)[:PROBE].clone() for i, g in enumerate(grads or []) if g is not None and g.numel()
        }

    def check(self, terms, weights, grads: list[torch.Tensor | None] | None = None) -> torch.Tensor | None:
        """After the step: the algebra's Δ against the weights' change on the probed elements, and
        the probed gradients against ``grads`` (the step must not have written them: the norms
        read them after it). The number of disagreeing elements as a device tensor (read with the
        step's transfer: no sync here), or None when nothing was probed. Tolerance: the float
        rounding of the step (a few units in the last place of w) plus 1e-4 of Δ; none for the
        gradients. :meth:`explain` describes a failure."""
        from normscope.collect.params import local

        probe, self._probe = self._probe, None
        gprobe, self._gprobe = self._gprobe, {}
        if probe is None:
            return None
        self._evidence = []
        counts = []
        for i, before in gprobe.items():
            g = grads[i] if grads is not None and i < len(grads) else None
            if g is None:  # the step removed the gradient: a change
                now, ok = torch.full_like(before, math.nan), torch.zeros_like(before, dtype=torch.bool)
            else:  # a value left NaN was left alone; one that became NaN changed
                now = g.detach().reshape(-1)[: before.numel()]
                ok = (now == before) | (now.isnan() & before.isnan())
            counts.append((~ok).sum())
            self._evidence.append((i, before, now, ok, "gradient"))
        for i, tm in enumerate(terms):
            if i not in probe:
                continue
            w = weights[i].reshape(-1)[:PROBE].double()
            real = w - probe[i]
            if tm is ZERO:
                pred = torch.zeros_like(real)
            elif not isinstance(tm, tuple):
                pred = torch.full_like(real, math.nan)  # no state after the step: a disagreement
            else:
                pred = delta(weights[i], (tm[0], local(tm[1]), local(tm[2]), *tm[3:]), n=PROBE)
            eps = torch.finfo(weights[i].dtype).eps
            tol = 4 * eps * (w.abs() + probe[i].abs()) + 1e-4 * pred.abs() + 1e-30
            # NaN compares False: a disagreement, unless both are non-finite (a NaN or Inf gradient made the
            # weights and the state's Δ non-finite alike: no evidence against the algebra, and ‖Δw‖ is NaN
            # either way)
            ok = ((real - pred).abs() <= tol) | (~real.isfinite() & ~pred.isfinite())
            counts.append((~ok).sum())
            self._evidence.append((i, real, pred, ok, "weights"))
        return torch.stack(counts).sum() if counts else None

    def explain(self) -> str:
        """The first disagreement of the last check (reads its tensors: call only after a failure)."""
        for i, real, pred, ok, what in self._evidence:
            bad = (~ok).nonzero()
            if bad.numel():
                j = int(bad[0])
                if what == "gradient":
                    return (f"parameter {i}, element {j}: step() changed the gradient from {float(real[j]):.6g} "
                            f"to {float(pred[j]):.6g}")  # fmt: skip
                return (f"parameter {i}, element {j}: the weights moved by {float(real[j]):.6g}, the {self.name} "
                        f"state gives {float(pred[j]):.6g}")  # fmt: skip
        return "a disagreement"

    def forget(self) -> None:
        self._evidence = []


def _d(t):
    return t.detach() if t is not None else None


def sq_norms_of(tensors: list[torch.Tensor], kernel_ok: bool, last_first: bool = False) -> torch.Tensor:
    """Squared norms (float64) of a list of tensors on one device: one kernel call for CPU float32
    tensors, else foreach ops (three ops, not three per tensor).

    ``last_first``: read the list from its end (the result keeps the list's order). Right after an
    optimizer step, which walks the parameters first to last, the last ones are still in the CPU's
    cache; read first, they are hits instead of evictions (measured: 15 % off the MLP's 44 MB of
    weights and momentum buffers)."""
    kernel = native.KERNEL if kernel_ok else None
    if kernel is not None:
        sq = kernel.sq_norms(tensors[::-1] if last_first else tensors)
        if sq.numel() == len(tensors):
            return sq.flip(0) if last_first else sq
    return torch.stack(torch._foreach_norm(tensors)).double().pow_(2)


UNKNOWN = (-2, None, None, 0.0, 0.0, 1.0, 0.0, 0.0)  # a kernel term: ‖Δ‖² is NaN


def step_sq_norms(
    weights: list[torch.Tensor], grads: list | None, terms: list, grad_sq: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The norms after an optimizer step, each parameter's tensors read once, in one pass, by the
    fused kernel: a 3 × P float64 tensor of ‖w‖², ‖g‖² of ``grads`` (None: zeros; a missing
    gradient: NaN) and ‖Δ‖². ``terms``: per parameter None (Δ = 0), :data:`UNKNOWN`, or
    ``(kind, t1, t2, a, b, k, eps, c)``: kinds 0 and 1 this module's algebra, 2 Δ = t1 − w (t1:
    a copy of the weights before the step), 3 Δ = a·g (no read: ‖g‖² of this pass, else of
    ``grad_sq``, the norms taken before the step). Read from the list's end: the step wrote the
    last parameters last, and they are still in the cache (the result keeps the list's order).
    None when the kernel is not loaded or declines a tensor (not contiguous float32 on the CPU,
    sizes that differ)."""
    kernel = native.KERNEL
    if kernel is None:
        return None
    ws, gs, t1s, t2s, coef, missing = [], [], [], [], [], []
    for i in range(len(weights) - 1, -1, -1):
        w, tm = weights[i], terms[i]
        ws.append(w)
        if grads is not None:
            g = grads[i]
            if g is None:
                missing.append(i)
            gs.append(w if g is None else g.detach())
        if tm is None:
            t1s.append(w)
            t2s.append(w)
            coef += (-1, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0)
        else:
            kind, t1, t2, a, b, k, eps, c = tm
            t1 = w if t1 is None else t1
            t1s.append(t1)
            t2s.append(t1 if t2 is None else t2)
            coef += (kind, a, b, k, eps, c, 1.0 / (1.0 - c))
    gsq = grad_sq.double().flip(0) if grad_sq is not None and grads is None else torch.empty(0, dtype=torch.float64)
    out = kernel.step_sq_norms(ws, gs, t1s, t2s, coef, gsq)
    if out.numel() != 3 * len(weights):
        return None
    out = out.flip(1)
    if missing:
        out[1, missing] = math.nan
    return out


def delta(w: torch.Tensor, term: tuple, n: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Δ = (A − c·w) / (1 − c) element-wise (the module's algebra) over the first ``n`` elements of
    the flat tensors (all: None), computed in ``dtype``."""
    kind, t1, t2, a, b, k, eps, c = term
    sl = slice(None) if n is None else slice(0, n)

    def flat(t):
        return t.detach().reshape(-1)[sl].to(dtype)

    if kind == 0:
        A = flat(t1) * a
        if t2 is not None:
            A += flat(t2) * b
    else:
        A = (flat(t1) / (flat(t2).sqrt() / k + eps)) * a
    if c:
        A -= flat(w) * c
        A /= 1.0 - c
    return A


def _sq_sliced(w: torch.Tensor, term: tuple) -> torch.Tensor:
    """‖Δ‖² (float64) in torch ops, slice by slice of the flat tensors (temporaries of at most
    ``_SLICE`` elements, never a copy of the whole parameter)."""
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    kind, t1, t2, *rest = term
    n = w.numel()
    flat = [x.detach().reshape(-1) if x is not None else None for x in (w, t1, t2)]
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for s in range(0, n, _SLICE):
        part = [x[s : s + _SLICE] if x is not None else None for x in flat]
        d = delta(part[0], (kind, part[1], part[2], *rest), dtype=dtype)
        total += torch.linalg.vector_norm(d, dtype=torch.float64) ** 2
    return total
