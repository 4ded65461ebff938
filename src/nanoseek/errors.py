"""The base of the project's own errors: what a user can fix (a wrong path, a bad config, a corrupt file,
a port in use, a checkpoint of another model), as opposed to a bug in nanoseek.

Every error class that library code raises for bad input derives from NanoseekError (ConfigError,
CheckpointError, TrainingError, EngineError, SamplingError, TextError, GrammarError, PlanError, DataError,
...), each also from the builtin it always was (ValueError, RuntimeError), so existing `except` clauses
keep working. The one command-line entry point (nanoseek.cli.main) prints such an error as one line,

    nanoseek <command>: <what> (<path>): <what to do>

and exits with its `exit_code` (2: bad input, nothing ran; NonFiniteLoss uses 1: the run itself
diverged). Anything else is a bug and keeps its traceback; `nanoseek --debug ...` shows the traceback of
these too. This module imports nothing, so every layer (config, model loading, data, infer, serve, train)
may use it.
"""

from __future__ import annotations

import os


class NanoseekError(Exception):
    """Bad input the user can fix. `what` says what is wrong, `path` (optional) the file or folder it is
    about, `hint` (optional) what to do; str() joins them as `what (path): hint`."""

    exit_code = 2

    def __init__(self, what: str = "", path: str | os.PathLike | None = None, hint: str | None = None):
        super().__init__(what)
        self.what, self.path, self.hint = what, path, hint

    def __str__(self) -> str:
        text = self.what
        if self.path is not None:
            text += f" ({os.fspath(self.path)})"
        if self.hint:
            text += f": {self.hint}"
        return text


class DataError(NanoseekError, ValueError):
    """A data file that cannot be used as given (a corpus, a task or SFT JSONL line); names file and line."""


class PathNotFound(NanoseekError, FileNotFoundError):
    """A file or folder the user named does not exist (a FileNotFoundError too)."""


class OptionError(NanoseekError, ValueError):
    """An option that does not apply to what it was given (a model, this machine); says what it needs."""


class CheckpointError(NanoseekError, RuntimeError):
    """A checkpoint that cannot be loaded as-is; the message names the file or tensor."""
