"""tools/show_mix.py and tools/show_cam.py write PNGs of the expected size from tiny demo data."""
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import models  # noqa: F401  registers the tiny models
from conftest import TINY_TEACHER, load_script


@pytest.fixture(scope='module')
def show_mix():
    return load_script(os.path.join('tools', 'show_mix.py'))


@pytest.fixture(scope='module')
def show_cam():
    return load_script(os.path.join('tools', 'show_cam.py'))


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == 'RGB'
        return np.asarray(img)


@pytest.mark.parametrize('with_teacher', [False, True])
def test_show_mix_grid(show_mix, tiny_data, teacher_checkpoint, tmp_path, with_teacher):
    out = tmp_path / 'mix.png'
    argv = ['--data-dir', tiny_data, '--pairs', '3', '--scale', '2', '--out', str(out)]
    if with_teacher:
        argv += ['--teacher-model', TINY_TEACHER, '--teacher-checkpoint', teacher_checkpoint]
    assert show_mix.main(argv) == 0
    pixels = _png(out)
    cell = 32 * 2
    assert pixels.shape == (3 * (cell + 2) + 2, 5 * (cell + 2) + 2, 3)  # 3 pairs x (A, B, mask, mixed, weights)
    mask_cell = pixels[2:2 + cell, 2 + 2 * (cell + 2):2 + 2 * (cell + 2) + cell]
    assert set(np.unique(mask_cell)) <= {0, 255} and 0 < (mask_cell == 255).mean() < 1  # a binary token mask


def test_show_mix_bad_input(show_mix, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        show_mix.main(['--data-dir', tiny_data, '--teacher-checkpoint', str(tmp_path / 'nope.pth'),
                       '--out', str(tmp_path / 'x.png')])
    assert e.value.code == 2 and '--teacher-checkpoint' in capsys.readouterr().err
    assert show_mix.main(['--data-dir', str(tmp_path), '--out', str(tmp_path / 'x.png')]) == 2
    assert 'objects.json not found' in capsys.readouterr().err


def test_show_cam_two_checkpoints(show_cam, tiny_data, tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = timm.create_model('tokenmix_vit_tiny_p8_64', img_size=32, embed_dim=32, depth=1, num_heads=2)
        paths.append(str(tmp_path / f'vit{seed}.pth.tar'))
        torch.save({'state_dict': model.state_dict()}, paths[-1])
    out = tmp_path / 'cam.png'
    assert show_cam.main(['--data-dir', tiny_data, '--model', 'tokenmix_vit_tiny_p8_64', '--img-size', '32',
                          '--model-kwargs', 'embed_dim=32', 'depth=1', 'num_heads=2', '--images', '2',
                          '--scale', '1', '--checkpoint', *paths, '--out', str(out)]) == 0
    pixels = _png(out)
    assert pixels.shape == (2 * 34 + 2, 3 * 34 + 2, 3)  # 2 images x (image, map 1, map 2)
    first, second = pixels[2:34, 36:68], pixels[2:34, 70:102]
    assert not np.array_equal(first, second)  # two different models, two different maps


def test_show_cam_rejects_three_checkpoints(show_cam, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        show_cam.main(['--data-dir', str(tmp_path), '--model', 'm', '--checkpoint', 'a', 'b', 'c',
                       '--out', str(tmp_path / 'x.png')])
    assert e.value.code == 2 and 'one or two' in capsys.readouterr().err
