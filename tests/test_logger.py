"""The logging module: StepMeter's times, averages, ETA and lines (on a fake clock) and RunLogger's training images."""
import io
import logging

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tokenmix_train.logger import RunLogger, StepMeter


def _batches(count: int, size: int = 4):
    return [(torch.zeros(size, 3, 2, 2), torch.zeros(size, dtype=torch.long)) for _ in range(count)]


def _lines(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == 'tokenmix_train.logger']


def test_meter_times_data_and_steps_and_logs_averages_rate_and_eta(caplog):
    # (batch ready, step done) per step, from the start at 0: data 1, .5, 0, 1, .5 s; steps 4, 2, 3, 2, 1 s
    ticks = iter([0.0, 1.0, 4.0, 4.5, 6.0, 6.0, 9.0, 10.0, 11.0, 11.5, 12.0])
    logged = []
    meter = StepMeter(_batches(5), 'val', 2, world_size=2, clock=lambda: next(ticks),
                      on_log=lambda step, values: logged.append((step, values)))
    seen = []
    with caplog.at_level(logging.INFO, logger='tokenmix_train.logger'):
        for index, batch in enumerate(meter):
            seen.append((meter.index, meter.step, meter.due))
            if index == 1:
                meter.update(loss=0.5, lr=0.001)
    assert seen == [(0, 1, False), (1, 2, True), (2, 3, False), (3, 4, True), (4, 5, True)]
    assert (meter.data_time.val, meter.data_time.avg, meter.step_time.val, meter.step_time.avg) == (0.5, 0.6, 1, 2.4)
    assert meter.elapsed == 12.0
    # images/s since the previous line, all ranks: 2 batches x 4 images x 2 ranks in 6 s, then in 5 s, 8 in 1 s
    assert _lines(caplog) == [
        'val [2/5] loss 0.5 lr 0.001 2.7 img/s data 0.500 (0.750) s step 2.000 (3.000) s eta 0:00:09',
        'val [4/5] 3.2 img/s data 1.000 (0.625) s step 2.000 (2.750) s eta 0:00:03',
        'val [5/5] 8.0 img/s data 0.500 (0.600) s step 1.000 (2.400) s eta 0:00:00']
    assert logged == [(2, dict(loss=0.5, lr=0.001, img_per_sec=pytest.approx(16 / 6))),
                      (4, dict(img_per_sec=3.2)), (5, dict(img_per_sec=8.0))]


def test_meter_eta_is_hours_minutes_seconds(caplog):
    ticks = iter([0.0, 0.0, 4000.0, 4000.0, 4000.5, 4000.5, 4001.0])
    with caplog.at_level(logging.INFO, logger='tokenmix_train.logger'):
        for _ in StepMeter(_batches(3, size=1), 'train epoch 0', 1, clock=lambda: next(ticks)):
            pass
    assert [line.split(' eta ')[1] for line in _lines(caplog)] == ['2:13:20', '0:33:20', '0:00:00']


@pytest.mark.parametrize('batches_per_step, steps_before, due_steps', [
    (1, 0, [2, 4, 6, 7]),  # timm's cadence: every 2nd update over the run, and the epoch's last
    (1, 7, [8, 10, 12, 14]),  # the next epoch continues the count
    (2, 4, [6, 8]),  # accumulation: updates of 2 batches (the last one partial), 4 before this epoch
])
def test_meter_counts_log_steps_in_updates_over_the_run(batches_per_step, steps_before, due_steps):
    logged = []
    meter = StepMeter(_batches(7), 'train', 2, steps_before=steps_before, batches_per_step=batches_per_step,
                      on_log=lambda step, values: logged.append(step))
    assert [meter.step for _ in meter if meter.due] == due_steps
    assert logged == due_steps


def test_run_logger_saves_log_step_batches_only_with_save_images(tmp_path):
    images = torch.rand(2, 3, 8, 8)
    for folder, save in (tmp_path / 'on', True), (tmp_path / 'off', False):
        logger = RunLogger(str(folder), save_images=save)
        logger.train_batch(0, 3, images, None, log_step=True, last_step=False)
        logger.train_batch(0, 4, images, None, log_step=False, last_step=False)
        logger.close()
    assert sorted(p.name for p in (tmp_path / 'on').glob('*.jpg')) == ['train-batch-3.jpg']
    assert Image.open(tmp_path / 'on' / 'train-batch-3.jpg').size == (2 * 8, 8)  # one row, no padding
    assert not list((tmp_path / 'off').glob('*.jpg'))
    RunLogger(None, save_images=True).train_batch(0, 3, images, None, log_step=True, last_step=True)  # no folder


def test_run_logger_writes_one_grid_an_epoch_masked_first_else_the_first_batch(tmp_path):
    black, white = torch.full((2, 3, 8, 8), -1.0), torch.ones(2, 3, 8, 8)  # de-normalised 0 and 1
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    logger = RunLogger(str(tmp_path))
    logger.train_batch(0, 0, black, None, log_step=False, last_step=False)
    logger.train_batch(0, 1, white, mask, log_step=False, last_step=False)  # the grid of epoch 0
    logger.train_batch(0, 2, black, mask, log_step=False, last_step=True)
    logger.train_batch(1, 0, black, None, log_step=False, last_step=False)  # epoch 1 has no mask: its first batch
    logger.train_batch(1, 1, white, None, log_step=False, last_step=True)
    logger.close()
    events = EventAccumulator(str(tmp_path / 'tensorboard'), size_guidance={'images': 0})
    events.Reload()
    grids = events.Images('train/mixed_images')
    assert [e.step for e in grids] == [0, 1]
    assert [(e.height, e.width) for e in grids] == [(2 + 2 * 10, 2 + 2 * 10), (2 + 10, 2 + 2 * 10)]  # masks: 2 rows
    first_pixel = [Image.open(io.BytesIO(e.encoded_image_string)).convert('L').getpixel((2, 2)) for e in grids]
    assert first_pixel == [255, 0]
