"""Mutation smoke run: plant known bugs in a scratch copy of the repository and check the suite catches them.

    .venv/bin/python scripts/mutation_smoke.py               # every mutation; exit 1 if one is not caught
    .venv/bin/python scripts/mutation_smoke.py --only merge-sign unmerge-skips-every-second
    .venv/bin/python scripts/mutation_smoke.py --list

Each mutation replaces one exact snippet of one file (it must occur exactly once: a snippet the code no
longer contains is reported as stale, not as caught) and runs the tests named for it. A mutation may list
the same bug for several forms of the code (``variants``): the first whose snippet occurs once is planted. The same tests first
run on the unmutated copy, which must pass, so a red test means the planted bug and nothing else. The
copy holds the working tree's tracked and untracked-but-not-ignored files; the repository is never changed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: node ids, files, or "-k" expressions
    what: str
    variants: tuple[tuple[str, str], ...] = ()  # more (old, new) forms of the same bug

    def edits(self) -> tuple[tuple[str, str], ...]:
        return ((self.old, self.new), *self.variants)


MUTATIONS = [
    Mutation(
        "unmerge-skips-every-second", "mm/layer.py",
        "for name in list(self.merged if names is None else names):",
        "for name in (self.merged if names is None else names):",
        ("tests/mm/test_merge_unmerge.py", "-k", "unmerging_two_merged"),
        "unmerge iterates self.merged while removing from it: one of two merged adapters stays merged",
        variants=(("for name in reversed([n for n in self.merged if wanted is None or n in wanted]):",
                   "for name in (n for n in self.merged if wanted is None or n in wanted):"),)),
    Mutation(
        "shape-check-by-numel", "mm/state.py",
        "if key in file_state and file_state[key].shape != tensor.shape",
        "if key in file_state and file_state[key].numel() != tensor.numel()",
        ("tests/mm/test_merge_unmerge.py", "-k", "transposed"),
        "the load-time shape check compares element counts: a transposed tensor gets a raw torch error"),
    Mutation(
        "disable-without-finally", "mm/wrap.py",
        "    try:\n        yield model\n    finally:\n        for layer in layers:\n            layer.disabled = False\n",
        "    yield model\n    for layer in layers:\n        layer.disabled = False\n",
        ("tests/mm/test_merge_unmerge.py", "-k", "exception_inside_disable"),
        "disable_adapters without try/finally: an exception in the block leaves the model disabled"),
    Mutation(
        "prune-by-rmtree", "train/engine/checkpoint.py",
        '        trash = root / f".trash-{path.name}"\n        os.replace(path, trash)\n',
        "        shutil.rmtree(path)\n",
        ("tests/train/test_checkpoint.py", "-k", "kill_while_pruning"),
        "checkpoint pruning deletes in place: a kill mid-delete leaves a half-deleted 'complete' checkpoint"),
    Mutation(
        "lora-scaling-alpha", "mm/adapters/lora.py",
        "return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)",
        "return self.alpha",
        ("tests/mm/test_moe.py", "tests/mm/test_peft_parity.py", "-k", "expert or same_outputs"),
        "LoRA scaling alpha instead of alpha/r: only outside references (PEFT, the MoE formulas) notice"),
    Mutation(
        "merge-sign", "mm/layer.py",
        "weight.add_(self.adapters[name].delta_weight(self.base).to(weight.dtype))",
        "weight.sub_(self.adapters[name].delta_weight(self.base).to(weight.dtype))",
        ("tests/mm/test_contract.py", "-k", "merge_equals_unmerged and mlp"),
        "merge subtracts the update instead of adding it",
        variants=(("weight.add_(delta)", "weight.sub_(delta)"),)),
    Mutation(
        "fused-backward-unscaled", "mm/adapters/base.py",
        "            if ctx.scaling != 1.0:\n                grad_h.mul_(ctx.scaling)\n",
        "",
        ("tests/mm/test_contract.py", "-k", "gradients_match and lora"),
        "LoRA's fused backward forgets the scaling on A's gradient (the forward is still right)"),
    Mutation(
        "checksum-not-verified", "mm/state.py",
        "if expected is not None and tensors_checksum(tensors) != expected:",
        "if False:",
        ("tests/bad_inputs/test_adapter_files.py", "-k", "flipped_bit"),
        "the adapter file's checksum is written but never checked: a bit flip loads silently"),
]


def copy_repository(dest: Path) -> None:
    """The working tree's tracked and untracked, not ignored files (no .venv, caches, runs)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    """pytest in the copy (its root first on sys.path, so the copy's packages are the ones imported)."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, lines[-1] if lines else done.stderr.strip()[-200:]


def apply(copy: Path, mutation: Mutation) -> str:
    """Plant the bug; returns the original text (to restore). A snippet not found exactly once is stale."""
    path = copy / mutation.file
    text = path.read_text()
    counts = [text.count(old) for old, _ in mutation.edits()]
    for (old, new), count in zip(mutation.edits(), counts, strict=True):
        if count == 1:
            path.write_text(text.replace(old, new))
            return text
    raise LookupError(f"{mutation.file}: the snippet to mutate occurs {counts} times (expected 1)")


def smoke(mutations: list[Mutation], timeout: float, keep: bool) -> list[dict[str, str]]:
    copy = Path(tempfile.mkdtemp(prefix="mmtune-mutation-"))
    rows = []
    try:
        copy_repository(copy)
        for mutation in mutations:
            started = time.perf_counter()
            row = {"bug": mutation.name, "tests": shlex.join(mutation.tests)}
            code, tail = run_tests(copy, mutation.tests, timeout)
            if code != 0:
                row.update(baseline="FAILS", caught="-", detail=f"unmutated: {tail}")
            else:
                try:
                    original = apply(copy, mutation)
                except LookupError as err:
                    row.update(baseline="ok", caught="stale", detail=str(err))
                else:
                    try:
                        code, tail = run_tests(copy, mutation.tests, timeout)
                    finally:
                        (copy / mutation.file).write_text(original)
                    row.update(baseline="ok", caught="yes" if code == 1 else "NO" if code == 0 else f"error {code}",
                               detail=tail)
            row["seconds"] = f"{time.perf_counter() - started:.0f}"
            rows.append(row)
            print(f"{row['bug']}: {row['caught']} ({row['detail']})", file=sys.stderr, flush=True)
    finally:
        if keep:
            print(f"scratch copy kept at {copy}", file=sys.stderr)
        else:
            shutil.rmtree(copy, ignore_errors=True)
    return rows


def table(rows: list[dict[str, str]]) -> str:
    lines = ["| bug | tests run | unmutated | caught | s |", "|---|---|---|---|---|"]
    lines += [f"| {r['bug']} | `{r['tests']}` | {r['baseline']} | {r['caught']} | {r['seconds']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.what} ({m.file})")
        return 0
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            parser.error(f"unknown mutation(s) {unknown}; known: {', '.join(m.name for m in MUTATIONS)}")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    rows = smoke(chosen, args.timeout, args.keep)
    print(table(rows))
    return 0 if all(r["caught"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
