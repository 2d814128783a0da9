"""``mmtune fewshot`` end to end on a folder of real PNG files with a tiny CLIP, the recipes it reads, and
the saved adapters reloading to the same accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import mm
from train.tasks.fewshot import DEFAULT_RECIPES, find_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
QUICK = {"lr": 1.0e-2, "batch_size": 8, "steps": 6}
QUICK_RECIPES = {
    "lora": {"adapters": [{"method": "lora", "targets": ["q_proj", "k_proj", "v_proj"], "r": 2}], "optim": QUICK},
    "block_lora": {"adapters": [{"method": "block_lora", "targets": ["q_proj", "k_proj", "v_proj"], "r": 2,
                                 "blocks": 4}], "optim": QUICK},
    "qladder": {"qladder": {"num_queries": 4, "mlp_ratio": 1.0}, "optim": QUICK},
}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "clip").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.total_steps(16) > 0 and (recipe.adapters or recipe.qladder)


def test_recipe_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"adapters": [{"method": "lora", "targets": ["q_proj"]}],
                                   "optim": {"lr": 1e-3, "steps": 2, "momentum": 0.9}}))
    with pytest.raises(mm.ConfigError, match="bad.yaml: unknown key.*momentum"):
        load_recipe(bad)
    bad.write_text(yaml.safe_dump({"adapters": [{"method": "lora", "rank": 2, "targets": ["q"]}],
                                   "optim": {"lr": 1e-3, "steps": 2}}))
    with pytest.raises(mm.ConfigError, match="bad.yaml adapters\\[0\\]: unknown key.*'rank'"):
        load_recipe(bad)
    bad.write_text("adapters: [{method: lora, targets: [q_proj]}]\noptim: {lr: 1e-3, steps: 2}\n")
    with pytest.raises(mm.ConfigError, match="bad.yaml: optim.lr expects float, got '1e-3' \\(YAML reads"):
        load_recipe(bad)
    (tmp_path / "ghost.yaml").write_text(yaml.safe_dump(
        {"adapters": [{"method": "ghost_lora", "targets": ["q_proj"]}], "optim": {"lr": 1e-3, "steps": 2}}))
    with pytest.raises(mm.ConfigError, match="method 'ghost' is not available in this build"):
        find_recipe("ghost", tmp_path)
    with pytest.raises(mm.ConfigError, match="no recipe .*nope.yaml; built-in methods: zero-shot, linear-probe"):
        find_recipe("nope", DEFAULT_RECIPES)


@pytest.fixture(scope="module")
def fewshot_run(tmp_path_factory):
    """One CLI run: 4 classes of fake PNGs, shots 1 and 2, seeds 1 and 2, every method, adapters saved."""
    from data.fake_images import make_fake_fewshot_dataset
    from encoders.clip import create_clip, save_clip_weights
    from train.cli import main

    root = tmp_path_factory.mktemp("fewshot_cli")
    data = make_fake_fewshot_dataset(root / "data", "folder", train_per_class=3, test_per_class=5, size=32)
    checkpoint = save_clip_weights(create_clip("tiny-test", seed=0).model, root / "tiny.safetensors")
    recipes = root / "recipes"
    recipes.mkdir()
    for name, recipe in QUICK_RECIPES.items():
        (recipes / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    out = root / "out"
    code = main(["fewshot", "--model", "tiny-test", "--pretrained", str(checkpoint), "--data", str(data),
                 "--shots", "1", "2", "--seeds", "1", "2", "--recipes", str(recipes), "--out-dir", str(out),
                 "--methods", "zero-shot", "linear-probe", "lora", "block_lora", "qladder",
                 "--save-adapters", "--no-progress"])
    return {"code": code, "out": out, "data": data, "checkpoint": checkpoint}


@pytest.mark.slow
def test_cli_writes_table_json_and_plot_for_every_method(fewshot_run):
    from PIL import Image

    assert fewshot_run["code"] == 0
    out = fewshot_run["out"]
    results = json.loads((out / "fewshot_results.json").read_text())
    records = results["records"]
    assert len(records) == 1 + 4 * 2 * 2  # zero-shot once; the rest per (shots, seed)
    assert {(r["method"], r["shots"], r["seed"]) for r in records if r["method"] == "lora"} == {
        ("lora", 1, 1), ("lora", 1, 2), ("lora", 2, 1), ("lora", 2, 2)}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    table = (out / "fewshot_table.md").read_text().splitlines()
    assert table[0] == "| method | trainable params | 1-shot | 2-shot | train s/run |"
    assert [line.split("|")[1].strip() for line in table[2:]] == [
        "zero-shot", "linear-probe", "lora", "block_lora", "qladder"]
    assert {row["method"] for row in results["summary"]} == {r["method"] for r in records}
    with Image.open(out / "fewshot_accuracy.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300


@pytest.mark.slow
def test_parameter_counts_block_lora_below_lora_at_the_same_rank(fewshot_run):
    records = json.loads((fewshot_run["out"] / "fewshot_results.json").read_text())["records"]
    params = {r["method"]: r["trainable_params"] for r in records}
    lora_expected = 12 * 2 * (32 + 32)  # 12 q/k/v layers of width 32, r = 2
    assert params["zero-shot"] == 0 and params["lora"] == lora_expected
    assert params["block_lora"] == 12 * 2 * (32 // 4 + 32) < params["lora"]
    assert params["linear-probe"] == 4 * 32 + 4
    assert params["qladder"] > params["lora"]


@pytest.mark.slow
def test_saved_adapters_reload_to_the_same_accuracy(fewshot_run):
    from data.fewshot import load_fewshot_data
    from encoders.clip import create_clip
    from train.tasks.fewshot import ImageCache, accuracy, make_head

    records = json.loads((fewshot_run["out"] / "fewshot_results.json").read_text())["records"]
    bundle = create_clip("tiny-test", str(fewshot_run["checkpoint"]))
    data = load_fewshot_data(fewshot_run["data"])
    test_x, test_y = ImageCache(bundle.preprocess).stack(data.split("test"))
    from train.tasks.fewshot import load_trained

    for method in ("lora", "block_lora", "qladder"):
        record = next(r for r in records if r["method"] == method and r["shots"] == 2 and r["seed"] == 2)
        assert record["files"] and all(Path(f).is_file() for f in record["files"])
        encoder = load_trained(bundle.model, record["files"])
        head = make_head(bundle, encoder, data.classes, ["a photo of a {}."])
        assert accuracy(encoder, head, test_x, test_y) == pytest.approx(record["accuracy"], abs=1e-6), method


def test_finished_runs_survive_a_later_failure(tmp_path, capsys, monkeypatch):
    """The JSON and table are rewritten after every finished (method, shots, seed): a failure in the third
    run leaves the first two on disk, as valid JSON marked incomplete."""
    from data.fake_images import make_fake_fewshot_dataset
    from train.cli import main
    from train.tasks import fewshot as fewshot_module

    data = make_fake_fewshot_dataset(tmp_path / "data", "folder", train_per_class=2, test_per_class=2, size=32)
    real_probe, calls = fewshot_module.linear_probe_accuracy, []

    def probe_failing_at_the_second_seed(*args, **kwargs):
        calls.append(args[4])  # the seed
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the middle of a run")
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(fewshot_module, "linear_probe_accuracy", probe_failing_at_the_second_seed)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fewshot", "--model", "tiny-test", "--data", str(data), "--shots", "1", "--seeds", "1", "2",
              "--methods", "zero-shot", "linear-probe", "--out-dir", str(out), "--no-progress"])
    saved = json.loads((out / "fewshot_results.json").read_text(), parse_constant=pytest.fail)
    assert saved["complete"] is False
    assert [(r["method"], r["seed"]) for r in saved["records"]] == [("zero-shot", None), ("linear-probe", 1)]
    assert [line.split("|")[1].strip() for line in (out / "fewshot_table.md").read_text().splitlines()[2:]] == [
        "zero-shot", "linear-probe"]


def test_report_json_has_null_not_nan(tmp_path):
    from train.tasks.fewshot_report import write_progress

    record = {"method": "lora", "shots": 1, "seed": 1, "accuracy": float("nan"), "trainable_params": 4,
              "train_seconds": float("inf"), "files": []}
    path = write_progress({"settings": {}, "classes": ["a"], "records": [record]}, tmp_path)["json"]
    saved = json.loads(path.read_text(), parse_constant=pytest.fail)  # NaN/Infinity would call parse_constant
    assert saved["records"][0]["accuracy"] is None and saved["records"][0]["train_seconds"] is None


def test_default_recipe_folders_hold_the_default_methods():
    """The defaults point at the repository's configs/ (they once pointed inside train/ after a move)."""
    from train.tasks.demo import DEMO_RECIPES
    from train.tasks.fewshot import DEFAULT_METHODS, FewShotSettings, check_methods

    assert DEFAULT_RECIPES == ROOT / "configs" / "clip" and DEMO_RECIPES == ROOT / "configs" / "clip" / "demo"
    recipes = check_methods(FewShotSettings(model="tiny-test", data="unused"))
    assert sorted(recipes) == sorted(set(DEFAULT_METHODS) - {"zero-shot", "linear-probe"})
    assert {p.stem for p in DEMO_RECIPES.glob("*.yaml")} >= {"lora", "block_lora", "qladder"}


# ---------------------------------------------------------------------------- schedules that scale, lr selection


def test_schedule_grows_with_shots_and_classes(tmp_path):
    recipe_file = tmp_path / "scaled.yaml"
    recipe_file.write_text(yaml.safe_dump({"adapters": [{"method": "lora", "targets": ["q_proj"]}],
                                           "optim": {"lr": 1.0e-2, "batch_size": 32, "steps": 20, "epochs": 200}}))
    recipe = load_recipe(recipe_file)
    assert recipe.total_steps(1, 5) == 20 + 32  # ceil(200 passes x 5 images / 32)
    assert recipe.total_steps(16, 5) == 20 + 500
    assert recipe.total_steps(16, 10) == 20 + 1000  # twice the classes, twice the passes' steps
    clip_lora = load_recipe(ROOT / "configs" / "clip" / "lora.yaml")
    assert clip_lora.total_steps(16, 11) == 16 * clip_lora.total_steps(1, 11) == 8000  # CLIP-LoRA: 500 x shots
    for path in sorted((ROOT / "configs" / "clip" / "demo").glob("*.yaml")):  # the demo's: 5 novel classes
        demo = load_recipe(path)
        steps = [demo.total_steps(k, 5) for k in (1, 2, 4, 8, 16)]
        assert steps == sorted(steps) and steps[-1] >= 4 * steps[0], path.name
    recipe_file.write_text(yaml.safe_dump({"adapters": [{"method": "lora", "targets": ["q_proj"]}],
                                           "optim": {"lr": 1.0e-2, "epochs": -1.0}}))
    with pytest.raises(mm.ConfigError, match="scaled.yaml: optim needs .*epochs >= 0"):
        load_recipe(recipe_file)


def test_validation_is_carved_outside_the_shots_per_class():
    from data.fewshot import FewShotDataError, Sample, sample_k_shot
    from train.tasks.fewshot_select import candidate_lrs, carve_validation

    classes = ["a", "b", "c"]
    train = [Sample(Path(f"train/{c}/{i}.png"), c) for c in range(3) for i in range(8)]
    shots = sample_k_shot(train, 2, seed=1, classes=classes)
    held = carve_validation(train, shots, per_class=4, seed=1, classes=classes)
    assert sorted(s.label for s in held) == [0] * 4 + [1] * 4 + [2] * 4
    assert not {s.path for s in held} & {s.path for s in shots}
    assert held == carve_validation(train, shots, 4, 1, classes)  # the run's seed fixes the draw
    assert len(carve_validation(train, shots, 100, 1, classes)) == 3 * 6  # at most the pool
    with pytest.raises(FewShotDataError, match=r"class\(es\) \['a'\] have no training image outside the shots"):
        carve_validation(train[:2] + train[8:], train[:2], 4, 1, classes)
    assert candidate_lrs(3e-2, None) == [3e-3, 1e-2, 3e-2, 9e-2]
    assert candidate_lrs(3e-2, [1e-1, 1e-3]) == [1e-3, 1e-1]


def test_select_lr_picks_the_best_validation_accuracy_and_reports_it(tmp_path, capsys):
    from data.fake_images import make_fake_fewshot_dataset
    from train.cli import main

    data = make_fake_fewshot_dataset(tmp_path / "data", "folder", classes=["red", "green", "blue"],
                                     train_per_class=4, test_per_class=3, size=32)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "lora.yaml").write_text(yaml.safe_dump(QUICK_RECIPES["lora"]))
    out = tmp_path / "out"
    assert main(["fewshot", "--model", "tiny-test", "--data", str(data), "--shots", "1", "--seeds", "1",
                 "--methods", "zero-shot", "lora", "--recipes", str(recipes), "--out-dir", str(out),
                 "--select", "lr", "--lrs", "1e-6", "3e-2", "--val-per-class", "2", "--no-progress"]) == 0
    (record,) = [r for r in json.loads((out / "fewshot_results.json").read_text())["records"] if r["method"] == "lora"]
    scores = record["validation"]
    assert set(scores) == {"1e-06", "0.03"} and all(0.0 <= v <= 1.0 for v in scores.values())
    best = max(sorted(scores, key=float), key=lambda lr: scores[lr])  # ties: the smaller lr
    assert record["lr"] == pytest.approx(float(best))
    table = capsys.readouterr().out
    assert f"(lr {float(best):g})" in table and "| zero-shot |" in table
    with pytest.raises(SystemExit):  # argparse: only 'lr' can be selected
        main(["fewshot", "--model", "tiny-test", "--data", str(data), "--select", "wd"])


def test_select_needs_a_training_image_beyond_the_shots(tmp_path, capsys):
    from data.fake_images import make_fake_fewshot_dataset
    from train.cli import main

    data = make_fake_fewshot_dataset(tmp_path / "data", "folder", classes=["red", "green"], train_per_class=2,
                                     test_per_class=1, size=32)
    code = main(["fewshot", "--model", "tiny-test", "--data", str(data), "--shots", "2", "--methods", "lora",
                 "--select", "lr", "--out-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--shots 2 with --select lr (validation images outside the shots) needs 3 training" in err


def test_zero_shot_alone_shows_its_accuracy():
    from train.tasks.fewshot_report import markdown_table, summarize

    record = {"method": "zero-shot", "shots": 0, "seed": None, "accuracy": 0.625, "trainable_params": 0,
              "train_seconds": 0.0, "files": []}
    assert markdown_table(summarize([record])).splitlines() == [
        "| method | trainable params | accuracy | train s/run |", "|---|---|---|---|",
        "| zero-shot | 0 | 62.5 ± 0.0 | 0.00 |"]


@pytest.mark.parametrize("image_folder", ["101_ObjectCategories", "jpg", "images", None])
def test_coop_split_files_find_their_image_folder(tmp_path, image_folder):
    """CoOp's layouts: split_zhou_<Name>.json beside the dataset's image folder (Caltech101's
    101_ObjectCategories/, Flowers102's jpg/, Pets' images/, StanfordCars' paths from the JSON's folder)."""
    import numpy as np

    from data.fake_images import write_png
    from data.fewshot import load_fewshot_data, read_image

    dataset = tmp_path / "caltech-101"
    images = dataset / image_folder if image_folder else dataset
    entries = {"train": [], "val": [], "test": []}
    for label, name in enumerate(["accordion", "airplane"]):
        for i, split in enumerate(["train", "train", "val", "test"]):
            relative = f"{name}/image_{i:04d}.png"
            (images / name).mkdir(parents=True, exist_ok=True)
            write_png(images / relative, np.full((8, 8, 3), 60 * label + i, np.uint8))
            entries[split].append([relative, label, name])
    (dataset / "split_zhou_Caltech101.json").write_text(json.dumps(entries))
    data = load_fewshot_data(dataset)
    assert data.layout == "coop" and data.classes == ["accordion", "airplane"]
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [4, 2, 2]
    first = data.split("test")[1]
    assert first.path == images / "airplane/image_0003.png" and np.asarray(read_image(first.path))[0, 0, 0] == 63
