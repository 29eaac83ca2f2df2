"""Checkpoints: resume continues bit for bit, writes are atomic, a non-finite loss keeps the last good one."""
import os

import pytest
import torch

import tokenmix.engine as engine
from tokenmix.checkpoint import AtomicCheckpointSaver

TOKENMIX = ['--tokenmix', '--mixup', '0.8', '--cutmix', '1.0', '--model-ema', '--model-ema-decay', '0.9',
            '--drop-path', '0.1', '--epochs', '3']


def _load(path):
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.parametrize('workers', [0, 1])
def test_resume_matches_uninterrupted_run(train_script, train_argv, teacher_checkpoint, tmp_path, monkeypatch,
                                          workers):
    """Bit-identical with loader workers too: each epoch's workers are seeded from the restored RNG state."""
    teacher = ['--teacher-model', 'tokenmix_cnn_teacher_64', '--teacher-checkpoint', teacher_checkpoint,
               '--workers', str(workers), '--color-jitter', '0.4', '--reprob', '0.25']
    assert train_script.run_main(train_argv(*TOKENMIX, *teacher, experiment='straight')) == 0

    class Stop(Exception):
        pass

    real = engine.train_one_epoch

    def stop_at_epoch_2(run, epoch, loader):
        if epoch == 2:
            raise Stop()
        return real(run, epoch, loader)

    monkeypatch.setattr(engine, 'train_one_epoch', stop_at_epoch_2)
    with pytest.raises(Stop):
        train_script.run_main(train_argv(*TOKENMIX, *teacher, experiment='stopped'))
    monkeypatch.setattr(engine, 'train_one_epoch', real)
    stopped = tmp_path / 'out' / 'stopped'
    assert _load(stopped / 'last.pth.tar')['epoch'] == 1
    assert train_script.run_main(train_argv(*TOKENMIX, *teacher, '--resume', str(stopped / 'last.pth.tar'),
                                            experiment='stopped')) == 0

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
