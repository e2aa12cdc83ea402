"""Errors a user can cause. Entry points turn them into one line on stderr and exit code 2."""


class ConfigError(ValueError):
    """A value given by the user (flag, config field, file) is invalid."""


class UnsafeFileError(ConfigError):
    """A file was refused because reading it could run code or it failed an integrity check."""


class DivergenceError(RuntimeError):
    """An optimisation produced non-finite values and could not recover."""


def shown(value: object, limit: int = 60) -> str:
    """`repr(value)` for an error message, cut to `limit` characters: a hostile value (a 100 KB
    pattern, a 500 KB key) is named, not echoed."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def one_line(message: str, limit: int = 600) -> str:
    """An error message as the one line a CLI prints: newlines folded, at most `limit` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"
