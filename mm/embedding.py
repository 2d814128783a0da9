"""Embeddings as adaptable layers: LoRA on a ``nn.Embedding`` in HF PEFT's layout (``mm.layer.AdaptedEmbedding``
wraps the layer).

PEFT 0.21 keeps ``lora_embedding_A`` (r x num_embeddings) and ``lora_embedding_B`` (embedding_dim x r), A at
zero and B standard normal at init (as loralib), and adds ``scaling * B[:, A[:, ids]]``, i.e. row ``ids`` of
``(B A)^T``, to the looked-up vectors; the A lookup uses the layer's padding index (no gradient reaches the
padding row's column of A). Export and import are thus key-for-key. A scaled embedding (Gemma's, which
multiplies its output by ``embed_scale``) scales the update the same way, as PEFT does.

PEFT applies no dropout to an embedding's update, so ``dropout`` is ignored here too. A layer with ``max_norm``
renormalises the rows it looks up in place, which would rewrite A; such layers are refused.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import Adapter
from mm.config import ConfigError


def is_embedding(module: nn.Module) -> bool:
    """A ``nn.Embedding`` (subclasses too: transformers' scaled word embeddings keep its lookup)."""
    return isinstance(module, nn.Embedding)


def embed_scale(embedding: nn.Module) -> torch.Tensor | float | None:
    """The factor a scaled embedding multiplies its output by (Gemma's ``embed_scale``), else None."""
    return getattr(embedding, "embed_scale", None)


def check_embedding(layer_name: str, embedding: nn.Module, method: str, *, freeze_a: bool = False) -> None:
    """Refuse what an embedding LoRA cannot compute as PEFT does."""
    if embedding.max_norm is not None:
        raise ConfigError(f"{method}: layer {layer_name!r} is an nn.Embedding with max_norm={embedding.max_norm}: "
                          "its lookup renormalises rows in place, which would rewrite lora_embedding_A; exclude it")
    if freeze_a:
        raise ConfigError(f"{method}: key 'freeze_a' cannot apply to the embedding {layer_name!r}: its A starts "
                          "at zero, so a frozen A keeps the update at zero; exclude it or drop freeze_a")


class EmbeddingLoRA(Adapter):
    """``out + scaling * (B A)^T[ids]``, computed as a lookup into A^T (r-wide) and one r x dim product."""

    def __init__(self, embedding: nn.Module, r: int, scaling: float) -> None:
        super().__init__()
        weight = embedding.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        num_embeddings, dim = weight.shape
        self.scaling, self.padding_idx = scaling, embedding.padding_idx
        self.scale_grad_by_freq = embedding.scale_grad_by_freq
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings, dtype=dtype, device=weight.device))
        self.lora_embedding_B = nn.Parameter(torch.randn(dim, r, dtype=dtype, device=weight.device))

    def extra_repr(self) -> str:
        r, num = self.lora_embedding_A.shape
        return f"r={r}, num_embeddings={num}, dim={self.lora_embedding_B.shape[0]}, scaling={self.scaling:g}"

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        hidden = F.embedding(x, self.lora_embedding_A.t(), padding_idx=self.padding_idx,
                             scale_grad_by_freq=self.scale_grad_by_freq)
        update = F.linear(hidden, self.lora_embedding_B) * self.scaling
        scale = embed_scale(base)
        return update if scale is None else update * torch.as_tensor(scale, dtype=update.dtype,
                                                                     device=update.device)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """(B A)^T * scaling: (num_embeddings, dim), the layer's own weight layout (its lookup table).

        ``embed_scale`` multiplies the table's output, not the table, so a merge into a scaled embedding
        stays exact without it.
        """
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling


# --- HF PEFT format: keys ``<prefix><layer>.lora_embedding_A`` / ``_B`` (no ``.weight``), and the table itself
# as ``<prefix><layer>.base_layer.weight`` when PEFT saved the embedding layers too.
PEFT_EMBEDDING_PARTS = ("lora_embedding_A", "lora_embedding_B")


def peft_embedding_key(key: str, prefix: str) -> tuple[str, str] | None:
    """(layer name, part) of a PEFT embedding-LoRA key ('base_layer.weight' for a saved table), else None."""
    found = re.fullmatch(rf"{re.escape(prefix)}(.+)\.(lora_embedding_[AB]|base_layer\.weight)(?:\.[^.]+)?", key)
    if found is None or (found.group(2) == "base_layer.weight" and not key.endswith("base_layer.weight")):
        return None
    return found.group(1), found.group(2)


def peft_embedding_tensors(layer_name: str, adapter: EmbeddingLoRA, prefix: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (a standalone CPU copy each)."""
    return {f"{prefix}{layer_name}.{part}": getattr(adapter, part).detach().cpu().contiguous().clone()
            for part in PEFT_EMBEDDING_PARTS}


@torch.no_grad()
def fill_embedding_lora(layer_name: str, adapter: EmbeddingLoRA, embedding: nn.Module,
                        found: dict[str, torch.Tensor], path: object) -> None:
    """Copy PEFT's tensors of one embedding layer into ``adapter`` (and a saved table into ``embedding``)."""
    from mm.state import AdapterStateError  # late: mm.state imports mm.wrap, which imports this module

    unexpected = sorted(set(found) - {*PEFT_EMBEDDING_PARTS, "base_layer.weight"})
    missing = [part for part in PEFT_EMBEDDING_PARTS if part not in found]
    if unexpected or missing:
        raise AdapterStateError(f"{path}: embedding layer {layer_name!r} has {sorted(found)}; an embedding LoRA "
                                f"holds {list(PEFT_EMBEDDING_PARTS)} (and optionally base_layer.weight)")
    targets = {part: getattr(adapter, part) for part in PEFT_EMBEDDING_PARTS}
    if "base_layer.weight" in found:
        targets["base_layer.weight"] = embedding.weight
    for part, target in targets.items():
        if target.shape != found[part].shape:
            raise AdapterStateError(f"{path}: {layer_name}.{part} has shape {tuple(found[part].shape)}, model "
                                    f"expects {tuple(target.shape)}")
    for part, target in targets.items():
        target.copy_(found[part])
