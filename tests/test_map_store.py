"""tokenmix_train.teacher_maps.MapStore: the index by key across shards, the checks made when a store is opened (each
fault one line naming --teacher-maps, the file and the fault), stores written before checksums, and the map served
with the image when --skip-bad-images skips one."""
import io
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageDataset
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms

from conftest import load_script
from tokenmix_train.data import CheckedImageDataset
from tokenmix_train.errors import ConfigError
from tokenmix_train.teacher_maps import (FORMAT, MANIFEST, MapStore, StoredMapDataset, record_maps, write_json_atomic,
                                         write_shard)

KEYS = ['a/0.png', 'a/1.png', 'a/2.png', 'b/0.png', 'b/1.png', 'b/2.png', 'b/10.png']  # 3 shards: 3, 3 and 1 rows


def _entry(value: float, label: int) -> np.ndarray:
    """One image's fp16 [2, K=2, 3, 3]: its own class `label` scores `value` everywhere, the other class 0."""
    values = np.stack([np.full((3, 3), value), np.zeros((3, 3))])
    indices = np.stack([np.full((3, 3), label), np.full((3, 3), 1 - label)])
    return np.stack([values, indices]).astype(np.float16)


def _write_store(root, keys=KEYS, shard_size=3) -> str:
    """A store of `keys` (class = folder), image i's own-class map the constant i + 1, written as the tool does."""
    os.makedirs(root, exist_ok=True)
    maps = np.stack([_entry(i + 1, key.startswith('b/')) for i, key in enumerate(keys)])
    shards = -(-len(keys) // shard_size)
    for shard in range(shards):
        rows = slice(shard * shard_size, (shard + 1) * shard_size)
        write_shard(str(root), shard, maps[rows], keys[rows])
    write_json_atomic(os.path.join(root, MANIFEST), dict(
        format=FORMAT, teacher='t', topk=2, map_size=[3, 3], classes=['a', 'b'], split='train', split_folder='train',
        num_images=len(keys), shard_size=shard_size, num_shards=shards))
    return str(root)


def test_every_key_reads_its_own_map_across_shards(tmp_path):
    store = MapStore(_write_store(tmp_path))
    for i, key in enumerate(KEYS):  # the last shard is shorter; keys are not in sorted order ('b/10' < 'b/2')
        values, indices = store.read(key)
        assert torch.equal(values[0], torch.full((3, 3), i + 1.)) and indices.dtype == torch.int64
        assert torch.equal(indices[0], torch.full((3, 3), int(key.startswith('b/'))))
    # absent keys: before, between and after the stored ones, a prefix of one, one longer than every stored key
    absent = ['0/0.png', 'a/10.png', 'c/0.png', 'b/1.pn', 'b/10.png/and/a/longer/name.png']
    assert store.has_maps(KEYS + absent).tolist() == [True] * len(KEYS) + [False] * len(absent)
    with pytest.raises(KeyError):
        store.read('b/1.pn')


def _truncate(root):
    path = os.path.join(root, 'shard-00001.npy')
    os.truncate(path, os.path.getsize(path) - 10)


def _fewer_rows(root):
    path = os.path.join(root, 'shard-00001.npy')
    np.save(path, np.load(path)[:2])


def _manifest(**change):
    def edit(root):
        manifest = json.loads(open(os.path.join(root, MANIFEST)).read())
        manifest.update(change)
        write_json_atomic(os.path.join(root, MANIFEST), {k: v for k, v in manifest.items() if v is not None})
    return edit


def _keys_file(edit):
    def change(root):
        path = os.path.join(root, 'shard-00000.json')
        record = json.loads(open(path).read())
        edit(record)
        write_json_atomic(path, record)
    return change


def _swap(record):
    record['keys'][0], record['keys'][2] = record['keys'][2], record['keys'][0]


def _other_data(root):
    shutil.copy(os.path.join(root, 'shard-00000.npy'), os.path.join(root, 'shard-00001.npy'))


def _edited_end(root):
    path = os.path.join(root, 'shard-00001.npy')
    maps = np.load(path)
    maps[-1, 0] += 1
    np.save(path, maps)


def _duplicate(root):
    write_shard(root, 1, np.stack([_entry(9, 1)] * 3), ['b/0.png', 'a/1.png', 'b/2.png'])


@pytest.mark.parametrize('fault, message', [
    (_truncate, r'shard-00001.npy has 334 bytes, its header needs 344 \(truncated\)'),
    (_fewer_rows, r'shard-00001.npy holds float16 \[2, 2, 2, 3, 3\], the manifest says float16 \[3, 2, 2, 3, 3\]'),
    (lambda root: open(os.path.join(root, 'shard-00002.npy'), 'wb').write(b'not numpy'),
     'shard-00002.npy is not a .npy array'),
    (_manifest(classes=None), "manifest.json has no 'classes'$"),
    (_manifest(topk='2'), "manifest.json 'topk' is str, not int$"),
    (_manifest(shard_size=0), "manifest.json 'shard_size' is 0, not >= 1$"),
    (_manifest(map_size=[3]), r"manifest.json 'map_size' is \[3\], not \[rows, columns\]$"),
    (_manifest(classes=['a', 'a']), "manifest.json 'classes' is not a list of distinct class names$"),
    (_manifest(num_shards=2), 'manifest.json gives 2 shards for 7 images of 3 a shard, not 3$'),
    (lambda root: open(os.path.join(root, 'shard-00002.json'), 'w').write('{"keys": ['),
     r'shard-00002.json cannot be read as JSON \(Expecting value'),
    (_keys_file(lambda record: record.update(keys='a/0.png')), 'shard-00000.json holds no list of image keys'),
    (_keys_file(lambda record: record['keys'].pop()),
     'shard-00000.json lists 2 images, the manifest gives this shard 3'),
    (_keys_file(_swap), r'shard-00000.json does not match its checksum: its keys were changed \(swapped, edited\)'),
    (_other_data, 'shard-00001.npy does not match the checksum in shard-00001.json: it holds other data'),
    (_edited_end, 'shard-00001.npy does not match the checksum in shard-00001.json'),
    (_duplicate, r"shard-00001.json lists 'a/1.png' a second time \(first in shard-00000.json\)"),
], ids=['truncated', 'fewer-rows', 'not-npy', 'no-classes', 'topk-str', 'shard-size-0', 'map-size', 'classes-twice',
        'num-shards', 'not-json', 'keys-not-a-list', 'keys-fewer', 'keys-swapped', 'other-data', 'edited-end',
        'duplicate'])
def test_a_faulty_store_is_refused_in_one_line_when_opened(tmp_path, fault, message):
    root = _write_store(tmp_path / 'store')
    MapStore(root)  # sound before the fault
    fault(root)
    with pytest.raises(ConfigError) as error:
        MapStore(root)
    text = str(error.value)
    assert len(text.splitlines()) == 1 and text.startswith(f"--teacher-maps '{root}': "), text
    assert re.search(message, text), text
    assert text.endswith('to remake it') == (MANIFEST not in message)  # a shard's fault says how to remake it


def test_a_store_without_checksums_is_read_with_one_warning_until_the_tool_adds_them(tmp_path, caplog):
    root = _write_store(tmp_path / 'store')
    written = {}
    for shard in range(3):  # as the tool wrote them before checksums were recorded
        path = os.path.join(root, f'shard-{shard:05d}.json')
        written[shard] = json.loads(open(path).read())
        write_json_atomic(path, dict(count=written[shard]['count'], keys=written[shard]['keys']))
    with caplog.at_level(logging.WARNING):
        store = MapStore(root)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and '3 of 3 shards were written without checksums' in warnings[0]
    assert 'rerun tools/precompute_teacher_maps.py' in warnings[0]
    assert torch.equal(store.read('b/10.png')[0][0], torch.full((3, 3), 7.))

    tool = load_script(os.path.join('tools', 'precompute_teacher_maps.py'))
    assert tool.add_checksums(root, range(3)) == 3 and tool.add_checksums(root, range(3)) == 0
    for shard in range(3):  # the very record write_shard makes
        assert json.loads(open(os.path.join(root, f'shard-{shard:05d}.json')).read()) == written[shard]
    caplog.clear()
    MapStore(root)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def _write_images(root, broken: str):
    """8 x 8 images named as KEYS, each a colour of its own; `broken` a JPEG cut short."""
    for i, key in enumerate(KEYS):
        os.makedirs(root / os.path.dirname(key), exist_ok=True)
        Image.new('RGB', (8, 8), (30 * i, 0, 0)).save(root / key)
    buffer = io.BytesIO()
    Image.new('RGB', (8, 8)).save(buffer, format='JPEG')
    (root / broken).write_bytes(buffer.getvalue()[:40])


def test_skipped_image_is_served_with_its_own_map(tmp_path):
    """--skip-bad-images serves the next readable image in place of a broken one: its label and its map."""
    _write_images(tmp_path / 'train', 'a/2.jpg')  # sorted between a/1.png and a/2.png
    checked = CheckedImageDataset(ImageDataset(str(tmp_path / 'train')), skip_bad=True)
    keys = [checked.reader.filename(i) for i in range(len(checked))]
    broken = keys.index('a/2.jpg')
    dataset = StoredMapDataset(checked, MapStore(_write_store(tmp_path / 'store', keys=keys)), (2, 2))
    dataset.transform = transforms.Compose([RandomResizedCropAndInterpolation(8, scale=(1., 1.), ratio=(1., 1.)),
                                            MaybeToTensor()])
    image, target = dataset[broken]
    assert checked.num_skipped == 1
    next_image, next_target = dataset[broken + 1]  # a/2.png, class a, the map of the store's row broken + 1
    assert torch.equal(image, next_image) and torch.equal(target, next_target)
    label, own_map = record_maps(target[None], (2, 2))
    assert label.item() == 0 and own_map.flatten().tolist() == [broken + 2.] * 4
