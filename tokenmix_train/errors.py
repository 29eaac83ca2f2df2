"""The project's errors that entry points turn into one line on stderr (`run_cli` in distributed.py, which also
tears the process group down): `ConfigError`, bad user input (exit code 2), and `OutputError`, a file of the run
that could not be written (exit code `OUTPUT_EXIT_CODE`)."""
import argparse
from typing import NoReturn, Union

__all__ = ['ConfigError', 'OutputError', 'OUTPUT_EXIT_CODE', 'OneLineParser', 'user_message', 'first_output_error']

# sysexits.h's EX_IOERR ("an error occurred while doing I/O on some file"); the small codes are taken: 1 a diverged
# run, 2 bad input, 3 a run stopped by a signal after saving
OUTPUT_EXIT_CODE = 74


class ConfigError(ValueError):
    """A flag, file or dataset given by the user cannot be used; the message names it."""


class OutputError(Exception):
    """A file of the run could not be written (a full disk, a quota, no permission); the message names the file, its
    folder and the free space there. Not an OSError, so no `except OSError` on the way up takes it for another."""


class OneLineParser(argparse.ArgumentParser):
    """An error is one line (`PROG: error: ...`, exit code 2): the usage of dozens of flags would bury it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def user_message(error: Union[ConfigError, OutputError]) -> str:
    """The one-line message of `error`.

    An error raised in a DataLoader worker comes back with the worker's traceback in its message; only the
    original message (its last line, after the exception's class name) is meant for the user.
    """
    text = str(error).strip()
    if 'Original Traceback' not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(': ', 1)[1] if ': ' in last else last


def first_output_error(error: OutputError) -> OutputError:
    """The earliest `OutputError` of the chain `error` was raised in: a run stopping after a failed write closes its
    files, and a failure there (the same full disk) would otherwise hide the write that failed first."""
    first, seen, context = error, {id(error)}, error.__context__
    while context is not None and id(context) not in seen:
        seen.add(id(context))
        if isinstance(context, OutputError):
            first = context
        context = context.__context__
    return first
