"""scripts/mutation_smoke.py: its planted bugs still match the code, a stale one is reported as stale, and
one full mutation round (copy, baseline, plant, test, restore) reports the bug caught."""

from __future__ import annotations

from pathlib import Path

import pytest
from script_loader import load_script

smoke = load_script("mutation_smoke")


@pytest.mark.parametrize("mutation", smoke.MUTATIONS, ids=lambda m: m.name)
def test_every_planted_bug_still_matches_the_code_and_names_existing_tests(mutation):
    text = (smoke.ROOT / mutation.file).read_text()
    assert any(text.count(old) == 1 for old, _ in mutation.edits()), (
        f"{mutation.file}: update the snippet of mutation {mutation.name!r}")
    assert all(old != new for old, new in mutation.edits())
    files = [t for t in mutation.tests if t.startswith("tests/")]
    assert files and all((smoke.ROOT / f.split("::")[0]).is_file() for f in files), mutation.tests


def test_a_snippet_the_code_no_longer_has_is_stale_not_caught(tmp_path: Path):
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "x.py").write_text("a = 1\n")
    stale = smoke.Mutation("gone", "mm/x.py", "a = 2", "a = 3", ("tests",), "")
    with pytest.raises(LookupError, match=r"occurs \[0\] times"):
        smoke.apply(tmp_path, stale)
    live = smoke.Mutation("live", "mm/x.py", "a = 1", "a = 3", ("tests",), "")
    assert smoke.apply(tmp_path, live) == "a = 1\n"
    assert (tmp_path / "mm" / "x.py").read_text() == "a = 3\n"


@pytest.mark.slow
def test_one_mutation_round_reports_the_bug_caught(capsys):
    assert smoke.main(["--only", "checksum-not-verified"]) == 0
    out = capsys.readouterr().out
    assert "| checksum-not-verified |" in out and "| ok | yes |" in out
