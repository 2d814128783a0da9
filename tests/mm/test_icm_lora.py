"""ICM-LoRA's generator (mm/compose/icm_lora.py): the task encoder, the family's flattening and checks, the CVAE
that learns LoRA weights from task conditions, and the generated adapter as a normal saveable LoRA."""

from __future__ import annotations

import pytest
import torch
from toys import TinyMLP

import mm
from mm.compose.icm_lora import CVAEConfig, GeneratorError, LoraGenerator, describe_task, family_states

CONFIG = mm.LoRAConfig(targets=["fc1", "fc2"], r=2, alpha=2.0)


@pytest.fixture(autouse=True)
def one_thread():
    """The CVAE trains hundreds of tiny steps: on a shared machine torch's thread pool costs more than the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _name(p: float) -> str:
    return f"t{p:g}".replace("-", "m")


def _family(params: list[float]) -> tuple[TinyMLP, dict[str, torch.Tensor]]:
    """A model with one LoRA per task parameter p whose weights are a smooth (non-linear) function of p."""
    torch.manual_seed(0)
    model = TinyMLP()
    directions = None
    conditions = {}
    for p in params:
        name = _name(p)
        mm.attach(model, CONFIG, name, active=False)
        state = mm.state.adapter_state(model, name)
        if directions is None:
            directions = {k: (torch.randn(v.shape), torch.randn(v.shape)) for k, v in state.items()}
        with torch.no_grad():
            for key, tensor in state.items():
                first, second = directions[key]
                tensor.copy_(first * torch.sin(torch.tensor(p / 40.0)) + second * (p / 90.0) ** 2)
        conditions[name] = describe_task(f"digits rotated by {p:g} degrees")
    return model, conditions


def test_describe_task_is_deterministic_and_orders_numbers():
    a, b, c = (describe_task(f"digits rotated by {n} degrees") for n in (20, 30, 90))
    assert torch.equal(a, describe_task("digits rotated by 20 degrees"))
    assert (a - b).norm() < (a - c).norm()
    assert not torch.equal(describe_task("fashion rotated by 20 degrees"), a)
    for bad in ("", "   ", None, 3):
        with pytest.raises(GeneratorError, match="task description"):
            describe_task(bad)


def test_generator_reconstructs_members_and_interpolates_unseen_task(tmp_path):
    trained = [-90, -60, -30, 0, 30, 60, 90]
    model, conditions = _family([*trained, 45])
    states = family_states(model, [_name(p) for p in trained])
    generator = LoraGenerator.fit(states, conditions, CONFIG, CVAEConfig(steps=300, hidden=64, latent=4))
    for label in ("tm60", "t30"):
        got, want = generator.generate(conditions[label]), states[label]
        for key in want:
            assert torch.allclose(got[key], want[key], atol=0.1 * want[key].abs().max()), (label, key)
    unseen = family_states(model, ["t45"])["t45"]
    generated = generator.generate(conditions["t45"])
    average = {k: torch.stack([s[k] for s in states.values()]).mean(0) for k in unseen}
    gen_err = sum(float((generated[k] - unseen[k]).norm()) for k in unseen)
    nearest_err = sum(float((states["t30"][k] - unseen[k]).norm()) for k in unseen)
    avg_err = sum(float((average[k] - unseen[k]).norm()) for k in unseen)
    assert gen_err < 0.2 * min(avg_err, nearest_err)

    path = tmp_path / "generator.safetensors"
    generator.save(path)
    loaded = LoraGenerator.load(path)
    again = loaded.generate(conditions["t45"])
    assert all(torch.equal(again[k], generated[k]) for k in generated)

    loaded.attach_generated(model, conditions["t45"], "generated")
    assert torch.equal(mm.state.adapter_state(model, "generated")["fc1.lora_A"], generated["fc1.lora_A"])
    mm.set_active(model, "generated")
    x = torch.randn(3, 12)
    out = model(x)
    mm.save_adapters(model, tmp_path / "gen.safetensors", ["generated"])
    fresh = TinyMLP()
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items()
                           if "lora_" not in k}, strict=False)
    mm.load_adapters(fresh, tmp_path / "gen.safetensors")
    assert torch.allclose(fresh(x), out, atol=1e-6)


def test_family_of_other_shapes_or_configs_is_refused_naming_the_adapter():
    model, conditions = _family([0, 30])
    mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, alpha=4.0), "wide")
    states = family_states(model, ["t0", "t30"])
    states["wide"] = mm.state.adapter_state(model, "wide")
    with pytest.raises(GeneratorError, match="adapter 'wide' tensor 'fc1.lora_A' is \\(4, 12\\)"):
        LoraGenerator.fit(states, {**conditions, "wide": conditions["t0"]}, CONFIG)
    with pytest.raises(GeneratorError, match="adapter 'wide' has another config than 't0'"):
        family_states(model, ["t0", "wide"])
    with pytest.raises(GeneratorError, match="no adapters given"):
        LoraGenerator.fit({}, {}, CONFIG)
    with pytest.raises(GeneratorError, match=r"adapter\(s\) \['t30'\] have no task condition"):
        LoraGenerator.fit(family_states(model, ["t0", "t30"]), {"t0": conditions["t0"]}, CONFIG)
    generator = LoraGenerator.fit(family_states(model, ["t0", "t30"]), conditions, CONFIG, CVAEConfig(steps=2))
    with pytest.raises(GeneratorError, match="task condition has 3 values; the generator was trained on 38"):
        generator.generate(torch.zeros(3))
    with pytest.raises(GeneratorError, match="adapter 'wide' is already attached"):
        generator.attach_generated(model, conditions["t0"], "wide")


def test_generator_file_of_another_format_is_refused(tmp_path):
    model, _ = _family([0])
    mm.save_adapters(model, tmp_path / "adapter.safetensors")
    with pytest.raises(mm.AdapterStateError, match="expected 'mmtune-lora-generator'"):
        LoraGenerator.load(tmp_path / "adapter.safetensors")
