"""The CLIP prototype classifier: class names through prompt templates give one text prototype per class;
logits are the scaled cosine similarities between image features and the prototypes.

With several templates, each prompt's text feature is L2-normalised, the template features of a class
averaged, and the mean normalised again (CLIP's prompt ensembling). When the text tower carries
trainable adapters (``adapt_text=True``), the prototypes are recomputed at every forward so gradients
reach the text side; under ``torch.no_grad`` (evaluation) they are computed once, without a graph, and
cached until the next gradient-enabled forward or ``refresh()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_prompts(class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """Prompts ordered class-major: class 0 with every template, then class 1, ..."""
    if not class_names:
        raise ValueError("class_prompts: no class names given")
    if not templates:
        raise ValueError("class_prompts: no templates given")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name")
    return [template.format(name.replace("_", " ")) for name in class_names for template in templates]


def prototypes_from_text_features(features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes * templates, dim) class-major text features -> (classes, dim) unit prototypes."""
    if features.shape[0] % num_classes:
        raise ValueError(f"{features.shape[0]} text features do not split into {num_classes} classes")
    per_class = F.normalize(features, dim=-1).view(num_classes, -1, features.shape[-1])
    return F.normalize(per_class.mean(dim=1), dim=-1)


def prototype_logits(image_features: torch.Tensor, prototypes: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``logit_scale * cos(image, prototype)`` for every image and class: (batch, classes)."""
    return logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(prototypes, dim=-1).t()


class ClipPrototypeHead(nn.Module):
    """Classifies image features against text prototypes of ``class_names``.

    ``encode_text`` maps token ids (n, context) to text features (n, dim), e.g. ``clip.encode_text``; the
    head holds no parameters of its own, so what trains is whatever the text encoder exposes.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        tokenizer: Callable[[list[str]], torch.Tensor],
        encode_text: Callable[[torch.Tensor], torch.Tensor],
        logit_scale: float,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        adapt_text: bool = False,
    ) -> None:
        super().__init__()
        self.class_names, self.templates = list(class_names), list(templates)
        self.encode_text, self.logit_scale, self.adapt_text = encode_text, float(logit_scale), adapt_text
        self.register_buffer("tokens", tokenizer(class_prompts(self.class_names, self.templates)), persistent=False)
        self._cached: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prototypes(self) -> torch.Tensor:
        if self.adapt_text and torch.is_grad_enabled():
            self._cached = None  # the text side is changing: the next no-grad call recomputes
            return prototypes_from_text_features(self.encode_text(self.tokens), self.num_classes)
        if self._cached is None:
            with torch.no_grad():
                self._cached = prototypes_from_text_features(self.encode_text(self.tokens), self.num_classes)
        return self._cached

    def refresh(self) -> None:
        """Forget cached prototypes (call after changing the text encoder)."""
        self._cached = None

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return prototype_logits(image_features, self.prototypes(), self.logit_scale)
