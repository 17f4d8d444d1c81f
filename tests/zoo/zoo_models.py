"""The zoo: real architectures from transformers configs (random init, no download), tiny sizes.

Each entry builds a fresh model and a deterministic batch source, and says what the tests expect
to see: one normalisation module and one activation module whose per-channel moments are checked
against a brute-force reference, with the channel axis and count a reader of the architecture
would name, and the blocks to wrap for gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

IMG = 32


@dataclass
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], dict]  # step → model kwargs (labels included)
    probes: dict = field(default_factory=dict)  # layer name → (channel axis, channels) to check by brute force
    blocks: tuple[str, ...] = ()  # names of blocks to checkpoint (parents must index them)
    family: str = ""


def _images(step: int, n: int = 4, labels: int = 3) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "pixel_values": torch.randn(n, 3, IMG, IMG, generator=g),
        "labels": torch.randint(0, labels, (n,), generator=g),
    }


def _tokens(step: int, n: int = 4, length: int = 12, vocab: int = 64, lm: bool = True) -> dict:
    g = torch.Generator().manual_seed(2000 + step)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    if lm:
        return {"input_ids": ids, "labels": ids.clone()}
    return {"input_ids": ids, "labels": torch.randint(0, 3, (n,), generator=g)}


def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                       num_labels=3)  # fmt: skip
    return ResNetForImageClassification(cfg)


def _convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=3)
    return ConvNextForImageClassification(cfg)


def _mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(num_channels=3, image_size=IMG, depth_multiplier=0.35, num_labels=3)
    return MobileNetV2ForImageClassification(cfg)


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=IMG, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=3)  # fmt: skip
    return ViTForImageClassification(cfg)


def _swin():
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(image_size=IMG, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                     window_size=4, num_labels=3)  # fmt: skip
    return SwinForImageClassification(cfg)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, num_labels=3)  # fmt: skip
    return BertForSequenceClassification(cfg)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg)


ZOO: list[ZooModel] = [
    ZooModel("resnet", _resnet, _images, {"resnet.embedder.embedder.normalization": (1, 8),
                                          "resnet.embedder.embedder.activation": (1, 8)},
             blocks=("resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.0"), family="conv"),
    ZooModel("convnext", _convnext, _images, {"convnext.embeddings.layernorm": (1, 16),
                                              "convnext.encoder.stages.0.layers.0.act": (-1, 64),
                                              "convnext.encoder.stages.0.layers.0": (1, 16)},
             blocks=("convnext.encoder.stages.0.layers.0", "convnext.encoder.stages.1.layers.0"), family="conv"),
    ZooModel("mobilenet_v2", _mobilenet_v2, _images, {"mobilenet_v2.conv_stem.first_conv.normalization": (1, 16),
                                                      "mobilenet_v2.conv_stem.first_conv.activation": (1, 16)},
             blocks=("mobilenet_v2.layer.0", "mobilenet_v2.layer.1"), family="conv"),
    ZooModel("vit", _vit, _images, {"vit.layers.0.layernorm_before": (-1, 32),
                                    "vit.layers.0.mlp.activation_fn": (-1, 64)},
             blocks=("vit.layers.0", "vit.layers.1"), family="vision-transformer"),
    ZooModel("swin", _swin, _images, {"swin.embeddings.norm": (-1, 16),
                                      "swin.encoder.layers.0.blocks.0.mlp.activation_fn": (-1, 64)},
             blocks=("swin.encoder.layers.0.blocks.0", "swin.encoder.layers.1.blocks.0"), family="vision-transformer"),
    ZooModel("bert", _bert, lambda s: _tokens(s, lm=False), {"bert.embeddings.LayerNorm": (-1, 32),
                                                              "bert.encoder.layer.0.intermediate.intermediate_act_fn": (-1, 64)},
             blocks=("bert.encoder.layer.0", "bert.encoder.layer.1"), family="text"),
    ZooModel("gpt2", _gpt2, _tokens, {"transformer.h.0.ln_1": (-1, 32), "transformer.h.0.mlp.act": (-1, 128)},
             blocks=("transformer.h.0", "transformer.h.1"), family="text"),
    ZooModel("llama", _llama, _tokens, {"model.layers.0.input_layernorm": (-1, 32),
                                        "model.layers.0.mlp.act_fn": (-1, 64)},
             blocks=("model.layers.0", "model.layers.1"), family="text"),
    ZooModel("qwen2", _qwen2, _tokens, {"model.layers.0.post_attention_layernorm": (-1, 32),
                                        "model.layers.0.mlp.act_fn": (-1, 64)},
             blocks=("model.layers.0", "model.layers.1"), family="text"),
    ZooModel("t5", _t5, _tokens, {"encoder.block.0.layer.0.layer_norm": (-1, 32),
                                  "encoder.block.0.layer.1.DenseReluDense.act": (-1, 64)},
             blocks=(), family="text"),
]  # fmt: skip
BY_NAME = {z.name: z for z in ZOO}


def build(z: ZooModel, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = z.build()
    m.train()
    return m


def train(model: nn.Module, z: ZooModel, steps: int = 2, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """AdamW steps on the zoo batches; returns the losses (the RNG is seeded, so dropout repeats)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        out = model(**z.batch(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


def submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def wrap_checkpoint(model: nn.Module, names: tuple[str, ...], reentrant: bool) -> None:
    """Replace each named block by torch's checkpoint wrapper (reentrant or not), in place."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        block = parent.get_submodule(leaf)
        wrapped = checkpoint_wrapper(block, checkpoint_impl=impl)
        if isinstance(parent, (nn.ModuleList, nn.Sequential)) and leaf.isdigit():
            parent[int(leaf)] = wrapped
        else:
            setattr(parent, leaf, wrapped)


def is_activation_module(m: nn.Module) -> bool:
    """The test's own definition (independent of normscope.roles): activation classes of torch and transformers."""
    origin = type(m).__module__
    return origin == "torch.nn.modules.activation" or origin.startswith("transformers.activations")


def is_norm_module(m: nn.Module) -> bool:
    """The test's own definition: every leaf *Norm* class (torch's, transformers', channels-first LN)."""
    return "Norm" in type(m).__name__ and not any(True for _ in m.children())
