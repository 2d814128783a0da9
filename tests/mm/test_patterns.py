"""LoRA's rank_pattern / alpha_pattern: per-layer rank and alpha by PEFT's matching rule, through attach,
save/load and PEFT configs."""

from __future__ import annotations

import json

import pytest
import torch
from contract_cases import perturb
from toys import TOYS

import mm
from mm.adapters.dora import DoRAConfig

peft = pytest.importorskip("peft")


def _ranks(model) -> dict[str, tuple[int, float]]:
    return {name: (layer.adapters["default"].lora_A.shape[0], layer.adapters["default"].scaling)
            for name, layer in mm.adapted_layers(model)}


def test_named_layers_get_their_rank_and_alpha():
    toy = TOYS["llama"]
    model = toy.build()
    config = mm.LoRAConfig(targets=toy.targets, r=4, alpha=8.0,
                           rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                           alpha_pattern={r"layers\.0\..*_proj": 3.0})
    mm.attach(model, config)
    ranks = _ranks(model)
    assert ranks["model.layers.1.self_attn.q_proj"] == (2, 8.0 / 2)
    assert ranks["model.layers.0.self_attn.q_proj"] == (4, 3.0 / 4)  # alpha only
    assert ranks["model.layers.0.mlp.down_proj"] == (6, 3.0 / 6)  # both
    assert ranks["model.layers.1.mlp.down_proj"] == (6, 8.0 / 6)
    assert ranks["model.layers.1.self_attn.v_proj"] == (4, 8.0 / 4)  # neither


def test_first_matching_pattern_wins_and_suffix_needs_a_dot():
    model = TOYS["mlp"].build()
    mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, rank_pattern={"fc1": 3, "fc.": 2}))
    assert _ranks(model)["fc1"][0] == 3 and _ranks(model)["fc2"][0] == 2  # "fc." matches fc1 too: first wins
    for patterns, unused in (({"c1": 2}, "c1"), ({"fc.": 2, "fc1": 3}, "fc1")):  # 'fc1' != '.c1'; shadowed
        model = TOYS["mlp"].build()
        # A warning, as PEFT's: a config reused on fewer layers keeps working; a typo is still reported.
        with pytest.warns(UserWarning, match=rf"key 'rank_pattern': pattern\(s\) \['{unused}'\] decide no"):
            mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, rank_pattern=patterns))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("rank_pattern", {"fc1": 0}, "must map to an integer >= 1, got 0"),
    ("rank_pattern", {"fc1": 2.5}, "must map to an integer >= 1, got 2.5"),
    ("alpha_pattern", {"fc1": -1.0}, "must map to a positive number"),
    ("rank_pattern", {"fc(": 2}, "is not a valid regular expression"),
])
def test_bad_patterns_are_config_errors(key, value, message):
    with pytest.raises(mm.ConfigError, match=rf"lora: key '{key}': .*{message}"):
        mm.LoRAConfig(targets=["fc1"], **{key: value})


def test_save_load_round_trip_keeps_per_layer_ranks(tmp_path):
    toy = TOYS["mlp"]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, rank_pattern={"fc2": 7}, alpha_pattern={"fc1": 2.0}))
    perturb(model)
    path = mm.save_adapters(model, tmp_path / "a.safetensors")
    fresh = mm.load_adapters(toy.build(), path)
    assert _ranks(fresh) == _ranks(model)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_patterns_import_with_same_outputs(dora, tmp_path):
    toy = TOYS["llama"]
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=toy.targets, init_lora_weights=False,
                             use_dora=dora, rank_pattern={"down_proj": 2, "unused_in_this_model": 5},
                             alpha_pattern={"layers.1.self_attn.v_proj": 3})
    peft_model = peft.get_peft_model(toy.build(), config).eval()
    x = toy.make_input()
    expected = toy.run(peft_model, x)
    peft_model.save_pretrained(tmp_path / "peft")
    model = mm.import_peft(toy.build(), tmp_path / "peft")
    ours = mm.adapter_config(model, "default")
    assert isinstance(ours, DoRAConfig) is dora
    assert ours.rank_pattern == {"down_proj": 2}  # PEFT's patterns that decide no layer are dropped
    assert _ranks(model)["model.layers.1.self_attn.v_proj"] == (4, 3 / 4)
    torch.testing.assert_close(toy.run(model, x), expected, rtol=1e-5, atol=1e-5)


def test_export_writes_patterns_peft_honours(tmp_path):
    toy = TOYS["llama"]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=4, alpha=8.0, rank_pattern={"q_proj": 2},
                                   alpha_pattern={"down_proj": 16.0}))
    perturb(model, scale=0.2)
    expected = toy.run(model, x)
    mm.export_peft(model, tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {"q_proj": 2} and written["alpha_pattern"] == {"down_proj": 16.0}
    peft_model = peft.PeftModel.from_pretrained(toy.build(), tmp_path / "peft").eval()
    torch.testing.assert_close(toy.run(peft_model, x), expected, rtol=1e-5, atol=1e-5)
