"""Error families. Each says what was wrong, where (file, row, key) and what to do instead.

The CLIs (`predict.py`, `train.py`) print a `LitFastError` as one line on stderr and exit non-zero, without a
traceback; anything else is a bug and keeps its traceback.
"""


class LitFastError(Exception):
    """Base class of every error lit_fast raises on purpose."""


class InputDataError(LitFastError, ValueError):
    """An input file or one of its rows cannot be used (missing, malformed, wrong columns, empty text...)."""


class ConfigError(LitFastError, ValueError):
    """A setting is unknown, contradictory, or cannot work on this device/dtype."""


class ModelLoadError(LitFastError, OSError):
    """A model could not be found or loaded (unknown name, offline hub id, unsafe weights)."""


class UnsupportedModelError(LitFastError, TypeError):
    """The fast path (or another feature) does not support this model; the message says what to use instead."""


class OutputExistsError(LitFastError, FileExistsError):
    """The output file exists and `--overwrite true` was not given."""
