"""The project's error for bad user input: entry points print its message and exit with code 2."""
import argparse
import sys
from typing import Callable, NoReturn, Optional, Sequence

import torch

__all__ = ['ConfigError', 'OneLineParser', 'user_message', 'run_cli']


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


def run_cli(main: Callable[[Optional[Sequence[str]]], int], prog: str, argv: Optional[Sequence[str]] = None) -> int:
    """Run an entry point's `main(argv)`: bad input is one line on stderr and exit code 2.

    The process group is torn down however `main` ends, so a torchrun worker never exits with it still open.
    """
    try:
        return main(argv)
    except ConfigError as e:
        print(f'{prog}: error: {user_message(e)}', file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
