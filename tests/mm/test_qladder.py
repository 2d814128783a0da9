"""QLadder: the ladder structure (layer i reads only encoder block i's input), each ladder layer against a
reference built from torch's own attention, the zero-init gate, config errors and the saved file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mm.config import ConfigError
from mm.qladder import LadderLayer, QLadder, QLadderConfig, load_qladder, save_qladder


def _hidden(depth=4, batch=3, tokens=7, width=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, width, generator=gen) for _ in range(depth)]


def _ladder(**config):
    torch.manual_seed(0)
    ladder = QLadder(QLadderConfig(num_queries=5, **config), width=16, depth=4, heads=4)
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up of the two inputs' norms shows
        for name, param in ladder.named_parameters():
            if name.endswith(("bias", "weight")) and param.dim() == 1:
                param.normal_()
    return ladder


def test_ladder_layer_matches_torch_cross_attention_then_mlp():
    layer = _ladder().ladder[0]
    queries, tokens = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    reference = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([layer.to_q.weight, layer.to_k.weight, layer.to_v.weight]))
        reference.in_proj_bias.copy_(torch.cat([layer.to_q.bias, layer.to_k.bias, layer.to_v.bias]))
        reference.out_proj.load_state_dict(layer.to_out.state_dict())
    kv = layer.ln_tokens(tokens)
    attended = queries + reference(layer.ln_query(queries), kv, kv, need_weights=False)[0]
    expected = attended + layer.mlp(layer.ln_mlp(attended))
    torch.testing.assert_close(layer(queries, tokens), expected, rtol=1e-5, atol=1e-5)


def test_ladder_layer_i_reads_only_the_inputs_of_blocks_up_to_i():
    ladder, hidden = _ladder(), _hidden()
    states = ladder(hidden)
    assert [s.shape for s in states] == [(3, 5, 16)] * 4  # queries, whatever the token count
    for changed in range(4):
        perturbed = [h.clone() for h in hidden]
        perturbed[changed] += torch.randn_like(hidden[changed])  # a constant shift would vanish in the norm
        again = ladder(perturbed)
        for i in range(4):
            if i < changed:
                torch.testing.assert_close(again[i], states[i], rtol=0, atol=0)
            else:
                assert (again[i] - states[i]).abs().max() > 1e-3, (changed, i)


def test_taps_choose_which_blocks_feed_the_ladder():
    ladder, hidden = _ladder(layers=[1, 3]), _hidden()
    assert len(ladder.ladder) == 2
    out = ladder.output(hidden)
    untouched = [h.clone() for h in hidden]
    untouched[0] += torch.randn_like(untouched[0])
    untouched[2] += torch.randn_like(untouched[2])
    torch.testing.assert_close(ladder.output(untouched), out, rtol=0, atol=0)
    touched = [h.clone() for h in hidden]
    touched[3] += torch.randn_like(touched[3])
    assert (ladder.output(touched) - out).abs().max() > 1e-3


def test_gate_starts_at_zero_so_the_fused_feature_is_the_frozen_one_and_learns():
    ladder = _ladder()
    frozen, extra = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(ladder.fuse(frozen, extra), frozen, rtol=0, atol=0)
    ladder.fuse(frozen, extra).sum().backward()
    assert ladder.gate.grad is not None and ladder.gate.grad.abs() > 0


def test_only_ladder_parameters_get_gradients_and_the_count_is_the_papers_layer():
    ladder = _ladder()
    hidden = [h.requires_grad_(False) for h in _hidden()]
    ladder.output(hidden).sum().backward()
    assert all(p.grad is not None for n, p in ladder.named_parameters() if n != "gate")
    per_layer = 4 * (16 * 16 + 16) + (16 * 64 + 64) + (64 * 16 + 16) + 3 * 2 * 16  # attn, MLP(4x), 3 norms
    assert sum(p.numel() for p in ladder.parameters()) == 5 * 16 + 4 * per_layer + 1


@pytest.mark.parametrize("bad, match", [
    ({"num_queries": 0}, "num_queries"),
    ({"num_queries": 2.5}, "num_queries"),
    ({"layers": []}, "layers"),
    ({"mlp_ratio": -1.0}, "mlp_ratio"),
])
def test_bad_config_values_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        QLadderConfig(**bad)


def test_config_shape_errors_and_unknown_keys():
    with pytest.raises(ConfigError, match="'layers' must be distinct increasing"):
        QLadder(QLadderConfig(layers=[0, 9]), width=16, depth=4, heads=4)
    with pytest.raises(ConfigError, match="not divisible by heads=3"):
        QLadder(QLadderConfig(heads=3), width=16, depth=4, heads=4)
    with pytest.raises(ConfigError, match="select_layer"):
        QLadder(QLadderConfig(layers=[1], select_layer=-2), width=16, depth=4, heads=4)
    with pytest.raises(ConfigError, match="recipe.yaml: unknown key.*'queries'"):
        QLadderConfig.from_dict({"queries": 4}, source="recipe.yaml")
    with pytest.raises(ValueError, match="inputs of all 4 encoder blocks, got 3"):
        _ladder()(_hidden(depth=3))


def test_save_and_load_round_trip_exactly(tmp_path):
    ladder, hidden = _ladder(layers=[0, 2], mlp_ratio=2.0), _hidden()
    with torch.no_grad():
        ladder.gate.fill_(0.7)
    path = save_qladder(ladder, tmp_path / "ladder.safetensors")
    again = load_qladder(path)
    assert again.config == ladder.config and again.taps == [0, 2]
    torch.testing.assert_close(again.output(hidden), ladder.output(hidden), rtol=0, atol=0)
    assert again.gate.item() == pytest.approx(0.7)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_qladder(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors: not a readable"):
        load_qladder(garbage)


def test_ladder_layers_are_not_lora_targets():
    # Encoder LoRA targets (q_proj, ...) must never match the ladder's own projections.
    names = {n.rpartition(".")[2] for n, _ in LadderLayer(16, 4, 2.0).named_modules()}
    assert not names & {"q_proj", "k_proj", "v_proj", "out_proj"}
