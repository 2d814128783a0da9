"""FSDP2 through accelerate (``scripts/launch_accelerate.sh RECIPE 2 fsdp2``), on two CPU processes over gloo.

Each rank holds only a slice of every parameter (a DTensor), so the adapter save must gather full
tensors, the resume must hand each rank its slice back, and the optimizer state is gathered into one
file. The run must follow the single-process run on the same global batch, and a resume must repeat it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import FAST, ROOT, csv_losses, digits_recipe

from mm.config import ConfigError
from train.engine.checkpoint import load_trainable
from train.engine.config import load_recipe
from train.engine.distributed import fsdp_unit_classes, make_accelerator, validate_accelerate_config
from train.engine.loop import train
from train.tasks.digits import DigitsClassification

STEPS = 8
RUN = [f"train.max_steps={STEPS}", "train.save_every=4", "adapters.default.dropout=0.0"]


def test_unit_classes_are_the_transformer_blocks_of_the_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    wrapper = torch.nn.ModuleDict({"lm": LlamaForCausalLM(config), "head": torch.nn.Linear(16, 2)})
    assert fsdp_unit_classes(wrapper) == ["LlamaDecoderLayer"]
    assert fsdp_unit_classes(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


@pytest.mark.parametrize(("env", "expected"), [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP needs a launcher"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "WORLD_SIZE": "2"}, "'fsdp_config.fsdp_version' must be 2"),
])
def test_fsdp_without_launcher_or_with_fsdp1_is_a_config_error(env, expected, tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=expected):
        make_accelerator(digits_recipe(tmp_path))


def test_the_fsdp2_launcher_config_is_valid_and_fsdp1_is_refused(tmp_path):
    config = validate_accelerate_config(ROOT / "configs" / "accelerate" / "fsdp2.yaml")
    assert config.fsdp_config["fsdp_version"] == 2
    fsdp1 = tmp_path / "configs" / "accelerate" / "fsdp1.yaml"
    fsdp1.parent.mkdir(parents=True)
    fsdp1.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n")
    with pytest.raises(ConfigError, match="fsdp1.yaml: key 'fsdp_config.fsdp_version' must be 2"):
        validate_accelerate_config(fsdp1)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The same global batch (2 x 16) on one process."""
    return train(digits_recipe(tmp_path_factory.mktemp("single"), *RUN, "train.batch_size=32"))


@pytest.mark.slow
def test_fsdp2_two_processes_save_full_adapters_and_resume(single_process, tmp_path):
    out_dir = tmp_path / "fsdp2"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    command = ["bash", str(ROOT / "scripts" / "launch_accelerate.sh"), "configs/tiny/digits_lora.yaml", "2",
               "fsdp2", *FAST, *RUN, "train.batch_size=16", f"train.out_dir={out_dir}"]
    _run(command, env)

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["setup"] == "fsdp2" and summary["step"] == STEPS
    reference = load_file(single_process.out_dir / "adapters.safetensors")
    last = out_dir / "checkpoints" / f"step-{STEPS:08d}"
    for folder in (out_dir, last):  # full tensors, not one rank's slice
        tensors = load_file(folder / "adapters.safetensors")
        assert {k: t.shape for k, t in tensors.items()} == {k: t.shape for k, t in reference.items()}
        assert all(torch.allclose(tensors[k], reference[k], atol=1e-4) for k in reference)
    head = load_file(last / "trainable.safetensors")
    assert {k: t.shape for k, t in head.items()} == {
        k: t.shape for k, t in load_file(single_process.checkpoint / "trainable.safetensors").items()}
    optimizer = torch.load(last / "optimizer.pt", weights_only=True)  # gathered: full-size moments per name
    moments = {name: state["exp_avg"].shape for name, state in optimizer["state"].items()}
    assert moments == tensors_by_param(single_process)

    fresh = DigitsClassification(load_recipe(out_dir / "config.yaml"))
    load_trainable(fresh, out_dir)
    data = fresh.eval_dataset()
    metrics = fresh.evaluate([fresh.collate([data[i] for i in range(len(data))])])
    assert metrics["accuracy"] == pytest.approx(summary["eval"]["accuracy"])

    losses = csv_losses(out_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(single_process.losses[step], abs=1e-4), step

    shutil.rmtree(last)  # resume from step 4: each rank takes its slice of the adapters and the optimizer
    _run([*command, "train.resume=auto"], env)
    resumed = json.loads((out_dir / "summary.json").read_text())
    assert resumed["resumed_from"].endswith("step-00000004")
    again = csv_losses(out_dir)
    assert all(abs(again[s] - losses[s]) <= 1e-6 for s in losses), (again, losses)


def tensors_by_param(result) -> dict[str, torch.Size]:
    """name -> shape of every trainable parameter of the single-process run's task."""
    task = DigitsClassification(load_recipe(result.out_dir / "config.yaml"))
    return {name: p.shape for name, p in task.named_parameters() if p.requires_grad}


def _run(command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
