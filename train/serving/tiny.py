"""A tiny served world for tests, demos and the serving scripts: a Llama saved with ``save_pretrained``,
its word tokenizer folder, and LoRA adapter files (mmtune safetensors) that change its answers."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(60)] + ["hello", "world", "tell", "me", "a", "story", "about", "cats"]


def tiny_llm(vocab_size: int, seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def lora_adapter(model, name: str, seed: int, *, r: int = 4, targets=("q_proj", "v_proj", "down_proj")) -> None:
    """Attach LoRA ``name`` with random (non-zero) A and B, so its answers differ from the base's."""
    import mm

    mm.attach(model, mm.LoRAConfig(targets=list(targets), r=r, alpha=2 * r), name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".{name}." in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def make_served_world(folder: str | Path, adapters: tuple[str, ...] = ("alpha", "beta"), *, hidden: int = 64
                      ) -> dict[str, Path]:
    """``folder``/model (LLM + tokenizer) and ``folder``/adapters/<name>.safetensors, one adapter each."""
    from transformers import AutoTokenizer

    import mm
    from data.fake_text import make_tokenizer_folder

    folder = Path(folder)
    model_dir = make_tokenizer_folder(folder / "model", [" ".join(WORDS)])
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    model = tiny_llm(vocab, hidden=hidden)
    model.save_pretrained(model_dir)
    (folder / "adapters").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(adapters):
        lora_adapter(model, name, seed=100 + i)
        mm.save_adapters(model, folder / "adapters" / f"{name}.safetensors", [name])
        mm.delete_adapter(model, name)
    return {"model": model_dir, "adapters": folder / "adapters"}
