"""Repeated blocks: which block a layer belongs to, and where each block normalises (pre-LN or
post-LN, Xiong et al. 2020) from the recorded execution order and graph."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from normscope.roles.kinds import is_norm_info


# --- where a repeated block normalises: pre-LN or post-LN (Xiong et al. 2020) --------------------
def block_of(layer: str) -> str:
    """The repeated block a layer belongs to: its name up to the first numeric part ("model.layers.3",
    a Sequential's "4"); a layer outside any numbered container is its own block ("lm_head")."""
    parts = layer.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return layer


def numbered_prefixes(layer: str) -> list[str]:
    """Every container of ``layer`` that ends in a numeric part, outermost first ("1", "1.layers.0")."""
    parts = layer.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts) - 1) if parts[i].isdigit()]


def norm_placement(order: list[Mapping[str, Any]], modules: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """Per repeated block, where its normalisation sits, from the recorded execution order
    (``meta.json`` ``execution_order``: the hooked modules in the order their forwards ended).

    A block is any numbered container holding two or more hooked modules ("bert.encoder.layer.3",
    "1.layers.0", T5's "encoder.block.0.layer.1" inside "encoder.block.0"); containers among the
    hooked modules (they end after their children) are left out of its sequence. Its placement:

    - ``"pre"``: the first module the block runs (dropouts aside) is a norm — each branch normalises
      the residual stream on entry (GPT-2, Llama, T5, ViT, Swin; ``norm_first=True``);
    - ``"post"``: the block's last module is a norm and its first is not — the norm follows the
      residual sum (the original Transformer, BERT; ``TransformerEncoderLayer(norm_first=False)``);
    - ``"both"``: first and last are norms (sandwich norms); ``None``: no norm at either end.

    Returns ``{block: {"placement", "first", "last", "norms", "stack"}}`` in execution order;
    ``stack`` is the container the block repeats in ("bert.encoder.layer").
    """
    seen: dict[str, list[str]] = {}
    for r in order:
        if int(r.get("call", 0)) != 0:
            continue
        layer = r["layer"]
        for b in numbered_prefixes(layer):
            if layer not in seen.setdefault(b, []):
                seen[b].append(layer)
    out = {}
    for b, layers in seen.items():
        leaves = [x for x in layers if not any(y.startswith(x + ".") for y in layers)]
        if len(leaves) < 2:
            continue

        def info(x):
            return modules.get(x, {})

        def norm(x):
            return is_norm_info(info(x))

        body = [x for x in leaves if info(x).get("role") != "dropout"] or leaves
        first_norm, last_norm = norm(body[0]), norm(leaves[-1])
        placement = ("both" if first_norm and last_norm else "pre" if first_norm else "post" if last_norm
                     else None)  # fmt: skip
        out[b] = {"placement": placement, "first": body[0], "last": leaves[-1],
                  "norms": [x for x in leaves if norm(x)], "stack": b.rpartition(".")[0]}  # fmt: skip
    return out


def block_stacks(placement: Mapping[str, Mapping[str, Any]], kind: str | None = None) -> dict[str, list[str]]:
    """Stacks of repeated blocks (``{stack: [block, ...]}`` in execution order, two blocks or more),
    from :func:`norm_placement`; with ``kind``, only blocks of that placement, and the innermost
    stacks only (a numbered container of whole stacks is not itself judged)."""
    stacks: dict[str, list[str]] = {}
    for b, v in placement.items():
        if kind is None or v["placement"] == kind:
            stacks.setdefault(v["stack"], []).append(b)
    stacks = {k: v for k, v in stacks.items() if len(v) >= 2}
    inner = {k: v for k, v in stacks.items()
             if not any(o != k and any(ob.startswith(b + ".") for b in v for ob in ov) for o, ov in stacks.items())}  # fmt: skip
    return inner
