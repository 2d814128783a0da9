"""Trainable tokens (HF PEFT's ``TrainableTokensConfig``): train only chosen rows of an embedding table, e.g. the
vectors of newly added tokens, and nothing else of it.

Each targeted ``nn.Embedding`` gets ``trainable_tokens_delta`` (k x dim), the current vectors of tokens
``token_indices`` (started at their base rows, so the model starts unchanged). Its effective table is the base
table with those k rows replaced, as PEFT's ``index_copy``; here the replacement is added as ``values -
original`` on the looked-up rows, so the frozen base lookup is reused and other adapters still add on top.

A tied output head (an ``nn.Linear`` whose weight is that same table, transformers' ``tie_word_embeddings``)
follows: it gets a ``TiedTokensHead`` that reads the embedding adapter's values (no parameters of its own), so
the logits of those tokens use the trained vectors, and merging writes the rows once into the shared table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter
from mm.config import AdapterConfig, ConfigError
from mm.embedding import embed_scale


@ADAPTERS.register("trainable_tokens")
@dataclass
class TrainableTokensConfig(AdapterConfig):
    """Trainable tokens: only the rows of chosen token ids of an embedding (and its tied head) train."""

    method: ClassVar[str] = "trainable_tokens"
    layer_kinds: ClassVar[tuple[str, ...]] = ("embedding",)

    token_indices: list[int] = field(
        default_factory=list, metadata={"help": "Token ids whose embedding rows train (e.g. newly added tokens)."})

    def validate(self) -> None:
        super().validate()
        if not self.token_indices:
            raise ConfigError("trainable_tokens: key 'token_indices' must list at least one token id")
        if min(self.token_indices) < 0:
            raise ConfigError(f"trainable_tokens: key 'token_indices' holds negative ids {sorted(i for i in self.token_indices if i < 0)}")
        if len(set(self.token_indices)) != len(self.token_indices):
            raise ConfigError(f"trainable_tokens: key 'token_indices' repeats ids: {self.token_indices}")

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> Adapter:
        raise ConfigError("trainable_tokens: targets must name nn.Embedding layers (e.g. 'embed_tokens'); a "
                          "linear layer was targeted. A head tied to the embedding follows without being named")

    def build_embedding(self, layer_name: str, embedding: nn.Module) -> TrainableTokens:
        num = embedding.num_embeddings
        too_large = sorted(i for i in self.token_indices if i >= num)
        if too_large:
            raise ConfigError(f"trainable_tokens: key 'token_indices' holds ids {too_large} beyond the "
                              f"{num} rows of embedding {layer_name!r}")
        return TrainableTokens(embedding, self.token_indices)

    def tie_outputs(self, model: nn.Module, name: str, targets: list[str], *, active: bool) -> None:
        """Give every linear layer that shares a targeted embedding's table a ``TiedTokensHead``."""
        from mm.layer import AdaptedLinear  # late: mm.layer imports the adapter package
        from mm.wrap import _replace, adapted_layers

        tables = {id(layer.base.weight): layer.adapters[name] for layer_name, layer in adapted_layers(model)
                  if layer_name in targets and isinstance(layer.adapters[name], TrainableTokens)}
        for module_name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and id(module.weight) in tables:
                head = AdaptedLinear(module).train(module.training)
                _replace(model, module_name, head)
            elif isinstance(module, AdaptedLinear) and isinstance(module.base, nn.Linear) and id(
                    module.base.weight) in tables:
                head = module
            else:
                continue
            head.add(name, TiedTokensHead(tables[id(head.base.weight)]).train(head.training), active=active)
            head.adapters[name].config = self


class TrainableTokens(Adapter):
    """``trainable_tokens_delta`` (k x dim): the trained vectors of ``token_indices``, replacing their rows."""

    def __init__(self, embedding: nn.Module, token_indices: list[int]) -> None:
        super().__init__()
        weight = embedding.weight
        indices = torch.tensor(token_indices, dtype=torch.long, device=weight.device)
        # Which slot of the delta each id uses (-1: not trainable): one gather per forward, no search.
        slots = torch.full((embedding.num_embeddings,), -1, dtype=torch.long, device=weight.device)
        slots[indices] = torch.arange(len(token_indices), device=weight.device)
        self.register_buffer("token_indices", indices, persistent=False)
        self.register_buffer("slots", slots, persistent=False)
        # The base rows at attach time: what unmerging restores, and what the values replace.
        self.register_buffer("original", weight[indices].detach().clone(), persistent=False)
        self.trainable_tokens_delta = nn.Parameter(weight[indices].detach().clone())
        self.padding_idx = embedding.padding_idx

    def extra_repr(self) -> str:
        return f"tokens={self.token_indices.tolist()}"

    def replacement(self) -> torch.Tensor:
        """(k, dim): what adding to the base rows gives the trained vectors."""
        return self.trainable_tokens_delta - self.original

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        slot = self.slots[x]
        chosen = (slot >= 0).unsqueeze(-1)
        update = F.embedding(slot.clamp(min=0), self.replacement()) * chosen
        if self.padding_idx is not None:  # nn.Embedding gives the padding row no gradient (PEFT's lookup too)
            update = torch.where((x == self.padding_idx).unsqueeze(-1), update.detach(), update)
        scale = embed_scale(base)
        return update if scale is None else update * torch.as_tensor(scale, dtype=update.dtype, device=update.device)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """Zero but the chosen rows, which become ``values - original``: merging writes the trained vectors."""
        table = torch.zeros_like(base.weight)
        return table.index_copy(0, self.token_indices, self.replacement().to(table.dtype))


class TiedTokensHead(Adapter):
    """On a head tied to a trainable-tokens embedding: logits of the chosen tokens use the trained vectors.

    Holds no parameters: it reads the embedding adapter's (kept out of this module's state, so the values are
    saved once). Merging adds nothing here: the embedding's merge already writes the shared table.
    """

    def __init__(self, tokens: TrainableTokens) -> None:
        super().__init__()
        self._tokens = [tokens]  # a list, so the embedding adapter is not registered (and saved) twice

    @property
    def tokens(self) -> TrainableTokens:
        return self._tokens[0]

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        replacement = self.tokens.replacement().to(x.dtype)
        columns = F.linear(x, replacement)  # (..., k): the chosen logits' change
        zeros = x.new_zeros((*x.shape[:-1], base.weight.shape[0]))
        return zeros.index_add(-1, self.tokens.token_indices, columns)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return torch.zeros_like(base.weight)
