"""``mmtune generate-lora``: a family of LoRA adapter files (safetensors) and their descriptions (jsonl) in, a
generator file and a generated adapter file out, which loads onto the base like any adapter; bad input is one
line, exit 2, naming the file and line."""

from __future__ import annotations

import json

import pytest
import torch
from toys import TinyMLP

import mm
from train.cli import main

ANGLES = (-90, -60, -30, 0, 30, 60, 90)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the command sets one thread for its tiny CVAE


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Adapter files of LoRAs on one TinyMLP whose weights are a smooth function of the angle, the family jsonl
    of the training angles, and the true LoRA of the unseen angle 45."""
    root = tmp_path_factory.mktemp("family")
    torch.manual_seed(0)
    model, directions = TinyMLP(), None
    for angle in (*ANGLES, 45):
        name = f"a{angle + 180}"
        mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=2, alpha=2.0), name, active=False)
        state = mm.state.adapter_state(model, name)
        directions = directions or {k: (torch.randn(v.shape), torch.randn(v.shape)) for k, v in state.items()}
        with torch.no_grad():
            for key, tensor in state.items():
                tensor.copy_(directions[key][0] * torch.sin(torch.tensor(angle / 40.0))
                             + directions[key][1] * (angle / 90.0) ** 2)
        mm.save_adapters(model, root / f"{name}.safetensors", [name])
    lines = [json.dumps({"adapter": f"a{a + 180}.safetensors", "description": f"digits rotated by {a} degrees"})
             for a in ANGLES]
    (root / "family.jsonl").write_text("\n".join(lines) + "\n")
    return root, model


def test_fit_then_generate_an_unseen_task_that_loads_like_any_adapter(family, tmp_path, capsys):
    root, model = family
    generator, out = tmp_path / "gen.safetensors", tmp_path / "a45.safetensors"
    assert main(["generate-lora", "--family", str(root / "family.jsonl"), "--save-generator", str(generator),
                 "--steps", "300", "--hidden", "64", "--latent", "4"]) == 0
    printed = capsys.readouterr().out
    assert "on 7 LoRAs of 168 parameters each" in printed and "| digits rotated by -30 degrees |" in printed
    errors = [float(line.split("|")[2]) for line in printed.splitlines() if line.startswith("| digits")]
    assert len(errors) == 7 and max(errors) < 0.2
    assert main(["generate-lora", "--generator", str(generator), "--description", "digits rotated by 45 degrees",
                 "--out", str(out), "--name", "rot45"]) == 0
    host = TinyMLP()
    mm.load_adapters(host, out)
    made, truth = mm.state.adapter_state(host, "rot45"), mm.state.adapter_state(model, "a225")
    average = {k: torch.stack([mm.state.adapter_state(model, f"a{a + 180}")[k] for a in ANGLES]).mean(0)
               for k in truth}
    assert sum(float((made[k] - truth[k]).norm()) for k in truth) < \
        0.3 * sum(float((average[k] - truth[k]).norm()) for k in truth)


@pytest.mark.parametrize(("lines", "expected"), [
    (['{"adapter": "a90.safetensors", "description": "x 0"}'], "1 task(s); a family needs at least two"),
    (['{"adapter": "a90.safetensors", "description": "x 0"}', "{nope"], "family.jsonl line 2: not valid JSON"),
    (['{"adapter": "a90.safetensors", "description": "x 0"}', '{"adapter": "a120.safetensors"}'],
     "family.jsonl line 2: expected an object with 'adapter' (a path) and 'description'"),
    (['{"adapter": "a90.safetensors", "description": "x 0"}', '{"adapter": "gone.safetensors", "description": "y"}'],
     "gone.safetensors: no such adapter file"),
    (['{"adapter": "a90.safetensors", "description": "x 0"}', '{"adapter": "a90.safetensors", "description": "y",'
      ' "name": "other"}'], "holds adapters ['a90']; pick one with 'name'"),
])
def test_bad_family_files_are_one_line_naming_file_and_line(family, tmp_path, capsys, lines, expected):
    root, _ = family
    path = root / "family_bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code = main(["generate-lora", "--family", str(path), "--save-generator", str(tmp_path / "g.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("mmtune generate-lora: ") and "\n" not in err
    assert expected.replace("family.jsonl", "family_bad.jsonl") in err
    assert not (tmp_path / "g.safetensors").exists()


def test_bad_options_and_other_shapes_are_one_line(family, tmp_path, capsys):
    root, model = family
    mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, alpha=4.0), "wide", active=False)
    mm.save_adapters(model, root / "wide.safetensors", ["wide"])
    (root / "mixed.jsonl").write_text(
        '{"adapter": "a90.safetensors", "description": "x 0"}\n{"adapter": "wide.safetensors", "description": "y"}\n')
    cases = [
        (["--family", str(root / "mixed.jsonl"), "--save-generator", str(tmp_path / "g")],
         "mixed.jsonl line 2: adapter 'wide' of"),
        (["--generator", str(root / "a90.safetensors")], "--generator: give --description and --out"),
        (["--generator", str(root / "a90.safetensors"), "--description", "x"], "--description and --out go together"),
        (["--generator", str(root / "a90.safetensors"), "--description", " ", "--out", str(tmp_path / "o")],
         "task description ' ': expected a non-empty string"),
        (["--generator", str(root / "a90.safetensors"), "--description", "x", "--out", str(tmp_path / "o")],
         "expected 'mmtune-lora-generator'"),
    ]
    for extra, expected in cases:
        assert main(["generate-lora", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mmtune generate-lora: ") and expected in err and "\n" not in err, (extra, err)
