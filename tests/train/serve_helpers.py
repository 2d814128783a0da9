"""Helpers of the serving tests: the tiny served world (train/serving/tiny.py) and the reference answer."""

from __future__ import annotations

import torch

from train.serving.tiny import WORDS, lora_adapter, make_served_world, tiny_llm

__all__ = ["WORDS", "greedy_alone", "lora_adapter", "make_served_world", "tiny_llm"]


def greedy_alone(model, prompt_ids: list[int], adapter: str | None, max_new_tokens: int, eos: int | None) -> list[int]:
    """The reference: one request, no KV cache, the whole sequence recomputed each step."""
    import mm

    ids, answer = torch.tensor([prompt_ids]), []
    with torch.no_grad(), mm.route(row_adapters=[adapter]):
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == eos:
                break
            answer.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return answer
