"""The project's error for bad user input: entry points print its message and exit with code 2."""

__all__ = ['ConfigError', 'user_message']


class ConfigError(ValueError):
    """A flag, file or dataset given by the user cannot be used; the message names it."""


def user_message(error: ConfigError) -> str:
    """The one-line message of `error`.

    An error raised in a DataLoader worker comes back with the worker's traceback in its message; only the
    original message (its last line, after the exception's class name) is meant for the user.
    """
    text = str(error).strip()
    if 'Original Traceback' not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(': ', 1)[1] if ': ' in last else last
