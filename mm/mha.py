"""``nn.MultiheadAttention`` with q, k, v and out as separate linear children.

``nn.MultiheadAttention`` (used by open_clip's towers) packs q/k/v into ``in_proj_weight`` and calls its
``out_proj`` weight directly, so wrapping a child module would be silently ignored. ``SplitMultiheadAttention``
shares the same weights as four ``nn.Linear`` children and computes the same attention, so any adapter
(including routed ones with no weight delta) can attach to each projection in activation space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm.errors import MMTuneError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class UnsupportedModuleError(MMTuneError, TypeError):
    """A module cannot be adapted as configured; the message names it and why."""


def _linear_sharing(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are the given tensors (views share storage, no copy)."""
    layer = nn.Linear(1, 1, bias=bias is not None, device="meta")
    layer.in_features, layer.out_features = weight.shape[1], weight.shape[0]
    layer.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    layer.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return layer


class SplitMultiheadAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention, name: str = "") -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedModuleError(
                f"{name or 'MultiheadAttention'}: add_bias_kv / add_zero_attn are not supported for adapters"
            )
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.kdim, self.vdim, self.dropout, self.batch_first = mha.kdim, mha.vdim, mha.dropout, mha.batch_first
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight
            weights = (w[:e], w[e : 2 * e], w[2 * e :])
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        b = mha.in_proj_bias
        biases = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        self.q_proj = _linear_sharing(weights[0], biases[0])
        self.k_proj = _linear_sharing(weights[1], biases[1])
        self.v_proj = _linear_sharing(weights[2], biases[2])
        self.out_proj = mha.out_proj

    # Code that inspects the packed parameters (e.g. for a dtype) still finds them.
    @property
    def in_proj_weight(self) -> torch.Tensor:
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    def to_mha(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` with the current (possibly merged) base weights."""
        layers = [getattr(self, p) for p in PROJECTIONS]
        bases = [getattr(m, "base", m) for m in layers]
        has_bias = bases[0].bias is not None
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=has_bias, kdim=self.kdim,
            vdim=self.vdim, batch_first=self.batch_first, device=bases[0].weight.device,
            dtype=bases[0].weight.dtype,
        )
        with torch.no_grad():
            if self._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([b.weight for b in bases[:3]]))
            else:
                for attr, b in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), bases, strict=False):
                    getattr(mha, attr).copy_(b.weight)
            if has_bias:
                mha.in_proj_bias.copy_(torch.cat([b.bias for b in bases[:3]]))
        mha.out_proj = bases[3]
        mha.requires_grad_(False)
        return mha

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        unbatched = query.dim() == 2
        if unbatched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt_len, src_len = query.shape[0], query.shape[1], key.shape[1]
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        mask = self._additive_mask(attn_mask, key_padding_mask, n, tgt_len, src_len, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / (self.head_dim**0.5)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(dim=-1), p=p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = self.attention(q, k, v, mask, p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt_len, self.embed_dim))
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  dropout_p: float) -> torch.Tensor:
        """Exact attention of (N, heads, L, d) tensors; ``mm.limits_path`` may replace it on an instance."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _additive_mask(
        self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int,
        tgt_len: int, src_len: int, dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """Both masks as one float mask broadcastable to (N, heads, L, S); bool True means "masked out"."""
        mask = None
        if attn_mask is not None:
            mask = _as_additive(attn_mask, dtype)
            mask = mask.view(1, 1, tgt_len, src_len) if mask.dim() == 2 else mask.view(
                n, self.num_heads, tgt_len, src_len)
        if key_padding_mask is not None:
            pad = _as_additive(key_padding_mask, dtype).view(n, 1, 1, src_len)
            mask = pad if mask is None else mask + pad
        return mask


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)
