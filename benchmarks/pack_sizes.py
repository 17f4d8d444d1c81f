"""Bytes normscope's collectives move per rank per sampled step, sized from the pack table.

    .venv/bin/python benchmarks/pack_sizes.py            # the table in docs/scale.md

:func:`llama_entries` lists what a watched Llama-shaped decoder records per sampled step (checked
against a real ``transformers`` LlamaForCausalLM in tests/collect/test_scale.py);
:func:`normscope.collect.distributed.step_bytes` sizes the SUM and MAX buffers of those entries
from ``ACT_FIELDS``/``GRAD_FIELDS`` (checked against the bytes measured at 2 and 4 gloo ranks).
"""

from __future__ import annotations

from normscope.collect.distributed import step_bytes
from normscope.collect.reducers import SYMLOG_BINS


def llama_entries(layers: int, hidden: int, mlp: int, vocab: int, grads: bool = True) -> list[tuple]:
    """(kind, channels, histogram bins) of every entry a Llama decoder records in one sampled train step.

    Per decoder layer: both RMSNorms record their input and output; q/k/v/o projections; gate,
    SiLU and up projections (MLP width); the down projection. Around them: the token embedding,
    the final norm (input and output) and the LM head. Every hooked output except a norm's input
    also records its gradient (5 values)."""
    h = SYMLOG_BINS
    out: list[tuple] = []

    def act(c: int, grad: bool = True) -> None:
        out.append(("act", c, h))
        if grad and grads:
            out.append(("grad", 1, 0))

    act(hidden)  # embed_tokens
    for _ in range(layers):
        act(hidden, grad=False)  # input_layernorm: its input
        act(hidden)  # input_layernorm
        for _ in range(4):  # q, k, v, o projections
            act(hidden)
        act(hidden, grad=False)
        act(hidden)  # post_attention_layernorm: input, output
        for _ in range(3):  # gate_proj, act_fn, up_proj
            act(mlp)
        act(hidden)  # down_proj
    act(hidden, grad=False)
    act(hidden)  # final norm
    act(vocab)  # lm_head
    return out


def llama_params(layers: int) -> int:
    """Parameter tensors of a Llama decoder (7 projections and 2 norm weights per layer, embedding,
    final norm, LM head): their squared norms are reduced under FSDP2."""
    return 9 * layers + 3


def table() -> list[tuple[str, int]]:
    cfg = dict(layers=32, hidden=4096, mlp=11008, vocab=32000)
    ents = llama_entries(**cfg)
    ents_nograd = llama_entries(**cfg, grads=False)
    p = llama_params(cfg["layers"])
    return [
        ("per-channel statistics, FSDP2 (sharded parameter norms)", step_bytes(ents, p)),
        ("per-channel statistics, DDP", step_bytes(ents, 0)),
        ("max_channels=4096 (MLP and LM head reduced as one channel)", step_bytes(ents, p, max_channels=4096)),
        ("max_channels=1024 (no per-channel statistics)", step_bytes(ents, p, max_channels=1024)),
        ("max_channels=1024, a step without gradient statistics", step_bytes(ents_nograd, p, max_channels=1024)),
    ]


if __name__ == "__main__":
    for label, b in table():
        print(f"{label:64s} {b:>12,d} B  {b / 2**20:8.2f} MiB")
