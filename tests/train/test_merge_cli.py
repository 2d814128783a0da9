"""``mmtune merge``: trained digits runs (two domains, one base) in, one merged adapter file out, and a table
of each run's eval metrics with its own adapter and with the merged one; bad input is one line, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from train_helpers import ROOT, digits_recipe

import mm
from train.cli import main
from train.commands.merge import METHOD_NAMES
from train.engine.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs of the tiny digits recipe on two domains (same seed: one base), and a copy of one whose
    config says another seed (the tiny base is drawn from the seed: another base model)."""
    root = tmp_path_factory.mktemp("merge_runs")
    folders = {}
    for name in ("inverted", "rotated"):
        train(digits_recipe(root / name, "train.max_steps=6", f"data.domain={name}"))
        folders[name] = root / name
    folders["other_base"] = root / "other_base"
    shutil.copytree(folders["rotated"], folders["other_base"])
    config = folders["other_base"] / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0\n", "seed: 1\n", 1))
    return folders


def _table(out: str) -> dict[tuple[str, str], tuple[float, float]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| /") and len(cells) == 5:
            rows[(cells[0], cells[1])] = (float(cells[2]), float(cells[3]))
    return rows


def test_ties_merge_writes_the_library_merge_and_scores_each_run(runs, tmp_path, capsys):
    out_file = tmp_path / "merged.safetensors"
    code = main(["merge", str(runs["inverted"]), str(runs["rotated"]), "--method", "ties", "--density", "0.5",
                 "--weights", "0.6", "0.4", "--out", str(out_file), "--peft", str(tmp_path / "peft"),
                 "--json", str(tmp_path / "metrics.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    table = _table(out)
    for run in ("inverted", "rotated"):
        summary = json.loads((runs[run] / "summary.json").read_text())
        own, merged = table[(str(runs[run]), "accuracy")]
        assert own == pytest.approx(summary["eval"]["accuracy"], abs=1e-4)  # "before" is the run's own score
        assert 0.0 <= merged <= 1.0
    # The file holds what mm.merge_adapters gives on the two runs' adapters.
    from train.commands.merge import _build_task, _load_as

    host = _build_task(digits_recipe(runs["inverted"]))
    mm.delete_adapter(host, "default")
    for i, run in enumerate(("inverted", "rotated")):
        _load_as(host, runs[run] / "adapters.safetensors", "default", f"run{i}")
    mm.merge_adapters(host, ["run0", "run1"], "ties", [0.6, 0.4], density=0.5, new_name="merged")
    loaded = mm.load_adapters(_build_task(digits_recipe(runs["inverted"])), out_file, ["merged"])
    ours = {k: v for k, v in mm.state.adapter_state(loaded, "merged").items()}
    for key, tensor in mm.state.adapter_state(host, "merged").items():
        torch.testing.assert_close(ours[key], tensor)
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["run"] for row in saved] == [str(runs["inverted"]), str(runs["rotated"])]


def test_concrete_merge_runs_through_each_runs_own_head(runs, tmp_path, capsys):
    out_file = tmp_path / "concrete.safetensors"
    code = main(["merge", str(runs["inverted"]), str(runs["rotated"]), "--method", "concrete", "--steps", "3",
                 "--objective-batches", "1", "--out", str(out_file)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert len(_table(out)) == 4 and out_file.is_file()
    assert "concrete: the shared mask keeps " in out and "lambda per run (mean over weights): 0.3, 0.3" in out
    assert "merged" in mm.state.read_adapter_file(out_file)[0]


@pytest.mark.parametrize(("extra", "expected"), [
    (["--method", "ties"], "method 'ties' needs 'density' in (0, 1]"),
    (["--weights", "1", "2", "3"], "3 weight(s) for 2 adapter(s)"),
    (["--name", "default"], "--name 'default' is a run's own adapter name"),
])
def test_bad_merge_options_are_one_line(runs, tmp_path, capsys, extra, expected):
    code = main(["merge", str(runs["inverted"]), str(runs["rotated"]), "--out", str(tmp_path / "m.safetensors"),
                 "--density", "0.5", *extra] if "--method" not in extra else
                ["merge", str(runs["inverted"]), str(runs["rotated"]), "--out", str(tmp_path / "m.safetensors"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("mmtune merge: ") and expected in err and "\n" not in err
    assert not (tmp_path / "m.safetensors").exists()


def test_runs_of_different_bases_or_unknown_adapters_are_refused(runs, tmp_path, capsys):
    out = str(tmp_path / "m.safetensors")
    assert main(["merge", str(runs["inverted"]), str(runs["other_base"]), "--density", "0.5", "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"{runs['other_base']}: another base model than {runs['inverted']} (seed 1 vs 0" in err
    assert main(["merge", str(runs["inverted"]), f"{runs['rotated']}:nope", "--density", "0.5", "--out", out]) == 2
    assert f"{runs['rotated']}: run has no adapter 'nope'; it has ['default']" in capsys.readouterr().err


def test_method_names_match_the_library_and_help_stays_light():
    from mm.compose import METHODS

    assert (*METHODS, "concrete") == METHOD_NAMES
    code = ("import sys\nfrom train.cli import main\ntry:\n    main(['merge', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip().endswith("False") and "--objective" in result.stdout
