"""BN folding math: small pure functions of tensors (no graph, no modules).

Everything is computed in float64; callers cast back to the parameter dtype and check
finiteness. Notation (docs/fold.md): in eval mode BN computes y = s·x + t per channel with
s = γ/√(σ²+ε) and t = β − μ·s (γ = 1, β = 0 when affine=False).

Weight layouts (PyTorch and ONNX agree):

- Conv:          W[C_out, C_in/g, k…]
- ConvTranspose: W[C_in, C_out/g, k…]; the output channel of W[i, j] is
  (i div (C_in/g))·(C_out/g) + j
- Linear:        W[out, in]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

F64 = torch.float64

__all__ = [
    "bn_scale_shift",
    "fold_into_producer",
    "scale_consumer_input",
    "fold_into_consumer",
    "pre_add_shift",
    "producer_channel_scale",
    "add_identity_kernel",
]


def _f64(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.detach().to(F64)


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Per-channel (s, t) of an eval-mode BN, in float64: BN(x) = s·x + t."""
    mean, var = _f64(running_mean), _f64(running_var)
    gamma = torch.ones_like(mean) if weight is None else _f64(weight)
    beta = torch.zeros_like(mean) if bias is None else _f64(bias)
    s = gamma / torch.sqrt(var + float(eps))
    t = beta - mean * s
    return s, t


def _broadcast(v: Tensor, ndim: int, axis: int) -> Tensor:
    shape = [1] * ndim
    shape[axis] = v.numel()
    return v.reshape(shape)


def producer_channel_scale(weight_shape: torch.Size, s: Tensor, kind: str, groups: int = 1) -> Tensor:
    """The factor that multiplies each weight entry when BN scale ``s`` (one per output
    channel of the producer) is folded into it; same shape as the weight."""
    nd = len(weight_shape)
    if kind in ("conv", "linear"):
        return _broadcast(s, nd, 0).expand(weight_shape)
    if kind == "convT":
        c_in, c_out_g = weight_shape[0], weight_shape[1]
        # output channel of W[i, j] = (i // (c_in/g)) * (c_out/g) + j
        s_g = s.reshape(groups, 1, c_out_g)  # [g, 1, C_out/g]
        full = s_g.expand(groups, c_in // groups, c_out_g).reshape(c_in, c_out_g)
        return full.reshape(c_in, c_out_g, *([1] * (nd - 2))).expand(weight_shape)
    raise ValueError(f"unknown producer kind {kind!r}")


def fold_into_producer(
    weight: Tensor, bias: Optional[Tensor], s: Tensor, t: Tensor, kind: str, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Producer → BN: W′[o] = s_o·W[o], b′ = s·b + t (b = 0 when absent). Float64 out."""
    w = _f64(weight)
    b = torch.zeros_like(s) if bias is None else _f64(bias)
    w_new = w * producer_channel_scale(w.shape, s, kind, groups)
    b_new = s * b + t
    return w_new, b_new


def _consumer_input_index(weight_shape: torch.Size, kind: str, groups: int) -> Tensor:
    """For Conv, the BN channel read by W[o, j]: g(o)·(C_in/g) + j, shape [C_out, C_in/g]."""
    c_out, c_in_g = weight_shape[0], weight_shape[1]
    group_of_o = torch.arange(c_out) // (c_out // groups)
    return group_of_o[:, None] * c_in_g + torch.arange(c_in_g)[None, :]


def scale_consumer_input(weight: Tensor, s: Tensor, kind: str, groups: int = 1, repeat: int = 1) -> Tensor:
    """BN → consumer, scale part: multiply every weight by the BN scale of the input channel it
    reads. Linear inputs may come through a flatten (each channel repeated ``repeat`` times)."""
    w = _f64(weight)
    s = s.to(w.device)
    if kind == "conv":
        idx = _consumer_input_index(w.shape, kind, groups).to(w.device)
        return w * s[idx].reshape(*idx.shape, *([1] * (w.dim() - 2)))
    if kind == "convT":  # input channel is dim 0
        return w * _broadcast(s, w.dim(), 0)
    if kind == "linear":
        return w * s.repeat_interleave(repeat)[None, :]
    raise ValueError(f"unknown consumer kind {kind!r}")


def fold_into_consumer(
    weight: Tensor,
    bias: Optional[Tensor],
    s: Tensor,
    t: Tensor,
    kind: str,
    groups: int = 1,
    repeat: int = 1,
) -> tuple[Tensor, Tensor]:
    """BN → Conv (no zero padding) or BN → Linear: W′ = W·s_in, b′ = b + Σ W·t_in.

    Exact for Conv only when every output position sees every tap on real data: padding 0,
    or a non-zero padding mode (reflect/replicate/circular pad copies of s·x + t)."""
    w = _f64(weight)
    w_new = scale_consumer_input(w, s, kind, groups, repeat)
    c_out = w.shape[0]
    b = torch.zeros(c_out, dtype=F64, device=w.device) if bias is None else _f64(bias)
    if kind == "conv":
        idx = _consumer_input_index(w.shape, kind, groups).to(w.device)
        w_sum = w.reshape(c_out, w.shape[1], -1).sum(-1)  # Σ over the kernel
        b_new = b + (w_sum * t.to(w.device)[idx]).sum(1)
    elif kind == "linear":
        b_new = b + w @ t.to(w.device).repeat_interleave(repeat)
    else:
        raise ValueError(f"kind {kind!r} cannot absorb a BN shift exactly")
    return w_new, b_new


def pre_add_shift(s: Tensor, t: Tensor) -> Tensor:
    """Shift a = t/s such that s·(x + a) = s·x + t; the scale then folds into a zero-padded
    conv and x + a stays as a small add before it. Non-finite where s = 0 (γ = 0)."""
    return t / s


def add_identity_kernel(
    weight: Tensor, bias: Optional[Tensor], s: Tensor, t: Tensor, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Conv(x) + BN(x) → Conv′(x) for a conv with C_in = C_out, stride 1, odd kernel and "same"
    padding: W′[o, o mod (C/g), centre] = W[…] + s_o, b′ = b + t. Float64 out."""
    w = _f64(weight).clone()
    c_out, c_in_g = w.shape[0], w.shape[1]
    centre = tuple(k // 2 for k in w.shape[2:])
    o = torch.arange(c_out)
    w[(o, o % c_in_g, *[torch.full_like(o, c) for c in centre])] += s.to(w.device)
    b = torch.zeros(c_out, dtype=F64, device=w.device) if bias is None else _f64(bias)
    return w, b + t.to(w.device)
