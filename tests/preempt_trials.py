"""Two-rank preemption trials in one torchrun launch (tests/test_preemption_distributed.py runs it).

`torchrun --nproc_per_node 2 tests/preempt_trials.py OUT U1,U2,... -- TRAIN_ARGS`: an uninterrupted run into
OUT/straight, then for each Ui a run into OUT/trial<i> in which rank 1 (only) gets SIGTERM right after its Ui-th
update, and the same command with --resume latest. Each run is train.py's own `main` in these processes; between
runs the process group is rebuilt on a fresh port. Each rank writes its exit codes to OUT/codes-rank<R>.json.
"""
import json
import os
import signal
import socket
import sys
from typing import List

import torch.distributed as dist

from conftest import load_script

import tokenmix_train.engine as engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _next_group() -> None:
    """End this run's process group; the next `init_process_group` meets on a port rank 0 picked."""
    port: List[int] = [_free_port() if dist.get_rank() == 0 else 0]
    dist.broadcast_object_list(port, src=0)
    dist.destroy_process_group()
    os.environ.pop('TORCHELASTIC_USE_AGENT_STORE', None)  # torchrun's store served the first group only
    os.environ['MASTER_PORT'] = str(port[0])


def _signal_rank1_after(update: int) -> None:
    real, count = engine._after_update, [0]

    def after_update(*args, **kwargs):
        real(*args, **kwargs)
        count[0] += 1
        if count[0] == update and int(os.environ['RANK']) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    engine._after_update = after_update if update else real


def main(argv: List[str]) -> int:
    out, updates, train_args = argv[0], [int(u) for u in argv[1].split(',')], argv[3:]
    train = load_script('train.py')
    real = engine._after_update
    codes = [train.main(train_args + ['--output', out, '--experiment', 'straight'])]
    for trial, update in enumerate(updates):
        for resume, at in (([], update), (['--resume', 'latest'], 0)):
            _next_group()
            _signal_rank1_after(at)
            codes.append(train.main(train_args + ['--output', out, '--experiment', f'trial{trial}'] + resume))
            engine._after_update = real
    with open(os.path.join(out, f'codes-rank{os.environ["RANK"]}.json'), 'w') as f:
        json.dump(codes, f)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
