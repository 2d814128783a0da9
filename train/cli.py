"""The ``mmtune`` command. Subcommands live in ``train/commands/<name>.py``, each with
``add_parser(subparsers)`` and ``run(args) -> int``; they import torch only inside ``run`` so that
``mmtune --help`` stays fast.

User errors end a command with ONE line on stderr, ``mmtune <cmd>: <culprit>: <what was expected>``, and
exit 2: the project's typed errors (``mm.errors.MMTuneError`` and its subclasses), missing or unwritable
files, disk full, malformed YAML/JSON. ``--debug`` (or ``MMTUNE_DEBUG=1``) re-raises them with the
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from train.commands import COMMANDS

#: Exit status of a user error (bad input, bad file, bad setting), as argparse uses for bad arguments.
USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmtune", description="Parameter-efficient fine-tuning of multimodal models."
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of user errors (also MMTUNE_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"train.commands.{name}")
        sub = module.add_parser(subparsers)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of user errors (also MMTUNE_DEBUG=1)")
        sub.set_defaults(_run=module.run)
    return parser


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input rather than a bug (yaml only if it is already imported).
    Evaluated only when an exception is raised: importing ``mm`` imports torch, which ``--help`` must not."""
    from mm.errors import MMTuneError

    types: list[type[BaseException]] = [MMTuneError, OSError, json.JSONDecodeError, UnicodeDecodeError]
    yaml = sys.modules.get("yaml")
    if yaml is not None:
        types.append(yaml.YAMLError)
    return tuple(types)


def describe(err: BaseException) -> str:
    """The one-line message of a user error: OS errors name their file, the rest say it themselves."""
    if isinstance(err, OSError) and err.filename is not None:
        reason = err.strerror or type(err).__name__
        return f"{err.filename}: {reason}"
    text = " ".join(str(err).split()) or type(err).__name__
    return text


class _DropDeepSpeedAcceleratorGuess(logging.Filter):
    """accelerate imports DeepSpeed whenever it is installed (``unwrap_model`` checks for its engine), and
    DeepSpeed's import warns "Setting accelerator to CPU..." on a machine without a GPU, in every run,
    DeepSpeed or not. Only that record is dropped; DeepSpeed's other messages stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def quiet_unused_components() -> None:
    """No third-party warning about a component the run does not use (see each filter's reason)."""
    deepspeed_logger = logging.getLogger("DeepSpeed")  # the name DeepSpeed's own logger takes on import
    if not any(isinstance(f, _DropDeepSpeedAcceleratorGuess) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropDeepSpeedAcceleratorGuess())


def debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("MMTUNE_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return USER_ERROR
    quiet_unused_components()
    try:
        return int(args._run(args) or 0)
    except user_error_types() as err:
        if debug_requested(args):
            raise
        print(f"mmtune {args.command}: {describe(err)}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
