"""The errors deltatune raises for bad input or a run that can't go on, in one place.

Each message says what was wrong, where, and what to do. The command line prints such an error as one line
(no traceback; `--debug` or `DELTATUNE_DEBUG=1` shows it); anything else is a bug.
"""

from __future__ import annotations


class DeltatuneError(Exception):
    """Base of the errors that are the user's to fix (a config, a file, a model): shown as one line."""


class ConfigError(DeltatuneError, ValueError):
    """A config (a method's, a training run's, a command's options) is invalid; the message lists why."""


class DataError(DeltatuneError, ValueError):
    """A data file can't be used; the message names the file, the line and the field."""


class CheckpointError(DeltatuneError, ValueError):
    """An adapter file is missing, corrupt, or doesn't fit the model; the message says which and why."""


class NonFiniteWeightsError(CheckpointError):
    """An adapter file's weights hold NaN or inf: it fits, but can only give NaN outputs."""


class BackendError(DeltatuneError, RuntimeError):
    """A quantization backend can't run here (its build doesn't support the device, or the device is wrong for
    it); the message says what to install or use instead."""


class MissingBackendError(BackendError, ImportError):
    """A quantization backend's package is not installed; the message says what to install."""


class TrainingError(DeltatuneError, RuntimeError):
    """Training can't go on (a NaN loss, a checkpoint that doesn't fit); the message says what to do."""


def short(value: object, limit: int = 200) -> str:
    """`repr(value)` for an error message, at most about `limit` characters, in bounded time.

    User values go into messages through this: a config whose YAML aliases expand a few hundred bytes into
    millions of list items (or a 10 MB string) gives a short quote, not a 72 MB message.
    """
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 8, 8, 8, 8
    r.maxstring = r.maxother = r.maxlong = max(limit, 20)
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
