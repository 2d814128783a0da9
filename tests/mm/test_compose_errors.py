"""Bad input to the merging functions: a typed error (``MergeError``, a ``ConfigError``/``MMTuneError``) whose
message names the adapter, key or task and what was expected; nothing is attached on refusal."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from torch import nn
from toys import TOYS

import mm
from mm.adapters.bone import BoneConfig
from mm.compose import ConcreteConfig, MergeError, concrete_merge_adapters, concrete_merge_task_vectors


@pytest.fixture
def model():
    model = TOYS["mlp"].build()
    mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, alpha=8.0), "task_a")
    mm.attach(model, mm.LoRAConfig(targets=["fc1"], r=4, alpha=4.0), "task_b")
    mm.attach(model, mm.LoRAConfig(targets=["fc2"], r=2, alpha=4.0), "small")
    perturb(model)
    return model


@pytest.mark.parametrize(("names", "kwargs", "expected"), [
    ([], {}, "no adapters given"),
    (["task_a", "nope"], {}, "adapter 'nope' is not attached"),
    (["task_a", "task_a"], {}, "['task_a'] given more than once"),
    (["task_a", "task_b"], {"weights": [1.0]}, "1 weight(s) for 2 adapter(s)"),
    (["task_a", "task_b"], {"weights": [1.0, float("nan")]}, "weight of adapter 'task_b' is nan"),
    (["task_a", "task_b"], {"weights": [0.0, 0.0]}, "every weight is 0"),
    (["task_a", "small"], {"method": "ties", "density": 0.5}, "ranks are {'task_a': 4, 'small': 2}"),
    (["task_a", "task_b"], {"method": "ties"}, "method 'ties' needs 'density' in (0, 1]"),
    (["task_a", "task_b"], {"method": "dare_linear", "density": 1.5}, "needs 'density' in (0, 1]"),
    (["task_a", "task_b"], {"method": "average"}, "unknown method 'average'"),
    (["task_a", "task_b"], {"method": "svd", "svd_rank": 0}, "'svd_rank' must be a positive integer"),
    (["task_a", "task_b"], {"new_name": "small"}, "already has an adapter named 'small'"),
])
def test_bad_merge_requests_name_the_culprit(model, names, kwargs, expected):
    before = mm.adapter_names(model)
    with pytest.raises(MergeError) as caught:
        mm.merge_adapters(model, names, **kwargs)
    assert expected in str(caught.value)
    assert isinstance(caught.value, mm.ConfigError | mm.MMTuneError)
    assert mm.adapter_names(model) == before


def test_factor_methods_refuse_non_lora_adapters_but_svd_takes_them(model):
    mm.attach(model, BoneConfig(targets=["fc1"], r=4), "bone_task")
    perturb(model, "bone_task")
    with pytest.raises(MergeError, match="adapter 'bone_task' at fc1 is Bone"):
        mm.merge_adapters(model, ["task_a", "bone_task"], "linear")
    name = mm.merge_adapters(model, ["task_a", "bone_task"], "svd", svd_rank=12)  # fc1 is 12 -> 24: exact
    layer = dict(mm.adapted_layers(model))["fc1"]
    expected = layer.adapters["task_a"].delta_weight(layer.base) + layer.adapters["bone_task"].delta_weight(layer.base)
    assert (layer.adapters[name].delta_weight(layer.base) - expected).abs().max() < 1e-4


def test_concrete_refuses_batches_that_do_not_match_the_tasks(model):
    with pytest.raises(MergeError, match="1 batch list"):
        concrete_merge_adapters(model, ["task_a", "task_b"], [[torch.zeros(1, 12)]], lambda m, b, t: m(b).sum())
    with pytest.raises(MergeError, match="task 1 has no batches"):
        concrete_merge_adapters(model, ["task_a", "task_b"], [[torch.zeros(1, 12)], []], lambda m, b, t: m(b).sum())
    assert "merged_concrete" not in mm.adapter_names(model)


def test_concrete_refuses_weights_of_another_base():
    base = nn.Sequential(nn.Linear(4, 3))
    other = nn.Sequential(nn.Linear(5, 3)).state_dict()
    with pytest.raises(MergeError, match=r"fine-tuned model 1: weight '0.weight' has shape \(3, 5\), the base has"):
        concrete_merge_task_vectors(base, [base.state_dict(), other], [[0], [0]], lambda m, b, t: m.sum(),
                                    keys=["0.weight"])
    with pytest.raises(MergeError, match="do not differ from the base"):
        concrete_merge_task_vectors(base, [base.state_dict()], [[0]], lambda m, b, t: m.sum())


@pytest.mark.parametrize(("key", "value"), [("inner", "fisher"), ("temperature", 0.0), ("steps", -1),
                                            ("eval_mask", "soft"), ("scaling", float("inf"))])
def test_concrete_config_names_the_bad_key(key, value):
    with pytest.raises(MergeError, match=f"key '{key}'"):
        ConcreteConfig(**{key: value})
