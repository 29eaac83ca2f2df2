"""tools/show_mix.py and tools/show_cam.py: figures whose panels say what they show, written as PNGs."""
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


def _png_size(path) -> tuple:
    with Image.open(path) as img:
        return img.size


@pytest.mark.parametrize('with_teacher', [False, True])
@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_show_mix_titles_legend_and_weights(show_mix, tiny_data, teacher_checkpoint, tmp_path, with_teacher):
    argv = ['--data-dir', tiny_data, '--pairs', '3', '--out', str(tmp_path / 'mix.png')]
    if with_teacher:
        argv += ['--teacher-model', TINY_TEACHER, '--teacher-checkpoint', teacher_checkpoint]
    fig = show_mix.render(show_mix.parse_args(argv))
    axes = np.array(fig.axes).reshape(3, 5)
    assert [ax.get_title() for ax in axes[0]] == ['image A', 'partner B', 'token mask\n(white: tokens from B)',
                                                  'mixed image', 'label weights']
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ['own label (A)', 'partner label (B)']
    groups = ['area', 'teacher', 'true'] if with_teacher else ['area', 'true']
    for row in axes:
        mask = row[2].get_images()[0].get_array()
        assert mask.shape == (32, 32, 3) and set(np.unique(mask)) == {0.0, 1.0}  # a binary mask, both sources
        assert (mask[..., 0] == 1).mean() == pytest.approx(37 / 64)  # 8 x 8 tokens of 4 px, lam 0.5 + 5 tokens
        assert [t.get_text() for t in row[4].get_xticklabels()] == groups
        own, partner = ([p.get_height() for p in c] for c in row[4].containers)
        assert own[0] == pytest.approx(27 / 64) and partner[0] == pytest.approx(37 / 64)  # area weights
        assert np.allclose(np.add(own, partner), 1)  # every group normalised to sum 1
    assert show_mix.main(argv) == 0
    assert _png_size(tmp_path / 'mix.png') == (800, 590)  # 8 x 5.9 in at 100 dpi


def test_show_mix_bad_input(show_mix, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        show_mix.main(['--data-dir', tiny_data, '--teacher-checkpoint', str(tmp_path / 'nope.pth'),
                       '--out', str(tmp_path / 'x.png')])
    assert e.value.code == 2 and '--teacher-checkpoint' in capsys.readouterr().err
    assert show_mix.main(['--data-dir', str(tmp_path), '--out', str(tmp_path / 'x.png')]) == 2
    assert 'objects.json not found' in capsys.readouterr().err
    assert not (tmp_path / 'x.png').exists()


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_show_cam_names_each_model(show_cam, tiny_data, tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = timm.create_model('tokenmix_vit_tiny_p8_64', img_size=32, embed_dim=32, depth=1, num_heads=2)
        folder = tmp_path / f'run{seed}'
        folder.mkdir()
        paths.append(str(folder / 'model_best.pth.tar'))
        torch.save({'state_dict': model.state_dict()}, paths[-1])
    common = ['--data-dir', tiny_data, '--model', 'tokenmix_vit_tiny_p8_64', '--img-size', '32',
              '--model-kwargs', 'embed_dim=32', 'depth=1', 'num_heads=2', '--images', '2', '--checkpoint', *paths]
    fig = show_cam.render(show_cam.parse_args(common + ['--labels', 'Mixup', 'TokenMix', '--out', 'x.png']))
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles == ['image', 'Mixup:\ntrue-class map', 'TokenMix:\ntrue-class map']
    first, second = (fig.axes[k].get_images()[0].get_array() for k in (1, 2))
    assert not np.array_equal(first, second)  # two different models, two different maps
    colour_bar = fig.axes[-1]
    assert [t.get_text() for t in colour_bar.get_yticklabels()] == ['low', 'high']
    default = show_cam.parse_args(common + ['--out', 'x.png'])
    assert default.labels == ['run0', 'run1']  # the checkpoints' folders
    out = tmp_path / 'cam.png'
    assert show_cam.main(common + ['--out', str(out)]) == 0
    assert _png_size(out) == (650, 400)  # (1.9 x 3 + 0.8) x (1.7 x 2 + 0.6) in at 100 dpi


def test_show_cam_bad_input(show_cam, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        show_cam.main(['--data-dir', str(tmp_path), '--model', 'm', '--checkpoint', 'a', 'b', 'c',
                       '--out', str(tmp_path / 'x.png')])
    assert e.value.code == 2 and 'one or two' in capsys.readouterr().err
    (tmp_path / 'a').write_bytes(b'')
    with pytest.raises(SystemExit) as e:
        show_cam.main(['--data-dir', str(tmp_path), '--model', 'm', '--checkpoint', str(tmp_path / 'a'),
                       '--labels', 'x', 'y', '--out', str(tmp_path / 'x.png')])
    assert e.value.code == 2 and '--labels takes one name per checkpoint' in capsys.readouterr().err
