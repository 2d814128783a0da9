"""FFA-LoRA federated averaging (averaging B is exact), DP-SGD on clients (clipping, noise, no-op case), and
``mmtune federate`` running both from a recipe."""

from __future__ import annotations

import math

import pytest
import torch
from toys import TinyMLP

import mm
from train.rules.federated import (
    DPConfig,
    average_states,
    dp_sgd_step,
    federated_average,
    per_sample_gradients,
    privatize,
)


def _model(freeze_a: bool = True, dtype=torch.float64) -> TinyMLP:
    torch.manual_seed(0)
    model = TinyMLP().to(dtype)
    return mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, alpha=8.0, freeze_a=freeze_a))


def _clients(n: int = 3, batches: int = 2, dtype=torch.float64) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Client c sees inputs shifted by 0.5 c (non-IID); every client's label is the same function of x."""
    gen = torch.Generator().manual_seed(5)
    clients = []
    for c in range(n):
        inputs = [torch.randn(16, 12, generator=gen, dtype=dtype) + 0.5 * c for _ in range(batches)]
        clients.append([(x, x[:, :5].argmax(dim=1)) for x in inputs])
    return clients


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _updates(model, state):
    """Each layer's LoRA update B A (scaled) for a given trainable state."""
    out = {}
    for layer_name, layer in mm.adapted_layers(model):
        lora = layer.adapters["default"]
        b = state.get(f"{layer_name}.adapters.default.lora_B", lora.lora_B)
        a = state.get(f"{layer_name}.adapters.default.lora_A", lora.lora_A)
        out[layer_name] = (b @ a) * lora.scaling
    return out


def test_with_a_frozen_the_mean_of_client_updates_is_the_global_update():
    model = _model(freeze_a=True)
    clients = [batches[: c + 1] for c, batches in enumerate(_clients(3, 3))]  # 16, 32, 48 samples
    result = federated_average(model, clients, _loss, rounds=2, local_steps=3, lr=0.5)
    assert all(name.endswith("lora_B") for name in result.global_state), sorted(result.global_state)
    weights = [16.0, 32.0, 48.0]  # FedAvg weights clients by their sample counts
    client_updates = [_updates(model, state) for state in result.client_states]
    global_updates = _updates(model, result.global_state)
    for layer_name, update in global_updates.items():
        weighted = [u[layer_name] * w for u, w in zip(client_updates, weights, strict=True)]
        mean_of_updates = sum(weighted) / sum(weights)
        assert (client_updates[0][layer_name] - client_updates[1][layer_name]).abs().max() > 1e-3
        torch.testing.assert_close(update, mean_of_updates, rtol=1e-12, atol=1e-14)
    # The model ends at the global state.
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, result.global_state[name])


def test_with_a_trained_averaging_factors_is_not_averaging_updates():
    model = _model(freeze_a=False)
    result = federated_average(model, _clients(), _loss, rounds=1, local_steps=3, lr=0.5)
    client_updates = [_updates(model, state) for state in result.client_states]
    global_updates = _updates(model, result.global_state)
    gaps = []
    for layer_name, update in global_updates.items():
        mean_of_updates = sum(u[layer_name] for u in client_updates) / 3
        gaps.append(float((update - mean_of_updates).norm() / mean_of_updates.norm()))
    assert max(gaps) > 1e-3, f"plain LoRA averaged exactly too ({gaps}): the clients did not diverge"


def test_federated_training_lowers_the_loss():
    model = _model()
    clients = _clients()
    result = federated_average(model, clients, _loss, rounds=8, local_steps=4, lr=2.0)
    first, last = sum(result.losses[0]) / 3, sum(result.losses[-1]) / 3
    assert last < 0.9 * first, result.losses


def test_vmap_and_loop_per_sample_gradients_agree_and_average_to_the_batch_gradient():
    model = _model()
    batch = _clients(1, 1)[0][0]
    vmapped = per_sample_gradients(model, _loss, batch, "vmap")
    looped = per_sample_gradients(model, _loss, batch, "loop")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    full = dict(zip(params, torch.autograd.grad(_loss(model, batch), list(params.values())), strict=True))
    for name in params:
        assert vmapped[name].shape == (16, *params[name].shape)
        torch.testing.assert_close(vmapped[name], looped[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(vmapped[name].mean(0), full[name], rtol=1e-10, atol=1e-12)


def test_dp_step_without_noise_or_clipping_is_plain_sgd():
    batch = _clients(1, 1)[0][0]
    private, plain = _model(), _model()
    for m in (private, plain):  # move B off zero so every trainable tensor has a gradient
        with torch.no_grad():
            for _, layer in mm.adapted_layers(m):
                layer.adapters["default"].lora_B.normal_(std=0.1, generator=torch.Generator().manual_seed(3))
    dp = DPConfig(clip_norm=math.inf, noise_multiplier=0.0)
    private_sgd = torch.optim.SGD([p for p in private.parameters() if p.requires_grad], lr=0.3)
    dp_sgd_step(private, _loss, batch, private_sgd, dp)
    optimizer = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.3)
    _loss(plain, batch).backward()
    optimizer.step()
    for (name, p), q in zip(private.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(private.parameters(), _model().parameters(), strict=True))


def test_clipping_bounds_each_samples_norm_and_keeps_small_ones():
    model = _model()
    per_sample = per_sample_gradients(model, _loss, _clients(1, 1)[0][0])
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    clip = float(norms.median())
    grads, clipped = privatize(per_sample, DPConfig(clip_norm=clip, noise_multiplier=0.0))
    assert bool((clipped <= clip * (1 + 1e-9)).all())
    small = norms <= clip
    assert 0 < int(small.sum()) < len(norms), "the test needs samples on both sides of the clip"
    torch.testing.assert_close(clipped[small], norms[small])
    torch.testing.assert_close(clipped[~small], torch.full_like(clipped[~small], clip))
    expected = {n: (g * (clipped / norms).view(-1, 1, 1)).mean(0) for n, g in per_sample.items()}
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name])


def test_noise_has_std_sigma_times_clip_over_batch_size():
    per_sample = {"w": torch.zeros(8, 200, 100)}  # zero gradients: the result is the noise alone
    dp = DPConfig(clip_norm=0.5, noise_multiplier=2.0)
    grads, _ = privatize(per_sample, dp, torch.Generator().manual_seed(0))
    std = float(grads["w"].std())
    assert abs(std - 2.0 * 0.5 / 8) < 0.03 * (2.0 * 0.5 / 8), std
    again, _ = privatize(per_sample, dp, torch.Generator().manual_seed(0))
    assert torch.equal(grads["w"], again["w"])


def test_private_federated_run_is_seeded():
    dp = DPConfig(clip_norm=1.0, noise_multiplier=0.5)
    runs = []
    for _ in range(2):
        model = _model()
        runs.append(federated_average(model, _clients(2, 1), _loss, rounds=1, local_steps=2, lr=0.5, dp=dp,
                                      seed=4).global_state)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        DPConfig(clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="finite clip_norm"):
        DPConfig(clip_norm=math.inf, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="at least one batch"):
        federated_average(_model(), [[], []], _loss, rounds=1, local_steps=1, lr=0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        federated_average(TinyMLP().requires_grad_(False), _clients(), _loss, rounds=1, local_steps=1, lr=0.1)
    with pytest.raises(ValueError, match="positive weights"):
        average_states([], [])


# ---------------------------------------------------------------------------- mmtune federate (recipes)

FFA_RECIPE = "configs/federated/digits_ffa.yaml"


def _federate(capsys, out_dir, *overrides: str) -> int:
    from train.cli import main

    code = main(["federate", "--config", FFA_RECIPE, f"train.out_dir={out_dir}", *overrides])
    capsys.readouterr()
    return code


def test_federate_command_trains_b_keeps_a_at_init_and_learns(tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from train.engine.run_log import read_metrics
    from train.engine.task import get_task
    from train.rules.federated_run import load_federated_recipe

    assert _federate(capsys, tmp_path) == 0
    saved = load_file(str(tmp_path / "adapters.safetensors"))
    recipe, _ = load_federated_recipe(FFA_RECIPE)
    fresh = dict(get_task(recipe.task)(recipe).named_parameters())  # the seeded init every client started from
    for key, tensor in saved.items():
        layer, factor = key.split("/", 1)[1].rsplit(".", 1)  # default/encoder.fc1.lora_A
        param = fresh[f"{layer}.adapters.default.{factor}"]
        if key.endswith("lora_A"):
            assert torch.equal(tensor, param), f"{key}: FFA-LoRA's A must stay at its init"
        else:
            assert not torch.equal(tensor, param) and tensor.abs().sum() > 0, f"{key}: B did not train"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["client_losses"]) == 5 and all(len(r) == 4 for r in summary["client_losses"])
    rounds = {r["step"]: r["value"] for r in read_metrics(tmp_path / "metrics.csv") if r["metric"] == "loss"
              and r["split"] == "train"}
    assert rounds[5] < rounds[1] - 0.05, rounds
    assert summary["eval"]["accuracy"] > 0.25  # ten classes: chance is 0.1
    assert (tmp_path / "trainable.safetensors").is_file()  # the digits head trains and is averaged too
    from train.cli import main  # the run folder is an ordinary one: mmtune eval rebuilds and scores it

    assert main(["eval", "--run", str(tmp_path)]) == 0
    assert f"accuracy={summary['eval']['accuracy']:.4f}" in capsys.readouterr().out


def test_federate_check_prints_the_resolved_recipe_with_its_section(capsys):
    import yaml

    from train.cli import main

    assert main(["federate", "--config", FFA_RECIPE, "--check", "federated.rounds=2"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["federated"]["rounds"] == 2 and resolved["adapters"]["default"]["freeze_a"] is True


def test_federate_with_dp_is_seeded_and_differs_from_plain(tmp_path, capsys):
    from safetensors.torch import load_file

    small = ["federated.rounds=1", "federated.local_steps=2", "federated.clients=2"]
    dp = ["federated.dp_clip_norm=0.5", "federated.noise_multiplier=0.8"]
    for name, extra in {"dp1": dp, "dp2": dp, "plain": []}.items():
        assert _federate(capsys, tmp_path / name, *small, *extra) == 0
    first, second, plain = (load_file(str(tmp_path / n / "adapters.safetensors")) for n in ("dp1", "dp2", "plain"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.allclose(first[k], plain[k]) for k in first if k.endswith("lora_B"))


@pytest.mark.parametrize("override, culprit", [
    ("adapters.default.freeze_a=false", "'adapters.default.freeze_a': FFA-LoRA averages exactly only with A frozen"),
    ("federated.clients=0", "'federated.clients' must be >= 1, got 0"),
    ("federated.rouns=3", "unknown key(s) 'federated.rouns'; known keys in 'federated': clients, rounds"),
    ("optim.name=adamw", "'optim.name': clients train with plain SGD"),
    ("federated.noise_multiplier=1.0", "'federated.noise_multiplier' needs federated.dp_clip_norm"),
    ("federated.clients=100", "fewer than train.batch_size=32"),
])
def test_federate_refuses_bad_recipes_in_one_line(tmp_path, capsys, override, culprit):
    from train.cli import main

    assert main(["federate", "--config", FFA_RECIPE, f"train.out_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmtune federate: ") and culprit in err[0], err
