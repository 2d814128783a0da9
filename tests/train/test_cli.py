"""The ``mmtune`` command: --help stays light (no torch import), subcommands answer."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_help_does_not_import_heavy_libraries():
    out = _python(
        "import sys, contextlib, io\n"
        "from train.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'open_clip') if m in sys.modules)\n"
        "print(buf.getvalue()); print('HEAVY=' + ','.join(heavy))\n"
    )
    assert "HEAVY=\n" in out, out
    assert "adapters" in out and "demo" in out


def test_adapters_lists_every_registered_method(capsys):
    import mm
    from train.cli import main

    assert main(["adapters"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == mm.ADAPTERS.names()
    assert any(line.startswith("lora ") and "low-rank" in line for line in lines)


def test_no_subcommand_prints_help_and_fails(capsys):
    from train.cli import main

    assert main([]) == 2
    assert "usage: mmtune" in capsys.readouterr().out
