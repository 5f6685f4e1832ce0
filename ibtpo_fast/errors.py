"""Errors in what a user gave us (config, data files, a reward function, the installed packages), and
refusals of the external engine a run drives.

The command-line entry points end on these with one line naming what was wrong and exit code 2;
`IBTPO_DEBUG=1` re-raises them with the traceback. Each is also the built-in error it refines, so
`except ValueError` in a caller's code keeps working.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem in the run's inputs, not in the code."""


class ConfigError(UserError, ValueError):
    """A config key or value that cannot work."""


class DataError(UserError, ValueError):
    """A data file or row that cannot be used; the message names the file, row and field."""


class RewardFnError(UserError, ValueError):
    """A reward function that cannot be loaded."""


class CheckpointError(UserError, OSError):
    """A model checkpoint that cannot be loaded from where the user pointed."""


class MissingExtraError(UserError, ImportError):
    """An optional package that the chosen option needs; the message says what to install."""


class EngineError(UserError, RuntimeError):
    """An external rollout engine (SGLang) refused a call; the message names the call and its answer."""


@contextmanager
def user_errors_end_cleanly(exit_code: int = 2) -> Iterator[None]:
    """Turn a UserError into one line on stderr and SystemExit(exit_code), unless IBTPO_DEBUG is set."""
    try:
        yield
    except UserError as e:
        if os.environ.get("IBTPO_DEBUG"):
            raise
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"{kind}: {e} (IBTPO_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(exit_code) from None
