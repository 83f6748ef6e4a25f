"""Errors a user can act on, raised by library code instead of exiting.

The `nuwa-train` command prints such an error as one line and exits non-zero (the traceback only with
`--debug`); a Python caller catches it by class. The other user errors live next to the code that
detects them (`ModelPathError`, `NuwaConfigError`, `ExportError`, `DatasetFormatError`, ...).
"""


class UsageError(ValueError):
    """A command's input that cannot work: a malformed flag value, a recipe without a needed key, a run
    directory without the state a command needs. The message names the input and says what to do."""
