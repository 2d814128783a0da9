"""LoRA on nn.Embedding in PEFT's layout: the defining lookup, the padding row, scaled embeddings, refusals,
and parity with HF PEFT 0.21 (same outputs and merged table; export loads in PEFT, PEFT's files import)."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from safetensors.torch import load_file, save_file
from toys import EMBEDDING_TOYS, TOYS

import mm
from mm.layer import AdaptedEmbedding

TOY = EMBEDDING_TOYS["embedding"]


def _ids() -> torch.Tensor:
    ids = TOY.make_input()
    ids[0, :2] = 0  # the padding row appears
    return ids


def test_update_is_scaled_columns_of_b_a_at_the_ids():
    model = TOY.build()
    mm.attach(model, mm.LoRAConfig(targets=["tokens"], r=4, alpha=6.0))
    layer = model.tokens
    assert isinstance(layer, AdaptedEmbedding) and layer.num_embeddings == 40 and layer.embedding_dim == 16
    adapter = layer.adapters["default"]
    assert adapter.lora_embedding_A.shape == (4, 40) and adapter.lora_embedding_B.shape == (16, 4)
    assert adapter.lora_embedding_A.abs().sum() == 0  # A = 0 at init (PEFT's, loralib's): the base output
    perturb(model, scale=0.5)
    ids = _ids()
    a, b = adapter.lora_embedding_A, adapter.lora_embedding_B
    expected = layer.base.weight[ids] + 1.5 * (b @ a[:, ids.reshape(-1)]).t().reshape(*ids.shape, 16)
    torch.testing.assert_close(layer(ids), expected)


def test_padding_column_of_a_gets_no_gradient_and_the_base_table_none():
    model = TOY.build()
    mm.attach(model, mm.LoRAConfig(targets=["tokens"], r=4))
    perturb(model)
    ids = _ids()
    TOY.run(model, ids).pow(2).sum().backward()
    grad_a = model.tokens.adapters["default"].lora_embedding_A.grad
    assert grad_a[:, 0].abs().sum() == 0  # id 0 is the padding index, as nn.Embedding treats it
    used = ids.unique()
    assert (grad_a[:, used[used != 0]].abs().sum(0) > 0).all()
    unused = torch.ones(40, dtype=torch.bool)
    unused[used] = False
    assert grad_a[:, unused].abs().sum() == 0  # only looked-up rows are touched
    assert model.tokens.base.weight.grad is None


def test_scaled_embedding_scales_the_update_and_still_merges_exactly():
    model = TOY.build()
    model.tokens.embed_scale = 3.0  # as transformers' scaled word embeddings (Gemma) carry
    plain = model.tokens.forward

    def scaled(ids):  # what such a layer computes
        return plain(ids) * 3.0

    model.tokens.forward = scaled
    mm.attach(model, mm.LoRAConfig(targets=["tokens"], r=4))
    perturb(model)
    layer, ids = model.tokens, _ids()
    adapter = layer.adapters["default"]
    expected = scaled(ids) + 3.0 * adapter.delta_weight(layer.base)[ids]
    torch.testing.assert_close(layer(ids), expected)
    mm.merge(model)
    torch.testing.assert_close(layer(ids), expected)


def test_refusals_name_the_layer():
    model = TOY.build()
    with pytest.raises(mm.ConfigError, match="'freeze_a' cannot apply to the embedding 'tokens'"):
        mm.attach(model, mm.LoRAConfig(targets=["tokens"], freeze_a=True))
    with pytest.raises(mm.ConfigError, match="layer 'tokens' is an Embedding, and method 'dylora' does not adapt"):
        mm.attach(model, mm.AdapterConfig.from_dict({"method": "dylora", "targets": ["tokens"]}))
    model.tokens.max_norm = 1.0
    with pytest.raises(mm.ConfigError, match="'tokens' is an nn.Embedding with max_norm=1.0"):
        mm.attach(model, mm.LoRAConfig(targets=["tokens"]))
    assert not list(mm.adapted_layers(model))


def test_all_linear_leaves_embeddings_alone_and_names_reach_them():
    model = TOY.build()
    assert mm.select_targets(model, mm.LoRAConfig(targets=["all-linear"])) == ["head"]
    llama = TOYS["llama"].build()
    chosen = mm.select_targets(llama, mm.LoRAConfig(targets=["embed_tokens", "q_proj"]))
    assert chosen[0] == "model.embed_tokens" and len(chosen) == 3


# --- parity with HF PEFT 0.21 ------------------------------------------------------------------------------

def _peft():
    return pytest.importorskip("peft")


def _peft_embedding(peft_model, name: str):
    return peft_model.base_model.model.get_submodule(name)


def test_same_weights_give_peft_outputs_and_merged_table(tmp_path):
    peft = _peft()
    model = TOY.build()
    mm.attach(model, mm.LoRAConfig(targets=["tokens", "positions"], r=4, alpha=6.0, rslora=True))
    perturb(model, scale=0.3)
    peft_model = peft.get_peft_model(TOY.build(), peft.LoraConfig(
        r=4, lora_alpha=6.0, use_rslora=True, target_modules=["tokens", "positions"])).eval()
    with torch.no_grad():
        for name in ("tokens", "positions"):
            ours, theirs = getattr(model, name).adapters["default"], _peft_embedding(peft_model, name)
            theirs.lora_embedding_A["default"].copy_(ours.lora_embedding_A)
            theirs.lora_embedding_B["default"].copy_(ours.lora_embedding_B)
    ids = _ids()
    expected = TOY.run(peft_model, ids)
    assert (expected - TOY.run(TOY.build(), ids)).abs().max() > 1e-3
    torch.testing.assert_close(TOY.run(model, ids), expected, rtol=1e-5, atol=1e-6)
    peft_delta = _peft_embedding(peft_model, "tokens").get_delta_weight("default")
    torch.testing.assert_close(model.tokens.adapters["default"].delta_weight(model.tokens.base), peft_delta)
    merged = peft_model.merge_and_unload()
    mm.merge(model, unload=True)
    torch.testing.assert_close(model.tokens.weight, merged.tokens.weight)


def test_export_loads_in_peft_and_peft_files_import(tmp_path):
    peft = _peft()
    model = TOY.build()
    mm.attach(model, mm.LoRAConfig(targets=["tokens", "head"], r=4, alpha=8.0))
    perturb(model, scale=0.3)
    ids = _ids()
    expected = TOY.run(model, ids)
    mm.export_peft(model, tmp_path / "ours")
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert "base_model.model.tokens.lora_embedding_A" in keys and "base_model.model.head.lora_A.weight" in keys
    loaded = peft.PeftModel.from_pretrained(TOY.build(), tmp_path / "ours").eval()
    torch.testing.assert_close(TOY.run(loaded, ids), expected, rtol=1e-5, atol=1e-6)
    loaded.save_pretrained(tmp_path / "theirs")  # PEFT's own writer, as a user would hand it over
    back = mm.import_peft(TOY.build(), tmp_path / "theirs")
    assert isinstance(back.tokens, AdaptedEmbedding)
    torch.testing.assert_close(TOY.run(back, ids), expected, rtol=1e-5, atol=1e-6)


def test_import_reads_a_saved_table_and_refuses_wrong_shapes(tmp_path):
    peft = _peft()
    llama = TOYS["llama"]
    trained = llama.build()
    with torch.no_grad():  # a table that differs from the fresh toy's (e.g. trained new tokens)
        trained.model.embed_tokens.weight[-4:].normal_(generator=torch.Generator().manual_seed(5))
    peft_model = peft.get_peft_model(trained, peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"],
                                                              init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "p", save_embedding_layers=True)
    weights = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in tensors
    x = llama.make_input()
    model = mm.import_peft(llama.build(), tmp_path / "p")
    torch.testing.assert_close(model.model.embed_tokens.base.weight, trained.model.embed_tokens.weight)
    torch.testing.assert_close(llama.run(model, x), llama.run(peft_model, x), rtol=1e-5, atol=1e-5)
    tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.zeros(31, 2)
    save_file(tensors, str(weights))
    fresh = llama.build()
    with pytest.raises(mm.AdapterStateError, match=r"embed_tokens\.lora_embedding_B has shape \(31, 2\), model "
                                                   r"expects \(32, 2\)"):
        mm.import_peft(fresh, tmp_path / "p")
    assert not list(mm.adapted_layers(fresh))
    assert torch.equal(fresh.model.embed_tokens.weight, llama.build().model.embed_tokens.weight)
