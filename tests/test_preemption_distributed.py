"""Preemption on two ranks (torchrun, gloo, CPU): a signal at random steps on one rank stops both after one save,
and --resume latest ends bit-identical to the uninterrupted run; SIGTERM and SIGUSR1 sent to distributed_train.sh
(torchrun) reach the ranks, end with one line and exit 3, and leave no rank running.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY_STUDENT
from test_preemption import BATCHES, RECIPE, _assert_same_end, _load
from test_teacher_maps import _children
from tokenmix_train.preemption import PREEMPTED_EXIT_CODE

pytestmark = [pytest.mark.slow,  # torchrun launches
              pytest.mark.skipif(not torch.distributed.is_available() or not os.path.isdir('/proc'),
                                 reason='needs torch.distributed and /proc')]

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
TRIALS = os.path.join(ROOT, 'tests', 'preempt_trials.py')
# two ranks of -b 4 take the 8 images one rank takes with -b 8: 7 updates an epoch, as in the one-rank trials
_DRAW = random.Random(25)


def _train_args(data, workers):
    return ['--data-dir', data, *TINY_STUDENT, '-b', '4', '--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '0',
            '--seed', '0', '--log-interval', '2', '--workers', str(workers), *RECIPE]


@pytest.mark.parametrize('workers,trials', [(0, 3), (2, 2)])
def test_signal_on_one_rank_stops_both_and_resumes_bit_identical(tiny_data, tmp_path, workers, trials):
    updates = [_DRAW.randint(1, 2 * BATCHES) for _ in range(trials)]
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           TRIALS, str(out), ','.join(map(str, updates)), '--', *_train_args(tiny_data, workers)],
                          cwd=str(tmp_path), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        with open(out / f'codes-rank{rank}.json') as f:
            assert json.load(f) == [0] + [PREEMPTED_EXIT_CODE, 0] * trials
    with open(out / 'trial0' / 'log.txt') as f:
        log = f.read()
    epoch, batch = divmod(updates[0] - 1, BATCHES)
    assert f'stopped by a signal on another rank at epoch {epoch} after batch {batch + 1}' in log  # rank 0 agreed
    for trial in range(trials):
        _assert_same_end(str(out / 'straight'), str(out / f'trial{trial}'))
        assert len(_load(out / f'trial{trial}' / 'last.pth.tar')['rng_states']) == 2


@pytest.fixture(scope='module')
def straight_two_ranks(tiny_data, tmp_path_factory):
    """An uninterrupted two-rank run (distributed_train.sh) of `_train_args(workers=0)`: its run folder."""
    out = tmp_path_factory.mktemp('straight')
    proc = _launch(tiny_data, out, 'straight')
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    return str(out / 'straight')


def _launch(data, out, experiment, *extra):
    return subprocess.Popen(['bash', os.path.join(ROOT, 'distributed_train.sh'), '2', *_train_args(data, 0),
                             '--output', str(out), '--experiment', experiment, *extra],
                            cwd=str(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_training(log_path, proc, timeout=120):
    """Until the run folder's log shows a training step (a signal then lands within the epoch)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if os.path.exists(log_path) and 'train epoch 0 [' in open(log_path).read():
            return
        time.sleep(0.05)
    raise AssertionError('the run did not start training')


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_distributed_train_sh_stops_every_rank_in_one_line(tiny_data, tmp_path, straight_two_ranks,
                                                                      signum):
    """torchrun forwards the signal; both ranks save and exit, none is left running (SIGUSR1 used to kill torchrun
    and leave them orphaned); the launcher says one line and exits 3; --resume latest ends bit-identical."""
    proc = _launch(tiny_data, tmp_path, 'sig')
    _wait_for_training(tmp_path / 'sig' / 'log.txt', proc)
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    os.kill(proc.pid, signum)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE
    stderr = proc.stderr.read()
    assert 'Traceback' not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f'distributed_train.sh: torchrun got {signal.Signals(signum).name} and forwarded it to every rank; each '
        f"saves its position and stops (see the run folder's log.txt); --resume latest continues")
    assert not [pid for pid in ranks if _alive(pid)]
    log = open(tmp_path / 'sig' / 'log.txt').read()
    assert f'stopped by {signal.Signals(signum).name} at epoch' in log
    assert [f for f in os.listdir(tmp_path / 'sig') if f.startswith('recovery-')]
    resumed = _launch(tiny_data, tmp_path, 'sig', '--resume', 'latest')
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    _assert_same_end(straight_two_ranks, str(tmp_path / 'sig'))


def test_kill_9_right_after_the_signal_loses_nothing(tiny_data, tmp_path, straight_two_ranks):
    """SIGKILL to every process 0.3 s after SIGTERM (during the step or the save): what is on disk loads, and
    --resume latest ends bit-identical."""
    proc = _launch(tiny_data, tmp_path, 'killed')
    _wait_for_training(tmp_path / 'killed' / 'log.txt', proc)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for name in os.listdir(tmp_path / 'killed'):
        if name.endswith('.pth.tar'):
            _load(tmp_path / 'killed' / name)
    resumed = _launch(tiny_data, tmp_path, 'killed', '--resume', 'latest')
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    _assert_same_end(straight_two_ranks, str(tmp_path / 'killed'))
