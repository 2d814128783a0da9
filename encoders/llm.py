"""Causal language models from transformers: by hub name or local folder, or a tiny Llama from sizes
(tests, demos), with a tokenizer that works offline and the ``<image>`` placeholder token an MLLM needs.

Real users pass a local folder (or a hub name, which needs the network) holding the model and its
tokenizer. Tests and the demo build a word-level tokenizer from their own texts (``word_tokenizer``):
a closed vocabulary, no download, saved and reloaded like any transformers tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.errors import MMTuneError

#: The placeholder an MLLM prompt carries where the image's tokens go.
IMAGE_TOKEN = "<image>"
#: Special tokens of the word-level tokenizer (pad first: id 0).
WORD_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)
WORD_ROLES = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}

#: Attention and MLP projection names by model family (module-name suffixes for ``mm.attach``).
ATTENTION_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "gpt2": ["c_attn", "attn.c_proj"]}
MLP_TARGETS = {"llama": ["gate_proj", "up_proj", "down_proj"], "gpt2": ["c_fc", "mlp.c_proj"]}


class LLMLoadError(MMTuneError, RuntimeError):
    """The model or tokenizer could not be loaded; the message names the path or name and what to do."""


@dataclass
class TinyLLMConfig:
    """Sizes of a random-init Llama for tests and demos."""

    hidden_size: int = field(default=64, metadata={"help": "Tiny model: hidden size."})
    intermediate_size: int = field(default=128, metadata={"help": "Tiny model: MLP width."})
    layers: int = field(default=2, metadata={"help": "Tiny model: decoder layers."})
    heads: int = field(default=4, metadata={"help": "Tiny model: attention heads."})
    kv_heads: int = field(default=2, metadata={"help": "Tiny model: key/value heads."})
    max_positions: int = field(default=512, metadata={"help": "Tiny model: longest sequence."})


def tiny_llm(vocab_size: int, config: TinyLLMConfig | None = None, *, pad_token_id: int | None = 0,
             seed: int | None = None) -> nn.Module:
    """A random-init ``LlamaForCausalLM`` of the given sizes (``seed`` makes it reproducible)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = config or TinyLLMConfig()
    if seed is not None:
        torch.manual_seed(seed)
    llama = LlamaConfig(vocab_size=vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
                        max_position_embeddings=c.max_positions, pad_token_id=pad_token_id)
    return LlamaForCausalLM(llama)


def load_llm(name_or_path: str, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM from a local folder or a hub name (the latter needs the network)."""
    from transformers import AutoModelForCausalLM

    local = Path(name_or_path).expanduser()
    if not local.exists() and name_or_path.startswith((".", "/", "~")):
        raise LLMLoadError(f"{name_or_path}: no such model folder")
    try:
        return AutoModelForCausalLM.from_pretrained(str(local) if local.exists() else name_or_path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise LLMLoadError(f"could not load causal LM {name_or_path!r} ({type(err).__name__}: {str(err)[:400]}); "
                           "on an offline machine pass a local folder saved with save_pretrained") from err


def load_tokenizer(name_or_path: str) -> Any:
    """A transformers tokenizer from a local folder, a ``tokenizer.json`` file, or a hub name."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(name_or_path).expanduser()
    if path.is_file():  # a bare tokenizer.json knows no roles: take the word tokenizer's names if present
        try:
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception for a malformed file
            raise LLMLoadError(f"{path}: not a tokenizers JSON file ({type(err).__name__}: {str(err)[:300]})") from None
        vocab = tokenizer.get_vocab()
        tokenizer.add_special_tokens({k: v for k, v in WORD_ROLES.items() if v in vocab})
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path)
    except (OSError, ValueError) as err:
        raise LLMLoadError(f"could not load a tokenizer from {name_or_path!r} ({type(err).__name__}: "
                           f"{str(err)[:400]}); pass a local folder or tokenizer.json") from err


def word_tokenizer(texts: Iterable[str], *, specials: Iterable[str] = WORD_SPECIALS) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is every word and punctuation run in
    ``texts`` (sorted, so the same texts give the same ids), lower-cased, plus the special tokens."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(specials))
    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in texts:
        for special in specials:  # matched whole by the tokenizer, never split into words
            text = text.replace(special, " ")
        words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    words = sorted(words - set(specials))
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>" if "<unk>" in vocab else specials[0]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, **{k: v for k, v in WORD_ROLES.items() if v in vocab},
        additional_special_tokens=[s for s in specials if s not in WORD_ROLES.values()])


def ensure_image_token(tokenizer: Any, model: nn.Module | None = None) -> int:
    """The id of ``<image>``, added as a special token if the tokenizer lacks it (the model's embeddings
    then grow to match). A pad token is set too (the eos token) where the tokenizer has none."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise LLMLoadError("the tokenizer has neither a pad nor an eos token; give it a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if len(tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]) != 1:
        raise LLMLoadError(f"the tokenizer splits {IMAGE_TOKEN!r} into several tokens; add it as a special token")
    if model is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return image_id


def model_family(model: nn.Module) -> str:
    """'llama' for Llama-style projections (q/k/v/o, gate/up/down: Llama, Mistral, Qwen...), 'gpt2' for Conv1D."""
    names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    if {"q_proj", "gate_proj"} <= names:
        return "llama"
    if {"c_attn", "c_fc"} <= names:
        return "gpt2"
    raise LLMLoadError(f"{type(model).__name__}: unknown projection names; give adapter targets explicitly")


def attention_targets(model: nn.Module) -> list[str]:
    return list(ATTENTION_TARGETS[model_family(model)])


def mlp_targets(model: nn.Module) -> list[str]:
    return list(MLP_TARGETS[model_family(model)])


def hidden_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().embedding_dim)
