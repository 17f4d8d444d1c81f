"""Attention modules (their query/key projections, heads, scale) and the transformer blocks
that hold them: what the transformer probes measure (normscope.collect.attention)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from normscope.roles.kinds import module_class

# --- attention blocks and transformer blocks ------------------------------------------------------
# (query child, key child) names of attention modules with separate projections: BERT/RoBERTa
# (query/key), Llama/Qwen2/Mistral/ViT/Swin in transformers ≥ 5 (q_proj/k_proj), T5 (q/k)
QK_CHILDREN = (("q_proj", "k_proj"), ("query", "key"), ("q", "k"))
# QK-norm children (Qwen3, OLMo2, Gemma 3, ViT-22B-style models): applied to q and k before the logits
QK_NORM_CHILDREN = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"), ("query_norm", "key_norm"),
                    ("norm_q", "norm_k"))  # fmt: skip
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim", "d_kv")


@dataclass(frozen=True)
class AttentionSpec:
    """How to read queries and keys of one attention module.

    ``kind``: ``"mha"`` (``nn.MultiheadAttention``: q and k recomputed from its inputs with its
    in-projection), ``"separate"`` (q and k are the outputs of two Linear-like children) or
    ``"fused"`` (one child's output holds q, k and v side by side: GPT-2's ``c_attn``).
    ``q`` / ``k``: (child name, first column, end column) of the child output holding them
    (None for "mha"). ``scale``: the factor the module applies to q·k (1/√head_dim, T5's 1, GPT-2's
    1/(√d·(layer+1)) with ``scale_attn_by_inverse_layer_idx``). ``causal``: the module declares
    causal self-attention (``is_causal``).
    """

    kind: str
    q: tuple[str, int, int] | None
    k: tuple[str, int, int] | None
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    batch_first: bool = True
    qk_norm: tuple[str, str] | None = None

    def as_json(self) -> dict:
        return {"kind": self.kind, "q": self.q[0] if self.q else None, "k": self.k[0] if self.k else None,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim, "scale": self.scale,
                "causal": self.causal, "qk_norm": list(self.qk_norm) if self.qk_norm else None}  # fmt: skip


def _out_features(m) -> int | None:
    n = getattr(m, "out_features", None)
    if isinstance(n, int):
        return n
    nf = getattr(m, "nf", None)  # transformers' Conv1D (GPT-2): weight is (in, out)
    if isinstance(nf, int):
        return nf
    w = getattr(m, "weight", None)
    return int(w.shape[0]) if w is not None and hasattr(w, "dim") and w.dim() == 2 else None


def _int_attr(module, names) -> int | None:
    for a in names:
        v = getattr(module, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    cfg = getattr(module, "config", None)
    for a in names:
        v = getattr(cfg, a, None) if cfg is not None else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _scale(module, head_dim: int) -> float:
    s = getattr(module, "scaling", None)
    if isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0:
        return float(s)
    if hasattr(module, "key_value_proj_dim"):  # T5 (before transformers 5 had `scaling`): no 1/√d
        return 1.0
    return head_dim**-0.5


def attention_spec(module: Any) -> AttentionSpec | None:
    """How ``module`` computes attention logits, or None when it is not an attention module.

    Recognised: ``nn.MultiheadAttention`` (fused ``in_proj_weight``, or separate q/k/v weights
    when ``kdim != embed_dim``); modules with Linear-like query and key children named as in
    :data:`QK_CHILDREN` and a head count or head size attribute (``num_heads``,
    ``num_attention_heads``, ``n_head``, ``n_heads``, ``head_dim``, ``attention_head_size``,
    ``key_value_proj_dim``; also read from ``module.config``); GPT-2's fused ``c_attn`` (its
    output split into q, k, v; cross-attention reads q from ``q_attn``). Grouped-query attention:
    the key heads are ``k_out / head_dim`` (``num_key_value_heads``), each serving
    ``heads / kv_heads`` query heads.
    """
    from torch import nn

    if isinstance(module, nn.MultiheadAttention):
        e, h = int(module.embed_dim), int(module.num_heads)
        d = e // h
        return AttentionSpec("mha", None, None, h, h, d, d**-0.5, False, bool(module.batch_first))
    children = dict(module.named_children())
    if not children:
        return None
    heads = _int_attr(module, _HEAD_ATTRS)
    hd = _int_attr(module, _HEAD_DIM_ATTRS)
    c_attn = children.get("c_attn")
    if c_attn is not None and _out_features(c_attn) and heads:  # GPT-2
        e = int(getattr(module, "split_size", None) or getattr(module, "embed_dim", 0) or _out_features(c_attn) // 3)
        d = hd or e // heads
        causal = getattr(module, "is_causal", None) is True
        if "q_attn" in children and getattr(module, "is_cross_attention", False):
            return AttentionSpec("separate", ("q_attn", 0, e), ("c_attn", 0, e), heads, heads, d, _scale(module, d),
                                 False)  # fmt: skip
        if _out_features(c_attn) == 3 * e:
            return AttentionSpec("fused", ("c_attn", 0, e), ("c_attn", e, 2 * e), heads, heads, d, _scale(module, d),
                                 causal)  # fmt: skip
    for qn, kn in QK_CHILDREN:
        q, k = children.get(qn), children.get(kn)
        if q is None or k is None or isinstance(q, nn.MultiheadAttention):
            continue
        qo, ko = _out_features(q), _out_features(k)
        if not qo or not ko or not (heads or hd):
            continue
        d = hd or qo // heads
        if qo % d or ko % d or (qo // d) % (ko // d):
            continue
        qkn = next(((a, b) for a, b in QK_NORM_CHILDREN if a in children and b in children), None)
        return AttentionSpec("separate", (qn, 0, qo), (kn, 0, ko), qo // d, ko // d, d, _scale(module, d),
                             getattr(module, "is_causal", None) is True, qk_norm=qkn)  # fmt: skip
    return None


def attention_modules(model: Any) -> dict[str, AttentionSpec]:
    """``{raw name: spec}`` of every attention module of ``model`` (see :func:`attention_spec`)."""
    out = {}
    for name, m in model.named_modules():
        s = attention_spec(m)
        if s is not None:
            out[name] = s
    return out


def transformer_blocks(model: Any, attention: Mapping[str, Any] | None = None) -> list[str]:
    """Raw names of the transformer blocks: the residual stream is their output.

    A block is an element of a ``ModuleList`` / ``Sequential`` whose elements all have the same
    class and each contain an attention module (BERT's ``encoder.layer``, GPT-2's ``h``, Llama's
    ``layers``, T5's ``block``, ViT's and ``nn.TransformerEncoder``'s ``layers``, Swin's ``blocks``);
    when such lists nest (Swin's stages holding block lists), the innermost level is taken.
    """
    from torch import nn

    attn = set(attention if attention is not None else attention_modules(model))
    cands = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.named_children())
        if not kids or len({module_class(c) for _, c in kids}) != 1:
            continue
        full = [f"{name}.{k}" if name else k for k, _ in kids]
        if all(any(a.startswith(f + ".") for a in attn) for f in full):
            cands += full
    return [c for c in cands if not any(o != c and o.startswith(c + ".") for o in cands)]
