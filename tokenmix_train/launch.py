"""torchrun for train.py, with the stop signals reaching every rank: `python -m tokenmix_train.launch [torchrun args]`.

distributed_train.sh runs this instead of bare torchrun. It is torchrun (the same flags), with two defaults changed:
- `--signals-to-handle` also takes SIGUSR1 and SIGUSR2 (torchrun's default set lacks them, so SIGUSR1, which SLURM
  sends before a time limit, killed torchrun and left the ranks running without it); torchrun forwards each
  signal it handles to every rank, and train.py's ranks stop at the next step after saving their position;
- `--shutdown-timeout` (how long torchrun waits for the ranks after forwarding, before SIGKILL) is 300 s, not 30,
  so a step, an evaluation under way and the save fit in it.
A run stopped this way ends with one line and train.py's `PREEMPTED_EXIT_CODE` instead of torchrun's traceback;
every other failure is reported by torchrun as usual.
"""
import os
import sys
from typing import List, Optional, Sequence

from .preemption import PREEMPTED_EXIT_CODE

__all__ = ['FORWARDED_SIGNALS', 'SHUTDOWN_TIMEOUT', 'torchrun_argv', 'main']

FORWARDED_SIGNALS = 'SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2'
SHUTDOWN_TIMEOUT = 300


def _given(argv: Sequence[str], flag: str) -> bool:
    spellings = (flag, flag.replace('-', '_').replace('__', '--'))
    return any(arg in spellings or arg.startswith(tuple(s + '=' for s in spellings)) for arg in argv)


def torchrun_argv(argv: Sequence[str]) -> List[str]:
    """`argv` with this launcher's defaults for the torchrun flags it does not set itself."""
    defaults = []
    if not _given(argv, '--signals-to-handle') and 'TORCHELASTIC_SIGNALS_TO_HANDLE' not in os.environ:
        defaults += ['--signals-to-handle', FORWARDED_SIGNALS]
    if not _given(argv, '--shutdown-timeout') and 'TORCH_ELASTIC_SHUTDOWN_TIMEOUT' not in os.environ:
        defaults += ['--shutdown-timeout', str(SHUTDOWN_TIMEOUT)]
    return defaults + list(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run torchrun; `PREEMPTED_EXIT_CODE` with one line when a signal stopped the ranks."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(torchrun_argv(sys.argv[1:] if argv is None else argv))
    except SignalException as e:
        print(f'distributed_train.sh: torchrun got {e.sigval.name} and forwarded it to every rank; each saves its '
              f'position and stops (see the run folder\'s log.txt); --resume latest continues', file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        if first.exitcode != PREEMPTED_EXIT_CODE:
            raise
        print(f'distributed_train.sh: rank {rank} stopped on a signal after saving the position (exit code '
              f'{PREEMPTED_EXIT_CODE}); --resume latest continues', file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == '__main__':
    sys.exit(main())
