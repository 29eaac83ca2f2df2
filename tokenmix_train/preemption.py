"""Stop signals: a preempted or time-limited job stops at a step boundary, every rank together, after one save.

`StopSignals` catches the --preempt-signal signals (SIGTERM and SIGUSR1 by default: what schedulers send before
they kill a job; SLURM's `--signal=USR1@90`). The handler only notes the signal, so a second one (torchrun
forwards what it gets, SLURM signals every process of a step) changes nothing. At each step boundary the ranks
agree (`requested`, a collective over a CPU (gloo) group, so a CUDA run gains no device sync), and if any rank
was signalled they all save the run's position and stop with `Preempted`; train.py exits with
`PREEMPTED_EXIT_CODE` and the same command with `--resume latest` continues at the next step.
"""
import signal
from types import FrameType
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from .distributed import process_group_active

__all__ = ['PREEMPTED_EXIT_CODE', 'SIGNAL_NAMES', 'Preempted', 'StopSignals', 'signal_numbers', 'stop_group']

PREEMPTED_EXIT_CODE = 3  # 0: the run ended, 1: it diverged, 2: bad input, 3: stopped by a signal after saving
SIGNAL_NAMES = ('TERM', 'USR1', 'USR2', 'HUP', 'INT')  # --preempt-signal choices ('none': no handler)


class Preempted(Exception):
    """The run stopped on a signal after saving its position; the message names the signal and the file."""


def signal_numbers(names: Sequence[str]) -> List[int]:
    """--preempt-signal's names (TERM, USR1, ...; 'none' for no signal) as signal numbers."""
    return [int(getattr(signal, 'SIG' + name)) for name in names if name != 'none']


def stop_group() -> Any:
    """The process group the ranks agree over: the default one when it reduces CPU tensors (gloo), else a gloo
    group made for it (a collective call: every rank calls it); None when not distributed."""
    if not process_group_active() or dist.get_backend() == 'gloo':
        return None
    return dist.new_group(backend='gloo')


class StopSignals:
    """Notes the first of `signals` this process gets; `requested()` tells every rank whether any rank got one.

    Use as a context manager: the previous handlers are put back on exit (not after `Preempted`: the process is
    then about to end, and the signals torchrun sends the ranks as it winds down must not kill it). `group` is the process group the ranks
    agree over (None: the default one, which must then be able to reduce CPU tensors, e.g. gloo).
    """

    def __init__(self, signals: Sequence[int], group: Any = None) -> None:
        self.signals, self.group = list(signals), group
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _note(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> 'StopSignals':
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None and issubclass(exc_type, Preempted):
            return  # the process is about to exit: later signals (torchrun's clean-up) must not cut it short
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        """The signal received ('a signal on another rank' when only another rank got one)."""
        return signal.Signals(self.received).name if self.received is not None else 'a signal on another rank'

    def requested(self) -> bool:
        """Whether any rank got a stop signal (a collective call when distributed: every rank calls it at the same
        step)."""
        if not self.signals:
            return False
        if not process_group_active():
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
