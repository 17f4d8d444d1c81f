"""Transformer probes: attention logits, output logits and residual-stream outliers.

Registered by :meth:`Scope.start <normscope.collect.scope.Scope.start>`; every hook returns at once
on unsampled steps, inside compiled regions, torch.func transforms and checkpoint recomputations.
On sampled steps they measure on device and queue the numbers with ``scope.emit`` (the step's one
host transfer carries them); nothing here copies to the host. A hook that fails is disabled, the
error is noted in ``meta.json`` and training goes on.

Signals (rows of the ``signals`` table, per module call):

- attention blocks (:func:`normscope.roles.attention_modules`), layer = the attention module:
  ``attn_logit_max`` — max over heads of the largest |q·k|·scale over a subsample of positions
  (≤ :data:`SEQS` sequences, ≤ :data:`POSITIONS` evenly spaced query and key positions; pairs a
  declared causal mask hides are left out); ``attn_logit_head_mean`` — the mean over heads of each
  head's maximum; ``attn_logit_bound`` — max‖q‖·max‖k‖·scale over the same positions (the cheap
  bound); ``attn_rotary`` — 1 when the model's rotary embedding was applied to q and k first.
  A QK-norm of the module (``q_norm``/``k_norm``, ...) is applied to the sampled q and k first.
- the model output (layer :data:`OUTPUT_LAYER`), when it has ≥ 2 axes and its last has ≥ 2 entries
  (classifier or LM logits): ``logz_mean`` / ``logz_std`` — log Σ exp(z) over the last axis, mean
  and std over a subsample of ≤ :data:`ROWS` rows; ``z_absmax`` — max |z| and ``z_mean`` — the
  mean logit there; in training, from the loss's gradient w.r.t. it, ``z_grad_shift`` —
  :func:`shift_sensitivity`: ~0 for a softmax cross-entropy, whose logits' log Z nothing holds in
  place, of order 1 for a regression or a sigmoid output (no logits to drift).
- transformer blocks (:func:`normscope.roles.transformer_blocks`): ``massive_absmax`` — max |x|
  over the whole output; ``massive_median`` — the exact median of |x| over ≤ :data:`MEDIAN_MAX`
  elements (whole token rows, evenly spaced); ``massive_ch_i`` / ``massive_val_i`` /
  ``massive_pos_i`` for the :data:`TOP` channels with the largest max |x|: channel index, its max
  |x| and the sequence position where it occurs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from normscope.collect.outputs import iter_float_tensors
from normscope.collect.scope_hooks import functorch_level, in_backward
from normscope.collect.select import canonical_names
from normscope.roles import AttentionSpec, attention_modules, feature_size, transformer_blocks

SEQS = 2  # sequences of a batch the attention logits are measured on
POSITIONS = 64  # query and key positions per sequence (evenly spaced, position 0 and the last included)
ROWS = 512  # output-logit rows for log Z
MEDIAN_MAX = 16384  # elements of a block output for the exact median of |x|
TOP = 4  # channels reported per block output
OUTPUT_LAYER = "output"
ATTN_NAMES = ("attn_logit_max", "attn_logit_head_mean", "attn_logit_bound", "attn_rotary")
LOGIT_NAMES = ("logz_mean", "logz_std", "z_absmax", "z_mean")


def spaced(n: int, k: int, device) -> torch.Tensor:
    """``min(n, k)`` indices evenly spaced over ``range(n)``, first and last included (fixed by shape)."""
    if n <= k:
        return torch.arange(n, device=device)
    return torch.arange(k, device=device) * (n - 1) // (k - 1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def head_logits(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, pos_q: torch.Tensor, pos_k: torch.Tensor,
                causal: bool, rot: tuple | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Per-head max |logit| and the bound, from sampled q (b, Pq, H·d) and k (b, Pk, Hk·d).

    ``rot``: (cos, sin) of shape (b', Pq, d) applied to q and k (transformers' rotate-half
    convention) when the model passes them; ``mask``: (b, Pq, Pk) True where a pair is hidden.
    Returns a float64 vector: per-head maxima (H) then the bound.
    """
    b, pq, _ = q.shape
    d = spec.head_dim
    qh = q.float().reshape(b, pq, -1, d).transpose(1, 2)  # (b, H, Pq, d)
    kh = k.float().reshape(b, k.shape[1], -1, d).transpose(1, 2)
    if rot is not None:
        cos, sin = (t.float().unsqueeze(1) for t in rot)
        qh = qh * cos + rotate_half(qh) * sin
        kh = kh * cos + rotate_half(kh) * sin
    if kh.shape[1] != qh.shape[1]:  # grouped-query attention: key head j serves query heads j·g … j·g+g-1
        b_, hk, pk, _ = kh.shape  # expand + reshape: repeat_interleave's order, without its size computation
        kh = kh[:, :, None].expand(b_, hk, qh.shape[1] // hk, pk, d).reshape(b_, qh.shape[1], pk, d)
    s = (qh @ kh.transpose(-1, -2)).abs_() * spec.scale  # (b, H, Pq, Pk)
    hide = mask
    if causal and pos_q.shape == pos_k.shape:
        c = pos_k.view(1, -1) > pos_q.view(-1, 1)
        hide = c.unsqueeze(0) if hide is None else hide | c
    if hide is not None:
        s = s.masked_fill(hide.unsqueeze(1), 0.0)
    per_head = s.amax(dim=(0, 2, 3))
    bound = qh.norm(dim=-1).amax() * kh.norm(dim=-1).amax() * spec.scale
    return torch.cat([per_head, bound.reshape(1)]).double()


def attention_values(per_head_and_bound: torch.Tensor, rotary: bool) -> torch.Tensor:
    ph = per_head_and_bound[:-1]
    extra = torch.full((1,), 1.0 if rotary else 0.0, dtype=torch.float64, device=ph.device)  # a fill: no copy
    return torch.cat([ph.max().reshape(1), ph.mean().reshape(1), per_head_and_bound[-1:], extra])


def logit_values(z: torch.Tensor) -> torch.Tensor | None:
    """(mean log Z, std log Z, max |z|, mean z) over ≤ ROWS evenly spaced rows of the last axis;
    None for an output with one axis (a batch of scalars, not rows of logits)."""
    if z.dim() < 2 or z.shape[-1] < 2:
        return None
    rows = z.reshape(-1, z.shape[-1])
    sub = rows.index_select(0, spaced(rows.shape[0], ROWS, rows.device)).float()
    lz = torch.logsumexp(sub, dim=-1)
    std = lz.std(unbiased=False) if lz.numel() > 1 else torch.zeros((), device=lz.device)
    return torch.stack([lz.mean(), std, sub.abs().amax(), sub.mean()]).double()


def shift_sensitivity(g: torch.Tensor) -> torch.Tensor | None:
    """Σ_rows |Σ_j g_ij| / Σ_rows Σ_j |g_ij| over the rows :func:`logit_values` samples: 0 (up to
    rounding) when the loss does not change if a constant is added to every logit of a row, as
    softmax cross-entropy (label smoothing and distillation's KL included) does not; of order 1
    (1/√k for k independent outputs) for a regression's squared error or a multi-label sigmoid."""
    if g.dim() < 2 or g.shape[-1] < 2:
        return None
    rows = g.reshape(-1, g.shape[-1])
    sub = rows.index_select(0, spaced(rows.shape[0], ROWS, rows.device)).double()
    total = sub.abs().sum()
    return (sub.sum(dim=-1).abs().sum() / total.clamp_min(1e-300)).reshape(1)


def massive_values(x: torch.Tensor, seq_axis: int) -> tuple[tuple[str, ...], torch.Tensor]:
    """Names and values of the massive-activation statistics of one block output."""
    x = x.detach()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    seq_axis = seq_axis % x.dim() if x.dim() > 2 else 0
    xt = x.movedim(seq_axis, -2) if seq_axis != x.dim() - 2 else x  # (..., L, D)
    dims = tuple(range(xt.dim() - 1))
    ch = torch.maximum(xt.amax(dim=dims), -xt.amin(dim=dims)).float()  # max |x| per channel
    k = min(TOP, ch.numel())
    vals, idx = ch.topk(k)
    sel = xt.index_select(-1, idx).abs()  # (..., L, k)
    pos = sel.reshape(-1, sel.shape[-2], k).amax(dim=0).argmax(dim=0)
    rows = xt.reshape(-1, xt.shape[-1])
    r = spaced(rows.shape[0], max(1, MEDIAN_MAX // rows.shape[1]), rows.device)
    a = rows.index_select(0, r).abs().flatten()
    med = a.float().kthvalue((a.numel() + 1) // 2).values
    names = ("massive_absmax", "massive_median", *(f"massive_ch_{i}" for i in range(k)),
             *(f"massive_val_{i}" for i in range(k)), *(f"massive_pos_{i}" for i in range(k)))  # fmt: skip
    v = torch.cat([vals[:1], med.reshape(1), idx.float(), vals, pos.float()]).double()
    return names, v


class _Attn:
    """One attention module's per-call state: the sampled q / k of the call in progress."""

    __slots__ = ("name", "spec", "module", "calls", "q", "k", "rot", "pos_q", "pos_k", "done")

    def __init__(self, name: str, spec: AttentionSpec, module: nn.Module):
        self.name, self.spec, self.module = name, spec, module
        self.calls = 0
        self.reset()

    def reset(self) -> None:
        self.q = self.k = self.rot = self.pos_q = self.pos_k = None
        self.done = False


class TransformerProbes:
    """The hooks of one scope (see the module docstring); :meth:`register` returns their handles."""

    def __init__(self, scope):
        self._scope = weakref.ref(scope)
        self.model = scope.model
        self.attn: list[_Attn] = []
        self.blocks: dict[str, tuple[str, int]] = {}
        self.disabled: set[str] = set()
        self._block_calls: dict[str, int] = {}
        self._root_phase: str | None = None  # the phase of the root forward, for its output
        self._step = -1  # the step the call counters belong to
        self.handles: list = []

    # --- set up ---------------------------------------------------------------------------------
    def register(self) -> list:
        scope = self._scope()
        names = canonical_names(self.model)
        mods = dict(self.model.named_modules())
        specs = attention_modules(self.model)
        handles = self.handles  # the root's hooks, every step
        hooks = scope._step_hooks  # the modules' hooks: sampled steps only
        handles += [self.model.register_forward_pre_hook(self._root_pre),
                    self.model.register_forward_hook(self._root_post)]  # fmt: skip
        for raw, spec in specs.items():
            m = mods[raw]
            st = _Attn(names.get(raw, raw), spec, m)
            self.attn.append(st)
            if spec.kind == "mha":
                hooks.add(m, self._mha_hook(st), pre=True, with_kwargs=True)
                continue
            hooks.add(m, self._attn_pre(st), pre=True, with_kwargs=True)
            for child in {spec.q[0], spec.k[0]}:
                hooks.add(getattr(m, child), self._proj_hook(st, child))
        for raw in transformer_blocks(self.model, specs):
            m = mods[raw]
            inner = [s for a, s in specs.items() if a.startswith(raw + ".") and s.kind == "mha"]
            seq_axis = 1 if (not inner or all(s.batch_first for s in inner)) else 0
            if getattr(m, "batch_first", None) is False:
                seq_axis = 0
            self.blocks[raw] = (names.get(raw, raw), seq_axis)
            hooks.add(m, self._block_hook(raw))
        if scope is not None:
            scope._meta["transformer"] = {
                "attention": {st.name: st.spec.as_json() for st in self.attn},
                "blocks": [n for n, _ in self.blocks.values()],
                "positions": POSITIONS, "sequences": SEQS, "rows": ROWS, "median_max": MEDIAN_MAX,
            }  # fmt: skip
        return handles

    # --- gating -----------------------------------------------------------------------------------
    def _live(self, key: str):
        """The scope when this sampled step records ``key``, else None (before any tensor op)."""
        if torch.compiler.is_compiling():  # first: dynamo must not trace (and guard on) the scope's state
            return None
        scope = self._scope()
        if scope is None or not scope._active or not scope._sampling or key in self.disabled:
            return None
        if scope._writer is None:  # another rank under torch.distributed: only the writer's values are kept
            return None
        if in_backward() or functorch_level() is not None:
            return None
        if scope.step_index != self._step:  # a new step (also when submodules are called without the root)
            self._step = scope.step_index
            self._new_forward()
        return scope

    def _fail(self, scope, key: str, e: BaseException) -> None:
        self.disabled.add(key)
        scope._note_error(f"{key} (transformer probe)", e)

    def _phase(self, scope) -> str:
        return scope._phase_now()

    # --- root: a new forward; the output logits ---------------------------------------------------------
    def _root_pre(self, module, args) -> None:
        scope = self._live("")
        if scope is None:
            return
        self._root_phase = self._phase(scope)
        self._new_forward()

    def _new_forward(self) -> None:
        for st in self.attn:
            st.calls = 0
            st.reset()
        self._block_calls = {}

    def _root_post(self, module, args, output) -> None:
        scope = self._live(OUTPUT_LAYER)
        if scope is None:
            return
        try:
            z = _logits_of(output)
            if z is None:
                return
            with torch.no_grad():
                v = logit_values(z.detach())
            if v is None:
                return
            phase = self._root_phase or self._phase(scope)
            scope.emit(phase, OUTPUT_LAYER, 0, LOGIT_NAMES, v)
            if phase == "train" and z.requires_grad and scope.record_grads:
                ref = weakref.ref(scope)
                z.register_hook(lambda g: self._logit_grad(ref, g))
        except Exception as e:  # never break the user's training
            self._fail(scope, OUTPUT_LAYER, e)

    def _logit_grad(self, ref, g: torch.Tensor) -> None:
        """The loss's gradient w.r.t. the output: is the loss blind to a constant added to every logit?"""
        scope = ref()
        if scope is None or OUTPUT_LAYER in self.disabled:
            return
        try:
            with torch.no_grad():
                v = shift_sensitivity(g.detach())
            if v is not None:
                scope.emit("train", OUTPUT_LAYER, 0, ("z_grad_shift",), v)
        except Exception as e:  # never break the user's training
            self._fail(scope, OUTPUT_LAYER, e)

    # --- attention ----------------------------------------------------------------------------------
    def _attn_pre(self, st: _Attn):
        def pre(module, args, kwargs):
            if self._live(st.name) is None:
                return None
            st.reset()
            st.calls += 1
            pe = kwargs.get("position_embeddings")
            if isinstance(pe, (tuple, list)) and len(pe) == 2 and all(isinstance(t, torch.Tensor) for t in pe):
                cos, _ = pe
                if cos.dim() == 3 and cos.shape[-1] == st.spec.head_dim:
                    st.rot = pe
            return None

        return pre

    def _proj_hook(self, st: _Attn, child: str):
        spec = st.spec

        def hook(module, args, output):
            scope = self._live(st.name)
            if scope is None or st.done or not isinstance(output, torch.Tensor) or in_backward():
                return None
            try:
                with torch.no_grad():
                    y = output.detach()
                    if y.dim() == 2:
                        y = y.unsqueeze(0)
                    y = y[:SEQS]
                    pos = spaced(y.shape[1], POSITIONS, y.device)
                    y = y.index_select(1, pos)
                    if spec.q[0] == child:
                        st.q, st.pos_q = y[..., spec.q[1] : spec.q[2]], pos
                    if spec.k[0] == child:
                        st.k, st.pos_k = y[..., spec.k[1] : spec.k[2]], pos
                    if st.q is None or st.k is None:
                        return None
                    if spec.qk_norm is not None:
                        st.q = _qk_norm(getattr(st.module, spec.qk_norm[0]), st.q, spec.head_dim)
                        st.k = _qk_norm(getattr(st.module, spec.qk_norm[1]), st.k, spec.head_dim)
                    rot = None
                    if st.rot is not None and st.q.shape[1] == st.k.shape[1]:
                        cos, sin = st.rot
                        if cos.shape[-2] == output.shape[-2]:
                            pick = lambda t: t[: min(SEQS, t.shape[0])].index_select(1, st.pos_q)  # noqa: E731
                            rot = (pick(cos), pick(sin))
                    ph = head_logits(st.q, st.k, spec, st.pos_q, st.pos_k, spec.causal, rot)
                    v = attention_values(ph, rot is not None)
                st.done = True
                q_calls = max(st.calls - 1, 0)
                scope.emit(self._phase(scope), st.name, q_calls, ATTN_NAMES, v)
                st.q = st.k = st.rot = None
            except Exception as e:  # never break the user's training
                self._fail(scope, st.name, e)
            return None

        return hook

    def _mha_hook(self, st: _Attn):
        spec = st.spec

        def pre(module: nn.MultiheadAttention, args, kwargs):
            scope = self._live(st.name)
            if scope is None:
                return None
            try:
                call = st.calls
                st.calls += 1
                with torch.no_grad():
                    v = mha_values(module, spec, args, kwargs)
                if v is not None:
                    scope.emit(self._phase(scope), st.name, call, ATTN_NAMES, v)
            except Exception as e:  # never break the user's training
                self._fail(scope, st.name, e)
            return None

        return pre

    # --- transformer blocks: the residual stream ---------------------------------------------------------
    def _block_hook(self, raw: str):
        name, seq_axis = self.blocks[raw]

        def hook(module, args, output):
            scope = self._live(name)
            if scope is None:
                return None
            try:
                x = next((t for _, t in iter_float_tensors(output)), None)
                if x is None:
                    return None
                call = self._block_calls.get(name, 0)
                self._block_calls[name] = call + 1
                with torch.no_grad():
                    names, v = massive_values(x, seq_axis)
                scope.emit(self._phase(scope), name, call, names, v)
            except Exception as e:  # never break the user's training
                self._fail(scope, name, e)
            return None

        return hook


def _qk_norm(norm: nn.Module, t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """QK-norm as the model applies it, per head (normalized size = head_dim) or over the whole
    projection; through ``forward`` so that no hook sees this extra call."""
    if feature_size(norm) == t.shape[-1] and t.shape[-1] != head_dim:
        return norm.forward(t)
    b, p, w = t.shape
    return norm.forward(t.reshape(b, p, w // head_dim, head_dim)).reshape(b, p, w)


def _arg(args, kwargs, i: int, name: str):
    return args[i] if len(args) > i else kwargs.get(name)


def mha_values(module: nn.MultiheadAttention, spec: AttentionSpec, args, kwargs) -> torch.Tensor | None:
    """Attention signals of one ``nn.MultiheadAttention`` call, recomputed from its inputs."""
    query, key = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key")
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
        return None
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        wq, wk = module.in_proj_weight[:e], module.in_proj_weight[e : 2 * e]
    else:
        wq, wk = module.q_proj_weight, module.k_proj_weight
    b = module.in_proj_bias
    bq, bk = (b[:e], b[e : 2 * e]) if b is not None else (None, None)
    unbatched = query.dim() == 2
    if unbatched:
        query, key = query.unsqueeze(1), key.unsqueeze(1)  # (L, 1, E)
    elif module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)  # (L, N, E)
    query, key = query[:, :SEQS], key[:, :SEQS]
    pq = spaced(query.shape[0], POSITIONS, query.device)
    pk = spaced(key.shape[0], POSITIONS, key.device)
    q = nn.functional.linear(query.index_select(0, pq), wq, bq).transpose(0, 1)  # (b, Pq, E)
    k = nn.functional.linear(key.index_select(0, pk), wk, bk).transpose(0, 1)
    mask = None
    am = _arg(args, kwargs, 5, "attn_mask")
    if isinstance(am, torch.Tensor) and am.dim() == 2:
        sub = am.index_select(0, pq).index_select(1, pk)
        mask = (sub if sub.dtype == torch.bool else torch.isneginf(sub)).unsqueeze(0)
    kpm = _arg(args, kwargs, 3, "key_padding_mask")
    if isinstance(kpm, torch.Tensor) and kpm.dim() == 2 and not unbatched:
        sub = kpm[: q.shape[0]].index_select(1, pk)
        sub = (sub if sub.dtype == torch.bool else torch.isneginf(sub)).unsqueeze(1)  # (b, 1, Pk)
        mask = sub if mask is None else mask | sub
    causal = bool(_arg(args, kwargs, 7, "is_causal")) and am is None
    return attention_values(head_logits(q, k, spec, pq, pk, causal, None, mask), False)


def _logits_of(output: Any) -> torch.Tensor | None:
    """The model's final logits: the output tensor, ``.logits`` of a ModelOutput / dict, or the
    first float tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, dict):
        z = output.get("logits")
        if isinstance(z, torch.Tensor) and z.is_floating_point():
            return z
    z = getattr(output, "logits", None)
    if isinstance(z, torch.Tensor) and z.is_floating_point():
        return z
    if isinstance(output, (tuple, list)):
        return next((t for _, t in iter_float_tensors(output)), None)
    return None


def register(scope) -> list:
    """Install the transformer probes on ``scope.model``; returns the hook handles (none on error)."""
    probes = TransformerProbes(scope)
    n0 = len(scope._step_hooks)
    try:
        return probes.register()
    except Exception as e:  # an unrecognisable model must not stop the collector
        for h in probes.handles:  # none left half-installed
            h.remove()
        scope._step_hooks.truncate(n0)
        scope._note_error("transformer probes", e)
        return []
