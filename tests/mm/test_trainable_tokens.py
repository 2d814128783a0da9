"""Trainable tokens: only the chosen rows of the embedding change in training, the tied LM head follows, merging
writes them into the shared table once, and HF PEFT 0.21's TrainableTokens gives the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mm
from mm.adapters.trainable_tokens import TiedTokensHead, TrainableTokens

CHOSEN = [3, 60, 61]  # e.g. two new tokens at the end of the vocabulary and one re-trained


def tied_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _ids() -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    ids[:, 2], ids[0, 5], ids[1, 7] = 3, 60, 61  # every chosen token occurs
    return ids


def _attached() -> torch.nn.Module:
    model = tied_llama()
    return mm.attach(model, mm.AdapterConfig.from_dict(
        {"method": "trainable_tokens", "targets": ["embed_tokens"], "token_indices": CHOSEN}))


def _effective_table(model) -> torch.Tensor:
    return model.model.embed_tokens(torch.arange(64)).detach()


def test_a_step_changes_only_the_chosen_rows_and_the_tied_head_follows():
    model = _attached()
    assert isinstance(model.lm_head.adapters["default"], TiedTokensHead)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.embed_tokens.adapters.default.trainable_tokens_delta"]
    ids = _ids()
    before_logits = model(ids).logits.detach()
    torch.testing.assert_close(before_logits, tied_llama()(ids).logits)  # starts as the base model
    table_before = _effective_table(model)
    base_before = model.model.embed_tokens.base.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    table_after = _effective_table(model)
    changed = (table_after - table_before).abs().sum(-1) > 0
    assert changed.nonzero().flatten().tolist() == CHOSEN
    assert torch.equal(model.model.embed_tokens.base.weight, base_before)  # the frozen table is untouched
    hidden = model.model(ids).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), F.linear(hidden, table_after))  # logits use the new rows


def test_merge_writes_the_rows_once_into_the_shared_table_and_unmerge_restores():
    model = _attached()
    with torch.no_grad():
        model.model.embed_tokens.adapters["default"].trainable_tokens_delta.normal_()
    ids = _ids()
    expected = model(ids).logits
    table = _effective_table(model)
    mm.merge(model)
    torch.testing.assert_close(model.model.embed_tokens.base.weight, table, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    mm.unmerge(model)
    torch.testing.assert_close(model.model.embed_tokens.base.weight, tied_llama().model.embed_tokens.weight,
                               rtol=0, atol=1e-6)
    mm.merge(model, unload=True)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_save_load_keeps_one_copy_and_reties_the_head(tmp_path):
    model = _attached()
    with torch.no_grad():
        model.model.embed_tokens.adapters["default"].trainable_tokens_delta.normal_()
    path = mm.save_adapters(model, tmp_path / "tokens.safetensors")
    from safetensors.torch import load_file

    assert [k for k in load_file(str(path)) if "delta" in k or "lm_head" in k] == [
        "default/model.embed_tokens.trainable_tokens_delta"]
    fresh = mm.load_adapters(tied_llama(), path)
    ids = _ids()
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    mm.delete_adapter(fresh, "default")
    assert type(fresh.lm_head) is torch.nn.Linear


def test_bad_configs_name_the_key_and_layer():
    with pytest.raises(mm.ConfigError, match="beyond the 64 rows of embedding 'model.embed_tokens'"):
        mm.attach(tied_llama(), mm.AdapterConfig.from_dict(
            {"method": "trainable_tokens", "targets": ["embed_tokens"], "token_indices": [2, 64]}))
    with pytest.raises(mm.ConfigError, match="'token_indices' repeats ids"):
        mm.AdapterConfig.from_dict({"method": "trainable_tokens", "targets": ["e"], "token_indices": [2, 2]})
    with pytest.raises(mm.ConfigError, match="'token_indices' must list at least one"):
        mm.AdapterConfig.from_dict({"method": "trainable_tokens", "targets": ["e"]})
    model = tied_llama()
    with pytest.raises(mm.ConfigError, match="targets must name nn.Embedding layers"):
        mm.attach(model, mm.AdapterConfig.from_dict(
            {"method": "trainable_tokens", "targets": ["q_proj"], "token_indices": [2]}))


def test_same_vectors_give_peft_trainable_tokens_logits():
    peft = pytest.importorskip("peft")
    model = _attached()
    ours = model.model.embed_tokens.adapters["default"]
    assert isinstance(ours, TrainableTokens)
    with torch.no_grad():
        ours.trainable_tokens_delta.normal_()
    peft_model = peft.get_peft_model(tied_llama(), peft.TrainableTokensConfig(
        target_modules=["embed_tokens"], token_indices=CHOSEN)).eval()
    with torch.no_grad():
        peft_model.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].copy_(
            ours.trainable_tokens_delta)
    ids = _ids()
    expected = peft_model(ids).logits
    assert (expected - tied_llama()(ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
