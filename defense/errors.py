"""Errors a user can cause. Entry points turn them into one line on stderr and exit code 2."""


class ConfigError(ValueError):
    """A value given by the user (flag, config field, file) is invalid."""


class UnsafeFileError(ConfigError):
    """A file was refused because reading it could run code or it failed an integrity check."""


class DivergenceError(RuntimeError):
    """An optimisation produced non-finite values and could not recover."""
