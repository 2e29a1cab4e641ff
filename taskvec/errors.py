"""Errors whose message tells the user what went wrong and what to do.

The CLI prints `error: <message>` on one line and exits non-zero for any of these.
"""


class TaskvecError(Exception):
    """Base class for every error taskvec raises on bad input."""


class FileFormatError(TaskvecError):
    """A file is not a readable taskvec/safetensors file (corrupt, truncated, pickle, wrong kind)."""


class MismatchError(TaskvecError):
    """Files that must agree (base identity, keys, shapes, labels, task) do not."""


class OutputExistsError(TaskvecError):
    """The output path exists and `force` was not given."""


class PrivacyError(TaskvecError):
    """A privacy setting is invalid or a privacy requirement is not met."""
