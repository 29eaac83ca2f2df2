"""A whole run on tiny data: TokenMix with a teacher, EMA, and every output file timm users expect."""
import csv
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tokenmix_train.args import parse_train_args
from tokenmix_train.logger import mixed_image_grid


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_tokenmix_teacher_run_writes_timm_outputs(train_script, train_argv, easy_data, easy_teacher_checkpoint,
                                                  tmp_path):
    # the DeiT recipe's augmentation and loss flags (RandAugment, random erasing, BCE) on the tiny model
    argv = train_argv('--tokenmix', '--mixup', '0.8', '--cutmix', '1.0', '--teacher-model', 'tokenmix_cnn_teacher_64',
                      '--teacher-checkpoint', easy_teacher_checkpoint, '--model-ema', '--checkpoint-hist', '1',
                      '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--remode', 'pixel', '--bce-loss',
                      data=easy_data)
    assert train_script.run_main(argv) == 0
    run = tmp_path / 'out' / 'run'
    files = sorted(os.listdir(run))
    assert [f for f in files if not f.startswith('checkpoint-')] == [
        'args.yaml', 'last.pth.tar', 'log.txt', 'model_best.pth.tar', 'summary.csv', 'tensorboard']
    assert len([f for f in files if f.startswith('checkpoint-')]) == 1  # --checkpoint-hist 1
    with open(run / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    # timm: with an evaluated EMA, eval_* are the EMA's metrics (they rank checkpoints); the raw model's beside them
    assert list(rows[0]) == ['epoch', 'train_loss', 'train_img_per_sec', 'eval_top1', 'eval_top5', 'eval_loss',
                             'eval_raw_top1', 'eval_raw_top5', 'eval_raw_loss', 'lr']
    # colour classes (chance 25%): a run whose mixing, targets or loss were broken would not learn them (the
    # raw model; the EMA, at timm's default decay, still lags after these few steps)
    assert len(rows) == 2 and float(rows[-1]['eval_raw_top1']) >= 90
    assert all(float(r['train_img_per_sec']) > 0 and float(r['train_loss']) > 0 for r in rows)

    again = parse_train_args(['-c', str(run / 'args.yaml')])[0]  # the run can be repeated from its args.yaml
    assert again.teacher_model == 'tokenmix_cnn_teacher_64' and again.tokenmix and again.model_ema
    assert again.tokenmix_target_norm == 'none'  # BCE: the authors' raw teacher weights

    events = EventAccumulator(str(run / 'tensorboard'), size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    tags = events.Tags()
    assert {'train/loss', 'train/lr', 'train/img_per_sec', 'eval/top1', 'eval/raw_top1'} <= set(tags['scalars'])
    # 7 updates an epoch: every 2nd update (counted over the run) and each epoch's last
    assert [e.step for e in events.Scalars('train/loss')] == [2, 4, 6, 7, 8, 10, 12, 14]
    images = events.Images('train/mixed_images')
    assert [e.step for e in images] == [0, 1]  # once per epoch
    # two rows of 8 images at 32 px (+2 px padding): the mixed images and their token masks
    assert (images[0].height, images[0].width) == (2 + 2 * 34, 2 + 8 * 34)


def test_mixed_image_grid_shows_images_and_masks():
    images = torch.zeros(4, 3, 16, 16)
    mask = torch.zeros(4, 2, 2, dtype=torch.bool)
    mask[:, 0, 1] = True  # top-right token pasted
    grid = mixed_image_grid(images, mask, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert grid.shape == (3, 2 + 2 * 18, 2 + 4 * 18)
    assert torch.allclose(grid[:, 2:18, 2:18], torch.full((3, 16, 16), 0.5))  # de-normalised zero = the mean
    mask_tile = grid[0, 20:36, 2:18]
    assert mask_tile[:8, 8:].eq(1).all() and mask_tile[:8, :8].eq(0).all() and mask_tile[8:].eq(0).all()
    assert mixed_image_grid(images, None, (0.5,) * 3, (0.25,) * 3).shape == (3, 2 + 18, 2 + 4 * 18)
