"""Checkpoints: resume continues bit for bit, writes are atomic, a non-finite loss keeps the last good one, and
files load with a plain torch.load and with timm's loaders."""
import argparse
import os
import subprocess
import sys

import pytest
import timm
import torch
from timm.models import load_checkpoint, resume_checkpoint

from conftest import run_until_epoch
from tokenmix_train.checkpoint import AtomicCheckpointSaver

pytestmark = pytest.mark.slow  # several whole runs per test

TOKENMIX = ['--tokenmix', '--mixup', '0.8', '--cutmix', '1.0', '--model-ema', '--model-ema-decay', '0.9',
            '--drop-path', '0.1', '--epochs', '3']


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.parametrize('workers', [0, 1])
def test_resume_matches_uninterrupted_run(train_script, train_argv, teacher_checkpoint, tmp_path, monkeypatch,
                                          workers, caplog):
    """Bit-identical with loader workers too: each epoch's workers are seeded from the restored RNG state."""
    teacher = ['--teacher-model', 'tokenmix_cnn_teacher_64', '--teacher-checkpoint', teacher_checkpoint,
               '--workers', str(workers), '--color-jitter', '0.4', '--reprob', '0.25']
    assert train_script.run_main(train_argv(*TOKENMIX, *teacher, experiment='straight')) == 0

    run_until_epoch(train_script, monkeypatch, train_argv(*TOKENMIX, *teacher, experiment='stopped'), 2)
    stopped = tmp_path / 'out' / 'stopped'
    assert _load(stopped / 'last.pth.tar')['epoch'] == 1
    assert train_script.run_main(train_argv(*TOKENMIX, *teacher, '--resume', str(stopped / 'last.pth.tar'),
                                            experiment='stopped')) == 0
    assert 'will not continue bit for bit' not in caplog.text

    a, b = _load(tmp_path / 'out' / 'straight' / 'last.pth.tar'), _load(stopped / 'last.pth.tar')
    assert a['epoch'] == b['epoch'] == 2
    for key in ('state_dict', 'state_dict_ema'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name} differs after resume'
    assert torch.equal(a['rng_states'][0]['generator'], b['rng_states'][0]['generator'])
    with open(tmp_path / 'out' / 'straight' / 'summary.csv') as f:
        straight_rows = f.read().splitlines()
    with open(stopped / 'summary.csv') as f:
        resumed_rows = f.read().splitlines()
    assert len(resumed_rows) == len(straight_rows) == 4  # header + 3 epochs, the resumed run appended one
    assert [r.split(',')[:2] for r in resumed_rows] == [r.split(',')[:2] for r in straight_rows]
    # the student checkpoint never holds the teacher
    assert not any(k.startswith(('teacher', 'model.')) for k in a['state_dict'])
    assert set(a) >= {'state_dict', 'state_dict_ema', 'optimizer', 'scheduler', 'rng_states', 'args', 'saver'}


def test_saves_are_atomic_and_history_bounded(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = AtomicCheckpointSaver(model=model, optimizer=optimizer, checkpoint_dir=str(tmp_path),
                                  recovery_dir=str(tmp_path), max_history=2)
    for epoch, metric in enumerate([1.0, 3.0, 2.0, 0.5]):
        saver.save(epoch, metric, dict(note=epoch))
    files = sorted(os.listdir(tmp_path))
    assert files == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    assert _load(tmp_path / 'model_best.pth.tar')['epoch'] == 1
    assert _load(tmp_path / 'last.pth.tar')['note'] == 3

    def crash(obj, f, *args, **kwargs):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt  # the run is killed while writing

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        saver.save(4, 9.0, {})
    assert _load(tmp_path / 'last.pth.tar')['epoch'] == 3  # the previous complete file is untouched
    assert _load(tmp_path / 'model_best.pth.tar')['epoch'] == 1


class NanAtCall(torch.nn.Module):
    """The run's criterion, except that call number `bad_call` (1-based) returns NaN."""

    def __init__(self, criterion, bad_call: int):
        super().__init__()
        self.criterion, self.bad_call, self.calls = criterion, bad_call, 0

    def forward(self, output, target):
        self.calls += 1
        loss = self.criterion(output, target)
        return loss * float('nan') if self.calls == self.bad_call else loss


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(train_script, train_argv, tmp_path, monkeypatch,
                                                              caplog):
    real = train_script.build_criterion
    # 60 images, -b 8: 7 batches an epoch, so call 10 is epoch 1, step 2 (0-based)
    monkeypatch.setattr(train_script, 'build_criterion', lambda args: NanAtCall(real(args), bad_call=10))
    assert train_script.run_main(train_argv('--epochs', '3', '--log-interval', '50')) == 1
    assert 'non-finite training loss at epoch 1, step 2 (batch 3 of 7)' in caplog.text
    assert 'last good checkpoint kept' in caplog.text
    out = tmp_path / 'out' / 'run'
    assert _load(out / 'last.pth.tar')['epoch'] == 0
    assert not (out / 'checkpoint-1.pth.tar').exists()
    with open(out / 'summary.csv') as f:
        assert len(f.read().splitlines()) == 2  # header + epoch 0


def test_checkpoints_load_with_plain_torch_load_and_timm(train_script, train_argv, tmp_path, caplog):
    assert train_script.run_main(train_argv('--epochs', '1', '--model-ema')) == 0
    out = tmp_path / 'out' / 'run'
    # a fresh Python, nothing of this project imported, torch.load's defaults (weights_only=True)
    code = ("import sys, torch; c = torch.load(sys.argv[1]); "
            "print(c['epoch'], type(c['args']).__name__, c['args']['model'], c['args']['model_kwargs'])")
    shown = subprocess.run([sys.executable, '-c', code, str(out / 'model_best.pth.tar')], cwd=str(tmp_path),
                           env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'},
                           capture_output=True, text=True, check=True).stdout
    assert shown.split() == ['0', 'dict', 'tokenmix_vit_tiny_p8_64', "{'embed_dim':", "32,", "'depth':", "1,",
                             "'num_heads':", "2}"]
    saved = _load(out / 'last.pth.tar')
    model = timm.create_model('tokenmix_vit_tiny_p8_64', img_size=32, num_classes=10, embed_dim=32, depth=1,
                              num_heads=2)
    load_checkpoint(model, str(out / 'last.pth.tar'), use_ema=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved['state_dict'][name]), name
    optimizer = timm.optim.create_optimizer_v2(model, 'adamw', weight_decay=2e-5)  # as train.py: two groups
    assert resume_checkpoint(model, str(out / 'last.pth.tar'), optimizer=optimizer) == 1  # timm: the next epoch
    assert optimizer.state_dict()['state'][0]['step'] == saved['optimizer']['state'][0]['step']

    # an older file, with args stored as an argparse.Namespace, still resumes; what makes it inexact is named
    saved['args'] = argparse.Namespace(**saved['args'])
    threads = saved['numerics']['threads']
    saved['numerics']['threads'] += 1
    del saved['rng_states']
    old = tmp_path / 'old.pth.tar'
    torch.save(saved, old)
    assert train_script.run_main(train_argv('--epochs', '2', '--model-ema', '--resume', str(old), '--workers', '1',
                                            experiment='from_old')) == 0
    assert _load(tmp_path / 'out' / 'from_old' / 'last.pth.tar')['epoch'] == 1
    assert (f"resuming '{old}' will not continue bit for bit like an uninterrupted run: the checkpoint holds no RNG "
            f"states, so random streams are reseeded; CPU threads "
            f"{threads}, the checkpoint was written with {threads + 1}") in caplog.text
