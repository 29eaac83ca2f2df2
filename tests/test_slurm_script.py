"""scripts/slurm_train.sh without SLURM: fake `srun` and `scontrol` on PATH. SLURM's SIGUSR1 before the time limit
reaches the task, which saves its position and exits 3; the script requeues the job; the requeued job (the same
script again) continues with --resume latest and ends bit-identical to an uninterrupted run."""
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from conftest import ROOT
from test_preemption import RECIPE, _assert_same_end
from test_teacher_maps import _children

pytestmark = pytest.mark.slow  # whole runs through bash

FAKE_SRUN = '#!/usr/bin/env bash\n# one task: SLURM starts each task with SLURM_PROCID set\nwhile [[ "$1" == --* ]]; do shift; done\n' \
            'SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 exec "$@"\n'
FAKE_SCONTROL = '#!/usr/bin/env bash\nif [ "$1" = show ]; then echo localhost; else echo "$@" >> "$SCONTROL_LOG"; fi\n'


def _fake_slurm(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in (('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='42', SLURM_SUBMIT_DIR=ROOT,
                SCONTROL_LOG=str(tmp_path / 'scontrol.log'), PYTHONPATH=ROOT,
                OMP_NUM_THREADS=str(torch.get_num_threads()))  # as the in-process straight run: same last bits


def test_usr1_before_the_time_limit_requeues_and_the_job_continues(train_script, train_argv, tmp_path):
    env = _fake_slurm(tmp_path)
    argv = train_argv(*RECIPE, experiment='job')
    job = subprocess.Popen(['bash', os.path.join(ROOT, 'scripts', 'slurm_train.sh'), *argv], env=env,
                           cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / 'out' / 'job' / 'log.txt'
    end = time.monotonic() + 120
    while not (log.exists() and 'train epoch 0 [' in log.read_text()):
        assert job.poll() is None and time.monotonic() < end, job.communicate()
        time.sleep(0.05)
    task = _children(job.pid)
    os.kill(task[0], signal.SIGUSR1)  # SLURM signals the tasks (--signal=USR1@180), not the batch shell
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr[-3000:]
    assert 'requeueing job 42' in stdout
    assert (tmp_path / 'scontrol.log').read_text() == 'requeue 42\n'
    # wherever the signal lands (a quiet machine may end epoch 0 first), the position is saved and the job requeued
    assert re.search(r'stopped by SIGUSR1 at epoch [01] after batch \d+', log.read_text())
    again = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'slurm_train.sh'), *argv], env=env,
                           cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert train_script.run_main(train_argv(*RECIPE, experiment='straight')) == 0
    _assert_same_end(str(tmp_path / 'out' / 'straight'), str(tmp_path / 'out' / 'job'))


def test_the_script_needs_an_experiment(tmp_path):
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'slurm_train.sh'), '--data-dir', 'x'],
                          env=_fake_slurm(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and '--experiment NAME' in proc.stderr

