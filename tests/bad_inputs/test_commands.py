"""Each ``mmtune`` command given bad arguments or data: ONE line ``mmtune <cmd>: <culprit>: <what>``, exit 2,
no traceback, nothing on disk changed; plus the quiet-output contract (no warning about a component the
run does not use, plain progress lines when stderr is a file).

Commands here: cluster (sources, feature files, overrides), fewshot (model, checkpoint, methods, shots),
train (data and attach errors), generate (the image), adapters. Images, audio/video, adapter files, PEFT
folders, recipes and run folders have their own corpus files.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from corpus import assert_clear_error, assert_kept, run_mmtune, snapshot

from data.fake_images import make_fake_fewshot_dataset

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "configs/eo/cluster.yaml"
DIGITS = "configs/tiny/digits_lora.yaml"


# ---------------------------------------------------------------------------- mmtune cluster


def cluster(capsys, *settings: str, config: str = CLUSTER):
    argv = ["cluster", "--config", config, "--set", "methods=[kmeans]"]
    for setting in settings:
        argv += ["--set", setting]
    return run_mmtune(argv, capsys)


def test_cluster_unknown_source_lists_the_valid_ones(capsys):
    line = assert_clear_error(cluster(capsys, "data.source=mnistt"), "cluster", "data.source", "'mnistt'")
    assert "digits, mnist, fashion_mnist" in line


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("make, culprits", [
    (lambda d: d / "gone.npz", ("gone.npz", "no such feature file", "'features'")),
    (lambda d: _gz(d / "features.csv.gz"), ("features.csv.gz", "not readable as an .npz archive")),
    (lambda d: _npz(d / "f.npz", features=np.zeros((4, 2))), ("f.npz", "no array(s) ['labels']")),
    (lambda d: _npz(d / "f.npz", features=np.array([["a", "b"]] * 4), labels=np.arange(4)),
     ("f.npz", "'features' must be numbers", "<U1")),
    (lambda d: _npz(d / "f.npz", features=np.array([[0.0, np.nan]] * 4), labels=np.arange(4)),
     ("f.npz", "NaN or infinite values in 4 row(s)")),
    (lambda d: _npz(d / "f.npz", features=np.zeros((4, 2)), labels=np.arange(3)),
     ("f.npz", "shapes (4, 2) and (3,)")),
    (lambda d: _npy(d / "f.npy"), ("f.npy", "a single .npy array")),
], ids=["missing", "csv_gz", "no_labels", "text_features", "nan_features", "length_mismatch", "npy"])
def test_cluster_bad_feature_file_names_it_and_the_format(tmp_path, capsys, make, culprits):
    path = make(tmp_path)
    before = snapshot(tmp_path)
    result = cluster(capsys, "data.source=npz", f"data.path={path}")
    assert_clear_error(result, "cluster", *culprits)
    assert_kept(before, tmp_path)


def _gz(path: Path) -> Path:
    with gzip.open(path, "wt") as handle:
        handle.write("f1,f2,label\n0.1,0.2,0\n0.3,0.4,1\n")
    return path


def _npy(path: Path) -> Path:
    np.save(path, np.zeros((4, 2)))
    return path


def test_cluster_npz_features_work(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = rng.normal(size=(60, 4)) * 0.1 + labels[:, None]
    path = _npz(tmp_path / "blobs.npz", features=features, labels=labels)
    result = cluster(capsys, "data.source=npz", f"data.path={path}")
    assert result.code == 0, result.err
    assert "| kmeans   | 100.0" in result.out


def test_cluster_truncated_or_foreign_fashion_mnist_file_is_named(tmp_path, capsys):
    header = b"\0\0\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 4, 4))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(10)))  # 32 promised
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    result = cluster(capsys, "data.source=fashion_mnist", f"data.path={tmp_path}", "data.split=test")
    assert_clear_error(result, "cluster", "t10k-images-idx3-ubyte.gz", "IDX header says (2, 4, 4), file holds 10")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header[:9]))
    result = cluster(capsys, "data.source=fashion_mnist", f"data.path={tmp_path}", "data.split=test")
    assert_clear_error(result, "cluster", "t10k-images-idx3-ubyte.gz", "header cut short")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(32)))
    result = cluster(capsys, "data.source=fashion_mnist", f"data.path={tmp_path}", "data.split=test")
    assert_clear_error(result, "cluster", "t10k-labels-idx1-ubyte.gz", "not a readable gzip-compressed IDX file")


@pytest.mark.parametrize("setting, culprits", [
    ("seeds", ("--set 'seeds'", "section.key=value")),
    ("seeds=abc", ("key 'seeds'", "list of integers")),
    ("methods=[kmeans, dbscan]", ("'methods'", "dbscan")),
    ("data.limit=1", ("data.limit", "integer >= 2")),
    ("data.nope=3", ("data.nope",)),
    ("methods.kmeans=2", ("--set 'methods.kmeans=2'", "not a section")),
    ("seeds=[0", ("--set 'seeds=[0'", "not valid YAML")),
], ids=["no_equals", "seeds_text", "unknown_method", "limit", "unknown_key", "into_a_list", "bad_yaml"])
def test_cluster_bad_override_names_it(capsys, setting, culprits):
    assert_clear_error(cluster(capsys, setting), "cluster", *culprits)


def test_cluster_recipe_of_another_task_is_named(capsys):
    assert_clear_error(cluster(capsys, config=DIGITS), "cluster", DIGITS, "key 'task' is not 'cluster'")


def test_cluster_missing_recipe_is_named(tmp_path, capsys):
    assert_clear_error(cluster(capsys, config=str(tmp_path / "nope.yaml")), "cluster", "nope.yaml")


# ---------------------------------------------------------------------------- mmtune fewshot


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_fake_fewshot_dataset(tmp_path_factory.mktemp("images"), "folder", train_per_class=2,
                                     test_per_class=1, size=32)


def fewshot(images: Path, out: Path, capsys, *extra: str, model: str = "tiny-test"):
    return run_mmtune(["fewshot", "--model", model, "--data", str(images), "--out-dir", str(out), "--shots", "1",
                       "--seeds", "1", "--methods", "zero-shot", "--no-progress", *extra], capsys)


def test_fewshot_unknown_model_suggests_close_names(images, tmp_path, capsys):
    line = assert_clear_error(fewshot(images, tmp_path, capsys, model="tiny-tset"), "fewshot", "'tiny-tset'")
    assert "Did you mean 'tiny-test'" in line and "'tiny-test'\"" not in line


@pytest.mark.parametrize("damage, culprit", [
    (lambda p: None, "no such checkpoint file"),
    (lambda p: p.write_bytes(b"\x08\x00\x00"), "cannot load into CLIP"),
    (lambda p: p.write_text("not weights"), "cannot load into CLIP"),
], ids=["missing", "truncated", "text"])
def test_fewshot_bad_local_checkpoint_is_named(images, tmp_path, capsys, damage, culprit):
    checkpoint = tmp_path / "clip.safetensors"
    damage(checkpoint)
    result = fewshot(images, tmp_path / "out", capsys, "--pretrained", str(checkpoint))
    assert_clear_error(result, "fewshot", str(checkpoint), culprit)


@pytest.mark.parametrize("extra, culprits", [
    (["--methods", "zero-shot", "loraa"], ("method 'loraa'", "no recipe", "built-in methods")),
    (["--shots", "0"], ("--shots", ">= 1")),
    (["--methods", "zero-shot", "zero-shot"], ("--methods", "'zero-shot'")),
    (["--shots", "3"], ("--shots 3", "class 'red_square' has 2")),
    pytest.param(["--device", "cuda:7"], ("--device cuda:7", "no CUDA device"),
                 marks=pytest.mark.skipif(_has_cuda(), reason="a CUDA device is present")),
], ids=["unknown_method", "zero_shots", "repeated_method", "too_many_shots", "no_gpu"])
def test_fewshot_bad_arguments_are_named_before_any_work(images, tmp_path, capsys, extra, culprits):
    out = tmp_path / "out"
    result = fewshot(images, out, capsys, *extra)
    assert_clear_error(result, "fewshot", *culprits)
    assert not out.exists() or not any(out.iterdir())  # nothing was written


# ---------------------------------------------------------------------------- mmtune train: data and attach


def train(capsys, tmp_path: Path, *overrides: str, config: str = DIGITS):
    return run_mmtune(["train", "--config", config, f"train.out_dir={tmp_path / 'run'}", "train.max_steps=1",
                       *overrides], capsys)


@pytest.mark.parametrize("override, culprits", [
    ("adapters.default.targets=[nothing_here]", ("targets ['nothing_here']", "match no adaptable layer", "fc1")),
    ("adapters.default.target_regex=fc[", ("target_regex", "'fc['", "not a valid regular expression")),
    ("data.domain=upside_down", ("data.domain", "upside_down")),
], ids=["targets_match_nothing", "bad_regex", "unknown_domain"])
def test_train_attach_and_data_errors_are_one_line(tmp_path, capsys, override, culprits):
    assert_clear_error(train(capsys, tmp_path, override), "train", *culprits)


@pytest.mark.parametrize("content, culprit", [
    ('[{"id": 1, ', "not valid JSON"),
    ('{"id": 1}', "expected a JSON list of records"),
], ids=["malformed", "not_a_list"])
def test_train_on_bad_instruction_json_names_the_file(tmp_path, capsys, content, culprit):
    bad = tmp_path / "records.json"
    bad.write_text(content)
    before = snapshot(tmp_path)
    result = train(capsys, tmp_path, f"data.train={bad}", f"data.eval={bad}", config="configs/mllm/text.yaml")
    assert_clear_error(result, "train", str(bad), culprit)
    assert_kept(before, tmp_path)


# ---------------------------------------------------------------------------- mmtune generate, adapters


@pytest.fixture
def mllm_run(tmp_path, capsys) -> Path:
    """A run folder as training leaves it, as far as generate looks before building the model: the resolved
    recipe and an adapter file (the image is read first, so the file's content is not reached)."""
    run = tmp_path / "run"
    run.mkdir()
    check = run_mmtune(["train", "--config", "configs/mllm/arcana.yaml", "--check", f"train.out_dir={run}"], capsys)
    assert check.code == 0, check.err
    (run / "config.yaml").write_text(check.out)
    (run / "adapters.safetensors").write_bytes(b"")
    return run


@pytest.mark.parametrize("write, culprit", [
    (lambda p: p.write_text("PNG?"), "cannot read image"),
    (lambda p: p.write_bytes(_png_bytes()[:40]), "cannot read image"),
    (lambda p: _float_tiff(p), "values in [-2, -2]"),
], ids=["not_an_image", "truncated_png", "negative_float_tiff"])
def test_generate_bad_image_is_one_line_naming_it_before_the_model_is_built(mllm_run, tmp_path, capsys, write,
                                                                           culprit):
    image = tmp_path / "question.png"
    write(image)
    before = snapshot(mllm_run)
    result = run_mmtune(["generate", "--run", str(mllm_run), "--image", str(image), "--prompt", "what?"], capsys)
    assert_clear_error(result, "generate", str(image), culprit)
    assert_kept(before, mllm_run)


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _float_tiff(path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((8, 8), -2.0, np.float32)).save(path, format="TIFF")


def test_adapters_lists_every_method_with_its_keys(capsys):
    import mm

    result = run_mmtune(["adapters", "--keys"], capsys)
    assert result.code == 0 and result.err == ""
    names = [line.split()[0] for line in result.out.splitlines() if not line.startswith(" ")]
    assert names == list(mm.list_adapters())
    assert "keys: " in result.out and "target_regex" in result.out


# ---------------------------------------------------------------------------- quiet by default


NOISE = ("Setting accelerator to CPU", "TensorBoard is not installed", "gemm_4bit", "bitsandbytes", "Traceback",
         "Warning", "warn(")


@pytest.mark.slow  # a fresh interpreter importing torch, accelerate and DeepSpeed: about 6 s
def test_tiny_train_prints_no_third_party_warning_and_plain_progress_to_a_file(tmp_path):
    stderr_file = tmp_path / "stderr.txt"
    with stderr_file.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "train.cli", "train", "--config", DIGITS, "train.max_steps=40",
             "train.eval_every=0", "train.save_every=0", "train.progress=true", f"train.out_dir={tmp_path / 'run'}"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT), "MMTUNE_DEBUG": ""})
    text = stderr_file.read_text()
    assert done.returncode == 0, text
    assert not [noise for noise in NOISE if noise in text], text
    lines = text.splitlines()
    assert "\r" not in text and 3 <= len(lines) <= 5, text  # 25/50/75/100 %: a few plain lines, not redraws
    assert lines[-1].startswith("digits_lora: 100% (40/40) loss=")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())
