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


def test_progress_off_a_terminal_is_a_few_plain_lines():
    import io

    from train.engine.progress import PlainProgress, progress_bar

    log = io.StringIO()  # a file: not a terminal
    bar = progress_bar(200, "run", stream=log)
    assert isinstance(bar, PlainProgress)
    for step in range(200):
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
        bar.update()
    bar.close()
    assert log.getvalue().splitlines() == ["run:  25% (50/200) loss=0.020", "run:  50% (100/200) loss=0.010",
                                           "run:  75% (150/200) loss=0.007", "run: 100% (200/200) loss=0.005"]
    resumed = io.StringIO()
    bar = progress_bar(200, "run", initial=120, stream=resumed)  # a resume: only the marks still ahead
    for _ in range(80):
        bar.update()
    bar.close()
    assert resumed.getvalue().splitlines() == ["run:  75% (150/200)", "run: 100% (200/200)"]
    silent = io.StringIO()
    progress_bar(5, "run", enabled=False, stream=silent).close()
    progress_bar(0, "empty", stream=silent).close()
    assert silent.getvalue() == ""


def test_progress_on_a_terminal_is_tqdm():
    import io

    from tqdm import tqdm

    from train.engine.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = progress_bar(10, "run", stream=screen)
    assert isinstance(bar, tqdm)
    bar.update(10)
    bar.close()
    assert "\r" in screen.getvalue()  # redrawn in place


def test_deepspeed_accelerator_guess_is_dropped_and_nothing_else(capsys):
    import logging

    from train.cli import quiet_unused_components

    quiet_unused_components()
    quiet_unused_components()  # idempotent: one filter
    logger = logging.getLogger("DeepSpeed")
    assert len([f for f in logger.filters if type(f).__name__ == "_DropDeepSpeedAcceleratorGuess"]) == 1
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("Some other DeepSpeed warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Some other DeepSpeed warning"]
