"""The router of the mixtures of LoRA experts: top-k softmax in fp32, the balance loss, routing statistics.

Balance loss (Switch Transformer, as MixLoRA uses it): ``E * sum_i f_i * P_i`` with f_i the fraction of the
T tokens routed to expert i (each of a token's k choices counts, as in the MixLoRA authors' code; for top-1
this is the paper's formula) and P_i the mean router probability of expert i. Padding tokens are left out
when the forward runs inside ``mm.route(token_masks={"attention": attention_mask})``. Each router keeps its
own loss (``balance_loss``) and the sums it is made of (``balance_sums``: choices per expert, summed
probabilities, tokens), from which ``concat_balance_loss`` gives the loss over all layers' router logits
concatenated, as MoE-PEFT computes it (``mm.adapters.moe.aux_loss``).

Router init: normal with std ``ROUTER_INIT_STD`` (MixLoRA's ``router_init_range`` 0.02) or Kaiming-uniform
(``nn.Linear``'s default; MoE-PEFT's MoLA routers, ``a = sqrt(5)``).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mm.route import current_route

if TYPE_CHECKING:
    from mm.adapters.moe import MixtureConfig

#: Router weights start small (normal, this std) so early routing is close to uniform, as in MixLoRA.
ROUTER_INIT_STD = 0.02


@dataclass
class Routing:
    """One routing decision: for T tokens, the k chosen experts (T, k) and their gates (T, k)."""

    experts: torch.Tensor
    gates: torch.Tensor


def expert_counts(experts: torch.Tensor, num_experts: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Choices per expert over the (T, k) ``experts``, each token weighted by ``weight`` (T,) if given.

    A scatter-add, not ``torch.bincount``: bincount reads its input's maximum back to the host, a device
    sync per router per step on a GPU.
    """
    flat = experts.reshape(-1)
    ones = torch.ones_like(flat, dtype=torch.float32) if weight is None else (
        weight.to(torch.float32)[:, None].expand(experts.shape).reshape(-1))
    return torch.zeros(num_experts, dtype=torch.float32, device=flat.device).scatter_add_(0, flat, ones)


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``E * sum_i f_i * P_i``: f_i = (choices of expert i) / T over the (T, k) ``experts``, P_i = mean prob.

    ``valid`` (T,) bool leaves padding tokens out of both f and P (as the MixLoRA authors' loss does with the
    attention mask); T is then the number of valid tokens (no valid token: 0).
    """
    num_experts = probs.shape[1]
    weight = torch.ones_like(probs[:, 0]) if valid is None else valid.to(probs.dtype)
    tokens = weight.sum().clamp_min(1.0)
    counts = expert_counts(experts, num_experts, weight).to(probs.dtype)
    mean_probs = (probs * weight[:, None]).sum(0) / tokens
    return num_experts * torch.sum(counts / tokens * mean_probs)


@dataclass
class BalanceSums:
    """What one router's balance loss is made of: choices per expert (E,), router probabilities summed over
    the tokens (E,) (with gradient), and the token count, padding left out."""

    counts: torch.Tensor
    prob_sums: torch.Tensor
    tokens: torch.Tensor


def concat_balance_loss(sums: list[BalanceSums]) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` over the tokens of every router in ``sums`` taken together: the loss of their
    router logits concatenated (MoE-PEFT's MixLoRA loss over all layers), not the mean of per-router losses.
    All routers must have the same E."""
    tokens = torch.stack([s.tokens for s in sums]).sum().clamp_min(1.0)
    counts = torch.stack([s.counts for s in sums]).sum(0)
    prob_sums = torch.stack([s.prob_sums for s in sums]).sum(0)
    return counts.shape[0] * torch.sum((counts / tokens) * (prob_sums / tokens))


#: ``mm.route(token_masks={PADDING_MASK: attention_mask})`` marks the real tokens of a padded batch.
PADDING_MASK = "attention"


def _valid_tokens(tokens: int) -> torch.Tensor | None:
    """The (T,) real-token mask of the current ``mm.route``, when it gives one covering these T tokens."""
    route = current_route()
    mask = None if route is None else route.token_masks.get(PADDING_MASK)
    if mask is None or mask.numel() != tokens:  # another shape of tokens (e.g. a vision tower): no mask
        return None
    return mask.reshape(-1).bool()


class Router(nn.Module):
    """Top-k softmax router; keeps its latest routing (so a block's later projections reuse it), loss, stats."""

    def __init__(self, in_features: int, num_experts: int, config: MixtureConfig, block: str,
                 device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=torch.float32, device=device))
        if config.resolved_router_init == "kaiming":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.weight, std=ROUTER_INIT_STD)
        self.in_features, self.num_experts, self.block = in_features, num_experts, block
        self.top_k, self.renormalize, self.jitter = config.top_k, config.renormalize, config.router_jitter
        self.members: dict[str, int] = {}  # projection -> its input width, filled while attaching
        self._expands: bool | None = None
        self._clear()

    @property
    def expands(self) -> bool:
        """Whole-FFN experts (MixLoRA, top-k > 1): the block has projections reading its input, which expand
        every token into its k (token, expert) rows, and one reading another width, which folds them back."""
        if self._expands is None:  # asked on every forward of every member: worked out once per attach
            self._expands = self.top_k > 1 and any(width != self.in_features for width in self.members.values())
        return self._expands

    def add_member(self, projection: str, in_features: int) -> None:
        """Record a projection that uses this router (while attaching)."""
        self.members[projection] = in_features
        self._expands = None

    def _clear(self) -> None:
        self._input: weakref.ref | None = None
        self.lead: tuple[int, ...] | None = None  # leading shape of the latest routed input
        self.routing: Routing | None = None
        self.balance_loss: torch.Tensor | None = None
        self.balance_sums: BalanceSums | None = None
        self.tokens_per_expert: torch.Tensor | None = None
        self.entropy: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        # The latest routing holds autograd graph tensors, which copy.deepcopy and pickle refuse.
        state = dict(self.__dict__)
        state.update(_input=None, lead=None, routing=None, balance_loss=None, balance_sums=None,
                     tokens_per_expert=None, entropy=None)
        return state

    def extra_repr(self) -> str:
        return f"block={self.block!r}, experts={self.num_experts}, top_k={self.top_k}"

    def route(self, x: torch.Tensor, source: torch.Tensor) -> Routing:
        """Route the (T, in) tokens ``x``; a second call with the same ``source`` tensor reuses the result."""
        if self.routing is not None and self._input is not None and self._input() is source:
            return self.routing
        x = x.float()  # fp32 whatever the model dtype
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        probs = F.linear(x, self.weight.float()).softmax(dim=-1)
        top_probs, experts = probs.topk(self.top_k, dim=-1)
        gates = top_probs / top_probs.sum(-1, keepdim=True) if self.renormalize else top_probs
        self.routing = Routing(experts, gates)
        self._input, self.lead = weakref.ref(source), tuple(source.shape[:-1])
        valid = _valid_tokens(probs.shape[0])
        self.balance_loss = load_balance_loss(probs, experts, valid)
        weight = torch.ones_like(probs[:, 0]) if valid is None else valid.to(probs.dtype)
        self.balance_sums = BalanceSums(expert_counts(experts, self.num_experts, weight),
                                        (probs * weight[:, None]).sum(0), weight.sum())
        with torch.no_grad():  # statistics for logging, kept on the device (no sync until read)
            self.tokens_per_expert = expert_counts(experts, self.num_experts, valid).round().long()
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
            self.entropy = entropy.mean() if valid is None else (
                (entropy * valid).sum() / valid.sum().clamp_min(1))
        return self.routing

    # Called as a module (``router(x, source)``), so hooks that gather sharded parameters (ZeRO-3) see it.
    forward = route

    def reuse(self, tokens: int, where: str) -> Routing:
        """The block's routing for a projection that does not read the block input (down_proj, c_proj)."""
        if self.routing is None or self.routing.experts.shape[0] != tokens:
            have = "none" if self.routing is None else f"{self.routing.experts.shape[0]} tokens"
            raise RuntimeError(
                f"{where}: this projection reuses the routing of block {self.block!r} for {tokens} tokens, but "
                f"the block's router holds {have}; the block's input projections must run first on the same tokens"
            )
        return self.routing
