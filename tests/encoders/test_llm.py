"""encoders.llm: tiny Llama, local-folder loading, the offline word-level tokenizer, <image>, targets."""

from __future__ import annotations

import pytest
import torch
from toys import tiny_gpt2

import mm
from encoders.llm import (
    IMAGE_TOKEN,
    LLMLoadError,
    TinyLLMConfig,
    attention_targets,
    ensure_image_token,
    hidden_size,
    load_llm,
    load_tokenizer,
    mlp_targets,
    tiny_llm,
    word_tokenizer,
)

TEXTS = ["USER: <image> how many shapes are there? ASSISTANT: there are three red circles.", "what digit?"]


def test_word_tokenizer_is_deterministic_and_keeps_image_whole():
    tok = word_tokenizer(TEXTS)
    assert word_tokenizer(list(reversed(TEXTS))).get_vocab() == tok.get_vocab()
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    ids = tok("How many <image> circles?", add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 1 and len(ids) == 5
    assert tok.decode(ids) == "how many <image> circles ?"
    assert "image" not in tok.get_vocab() and "<" not in tok.get_vocab()  # the placeholder is not split into words
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


@pytest.mark.parametrize("form", ["folder", "file"])
def test_tokenizer_round_trips_offline(tmp_path, form):
    tok = word_tokenizer(TEXTS)
    if form == "folder":
        tok.save_pretrained(tmp_path / "tok")
        path = tmp_path / "tok"
    else:
        tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
        path = tmp_path / "tokenizer.json"
    back = load_tokenizer(str(path))
    text = "there are three <image> circles."
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert (back.pad_token_id, back.eos_token_id, back.bos_token_id) == (0, 3, 2)
    with pytest.raises(LLMLoadError, match="nope"):
        load_tokenizer(str(tmp_path / "nope"))


def test_tiny_llm_is_seeded_and_loads_back_from_a_local_folder(tmp_path):
    config = TinyLLMConfig(hidden_size=32, intermediate_size=64, layers=1, heads=2, kv_heads=1)
    a, b = tiny_llm(40, config, seed=1), tiny_llm(40, config, seed=1)
    ids = torch.randint(0, 40, (2, 5))
    torch.testing.assert_close(a(ids).logits, b(ids).logits)
    assert hidden_size(a) == 32 and a.config.vocab_size == 40
    a.save_pretrained(tmp_path / "llm")
    loaded = load_llm(str(tmp_path / "llm"))
    torch.testing.assert_close(loaded(ids).logits, a(ids).logits)
    with pytest.raises(LLMLoadError, match="no such model folder"):
        load_llm(str(tmp_path / "missing"))


def test_ensure_image_token_adds_it_and_grows_the_embeddings():
    tok = word_tokenizer(["hello world"], specials=["<pad>", "<unk>", "<s>", "</s>"])
    model = tiny_llm(len(tok), TinyLLMConfig(hidden_size=16, intermediate_size=32, layers=1, heads=2, kv_heads=1))
    assert IMAGE_TOKEN not in tok.get_vocab()
    image_id = ensure_image_token(tok, model)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == image_id == len(tok) - 1
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert tok("hello <image>", add_special_tokens=False)["input_ids"][-1] == image_id
    assert ensure_image_token(tok, model) == image_id  # idempotent


def test_ensure_image_token_sets_a_missing_pad_to_eos():
    tok = word_tokenizer(["a b"], specials=["<unk>", "</s>"])
    assert tok.pad_token_id is None
    ensure_image_token(tok)
    assert tok.pad_token_id == tok.eos_token_id


def test_default_targets_by_family_attach():
    llama = tiny_llm(20, TinyLLMConfig(hidden_size=16, intermediate_size=32, layers=2, heads=2, kv_heads=1))
    assert attention_targets(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert mlp_targets(llama) == ["gate_proj", "up_proj", "down_proj"]
    assert len(mm.select_targets(llama, mm.LoRAConfig(targets=attention_targets(llama) + mlp_targets(llama)))) == 14
    gpt2 = tiny_gpt2()
    chosen = mm.select_targets(gpt2, mm.LoRAConfig(targets=mlp_targets(gpt2)))
    assert chosen == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc",
                      "transformer.h.1.mlp.c_proj"]
    with pytest.raises(LLMLoadError, match="unknown projection names"):
        attention_targets(torch.nn.Linear(2, 2))
