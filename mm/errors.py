"""The base of every error mmtune raises for bad input, so that a command can tell a user's mistake (one
line, exit 2) from a bug (traceback). Each package keeps its own typed errors (``ConfigError``,
``AdapterStateError``, the data errors...); they all derive from ``MMTuneError`` as well as from the
builtin they always were (``ValueError``, ``RuntimeError``...), so existing ``except`` clauses still work.
Messages name the file, key or tensor and what was expected."""


class MMTuneError(Exception):
    """A user-facing error: bad input, a bad file, a bad setting. Its message is the whole story."""
