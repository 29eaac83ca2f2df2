"""Mixing and teacher flags in a real train.py run, checked on what the mixer and the teacher were given."""
import pytest
import torch
from timm.data.mixup import mixup_target

from conftest import TINY_TEACHER
from tests.train_spies import spy_forwards, spy_mixers

BATCHES = 7  # 60 train images, -b 8, the last partial batch dropped


@pytest.mark.parametrize('mixer', ['TokenMix', 'Mixup'])
@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_mixup_off_epoch_stops_mixing_from_that_epoch(train_script, train_argv, monkeypatch, mixer):
    mixes = spy_mixers(monkeypatch)
    argv = train_argv('--mixup', '0.8', '--cutmix', '1.0', '--mixup-off-epoch', '1', '--epochs', '2',
                      *(['--tokenmix'] if mixer == 'TokenMix' else []))
    assert train_script.run_main(argv) == 0
    assert [type(mix.mixer).__name__ for mix in mixes] == [mixer] * 2 * BATCHES
    # epoch 0 mixes every batch; epoch 1 (>= --mixup-off-epoch) passes the images through with their labels
    assert all(mix.enabled and not torch.equal(mix.mixed, mix.images) for mix in mixes[:BATCHES])
    for mix in mixes[BATCHES:]:
        assert not mix.enabled and mix.mask is None and torch.equal(mix.mixed, mix.images)
        assert torch.allclose(mix.targets, mixup_target(mix.labels, 10, lam=1., smoothing=0.1))


def test_teacher_img_size_and_amp_change_what_the_teacher_sees(train_script, train_argv, teacher_checkpoint):
    """The teacher's stem (its only 3 x 3 convolution on 3 channels; the student embeds 8 x 8 patches) sees the
    32 px float32 batch; --teacher-img-size 16 --teacher-amp resize it and run the teacher in bfloat16."""
    teacher = ['--tokenmix', '--cutmix', '1.0', '--teacher-model', TINY_TEACHER, '--teacher-checkpoint',
               teacher_checkpoint, '--epochs', '1']
    seen = []
    for experiment, flags in (('plain', []), ('resized', ['--teacher-img-size', '16', '--teacher-amp',
                                                          '--amp-dtype', 'bfloat16'])):
        with spy_forwards(lambda m: isinstance(m, torch.nn.Conv2d) and m.in_channels == 3 and
                          m.kernel_size == (3, 3)) as stem:
            assert train_script.run_main(train_argv(*teacher, *flags, experiment=experiment)) == 0
        seen.append({(tuple(call.input.shape), call.input.dtype, call.output.dtype) for call in stem.calls})
        assert len(stem.calls) == BATCHES  # --cutmix 1.0 without --mixup: every batch is a token batch
    assert seen == [{((8, 3, 32, 32), torch.float32, torch.float32)},
                    {((8, 3, 16, 16), torch.float32, torch.bfloat16)}]
