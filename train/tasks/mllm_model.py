"""A LLaVA-style MLLM: frozen CLIP vision tower (optionally with Arcana's QLadder) -> projector -> image
tokens spliced in at the prompt's ``<image>`` placeholder -> causal LLM with adapters; loss on answers only.

The LLM runs inside ``mm.route(token_masks={"vision": mask})`` with the mask True at the spliced image
tokens, so modality-aware adapters (MM-LoRA) see which token is which without any change to the LLM's
code. Generation is a greedy loop with the KV cache whose first step routes the prompt's mask and whose
later steps (one new text token each) route an all-language mask.

The vision tokens are the patch tokens of one vision block's input (``vision_layer``; -1, the input of
the last block, is LLaVA's "penultimate layer" choice), followed, with a QLadder, by the ladder's query
tokens (Arcana hands both to the LLM). The tower runs without gradients; the ladder reads its block
inputs through forward pre-hooks (``encoders.clip.vision_block_inputs``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.route import route

IGNORE_INDEX = -100


class LlavaModel(nn.Module):
    """``vision`` (an open_clip CLIP, frozen) + ``ladder`` (QLadder or None) + ``projector`` + ``llm``."""

    def __init__(self, vision: nn.Module | None, projector: nn.Module | None, llm: nn.Module, *, image_id: int,
                 pad_id: int, eos_id: int, ladder: nn.Module | None = None, vision_layer: int = -1) -> None:
        super().__init__()
        self.vision, self.ladder, self.projector, self.llm = vision, ladder, projector, llm
        self.image_id, self.pad_id, self.eos_id, self.vision_layer = image_id, pad_id, eos_id, vision_layer
        if vision is not None:
            vision.requires_grad_(False)

    def train(self, mode: bool = True) -> LlavaModel:
        super().train(mode)
        if self.vision is not None:
            self.vision.eval()  # frozen: no dropout whatever the task's mode
        return self

    # ------------------------------------------------------------------------------------- vision side

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(n_images, N, llm width): projected patch tokens (+ ladder queries) of each image."""
        from encoders.clip import vision_block_inputs

        if self.vision is None or self.projector is None:
            raise RuntimeError("this model has no vision tower (stage 'text'); its samples must be text-only")
        visual = self.vision.visual
        with torch.no_grad(), vision_block_inputs(self.vision) as states:
            visual(images)
        prefix = 1 if getattr(visual, "class_embedding", None) is not None else 0
        tokens = states[self.vision_layer][:, prefix:]
        if self.ladder is not None:
            tokens = torch.cat([tokens, self.ladder.output(states).to(tokens.dtype)], dim=1)
        return self.projector(tokens)

    # ------------------------------------------------------------------------------------- splicing

    def splice(self, ids: torch.Tensor, mask: torch.Tensor, images: torch.Tensor | None, has_image: torch.Tensor,
               labels: torch.Tensor | None = None, side: str = "right") -> dict[str, torch.Tensor]:
        """Text embeddings with each image's tokens in place of its ``<image>`` token, re-padded on ``side``.

        Returns inputs_embeds, attention_mask, position_ids, vision_mask (True at image tokens) and, when
        ``labels`` are given, labels with IGNORE_INDEX at image tokens.
        """
        embed = self.llm.get_input_embeddings()
        text = embed(ids.masked_fill(ids == self.image_id, self.pad_id))
        image_embeds = self.image_tokens(images) if images is not None else None
        rows, used = [], 0
        for b in range(ids.shape[0]):
            keep = mask[b].bool()
            row_ids, row_text = ids[b][keep], text[b][keep]
            row_labels = labels[b][keep] if labels is not None else None
            places = (row_ids == self.image_id).nonzero().flatten()
            if bool(has_image[b]):
                if len(places) != 1:
                    raise ValueError(f"batch row {b} has an image but {len(places)} <image> tokens in its text "
                                     "(is max_length cutting the placeholder off?)")
                if image_embeds is None or used >= len(image_embeds):
                    raise ValueError(f"batch row {b} is marked has_image but the batch has too few images")
                p, img = int(places[0]), image_embeds[used].to(row_text.dtype)
                used += 1
                row_text = torch.cat([row_text[:p], img, row_text[p + 1:]])
                is_vision = torch.zeros(len(row_text), dtype=torch.bool, device=ids.device)
                is_vision[p:p + len(img)] = True
                if row_labels is not None:
                    fill = row_labels.new_full((len(img),), IGNORE_INDEX)
                    row_labels = torch.cat([row_labels[:p], fill, row_labels[p + 1:]])
            else:
                if len(places):
                    raise ValueError(f"batch row {b} has an <image> token but no image")
                is_vision = torch.zeros(len(row_text), dtype=torch.bool, device=ids.device)
            rows.append((row_text, is_vision, row_labels))
        return self._pad_rows(rows, side, text.shape[-1])

    def _pad_rows(self, rows: list, side: str, width: int) -> dict[str, torch.Tensor]:
        length = max(len(r[0]) for r in rows)
        first = rows[0][0]
        out = {"inputs_embeds": first.new_zeros(len(rows), length, width),
               "attention_mask": torch.zeros(len(rows), length, dtype=torch.long, device=first.device),
               "vision_mask": torch.zeros(len(rows), length, dtype=torch.bool, device=first.device)}
        if rows[0][2] is not None:
            out["labels"] = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=first.device)
        for b, (row_text, is_vision, row_labels) in enumerate(rows):
            span = slice(0, len(row_text)) if side == "right" else slice(length - len(row_text), length)
            out["inputs_embeds"][b, span] = row_text
            out["attention_mask"][b, span] = 1
            out["vision_mask"][b, span] = is_vision
            if row_labels is not None:
                out["labels"][b, span] = row_labels
        out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return out

    # ------------------------------------------------------------------------------------- LLM passes

    def forward_llm(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        # "attention" keeps padding out of mixture routers' balance loss and statistics.
        with route(token_masks={"vision": inputs["vision_mask"], "attention": inputs["attention_mask"]}):
            return self.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                            position_ids=inputs["position_ids"], **kwargs)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(answer-token cross-entropy, the same detached, answer tokens); the task adds mixtures' balance loss."""
        inputs = self.splice(batch["input_ids"], batch["attention_mask"], batch["images"], batch["has_image"],
                             labels=batch["labels"])
        logits = self.forward_llm(inputs).logits[:, :-1].float()
        target = inputs["labels"][:, 1:]
        count = int((target != IGNORE_INDEX).sum())
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="sum") / max(count, 1)
        return ce, ce.detach(), count

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, images: torch.Tensor | None,
                 has_image: torch.Tensor, max_new_tokens: int = 16) -> list[list[int]]:
        """Greedy answers (token ids, without the end-of-sequence token) for left-padded prompts."""
        inputs = self.splice(prompt_ids, prompt_mask, images, has_image, side="left")
        out = self.forward_llm(inputs, use_cache=True)
        batch = prompt_ids.shape[0]
        answers: list[list[int]] = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
        mask, position = inputs["attention_mask"], inputs["position_ids"][:, -1:]
        embed = self.llm.get_input_embeddings()
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            for b in range(batch):
                if not done[b] and int(token[b]) != self.eos_id:
                    answers[b].append(int(token[b]))
            done |= token == self.eos_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            position = position + 1
            step_inputs = {"inputs_embeds": embed(token[:, None]), "attention_mask": mask, "position_ids": position,
                           "vision_mask": torch.zeros(batch, 1, dtype=torch.bool, device=mask.device)}
            out = self.forward_llm(step_inputs, cache=out.cache, use_cache=True)
        return answers
