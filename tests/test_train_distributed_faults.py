"""Two processes with torchrun (gloo, CPU) beyond a clean run: targets from stored maps, a run killed with SIGKILL
and resumed, BatchNorm statistics (--dist-bn, --sync-bn).

Each rank's own record (what its mixer saw and returned, the model it ended with) comes from tests/record_train.py,
which runs train.py's `main` with the mixer wrapped.
"""
import argparse
import contextlib
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

from conftest import ROOT, TINY_TEACHER, load_script
from record_train import record_run
from test_teacher_maps import _children
from tokenmix_train.args import parse_train_args
from tokenmix_train.mixing import build_mixer
from tokenmix_train.teacher_maps import record_maps

pytestmark = [pytest.mark.slow,  # torchrun with two processes, kills and resumes
              pytest.mark.skipif(not torch.distributed.is_available() or not os.path.isdir('/proc'),
                                 reason='needs torch.distributed and /proc')]

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
RECORDER = os.path.join(ROOT, 'tests', 'record_train.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
TRAIN_IMAGES = 60  # the tiny train split
# the tiny CNN as student, one epoch; the trailing --model-kwargs clears the ViT keywords of `train_argv`
CNN_STUDENT = ('--model', TINY_TEACHER, '--epochs', '1', '--model-kwargs')


def _torchrun(*argv: str, cwd) -> None:
    """Run `argv` (a script and its arguments) on two ranks to its end; it must succeed."""
    proc = subprocess.run([*TORCHRUN, *argv], cwd=str(cwd), env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _kill_torchrun(proc: subprocess.Popen) -> None:
    """SIGKILL, no clean-up: the workers (each in a session of its own, with any loader processes), then torchrun."""
    for pid in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


def test_stored_map_targets_on_two_ranks_equal_a_single_process_run(train_argv, tiny_data, teacher_checkpoint,
                                                                     tmp_path):
    """Each sample's label and own map, and the soft targets mixed from them, are those of a one-process run.

    The crop is the whole image (--scale 1 1 --ratio 1 1, no flip), so a sample's own map does not depend on the
    random stream that drew its augmentation; the soft targets are checked by replaying each rank's mixer call
    (its generator state) on the single run's targets for the same samples.
    """
    store = str(tmp_path / 'maps')
    tool = load_script(os.path.join('tools', 'precompute_teacher_maps.py'))
    assert tool.main(['--data-dir', tiny_data, '--teacher-model', TINY_TEACHER, '--teacher-checkpoint',
                      teacher_checkpoint, '--out', store, '--img-size', '64', '--shard-size', '16', '--workers', '0',
                      '-b', '8']) == 0  # 8 x 8 maps, averaged onto the 4 x 4 token grid
    flags = ('--tokenmix', '--cutmix', '1.0', '--mixup-mode', 'elem', '--teacher-maps', store, '--teacher-model',
             TINY_TEACHER, '--teacher-topk', '3', '--scale', '1', '1', '--ratio', '1', '1', '--hflip', '0',
             '-b', '6', '--epochs', '1')  # 60 images: 5 batches a rank, 10 in one process, none dropped
    single, double = tmp_path / 'single', tmp_path / 'double'
    single.mkdir()
    double.mkdir()
    assert record_run(str(single), train_argv(*flags, experiment='single')) == 0
    argv = train_argv(*flags, experiment='double')
    _torchrun(RECORDER, '--record', str(double), '--', *argv, cwd=tmp_path)

    reference = {}
    for call in _load(single / 'rank0.pt')['calls']:
        reference.update(zip(call['indices'], call['targets']))
    assert sorted(reference) == list(range(TRAIN_IMAGES))
    # maps that weigh the labels (measured: 35; the random teacher's top 3 misses the own class of the others)
    own_maps = record_maps(torch.stack(list(reference.values())), (4, 4))[1]
    assert sum(bool(own.gt(0).any()) for own in own_maps) >= TRAIN_IMAGES // 2
    args = parse_train_args(argv)[0]
    seen = []
    for rank in (0, 1):
        calls = _load(double / f'rank{rank}.pt')['calls']
        assert len(calls) == 5
        for call in calls:
            expected = torch.stack([reference[index] for index in call['indices']])
            assert torch.equal(call['targets'], expected), (rank, call['indices'])  # records: label, maps, geometry
            generator = torch.Generator().set_state(call['generator'])
            mixer = build_mixer(args, 10, 8, None, generator)  # 10 classes, 8 px tokens, no teacher (stored maps)
            _, soft = mixer(torch.zeros(6, 3, 32, 32), expected)
            assert torch.equal(mixer.last_mask, call['mask'])
            assert torch.equal(soft, call['soft']), (rank, call['indices'])
            seen += call['indices']
    assert sorted(seen) == list(range(TRAIN_IMAGES))  # the ranks share the epoch: every sample once


def test_two_ranks_killed_after_an_epoch_resume_bit_for_bit(train_argv, teacher_checkpoint, tmp_path):
    flags = ('--tokenmix', '--mixup', '0.8', '--cutmix', '1.0', '--teacher-model', TINY_TEACHER,
             '--teacher-checkpoint', teacher_checkpoint, '--model-ema', '--model-ema-decay', '0.9',
             '--log-interval', '50')
    train = os.path.join(ROOT, 'train.py')
    _torchrun(train, *train_argv(*flags, experiment='straight'), cwd=tmp_path)

    record = tmp_path / 'record'
    record.mkdir()
    with open(tmp_path / 'killed.log', 'w') as log:
        proc = subprocess.Popen([*TORCHRUN, RECORDER, '--record', str(record), '--hold-at-epoch', '1', '--',
                                 *train_argv(*flags, experiment='killed')], cwd=str(tmp_path), env=ENV,
                                stdout=log, stderr=subprocess.STDOUT)
        try:  # both ranks are in epoch 1: rank 0 has saved epoch 0
            deadline = time.monotonic() + 180
            while not all((record / f'held-rank{rank}').exists() for rank in (0, 1)):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / 'killed.log').read_text()
                time.sleep(0.05)
        finally:
            _kill_torchrun(proc)
    run = tmp_path / 'out' / 'killed'
    assert _load(run / 'last.pth.tar')['epoch'] == 0 and not (run / 'checkpoint-1.pth.tar').exists()
    assert not (record / 'rank0.pt').exists()  # killed, not finished

    _torchrun(train, *train_argv(*flags, '--resume', str(run / 'last.pth.tar'), experiment='killed'), cwd=tmp_path)
    straight, resumed = (_load(tmp_path / 'out' / name / 'last.pth.tar') for name in ('straight', 'killed'))
    assert straight['epoch'] == resumed['epoch'] == 1
    for key in ('state_dict', 'state_dict_ema'):
        assert straight[key].keys() == resumed[key].keys()
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f'{key}.{name} differs after the resume'
    for rank in (0, 1):  # each rank's streams went on from its own saved state
        assert torch.equal(straight['rng_states'][rank]['generator'], resumed['rng_states'][rank]['generator'])
    rows = {}
    for name in ('straight', 'killed'):
        with open(tmp_path / 'out' / name / 'summary.csv') as f:
            rows[name] = [{k: v for k, v in row.items() if 'per_sec' not in k} for row in csv.DictReader(f)]
    assert [int(row['epoch']) for row in rows['killed']] == [0, 1]  # each epoch once
    assert rows['killed'] == rows['straight']


def test_every_rank_ends_an_epoch_with_the_same_batchnorm_statistics(train_argv, tmp_path):
    """A CNN student on two ranks: --dist-bn reduce (the default) averages the statistics each rank gathered from
    its own batches, so each rank evaluates its shard with one model, the one that is saved."""
    record = tmp_path / 'record'
    record.mkdir()
    _torchrun(RECORDER, '--record', str(record), '--', *train_argv(*CNN_STUDENT, experiment='cnn'), cwd=tmp_path)

    plain = timm.create_model(TINY_TEACHER, num_classes=10)
    norms = {name for name, module in plain.named_modules() if isinstance(module, torch.nn.BatchNorm2d)}
    assert len(norms) >= 10
    ranks = [_load(record / f'rank{rank}.pt') for rank in (0, 1)]
    assert {name for name, kind in ranks[0]['modules'].items() if kind == 'BatchNorm2d'} == norms
    saved = _load(tmp_path / 'out' / 'cnn' / 'last.pth.tar')['state_dict']
    for name in norms:
        for buffer in ('running_mean', 'running_var', 'num_batches_tracked'):
            key = f'{name}.{buffer}'
            assert torch.equal(ranks[0]['state_dict'][key], ranks[1]['state_dict'][key]), key
            assert torch.equal(saved[key], ranks[0]['state_dict'][key]), key
        assert int(saved[f'{name}.num_batches_tracked']) == 3  # 30 images a rank, 8 a batch


def test_sync_bn_on_cpu_ranks_is_a_one_line_error(train_argv, tmp_path):
    proc = subprocess.run([*TORCHRUN, os.path.join(ROOT, 'train.py'),
                           *train_argv(*CNN_STUDENT, '--sync-bn', '--device', 'cpu')],
                          cwd=str(tmp_path), env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert 'train.py: error: --sync-bn' in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / 'out').exists()  # refused before anything is written
