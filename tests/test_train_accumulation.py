"""Gradient accumulation in a real train.py run: micro-batches add up to the update of one large batch, and the EMA
and the schedule move once per update."""
import csv

import pytest
import torch
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3

pytestmark = pytest.mark.slow  # two whole runs compared

# No mixing, no dropout or drop-path, LayerNorm only (no batch statistics): a batch of 6 and two micro-batches of
# 3 see the same images (one RNG stream draws the order and the augmentations either way) and give the same
# gradient, up to float32 summation order. SGD with momentum (no Nesterov) keeps the update linear in the gradient.
UPDATE = ['--opt', 'momentum', '--weight-decay', '0', '--lr', '0.05', '--epochs', '1',
          '--sched-on-updates', '--model-ema', '--model-ema-decay', '0.5']
TOLERANCE = 1e-5  # on weights and EMA weights after 10 updates; about 3e-8 seen


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_two_micro_batches_make_the_update_of_one_batch(train_script, train_argv, tmp_path, monkeypatch):
    ema_steps, schedule_steps = [], []
    ema_update, step_update = ModelEmaV3.update, Scheduler.step_update

    def count_ema(self, model, step=None):
        ema_steps.append(step)
        return ema_update(self, model, step=step)

    def count_schedule(self, num_updates, metric=None):
        schedule_steps.append(num_updates)
        return step_update(self, num_updates, metric)
    monkeypatch.setattr(ModelEmaV3, 'update', count_ema)
    monkeypatch.setattr(Scheduler, 'step_update', count_schedule)

    assert train_script.run_main(train_argv(*UPDATE, '-b', '6', experiment='batch')) == 0
    assert ema_steps == schedule_steps == list(range(1, 11))  # 60 images, 10 batches: 10 updates
    ema_steps.clear()
    schedule_steps.clear()
    assert train_script.run_main(train_argv(*UPDATE, '-b', '3', '--grad-accum-steps', '2', experiment='accum')) == 0
    assert ema_steps == schedule_steps == list(range(1, 11))  # 20 micro-batches, still 10 updates

    batch, accum = (_load(tmp_path / 'out' / run / 'last.pth.tar') for run in ('batch', 'accum'))
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in batch[key].items():
            assert torch.allclose(accum[key][name], tensor, rtol=0, atol=TOLERANCE), f'{key}.{name}'
    lag = max((batch['state_dict'][name] - tensor).abs().max().item()
                for name, tensor in batch['state_dict_ema'].items())
    assert lag > 100 * TOLERANCE  # the EMA lags the weights: a per-micro-batch EMA would not match
    rows = []
    for run in ('batch', 'accum'):
        with open(tmp_path / 'out' / run / 'summary.csv') as f:
            rows += list(csv.DictReader(f))
    assert float(rows[1]['lr']) == pytest.approx(float(rows[0]['lr']), rel=1e-12)
    assert float(rows[1]['train_loss']) == pytest.approx(float(rows[0]['train_loss']), abs=1e-5)
