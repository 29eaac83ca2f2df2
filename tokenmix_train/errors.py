"""The project's error for bad user input: entry points print its message and exit with code 2 (`run_cli` in
distributed.py, which also tears the process group down)."""
import argparse
from typing import NoReturn

__all__ = ['ConfigError', 'OneLineParser', 'user_message']


class ConfigError(ValueError):
    """A flag, file or dataset given by the user cannot be used; the message names it."""


class OneLineParser(argparse.ArgumentParser):
    """An error is one line (`PROG: error: ...`, exit code 2): the usage of dozens of flags would bury it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


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

