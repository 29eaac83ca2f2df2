"""tools/make_demo_data.py: layout, object records and masks, disjoint sources, determinism, bad flags."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image


def _tree_digest(root: str) -> str:
    digest = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, 'rb') as f:
                digest.update(f.read())
    return digest.hexdigest()


def test_layout_records_and_masks(tiny_data):
    for split, per_class in (('train', 6), ('val', 3)):
        assert sorted(os.listdir(os.path.join(tiny_data, split))) == [str(c) for c in range(10)]
        for c in range(10):
            assert len(os.listdir(os.path.join(tiny_data, split, str(c)))) == per_class
    with open(os.path.join(tiny_data, 'objects.json')) as f:
        meta = json.load(f)
    masks = np.load(os.path.join(tiny_data, 'object_masks.npz'))
    assert masks['train'].shape == (60, 32, 32) and masks['val'].shape == (30, 32, 32)
    assert masks['train'].dtype == bool
    for split in ('train', 'val'):
        for rec in meta[split]:
            assert rec['file'].split('/')[1] == str(rec['label'])  # folder = class = the digit
            img = Image.open(os.path.join(tiny_data, rec['file']))
            assert img.size == (32, 32) and img.mode == 'RGB'
            mask = masks[split][rec['mask_index']]
            ys, xs = np.nonzero(mask)
            assert rec['box'] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            x0, y0, x1, y1 = rec['box']
            # large digits (docs/training.md, "The demo"): the box spans at least a third of the side
            assert max(x1 - x0, y1 - y0) >= 32 // 3
    train_sources = {r['source_digit'] for r in meta['train']}
    val_sources = {r['source_digit'] for r in meta['val']}
    assert not train_sources & val_sources


def test_digit_pixels_show_the_digit(tiny_data):
    """Pixels under the mask differ from the dimmed background: the digit is pasted where the mask says."""
    with open(os.path.join(tiny_data, 'objects.json')) as f:
        meta = json.load(f)
    masks = np.load(os.path.join(tiny_data, 'object_masks.npz'))['val']
    brighter = 0
    for rec in meta['val']:
        img = np.asarray(Image.open(os.path.join(tiny_data, rec['file'])), dtype=np.float32)
        mask = masks[rec['mask_index']]
        brighter += img[mask].max(axis=1).mean() > img[~mask].max(axis=1).mean()
    assert brighter >= 0.9 * len(meta['val'])


def test_deterministic_from_seed(demo_tool, tmp_path):
    argv = ['--size', '24', '--train-per-class', '2', '--val-per-class', '1']
    for name, seed in (('a', 5), ('b', 5), ('c', 6)):
        assert demo_tool.main(['--out', str(tmp_path / name), '--seed', str(seed), *argv]) == 0
    assert _tree_digest(str(tmp_path / 'a')) == _tree_digest(str(tmp_path / 'b'))
    assert _tree_digest(str(tmp_path / 'a')) != _tree_digest(str(tmp_path / 'c'))


@pytest.mark.parametrize('argv, message', [
    (['--size', '8'], '--size must be at least 16'),
    (['--train-per-class', '0'], '--train-per-class and --val-per-class must be at least 1'),
    (['--digit-scale', '0.9', '0.5'], '--digit-scale needs'),
])
def test_bad_flags_exit_2(demo_tool, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        demo_tool.main(['--out', str(tmp_path / 'x'), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()


def test_refuses_non_empty_output(demo_tool, tmp_path, capsys):
    (tmp_path / 'x').mkdir()
    (tmp_path / 'x' / 'keep.txt').write_text('mine')
    with pytest.raises(SystemExit) as exc:
        demo_tool.main(['--out', str(tmp_path / 'x')])
    assert exc.value.code == 2 and 'is not empty' in capsys.readouterr().err
    assert os.listdir(tmp_path / 'x') == ['keep.txt']
