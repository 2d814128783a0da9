"""Tiny backbones for tests: an MLP, a ViT on nn.MultiheadAttention, a transformers Llama and GPT-2, and
(``CONV_TOYS``) small convolutional nets: Conv1d, Conv2d, grouped and depthwise Conv2d, Conv3d.

Each toy is deterministic (built from a seed), so two calls give identical base weights: tests compare a
model with adapters against a fresh copy of the same base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 24, d_out: int = 5) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class TinyBlock(nn.Module):
    """A pre-norm transformer block as open_clip builds them: nn.MultiheadAttention + an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, 2 * dim))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    def __init__(self, image: int = 8, patch: int = 2, dim: int = 16, depth: int = 2, heads: int = 4,
                 classes: int = 5, channels: int = 1) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(TinyBlock(dim, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyConvNet(nn.Module):
    """Two target convolutions ``conv1``, ``conv2`` (a 1x1 ``mix`` between them is not targeted), pooled into
    a linear head: enough to see each conv's geometry (stride, padding, dilation, groups) in the output."""

    def __init__(self, conv1: nn.Module, conv2: nn.Module, mix: nn.Module | None = None, classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.act, self.conv2 = conv1, nn.GELU(), conv2
        self.mix = mix if mix is not None else nn.Identity()
        self.head = nn.Linear(conv2.out_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv2(self.mix(self.act(self.conv1(x)))))
        return self.head(h.flatten(2).mean(-1))


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


@dataclass
class Toy:
    """A toy backbone: how to build it, an input, how to run it, and which layers adapters target."""

    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[], torch.Tensor]
    targets: list[str]
    logits: bool = False  # transformers models return an output object with .logits

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return out.logits if self.logits else out


def _seeded(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return factory().eval()

    return build


def _input(shape: tuple[int, ...], *, vocab: int | None = None, seed: int = 1) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if vocab is not None:
            return torch.randint(0, vocab, shape, generator=gen)
        return torch.randn(shape, generator=gen)

    return make


TOYS = {
    "mlp": Toy("mlp", _seeded(TinyMLP), _input((4, 12)), ["fc1", "fc2"]),
    "vit": Toy("vit", _seeded(TinyViT), _input((3, 1, 8, 8)), ["q_proj", "v_proj", "out_proj", "c_fc"]),
    "llama": Toy("llama", tiny_llama, _input((2, 7), vocab=64), ["q_proj", "v_proj", "down_proj"], logits=True),
    "gpt2": Toy("gpt2", tiny_gpt2, _input((2, 7), vocab=64), ["c_attn", "c_fc"], logits=True),
}

# Layers are created in the builders below under the seed, so each build has the same weights. Every conv
# is sized so that a rank-4 LoRA (the contract cases' r) is smaller than it (see mm.conv.check_conv_rank).
CONV_TOYS = {
    "conv1d": Toy("conv1d", _seeded(lambda: TinyConvNet(
        nn.Conv1d(3, 8, 5, padding=2), nn.Conv1d(8, 8, 3, stride=2, padding=2, dilation=2))),
        _input((2, 3, 16)), ["conv1", "conv2"]),
    "conv2d": Toy("conv2d", _seeded(lambda: TinyConvNet(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, (3, 1), stride=2, padding="valid", bias=False))),
        _input((2, 3, 9, 9)), ["conv1", "conv2"]),
    "conv2d-grouped": Toy("conv2d-grouped", _seeded(lambda: TinyConvNet(
        nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4))),
        _input((2, 4, 8, 8)), ["conv1", "conv2"]),
    # Depthwise with a channel multiplier (4, then 2 filters per channel), a pointwise mix between.
    "conv2d-depthwise": Toy("conv2d-depthwise", _seeded(lambda: TinyConvNet(
        nn.Conv2d(4, 16, 3, padding=1, groups=4), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.Conv2d(16, 4, 1))),
        _input((2, 4, 8, 8)), ["conv1", "conv2"]),
    "conv3d": Toy("conv3d", _seeded(lambda: TinyConvNet(
        nn.Conv3d(2, 8, (3, 3, 3), padding=1), nn.Conv3d(8, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))),
        _input((2, 2, 4, 6, 6)), ["conv1", "conv2"]),
}


class TinyEmbedder(nn.Module):
    """Token and position embeddings (the token table has a padding row) into a linear head."""

    def __init__(self, vocab: int = 40, positions: int = 8, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim, padding_idx=0)
        self.positions = nn.Embedding(positions, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[-1], device=ids.device))
        return self.head(torch.nn.functional.gelu(h)).mean(dim=-2)


#: Toys whose targets are nn.Embedding layers, for the methods that adapt embeddings.
EMBEDDING_TOYS = {
    "embedding": Toy("embedding", _seeded(TinyEmbedder), _input((3, 6), vocab=40), ["tokens", "positions"]),
}
