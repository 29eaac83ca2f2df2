"""Top-k maps, the map store and training from stored maps: alignment with the online teacher, orientation,
precompute with one and two processes (killed once, resumed), the authors' per-image layout, clear errors."""
import argparse
import filecmp
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from timm.models import get_pretrained_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torchvision import transforms

from conftest import ROOT, TINY_TEACHER, load_script
from mixup_ext import TokenMix, crop_map, own_class_maps, own_map_from_topk, truncate_to_topk
from models import Teacher, build_teacher
from tokenmix_train.args import parse_train_args
from tokenmix_train.errors import ConfigError
from tokenmix_train.teacher_maps import (FORMAT, MANIFEST, AuthorsMapStore, MapStore, StoredMapDataset, StoredMapsMixer,
                                   map_box, open_map_store, pack_record, record_maps, wrap_train_dataset,
                                   write_json_atomic, write_shard)

GEOMETRIC = ['Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']
IMAGE_W, IMAGE_H = 48, 40
FILL = (123, 115, 103)  # one step under ImageNet's mean in each channel


@register_model
def tokenmix_test_pointwise_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A translation-equivariant teacher: 1 px patches, no blocks, no position embedding: a per-pixel linear map."""
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith(('pretrained_cfg', 'cache_dir'))}
    kwargs.setdefault('num_classes', 4)
    model = VisionTransformer(img_size=IMAGE_W, patch_size=1, embed_dim=4, depth=0, num_heads=1, class_token=False,
                              global_pool='avg', pos_embed='none', dynamic_img_size=True, **kwargs)
    model.fc_norm = torch.nn.Identity()
    return model


@pytest.fixture(scope='module')
def tool():
    return load_script(os.path.join('tools', 'precompute_teacher_maps.py'))


@pytest.fixture(scope='module')
def smooth_data(tmp_path_factory) -> str:
    """4 classes x 3 images of 48 x 40 px: colour blobs on gradients (smooth, so resampling orders barely differ)."""
    root = tmp_path_factory.mktemp('smooth')
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:IMAGE_H, 0:IMAGE_W].astype(np.float32)
    for c in range(4):
        os.makedirs(root / 'train' / f'c{c}')
        for i in range(3):
            img = 0.3 + 0.3 * (xx / IMAGE_W)[..., None] * rng.uniform(0, 1, 3)
            for _ in range(2):
                cx, cy, s = rng.uniform(8, 40), rng.uniform(8, 32), rng.uniform(5, 9)
                blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
                img = img + rng.uniform(-0.5, 0.6, 3) * blob[..., None]
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / 'train' / f'c{c}' / f'{i}.png')
    return str(root)


@pytest.fixture(scope='module')
def pointwise_checkpoint(tmp_path_factory) -> str:
    """Class c < 3 reads colour channel c, class 3 green minus red; no biases. The fill of the geometric ops
    (`FILL`, just under the mean) then scores <= 0 for every class, as the zero the stored maps are filled with."""
    model = tokenmix_test_pointwise_vit()
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.weight[:3, :, 0, 0] = torch.eye(3)
        model.patch_embed.proj.bias.zero_()
        model.head.weight.copy_(torch.tensor([[1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [-1., 1., 0, 0]]))
        model.head.bias.zero_()
    path = str(tmp_path_factory.mktemp('pointwise') / 'pointwise.pth')
    torch.save(model.state_dict(), path)
    return path


def test_truncate_to_topk_zeroes_positions_outside_the_top_k():
    maps = torch.tensor([[[[5., 1.]], [[4., 3.]], [[1., 2.]]]])  # 1 image, 3 classes, 1 x 2 positions
    own = own_class_maps(maps, torch.tensor([1]), 3)  # class 1: [4, 3]
    assert torch.equal(truncate_to_topk(own, maps, 1), torch.tensor([[[0., 3.]]]))  # top-1: class 0, then class 1
    assert torch.equal(truncate_to_topk(own, maps, 2), torch.tensor([[[4., 3.]]]))
    assert torch.equal(truncate_to_topk(own, maps, 0), own)
    values, indices = maps[0].topk(2, dim=0)
    assert torch.equal(own_map_from_topk(values, indices, 1), torch.tensor([[4., 3.]]))
    assert torch.equal(own_map_from_topk(values, indices, 1, k=1), torch.tensor([[0., 3.]]))
    assert torch.equal(own_map_from_topk(values, indices, 2), torch.tensor([[0., 2.]]))


def test_tokenmix_teacher_topk_weights():
    # image 0 (class 0) is seen on the left, but class 1 wins at its right half: top-1 keeps only the left
    maps = torch.zeros(2, 2, 2, 2)
    maps[0, 0] = torch.tensor([[1., 1.], [1., 1.]])
    maps[0, 1] = torch.tensor([[0., 3.], [0., 3.]])
    maps[1, 1] = 1.
    kwargs = dict(mixup_alpha=0., cutmix_alpha=1., label_smoothing=0., num_classes=2, patch_size=1,
                  mask_type='random', min_tokens=0)
    x, labels = torch.zeros(2, 3, 2, 2), torch.tensor([0, 1])
    full = TokenMix(**kwargs, teacher=lambda _: maps, generator=torch.Generator().manual_seed(0))
    top1 = TokenMix(**kwargs, teacher=lambda _: maps, teacher_topk=1, generator=torch.Generator().manual_seed(0))
    full(x.clone(), labels)
    top1(x.clone(), labels)
    mask = top1.last_mask[0]
    assert torch.equal(full.last_mask, top1.last_mask)
    kept_full = (~mask).float().mean().item()
    kept_left = (~mask[:, 0]).float().sum().item() / 2
    assert full.last_weights[0, 0].item() == pytest.approx(kept_full)
    assert top1.last_weights[0, 0].item() == pytest.approx(kept_left)


def test_crop_map_orientation_whole_and_centre():
    grid = torch.arange(64.).view(8, 8)  # value = 8 * row + col
    tr = crop_map(grid, (4, 0, 8, 4), (2, 2))  # top-right quadrant on a 2 x 2 grid: its four 2 x 2 block means
    assert torch.allclose(tr, torch.tensor([[8.5, 10.5], [24.5, 26.5]]))
    assert torch.allclose(crop_map(grid, (4, 0, 8, 4), (2, 2), hflip=True), tr.flip(-1))
    assert torch.allclose(crop_map(grid, (4, 0, 8, 4), (2, 2), vflip=True), tr.flip(-2))
    # an image of 80 x 64 px (width x height) with an 8 x 8 map; the crop is its top-right 40 x 32 px
    assert map_box((0, 40, 32, 40), (80, 64), (8, 8), 'whole') == (4.0, 0.0, 8.0, 4.0)
    # centre coverage: the map spans x in [8, 72) px; the same crop starts at x = 32 px = map column 4
    assert map_box((0, 40, 32, 40), (80, 64), (8, 8), 'centre') == (4.0, 0.0, 9.0, 4.0)


def _write_pattern_stores(root, k=2):
    """One image (class 1 of 2, 80 x 64 px) in both layouts; class 1's map value = 8 * row + col, class 0 ranks
    first everywhere and class 1 second."""
    os.makedirs(root / 'data' / 'train' / 'a')
    os.makedirs(root / 'data' / 'train' / 'b')
    Image.new('RGB', (80, 64)).save(root / 'data' / 'train' / 'b' / 'img.png')
    Image.new('RGB', (80, 64)).save(root / 'data' / 'train' / 'a' / 'other.png')
    values = torch.stack([torch.full((8, 8), 100.), torch.arange(64.).view(8, 8)])
    indices = torch.stack([torch.zeros(8, 8), torch.ones(8, 8)])
    entry = torch.stack([values, indices]).half()  # [2, K, h, w]
    store = root / 'store'
    os.makedirs(store)
    write_shard(str(store), 0, np.stack([np.zeros_like(entry.numpy()), entry.numpy()]), ['a/other.png', 'b/img.png'])
    write_json_atomic(str(store / MANIFEST), dict(format=FORMAT, teacher='t', topk=k, map_size=[8, 8], num_images=2,
                                                 shard_size=2, num_shards=1, classes=['a', 'b'], split='train',
                                                 split_folder='train'))
    os.makedirs(root / 'authors' / 'b')
    torch.save(entry, root / 'authors' / 'b' / 'img.pt')
    os.makedirs(root / 'authors' / 'a')  # the teacher's class 0 has its folder, without the train image's map
    torch.save(torch.zeros(2, k, 8, 8).half(), root / 'authors' / 'a' / 'unrelated.pt')
    return ImageDataset(str(root / 'data' / 'train'))


def test_stored_map_orientation_both_layouts(tmp_path):
    dataset = _write_pattern_stores(tmp_path)
    index = [dataset.reader.filename(i) for i in range(len(dataset))].index('b/img.png')
    ours = StoredMapDataset(dataset, open_map_store(str(tmp_path / 'store')), (2, 2))
    assert isinstance(ours.store, MapStore)
    # a crop of the image's top-right 40 x 32 px reads the top-right quadrant of the map, 8 * (y - 0.5) + (x - 0.5)
    # at cell coordinates (x, y): token means of 4 x 4 samples (one a map cell of the whole image), where the map is
    # flat within half a cell of its top and right edges (roi_align's clamp), so 8.5 + 0.5 and 10.5 + 0.5 - 0.0625
    ours.log.crop, ours.log.image_size, ours.log.output_size = (0, 40, 32, 40), (80, 64), (16, 16)
    expected = torch.tensor([[9.0, 10.9375], [24.5, 26.4375]])
    assert torch.allclose(ours.own_map(index, 1), expected)
    ours.log.hflip = True
    assert torch.allclose(ours.own_map(index, 1), expected.flip(-1))  # mirrored
    ours.topk = 1  # class 1 is second everywhere: outside the top 1
    assert torch.equal(ours.own_map(index, 1), torch.zeros(2, 2))

    dataset_b = ImageDataset(str(tmp_path / 'data' / 'train'))
    with pytest.raises(ConfigError, match="no maps for 1 of 2 train images .*'a/other.png'"):
        StoredMapDataset(dataset_b, open_map_store(str(tmp_path / 'authors')), (2, 2))
    torch.save(torch.zeros(2, 2, 8, 8).half(), tmp_path / 'authors' / 'a' / 'other.pt')
    authors = StoredMapDataset(dataset_b, open_map_store(str(tmp_path / 'authors')), (2, 2))
    assert isinstance(authors.store, AuthorsMapStore)
    # their map covers the centre 64 x 64 px square, x in [8, 72) px: its top-right 32 x 32 px is x in [40, 72)
    authors.log.crop, authors.log.image_size, authors.log.output_size = (0, 40, 32, 32), (80, 64), (16, 16)
    assert torch.allclose(authors.own_map(index, 1), expected)


def _geometric_transform(size: int) -> transforms.Compose:
    """The train pipeline without photometric ops (the stored maps cannot know colours): crop, flip, geometric RA."""
    hparams = dict(translate_const=int(size * 0.45), interpolation=Image.BILINEAR, img_mean=FILL)
    ra = rand_augment_transform('rand-n2-m9-mstd0.5', hparams, transforms=GEOMETRIC)
    return transforms.Compose([RandomResizedCropAndInterpolation(size, scale=(0.2, 1.0), interpolation='bilinear'),
                               transforms.RandomHorizontalFlip(0.5), ra, MaybeToTensor(),
                               transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


@pytest.mark.parametrize('geometric_ra', [False, True])
def test_stored_maps_match_online_teacher(tool, smooth_data, pointwise_checkpoint, tmp_path, geometric_ra):
    store = str(tmp_path / 'store')
    assert tool.main(['--data-dir', smooth_data, '--teacher-model', 'tokenmix_test_pointwise_vit',
                      '--teacher-checkpoint', pointwise_checkpoint, '--out', store, '--img-size', str(IMAGE_W),
                      '--topk', '2', '--shard-size', '5', '--workers', '0', '-b', '4']) == 0
    size, patch = 32, 8
    dataset = StoredMapDataset(ImageDataset(os.path.join(smooth_data, 'train')), open_map_store(store), (4, 4))
    dataset.transform = _geometric_transform(size) if geometric_ra else transforms.Compose(
        _geometric_transform(size).transforms[:2] + _geometric_transform(size).transforms[3:])
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    items = [dataset[i % len(dataset)] for i in range(48)]  # 4 passes: 48 different crops
    images = torch.stack([img for img, _ in items])
    packed = torch.stack([target for _, target in items])
    labels = packed[:, 0].long()

    model = tokenmix_test_pointwise_vit()
    model.load_state_dict(torch.load(pointwise_checkpoint))
    teacher = Teacher(model)
    full = teacher(images)  # B x 4 x 32 x 32: the teacher on the augmented crops themselves
    online = truncate_to_topk(own_class_maps(full, labels, 4), full, 2)
    online = F.adaptive_avg_pool2d(online[:, None], (4, 4))[:, 0].clamp(min=0)
    stored = record_maps(packed, (4, 4))[1].clamp(min=0)
    dist = [m / m.flatten(1).sum(1).clamp(min=1e-9).view(-1, 1, 1) for m in (online, stored)]
    has_mass = online.flatten(1).sum(1) > 0.05
    assert has_mass.sum() >= 30
    map_error = (dist[0] - dist[1]).abs().flatten(1).sum(1)[has_mass]  # L1 distance of the two distributions
    # measured: median 0.004 / 0.010, max 0.11 / 0.10 (without / with geometric RandAugment ops)
    assert map_error.median() < 0.03 and map_error.max() < 0.25, map_error

    kwargs = dict(mixup_alpha=0., cutmix_alpha=1., label_smoothing=0., num_classes=4, patch_size=patch, mode='elem',
                  target_norm='sum')
    with_teacher = TokenMix(**kwargs, teacher=teacher, teacher_topk=2, generator=torch.Generator().manual_seed(1))
    with_store = StoredMapsMixer(TokenMix(**kwargs, generator=torch.Generator().manual_seed(1)))
    with_teacher(images.clone(), labels)
    with_store(images.clone(), packed)
    area = TokenMix(**kwargs, target='area', generator=torch.Generator().manual_seed(1))
    area(images.clone(), labels)
    usable = has_mass & has_mass.flip(0)
    gap = (with_teacher.last_weights - with_store.last_weights).abs()[usable]
    # measured: mean 0.0004 / 0.0007, max 0.008 / 0.015; area weights differ by 0.047 / 0.075 on average
    assert gap.mean() < 0.005 and gap.max() < 0.05, gap
    # the weights are far from area weights: the agreement is not that of two maps that say nothing
    assert (with_teacher.last_weights - area.last_weights).abs()[usable].mean() > 10 * gap.mean()


def _precompute_argv(data: str, checkpoint: str, out: str, size: int = 32, shard: int = 4):
    return ['--data-dir', data, '--teacher-model', TINY_TEACHER, '--teacher-checkpoint', checkpoint, '--out', out,
            '--img-size', str(size), '--shard-size', str(shard), '--workers', '0', '-b', '2']


def _read_store(path: str):
    store = MapStore(path)
    keys = [key for shard in range(store.manifest['num_shards'])
            for key in json.loads((Path(path) / f'shard-{shard:05d}.json').read_text())['keys']]
    return {key: store.read(key) for key in keys}


@pytest.fixture(scope='module')
def tiny_store(tool, tiny_data, teacher_checkpoint, tmp_path_factory) -> str:
    """The tiny CNN teacher's top-5 maps of the tiny train split, written by one process."""
    out = str(tmp_path_factory.mktemp('store') / 'maps')
    assert tool.main(_precompute_argv(tiny_data, teacher_checkpoint, out)) == 0
    return out


def _children(pid: int):
    """Process ids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/stat') as f:
                if entry.isdigit() and int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_writing_a_shard_again_removes_what_a_killed_writer_left(tmp_path):
    # a worker killed during np.save / json.dump leaves its temporary files; the shard's next writer removes them
    for name in ('shard-00003.npy.tmp-4242', 'shard-00003.json.tmp-4242', 'shard-00013.npy.tmp-77'):
        (tmp_path / name).write_bytes(b'partial')
    maps = np.ones((1, 2, 5, 2, 2), dtype=np.float16)
    write_shard(str(tmp_path), 3, maps, ['0/a.png'])
    assert sorted(os.listdir(tmp_path)) == ['shard-00003.json', 'shard-00003.npy', 'shard-00013.npy.tmp-77']
    assert np.array_equal(np.load(tmp_path / 'shard-00003.npy'), maps)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not os.path.isdir('/proc'),
                    reason='needs torch.distributed (torchrun) and /proc (to find its workers)')
def test_precompute_two_processes_killed_then_resumed(tool, tiny_store, tiny_data, teacher_checkpoint, tmp_path):
    out = str(tmp_path / 'maps')
    argv = _precompute_argv(tiny_data, teacher_checkpoint, out, size=96, shard=2)  # 30 shards of 2 images
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(ROOT, 'tools', 'precompute_teacher_maps.py'), *argv]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    def finished():
        names = os.listdir(out) if os.path.isdir(out) else []
        return {int(f[6:11]) for f in names if f.startswith('shard-') and f.endswith('.json')}

    try:  # kill both workers (SIGKILL, no clean-up) once each has finished a shard: rank 0 even ones, rank 1 odd
        deadline = time.monotonic() + 180
        while len({s % 2 for s in finished()}) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.01)
    finally:  # torchrun starts each worker in a session of its own: kill the workers, then torchrun
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
    done = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)
            if f.startswith('shard') and f.endswith('.json')}
    assert 0 < len(done) < 30
    with pytest.raises(ConfigError, match='incomplete store'):  # a killed run is never taken for a store
        MapStore(out)

    straight = str(tmp_path / 'straight')  # the same store made by one uninterrupted run, compared below
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed workers (OMP_NUM_THREADS=1): other thread counts round differently
    try:
        assert tool.main(argv) == 0  # resumed by one process: shards do not depend on the number of processes
        assert tool.main(_precompute_argv(tiny_data, teacher_checkpoint, straight, size=96, shard=2)) == 0
    finally:
        torch.set_num_threads(threads)
    for f, mtime in done.items():  # finished shards are not redone
        assert os.stat(os.path.join(out, f)).st_mtime_ns == mtime
    names = os.listdir(out)
    assert len(names) == 61 and not [f for f in names if '.tmp-' in f]  # manifest + 30 x (data, keys)

    # each entry: the teacher's top-5 scores and classes of the whole image resized to 96 x 96
    stored = _read_store(out)
    assert len(stored) == 60
    teacher = build_teacher(TINY_TEACHER, checkpoint=teacher_checkpoint, num_classes=10)
    for key in ('0/00000.png', '7/00003.png'):
        image = Image.open(os.path.join(tiny_data, 'train', key)).convert('RGB').resize((96, 96), Image.BILINEAR)
        x = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(transforms.functional.to_tensor(image))
        values, indices = teacher(x[None])[0].topk(5, dim=0)
        assert stored[key][0].shape == (5, 12, 12)
        assert torch.allclose(stored[key][0], values, rtol=1e-3, atol=1e-3)
        assert torch.equal(stored[key][1], indices)
    with open(os.path.join(out, MANIFEST)) as f:
        manifest = json.load(f)
    assert (manifest['teacher'], manifest['topk'], manifest['map_size'], manifest['img_size'], manifest['split'],
            manifest['classes'], manifest['coverage']) == (
        TINY_TEACHER, 5, [12, 12], 96, 'train', [str(c) for c in range(10)], 'whole')

    # every shard's data and key list, and the manifest, byte for byte those of the uninterrupted run
    assert sorted(os.listdir(straight)) == sorted(names)
    for name in names:
        assert filecmp.cmp(os.path.join(out, name), os.path.join(straight, name), shallow=False), name


def test_precompute_refuses_other_settings_in_the_same_store(tool, tiny_store, tiny_data, teacher_checkpoint, capsys):
    argv = _precompute_argv(tiny_data, teacher_checkpoint, tiny_store)
    assert tool.main(argv) == 0  # a complete store: nothing to redo
    assert tool.run_cli(tool.main, 'precompute_teacher_maps.py', argv + ['--topk', '3']) == 2
    assert 'holds a store made with other settings (topk)' in capsys.readouterr().err


@pytest.mark.parametrize('extra, message', [
    (['--num-classes', '0'], '--num-classes must be >= 1, got 0'),
    (['--img-size', '0'], '--img-size must be >= 1, got 0'),
    (['--device', 'nosuch'], '--device nosuch: '),
    (['--interpolation', 'area'], "argument --interpolation: invalid choice: 'area'"),
    (['--out', '{file}'], "--out '{file}': '{file}' is a file, not a folder"),
    (['--class-map', '{file}'], "--class-map '{file}': Unsupported class map file extension"),
    (['--class-map', '{eleven}', '--num-classes', '10'],
     "--num-classes 10: the teacher's class list (--class-map, else the split's class folders) names 11 classes"),
])
def test_precompute_bad_values_are_one_line(tool, tiny_data, teacher_checkpoint, tmp_path, capsys, extra, message):
    """Values that were silently replaced by defaults (0) or ended in a traceback."""
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'eleven.txt').write_text(''.join(f'{c}\n' for c in range(11)))
    fill = dict(file=str(tmp_path / 'file'), eleven=str(tmp_path / 'eleven.txt'))
    argv = _precompute_argv(tiny_data, teacher_checkpoint, str(tmp_path / 'out')) + [e.format(**fill) for e in extra]
    try:
        code = tool.run_cli(tool.main, 'precompute_teacher_maps.py', argv)
    except SystemExit as e:  # a parser error
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('precompute_teacher_maps.py: error: ' + message.format(**fill)), err
    assert not os.path.exists(tmp_path / 'out')


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_precompute_records_the_teacher_classes_and_training_matches_them(tool, tiny_data, teacher_checkpoint,
                                                                          tmp_path):
    """--class-map names the teacher's class indices (here the split's folders in reverse): the manifest records
    them, and training reads the channel of each label's class by name."""
    names = [str(c) for c in range(9, -1, -1)]
    (tmp_path / 'teacher_classes.txt').write_text('\n'.join(names) + '\n')
    out = str(tmp_path / 'maps')
    argv = _precompute_argv(tiny_data, teacher_checkpoint, out, shard=30)
    assert tool.main(argv + ['--class-map', str(tmp_path / 'teacher_classes.txt')]) == 0
    assert MapStore.read_manifest(out)['classes'] == names
    args = argparse.Namespace(teacher_maps=out, teacher_model=TINY_TEACHER, teacher_topk=0, class_map='')
    wrapped = wrap_train_dataset(args, ImageDataset(os.path.join(tiny_data, 'train')), (3, 32, 32), 8)
    assert wrapped.teacher_classes == {label: 9 - label for label in range(10)}


def test_precompute_resizes_as_the_teacher_was_trained(tool, smooth_data, pointwise_checkpoint, tiny_store, tmp_path):
    """The whole image is resized with the teacher's pretrained-config interpolation; --interpolation overrides."""
    assert get_pretrained_cfg('dm_nfnet_f6.dm_in1k').interpolation == 'bicubic'  # the authors' maps' teacher
    manifest = MapStore.read_manifest(tiny_store)
    assert (manifest['interpolation'], manifest['precision']) == ('bilinear', 'float32')  # the tiny teacher's config
    stores = {}
    for interpolation in ('', 'bilinear', 'bicubic'):
        out = str(tmp_path / (interpolation or 'default'))
        assert tool.main(['--data-dir', smooth_data, '--teacher-model', 'tokenmix_test_pointwise_vit',
                          '--teacher-checkpoint', pointwise_checkpoint, '--out', out, '--img-size', str(IMAGE_W),
                          '--topk', '2', '--workers', '0'] + (['--interpolation', interpolation] if interpolation
                                                              else [])) == 0
        stores[interpolation] = _read_store(out)
    # a model without a pretrained config gets timm's default, bicubic
    assert MapStore.read_manifest(str(tmp_path / 'default'))['interpolation'] == 'bicubic'
    for key, (values, indices) in stores[''].items():
        assert torch.equal(values, stores['bicubic'][key][0]) and torch.equal(indices, stores['bicubic'][key][1])
    assert not torch.equal(stores['bilinear']['c0/0.png'][0], stores['bicubic']['c0/0.png'][0])
    model = tokenmix_test_pointwise_vit()
    model.load_state_dict(torch.load(pointwise_checkpoint))
    image = Image.open(os.path.join(smooth_data, 'train', 'c0', '0.png')).convert('RGB')
    for interpolation, resample in (('bilinear', Image.BILINEAR), ('bicubic', Image.BICUBIC)):
        resized = transforms.functional.to_tensor(image.resize((IMAGE_W, IMAGE_W), resample))
        x = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(resized)
        values, indices = Teacher(model)(x[None])[0].topk(2, dim=0)
        assert torch.allclose(stores[interpolation]['c0/0.png'][0], values, rtol=1e-3, atol=1e-3)
        assert torch.equal(stores[interpolation]['c0/0.png'][1], indices)


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_train_from_stored_maps_with_workers_and_resume(train_script, train_argv, tiny_store, tmp_path):
    argv = train_argv('--tokenmix', '--mixup', '0.8', '--cutmix', '1.0', '--teacher-maps', tiny_store,
                      '--teacher-topk', '3', '--teacher-model', TINY_TEACHER, '--aa', 'rand-m9-mstd0.5-inc1',
                      '--workers', '2', '--epochs', '1', '--checkpoint-hist', '1')
    assert train_script.run_main(argv) == 0
    run = tmp_path / 'out' / 'run'
    assert train_script.run_main(argv[:-4] + ['--epochs', '2', '--resume', str(run / 'last.pth.tar'),
                                              '--experiment', 'resumed']) == 0
    log = (tmp_path / 'out' / 'resumed' / 'log.txt').read_text()
    assert 'eval epoch 1: top-1' in log and 'eval epoch 0' not in log


@pytest.mark.parametrize('change, message', [
    (dict(teacher='resnet50'), "made by teacher 'resnet50', not --teacher-model 'tokenmix_cnn_teacher_64'"),
    (dict(classes=[str(c) for c in range(9)]),
     r"has no class '9' of the train split \(1 of 10 classes missing; .* the 9 classes its manifest.json lists"),
    (dict(split='val', split_folder='val'), "holds split 'val', the train split is 'train'"),
    (dict(), '--teacher-topk 6: .* keeps only the top 5'),
])
def test_stored_maps_mismatch_errors(train_script, train_argv, tiny_store, tmp_path, capsys, change, message):
    store = tmp_path / 'maps'
    shutil.copytree(tiny_store, store)
    manifest = json.loads((store / MANIFEST).read_text())
    (store / MANIFEST).write_text(json.dumps(dict(manifest, **change)))
    argv = train_argv('--tokenmix', '--cutmix', '1.0', '--teacher-maps', str(store), '--teacher-topk',
                      '3' if change else '6', '--teacher-model', TINY_TEACHER)
    assert train_script.run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


@pytest.mark.parametrize('maps', ['', '/maps/authors'])
def test_teacher_table_precomputes_the_store_then_trains_from_it(maps):
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'ablation_teacher.sh'), '8', '/data', '/runs'],
                          capture_output=True, text=True, env=dict(os.environ, DRY_RUN='1', PYTHON='py',
                                                                   TEACHER_MAPS=maps))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if 'stored_maps' in line or 'precompute' in line]
    store = maps or '/runs/teacher_maps/dm_nfnet_f6_576'
    assert ('precompute_teacher_maps.py' in lines[0]) == (not maps)
    if not maps:
        assert '--nproc_per_node 8' in lines[0] and f'--out {store}' in lines[0] and '--img-size 576' in lines[0]
        assert '--amp-dtype' not in lines[0] and '--interpolation' not in lines[0]  # fp32; F6's own bicubic
    train = next(line for line in lines if 'distributed_train.sh' in line)
    assert train.endswith(f'--teacher-maps {store}')


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_stored_maps_mixer_equals_tokenmix_with_those_maps(mode):
    """Every mask mode: the maps a batch carries give the weights a teacher returning those maps would give."""
    torch.manual_seed(0)
    x, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    scores = torch.rand(8, 1, 4, 4) * (torch.rand(8, 1, 4, 4) > 0.5)  # top-1 maps of each image's own class
    whole = (0.25, 0., 0., 0., 0.25, 0.)  # the 16 x 16 px image onto its 4 x 4 map
    records = torch.stack([pack_record(int(label), int(label), torch.stack([score, torch.full_like(score, label)]).numpy(),
                                       whole, [], 0, (16, 16)) for label, score in zip(labels, scores)])
    read_labels, own = record_maps(records, (4, 4))
    assert torch.equal(read_labels, labels) and own.shape == (8, 4, 4) and own.sum() > 0
    full = torch.zeros(8, 5, 4, 4)
    full[torch.arange(8), labels] = own
    kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1., num_classes=5, patch_size=4, mode=mode, target_norm='sum',
                  min_tokens=1)
    teacher = TokenMix(**kwargs, teacher=lambda _: full, generator=torch.Generator().manual_seed(3))
    stored = StoredMapsMixer(TokenMix(**kwargs, generator=torch.Generator().manual_seed(3)))
    token_batches = 0
    for _ in range(6):  # Mixup and token batches
        mixed_t, target_t = teacher(x.clone(), labels)
        mixed_s, target_s = stored(x.clone(), records)
        assert torch.equal(mixed_t, mixed_s) and torch.allclose(target_t, target_s)
        token_batches += stored.last_mask is not None
    assert token_batches >= 2
    stored.mixup_enabled = False  # --mixup-off-epoch reaches the wrapped TokenMix
    assert not stored.tokenmix.mixup_enabled
    with pytest.raises(ValueError, match='stored-map targets must be B x L records of StoredMapDataset'):
        stored(x.clone(), labels)
    with pytest.raises(ValueError, match=r'must be B x 46 records of StoredMapDataset .*top-1 4 x 4 maps.*\(8, 45\)'):
        stored(x.clone(), records[:, :-1])


@pytest.mark.parametrize('extra, message', [
    (['--tokenmix', '--cutmix', '1', '--teacher-maps', 'm', '--teacher-checkpoint', 't.pth'],
     '--teacher-checkpoint is for an online teacher; --teacher-maps reads stored maps'),
    (['--cutmix', '1', '--teacher-maps', 'm'], '--teacher-maps gives TokenMix its label weights'),
    (['--tokenmix', '--cutmix', '1', '--teacher-maps', 'm', '--tokenmix-target', 'area'],
     '--teacher-maps gives TokenMix its label weights'),
    (['--tokenmix', '--cutmix', '1', '--teacher-topk', '5'], '--teacher-topk needs --teacher-model'),
    (['--tokenmix', '--cutmix', '1', '--teacher-maps', 'm', '--teacher-topk', '-1'], '--teacher-topk must be >= 0'),
])
def test_stored_map_flag_errors(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(['--data-dir', 'd', *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_store_is_one_line(train_script, train_argv, tmp_path, capsys):
    assert train_script.run_main(train_argv('--tokenmix', '--cutmix', '1', '--teacher-maps', str(tmp_path / 'no'))) == 2
    assert capsys.readouterr().err.strip().endswith(f"--teacher-maps '{tmp_path / 'no'}' is not a directory")


def test_authors_layout_with_fewer_classes_than_teacher_topk(tmp_path):
    """The authors' files hold K classes a position: a larger --teacher-topk would silently mean K."""
    dataset = _write_pattern_stores(tmp_path)  # authors' files of K = 2
    args = argparse.Namespace(teacher_maps=str(tmp_path / 'authors'), teacher_model='', teacher_topk=3)
    with pytest.raises(ConfigError, match="--teacher-topk 3: --teacher-maps '.*authors' keeps only the top 2"):
        wrap_train_dataset(args, dataset, (3, 32, 32), 16)


AUTHORS_CLASSES = ('a', 'b', 'c', 'd')  # the authors' teacher's classes: class i is the i-th folder by name


def _authors_store_and_data(root, data_classes, class_map=None, store_classes=AUTHORS_CLASSES, layout='authors'):
    """An authors' store, or with layout 'ours' this project's store whose manifest lists `store_classes` (one 8 x 8
    map per image: every position holds all 4 teacher classes, class i scoring 10 * (i + 1), best first), a train
    split of one 8 x 8 image per class of `data_classes`, and, with `class_map`, a --class-map file listing those
    names: the train dataset and the arguments that read it with the store."""
    values = torch.tensor([40., 30., 20., 10.]).view(4, 1, 1).expand(4, 8, 8)
    indices = torch.tensor([3., 2., 1., 0.]).view(4, 1, 1).expand(4, 8, 8)
    entry = torch.stack([values, indices]).half()
    for name in store_classes if layout == 'authors' else ():
        os.makedirs(root / 'authors' / name)
        torch.save(entry, root / 'authors' / name / '0.pt')
    if layout == 'ours':
        os.makedirs(root / 'ours')
        write_shard(str(root / 'ours'), 0, np.stack([entry.numpy()] * len(store_classes)),
                    [f'{name}/0.png' for name in store_classes])
        write_json_atomic(str(root / 'ours' / MANIFEST), dict(
            format=FORMAT, teacher='t', topk=4, map_size=[8, 8], classes=list(store_classes), split='train',
            split_folder='train', num_images=len(store_classes), shard_size=len(store_classes), num_shards=1))
    for name in data_classes:
        os.makedirs(root / 'train' / name)
        Image.new('RGB', (8, 8)).save(root / 'train' / name / '0.png')
    map_file = ''
    if class_map:
        map_file = str(root / 'classes.txt')
        (root / 'classes.txt').write_text('\n'.join(class_map) + '\n')
    args = argparse.Namespace(teacher_maps=str(root / layout), teacher_model='', teacher_topk=0,
                              class_map=map_file)
    return ImageDataset(str(root / 'train'), class_map=map_file), args


@pytest.mark.parametrize('layout', ['authors', 'ours'])
@pytest.mark.parametrize('data_classes, class_map', [
    (('b', 'd'), None),  # a subset: labels 0, 1 are the teacher's classes 1, 3
    (AUTHORS_CLASSES, ('d', 'c', 'b', 'a')),  # --class-map reverses the labels
    (('d', 'b'), ('d', 'b')),  # a subset in another order
])
def test_labels_are_matched_to_the_teacher_classes_by_name(tmp_path, data_classes, class_map, layout):
    """Both layouts: the authors' class folders, or the class list of our manifest, name the maps' class indices."""
    dataset, args = _authors_store_and_data(tmp_path, data_classes, class_map, layout=layout)
    wrapped = wrap_train_dataset(args, dataset, (3, 16, 16), 8)
    wrapped.transform = transforms.Compose([RandomResizedCropAndInterpolation(16, scale=(1., 1.), ratio=(1., 1.)),
                                            MaybeToTensor()])
    expected_labels = {name: i for i, name in enumerate(class_map or data_classes)}
    for index in range(len(wrapped)):
        name = wrapped.key(index).split('/')[0]
        _, target = wrapped[index]
        label, own_map = record_maps(target[None], wrapped.grid)
        assert target[0].item() == label.item() == expected_labels[name]
        score = 10. * (AUTHORS_CLASSES.index(name) + 1)  # the channel of the teacher's class of that name
        assert torch.allclose(own_map, torch.full((1, 2, 2), score)), (name, own_map)


@pytest.mark.parametrize('data_classes, class_map, store_classes, layout, message', [
    (('b', 'e'), None, AUTHORS_CLASSES, 'authors',
     r"has no class 'e' of the train split \(1 of 2 classes missing; .* its 4 class folders, in order"),
    (('b', 'e'), None, AUTHORS_CLASSES, 'ours',
     r"has no class 'e' of the train split \(1 of 2 classes missing; .* the 4 classes its manifest.json lists, in"),
    (AUTHORS_CLASSES, ('a', 'x', 'b'), AUTHORS_CLASSES, 'authors', r"has no class 'x' of --class-map '.*classes.txt'"),
    (AUTHORS_CLASSES, ('a', 'x', 'b'), AUTHORS_CLASSES, 'ours', r"has no class 'x' of --class-map '.*classes.txt'"),
    (('b', 'd'), None, ('b', 'd'), 'authors', r"'b/0.pt' names class 3 but the store has 2 class folders"),
])
def test_classes_the_store_cannot_match_are_refused(tmp_path, data_classes, class_map, store_classes, layout,
                                                    message):
    dataset, args = _authors_store_and_data(tmp_path, data_classes, class_map, store_classes, layout)
    with pytest.raises(ConfigError, match='--teacher-maps .*' + message) as error:
        wrap_train_dataset(args, dataset, (3, 16, 16), 8)
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize('damage, at_open', [
    (lambda path: path.write_bytes(b''), True),  # the first file, read when the store is opened
    (lambda path: path.write_bytes(path.read_bytes()[:100]), False),  # another one, read for its sample
])
def test_authors_layout_unreadable_file_is_one_line(tmp_path, damage, at_open):
    dataset, args = _authors_store_and_data(tmp_path, AUTHORS_CLASSES)
    name = 'a/0.pt' if at_open else 'c/0.pt'
    damage(tmp_path / 'authors' / name)
    with pytest.raises(ConfigError) as error:
        wrapped = wrap_train_dataset(args, dataset, (3, 16, 16), 8)
        wrapped.transform = transforms.Compose([RandomResizedCropAndInterpolation(16), MaybeToTensor()])
        assert not at_open
        [wrapped[i] for i in range(len(wrapped))]
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith(
        f"--teacher-maps '{tmp_path / 'authors'}': cannot read '{name}': checkpoint "), message
    assert message.endswith('is empty (0 bytes)' if at_open else 'is truncated or damaged (an incomplete torch zip '
                                                                  'archive)'), message


def test_authors_layout_of_another_split_is_refused(tmp_path):
    _, args = _authors_store_and_data(tmp_path, AUTHORS_CLASSES)
    for name in AUTHORS_CLASSES:  # the same classes, other images (as ImageNet's val images beside train's)
        os.rename(tmp_path / 'train' / name / '0.png', tmp_path / 'train' / name / 'val_0.png')
    with pytest.raises(ConfigError, match=r"no maps for 4 of 4 train images \(first: 'a/val_0.png'\): a store of "
                                          'another split'):
        wrap_train_dataset(args, ImageDataset(str(tmp_path / 'train')), (3, 16, 16), 8)


def test_authors_order_flips_and_turns_the_whole_map_before_the_crop(tmp_path):
    """--aug-order authors: the crop box is drawn on the flipped (and rotated) image, so it reads the map there."""
    from timm.data.auto_augment import rotate, translate_x_abs
    dataset = _write_pattern_stores(tmp_path)
    index = [dataset.reader.filename(i) for i in range(len(dataset))].index('b/img.png')
    ours = StoredMapDataset(dataset, open_map_store(str(tmp_path / 'store')), (2, 2))
    log = ours.log
    log.crop, log.image_size, log.output_size, log.hflip = (0, 40, 32, 40), (80, 64), (32, 32), True
    # the map is 8 * (y - 0.5) + (x - 0.5) but flat within half a cell of its edges (roi_align's clamp): a token along
    # an edge reads up to 0.5 off that ramp (4 x 4 samples a token, see test_stored_map_orientation_both_layouts)
    flipped_then_cut = torch.tensor([[7.0, 5.0625], [22.5, 20.5625]])  # the map's top-left quadrant, mirrored
    assert torch.allclose(ours.own_map(index, 1), torch.tensor([[10.9375, 9.0], [26.4375, 24.5]]))  # timm: cut, flip
    log.crop_last = True
    assert torch.allclose(ours.own_map(index, 1), flipped_then_cut)
    log.hflip, log.vflip = False, True  # the bottom-right quadrant, upside down
    assert torch.allclose(ours.own_map(index, 1), torch.tensor([[56.0, 57.9375], [40.5, 42.4375]]))
    # the whole image turned, then a crop away from its edges: the crop's place turned, x in [32, 72) px, y in
    # [24, 56) px, i.e. map x in [3.2, 7.2), y in [3, 7), where the map is 8 * (y - 0.5) + (x - 0.5); then turned
    log.crop, log.vflip, log.ops, log.slots = (8, 8, 32, 40), False, [(rotate, (180.,))], 1
    assert torch.allclose(ours.own_map(index, 1), torch.tensor([[49.7, 47.7], [33.7, 31.7]]), atol=1e-3)
    log.ops = [(translate_x_abs, (16.,))]  # the image moved 16 px left: the crop reads x in [24, 64) px
    assert torch.allclose(ours.own_map(index, 1), torch.tensor([[14.9, 16.9], [30.9, 32.9]]), atol=1e-3)
    log.ops = []
    unturned = ours.own_map(index, 1)
    log.hflip, log.ops = True, [(rotate, (0.,))]  # an op that moves nothing: the flip alone, by the whole-image path
    mirrored = ours.own_map(index, 1)
    log.ops = []
    assert torch.allclose(mirrored, ours.own_map(index, 1), atol=1e-3) and not torch.allclose(mirrored, unturned)

    dataset_b = ImageDataset(str(tmp_path / 'data' / 'train'))
    torch.save(torch.zeros(2, 2, 8, 8).half(), tmp_path / 'authors' / 'a' / 'other.pt')
    authors = StoredMapDataset(dataset_b, open_map_store(str(tmp_path / 'authors')), (2, 2))
    # their map covers x in [8, 72) px; the crop x in [40, 72) of the flipped image is x in [8, 40) of the image
    authors.log.crop, authors.log.image_size, authors.log.hflip = (0, 40, 32, 32), (80, 64), True
    authors.log.crop_last, authors.log.output_size = True, (16, 16)
    assert torch.allclose(authors.own_map(index, 1), flipped_then_cut)


@pytest.fixture(scope='module')
def pointwise_store(tool, smooth_data, pointwise_checkpoint, tmp_path_factory) -> str:
    """The pointwise teacher's top-2 maps of the smooth images, made by the tool at the images' width."""
    store = str(tmp_path_factory.mktemp('pointwise_store') / 'store')
    assert tool.main(['--data-dir', smooth_data, '--teacher-model', 'tokenmix_test_pointwise_vit',
                      '--teacher-checkpoint', pointwise_checkpoint, '--out', store, '--img-size', str(IMAGE_W),
                      '--topk', '2', '--shard-size', '5', '--workers', '0', '-b', '4']) == 0
    return store


def _stored_against_online(store: str, smooth_data: str, checkpoint: str, transform, drop: str = ''):
    """Stored maps and label weights of 48 crops against the online teacher on the same crops, as
    test_stored_maps_match_online_teacher measures them: (L1 distance of the two map distributions per sample,
    weight differences, mean difference of area weights from the online ones, the replayed geometry per sample).
    `drop` ('hflip', 'ops', 'order') leaves that part out of the replay."""
    dataset = StoredMapDataset(ImageDataset(os.path.join(smooth_data, 'train')), open_map_store(store), (4, 4))
    dataset.transform = transform
    replayed, record = [], dataset.record

    def replay(index, label):
        log = dataset.log
        replayed.append((log.crop_last, log.hflip, len(log.ops)))
        log.hflip, log.ops = (False, log.ops) if drop == 'hflip' else (log.hflip, [] if drop == 'ops' else log.ops)
        log.crop_last = log.crop_last and drop != 'order'
        return record(index, label)

    dataset.record = replay
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    items = [dataset[i % len(dataset)] for i in range(48)]
    images, packed = torch.stack([img for img, _ in items]), torch.stack([target for _, target in items])
    labels = packed[:, 0].long()
    model = tokenmix_test_pointwise_vit()
    model.load_state_dict(torch.load(checkpoint))
    teacher = Teacher(model)
    full = teacher(images)
    online = F.adaptive_avg_pool2d(truncate_to_topk(own_class_maps(full, labels, 4), full, 2)[:, None], (4, 4))[:, 0]
    stored = record_maps(packed, (4, 4))[1]
    dist = [m.clamp(min=0) / m.clamp(min=0).flatten(1).sum(1).clamp(min=1e-9).view(-1, 1, 1) for m in (online, stored)]
    has_mass = online.clamp(min=0).flatten(1).sum(1) > 0.05
    assert has_mass.sum() >= 30
    map_error = (dist[0] - dist[1]).abs().flatten(1).sum(1)[has_mass]
    kwargs = dict(mixup_alpha=0., cutmix_alpha=1., label_smoothing=0., num_classes=4, patch_size=8, mode='elem',
                  target_norm='sum')
    mixers = [TokenMix(**kwargs, teacher=teacher, teacher_topk=2, generator=torch.Generator().manual_seed(1)),
              StoredMapsMixer(TokenMix(**kwargs, generator=torch.Generator().manual_seed(1))),
              TokenMix(**kwargs, target='area', generator=torch.Generator().manual_seed(1))]
    for mixer, target in zip(mixers, (labels, packed, labels)):
        mixer(images.clone(), target)
    usable = has_mass & has_mass.flip(0)
    online_weights, stored_weights, area_weights = (mixer.last_weights for mixer in mixers)
    gap = (online_weights - stored_weights).abs()[usable]
    return map_error, gap, (online_weights - area_weights).abs()[usable].mean(), replayed


def _aligned(map_error: torch.Tensor, gap: torch.Tensor) -> bool:
    """test_stored_maps_match_online_teacher's bounds, for maps and for label weights."""
    return bool(map_error.median() < 0.03 and map_error.max() < 0.25 and gap.mean() < 0.005 and gap.max() < 0.05)


def test_stored_maps_match_online_teacher_in_the_authors_order(pointwise_store, smooth_data, pointwise_checkpoint):
    """Flip and geometric RandAugment on the whole image, then the crop: the stored path replays them in that order
    on a map of the whole image, within the bounds of timm's order."""
    from tokenmix_train.transforms import authors_order
    transform = authors_order(_geometric_transform(32))
    assert [type(t).__name__ for t in transform.transforms][:3] == [
        'RandomHorizontalFlip', 'RandAugment', 'RandomResizedCropAndInterpolation']
    map_error, gap, area_gap, replayed = _stored_against_online(pointwise_store, smooth_data, pointwise_checkpoint,
                                                                transform)
    assert all(crop_last for crop_last, _, _ in replayed)
    assert sum(flip for _, flip, _ in replayed) >= 15 and sum(ops > 0 for _, _, ops in replayed) >= 30
    # measured: maps median 0.013, max 0.11; weights mean 0.0004, max 0.005 (timm's order on the same images: 0.010,
    # 0.10; 0.0007, 0.015)
    assert _aligned(map_error, gap), (map_error, gap)
    assert area_gap > 10 * gap.mean()


@pytest.mark.parametrize('drop', ['hflip', 'ops', 'order'])
def test_authors_order_alignment_fails_without_the_flip_the_ops_or_the_order(pointwise_store, smooth_data,
                                                                             pointwise_checkpoint, drop):
    """The same crops with the flip or the geometric ops left out of the replay, or replayed in timm's order."""
    from tokenmix_train.transforms import authors_order
    map_error, gap, _, _ = _stored_against_online(pointwise_store, smooth_data, pointwise_checkpoint,
                                                  authors_order(_geometric_transform(32)), drop)
    assert not _aligned(map_error, gap)
    assert map_error.median() > 0.3, map_error  # measured: 1.0 (no flip), 0.81 (no ops), 0.65 (timm's order)


@pytest.mark.parametrize('op, arg', [('rotate', 17.), ('rotate', -150.), ('shear_x', 0.3), ('shear_y', -0.25),
                                     ('translate_x_rel', 0.12), ('translate_y_rel', -0.2), ('translate_x_abs', 5.5),
                                     ('translate_y_abs', -3.)])
def test_op_matrices_are_what_timm_ops_do_to_an_image(op, arg):
    """Each geometric op's affine map (output -> input, pixel centres at k + 0.5) reads, on a linear ramp, what timm's
    op writes at every pixel it fills from inside the image, and says "outside" where the op wrote its fill."""
    from timm.data import auto_augment
    from tokenmix_train.teacher_maps import _op_matrix
    width, height = 40, 30
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = Image.fromarray((xs + 100 * ys).astype(np.float32), mode='F')
    fn = getattr(auto_augment, op)
    out = np.asarray(fn(ramp, arg, resample=Image.BILINEAR, fillcolor=-1.0))
    matrix = np.array(_op_matrix(fn, (arg,), (width, height))).reshape(2, 3)  # (a, b, c, d, e, f) as 2 x 3
    at = np.stack([xs + 0.5, ys + 0.5, np.ones_like(xs)], -1) @ matrix.T
    inner = (at[..., 0] > 1) & (at[..., 0] < width - 1) & (at[..., 1] > 1) & (at[..., 1] < height - 1)
    assert inner.sum() > 300
    np.testing.assert_allclose(out[inner], (at[..., 0] - 0.5 + 100 * (at[..., 1] - 0.5))[inner], atol=2e-3)
    outside = (at[..., 0] < -0.5) | (at[..., 0] > width + 0.5) | (at[..., 1] < -0.5) | (at[..., 1] > height + 0.5)
    assert (out[outside] == -1.0).all()
    with pytest.raises(ValueError, match='no affine map for the augment op solarize'):
        _op_matrix(auto_augment.solarize, (128,), (width, height))


# Tests written against the survivors of the mutation run of this module (docs/mutation.md, 2026-12-05 afternoon).
import hashlib  # noqa: E402
import logging  # noqa: E402
import pickle  # noqa: E402

from torchvision.transforms import functional as TF  # noqa: E402

from tokenmix_train.teacher_maps import (GeometryLog, RecordLayout, _op_matrix, geometry_matrices,  # noqa: E402
                                         instrument_transform)
from tokenmix_train.transforms import WholePixelTranslate  # noqa: E402


def test_a_pickled_store_leaves_its_open_shards_behind_and_reads_the_same_maps(tmp_path):
    """A loader worker started by pickling (spawn, forkserver) gets the store without its memory maps, and maps
    its shards anew on first use."""
    _write_pattern_stores(tmp_path)
    store = MapStore(str(tmp_path / 'store'))
    entry = store.entry('b/img.png')
    assert list(store._arrays) == [0]  # shard 0 is mapped in this process
    copy = pickle.loads(pickle.dumps(store))
    assert copy._arrays == {} and (copy.root, copy.topk, copy.classes) == (store.root, 2, ['a', 'b'])
    np.testing.assert_array_equal(copy.entry('b/img.png'), entry)
    assert list(copy._arrays) == [0] and list(store._arrays) == [0]


def _authors_files(root, files):
    """An authors' store: each `files` key (class folder / name.pt) holding its value as given."""
    for key, value in files.items():
        os.makedirs(root / os.path.dirname(key), exist_ok=True)
        torch.save(value, root / key)
    return str(root)


def _authors_entry(top_class: int, k: int = 1, size: int = 2) -> torch.Tensor:
    """fp16 [2, K, h, w]: values 1, 2, ..., class indices all `top_class`."""
    values = torch.arange(1., 1 + k * size * size).view(k, size, size)
    return torch.stack([values, torch.full_like(values, top_class)]).half()


def test_authors_class_folders_are_numbered_in_natural_order_and_cover_the_classes_named(tmp_path):
    """Class i is the i-th folder in timm's natural order ('2' before '10', as timm numbers an image folder's
    classes), and a first file naming class index = the folder count is refused (it needs one folder more)."""
    store = AuthorsMapStore(_authors_files(tmp_path / 'ok', {'10/x.pt': _authors_entry(1), '2/y.pt': _authors_entry(1)}))
    assert store.classes == ['2', '10']
    root = _authors_files(tmp_path / 'short', {'10/x.pt': _authors_entry(2), '2/y.pt': _authors_entry(0)})
    with pytest.raises(ConfigError, match=r"^--teacher-maps '.*short': '10/x.pt' names class 2 but the store has 2 "
                                          'class folders'):
        AuthorsMapStore(root)


@pytest.mark.parametrize('value, found', [
    (dict(maps=torch.zeros(2, 1, 2, 2)), 'dict'),
    (torch.zeros(2, 2, 2), '(2, 2, 2)'),  # no K axis
    (torch.zeros(3, 1, 2, 2), '(3, 1, 2, 2)'),  # not values and indices
])
def test_an_authors_file_that_is_not_values_and_indices_is_one_line(tmp_path, value, found):
    root = _authors_files(tmp_path / 'maps', {'a/0.pt': value})
    with pytest.raises(ConfigError) as error:
        AuthorsMapStore(root)
    assert str(error.value) == f"--teacher-maps '{root}': 'a/0.pt' is not a [2, K, h, w] tensor (got {found})"


def test_authors_store_reads_values_and_class_indices_of_an_image_key(tmp_path):
    entry = _authors_entry(1, k=2)
    store = AuthorsMapStore(_authors_files(tmp_path, {'a/0.pt': _authors_entry(0), 'b/img.pt': entry}))
    values, indices = store.read('train/b/img.JPEG')  # the image's key: its folder and stem name the file
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(values, entry[0].float()) and torch.equal(indices, torch.ones(2, 2, 2, dtype=torch.int64))


def test_centre_coverage_of_a_portrait_image_is_its_centre_square():
    """The authors' maps of an image taller than wide cover its centre square: the rows above and below it are
    outside the map, and a crop of exactly that square reads the whole map."""
    # 40 x 80 px (width x height), an 8 x 8 map over y in [20, 60) px: 5 px a cell
    assert map_box((24, 0, 32, 40), (40, 80), (8, 8), 'centre') == pytest.approx((0., 0.8, 8., 7.2))
    assert map_box((0, 10, 80, 20), (40, 80), (8, 8), 'centre') == pytest.approx((2., -4., 6., 12.))
    log = GeometryLog(image_size=(40, 80), crop=(20, 0, 40, 40), output_size=(20, 20))
    to_map, checks = geometry_matrices(log, (8, 8), 'centre')
    assert to_map == pytest.approx((0.4, 0., 0., 0., 0.4, 0.)) and checks == []  # output px -> map cells


def test_a_vertical_flip_is_recorded_and_read_upside_down(tmp_path):
    """RandomVerticalFlip is followed as torchvision draws it: the image and the map turned upside down."""
    log = GeometryLog()
    steps = [RandomResizedCropAndInterpolation(4, scale=(1., 1.), ratio=(1., 1.)), transforms.RandomVerticalFlip(1.),
             transforms.PILToTensor()]
    transform = transforms.Compose(steps)
    instrument_transform(transform, log)
    picture = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    assert torch.equal(transform(picture), TF.pil_to_tensor(picture).flip(-2))
    assert log.vflip and not log.hflip
    again = GeometryLog()
    instrument_transform(transform, again)  # as build_train_loader does before --aug-order authors reorders it
    assert torch.equal(transform(picture), TF.pil_to_tensor(picture).flip(-2)) and again.vflip and not again.hflip
    again.reset()
    transform.transforms[1].p = 0.  # never drawn
    assert torch.equal(transform(picture), TF.pil_to_tensor(picture)) and not again.vflip and not again.hflip


def test_an_op_without_an_affine_map_is_named_by_its_type():
    """A geometric op recorded as a callable object (not one of timm's functions) is refused by its class name."""
    with pytest.raises(ValueError, match='^no affine map for the augment op WholePixelTranslate$'):
        _op_matrix(WholePixelTranslate(0, True), (0.1,), (8, 8))


def test_a_record_is_float32_whatever_the_precision_of_the_maps_given():
    top = np.stack([np.full((1, 2, 2), 0.1), np.zeros((1, 2, 2))])  # float64
    record = pack_record(3, 1, top, (0.5, 0., 0., 0., 0.5, 0.), [], 0, (4, 4))
    assert record.dtype == torch.float32 and RecordLayout.of(record[None]) == RecordLayout(1, 2, 2, 0, 4, 4)
    assert record[0].item() == 3 and record[-8:-4].tolist() == [np.float32(0.1).item()] * 4


def _small_store(root, k: int = 3, size: int = 2) -> ImageDataset:
    """A train split of one 8 x 8 image of class 'a' and this project's store of its top-`k` maps of `size` x `size`,
    class i scoring k - i everywhere."""
    os.makedirs(root / 'train' / 'a')
    Image.new('RGB', (8, 8)).save(root / 'train' / 'a' / '0.png')
    values = np.arange(k, 0, -1, dtype=np.float16)[:, None, None] * np.ones((k, size, size), np.float16)
    indices = np.arange(k, dtype=np.float16)[:, None, None] * np.ones((k, size, size), np.float16)
    os.makedirs(root / 'maps')
    write_shard(str(root / 'maps'), 0, np.stack([values, indices])[None], ['a/0.png'])
    write_json_atomic(str(root / 'maps' / MANIFEST), dict(
        format=FORMAT, teacher='t', topk=k, map_size=[size, size], classes=['a', 'b', 'c'][:k], split='train',
        split_folder='train', num_images=1, shard_size=1, num_shards=1))
    return ImageDataset(str(root / 'train'))


def test_teacher_topk_keeps_that_many_stored_classes_even_on_maps_smaller_than_it(tmp_path):
    """--teacher-topk 2 of a top-3 store of 2 x 2 maps: two classes a position, whatever the map's size."""
    dataset = StoredMapDataset(_small_store(tmp_path), open_map_store(str(tmp_path / 'maps')), (2, 2), topk=2)
    dataset.log.crop, dataset.log.image_size, dataset.log.output_size = (0, 0, 8, 8), (8, 8), (8, 8)
    layout = RecordLayout.of(dataset.record(0, 2)[None])  # label 2 = class 'c': third everywhere
    assert (layout.k, layout.h, layout.w) == (2, 2, 2)
    assert torch.equal(dataset.own_map(0, 2), torch.zeros(2, 2))
    dataset.topk = 3  # the store's K: all of it
    assert torch.equal(dataset.own_map(0, 2), torch.ones(2, 2))


def test_a_stored_map_dataset_answers_for_the_dataset_it_wraps_and_pickles(tmp_path):
    """Attributes it lacks are the wrapped dataset's (timm's loader factory and train.py read them through it), and
    it survives the pickling of a loader worker started by spawn (no recursion before its state is set)."""
    dataset = _write_pattern_stores(tmp_path)
    stored = StoredMapDataset(dataset, open_map_store(str(tmp_path / 'store')), (2, 2))
    assert stored.reader is dataset.reader and stored.load_bytes is False
    with pytest.raises(AttributeError, match='no_such_attribute'):
        stored.no_such_attribute
    copy = pickle.loads(pickle.dumps(stored))
    assert copy.key(1) == stored.key(1) and copy.rows.tolist() == stored.rows.tolist()


def test_teacher_topk_equal_to_the_stores_and_mismatches_named_with_the_store(tmp_path):
    """--teacher-topk may be the store's K; a store of another teacher or split is named with --teacher-maps."""
    dataset, args = _authors_store_and_data(tmp_path, AUTHORS_CLASSES, layout='ours')  # a store of K = 4
    args.teacher_topk = 4
    assert wrap_train_dataset(args, dataset, (3, 16, 16), 8).topk == 4
    root = tmp_path / 'ours'
    args.teacher_model = 'other'
    with pytest.raises(ConfigError) as error:
        wrap_train_dataset(args, dataset, (3, 16, 16), 8)
    assert str(error.value) == f"--teacher-maps '{root}' was made by teacher 't', not --teacher-model 'other'"
    args.teacher_model = ''
    os.rename(tmp_path / 'train', tmp_path / 'other')
    with pytest.raises(ConfigError) as error:
        wrap_train_dataset(args, ImageDataset(str(tmp_path / 'other')), (3, 16, 16), 8)
    assert str(error.value) == f"--teacher-maps '{root}' holds split 'train', the train split is 'other'"


class _Reader:
    class_to_idx = {'a': 0}


@pytest.mark.parametrize('dataset', [torch.utils.data.TensorDataset(torch.zeros(1)), type('D', (), {'reader': _Reader()})()],
                         ids=['no-reader', 'reader-without-root'])
def test_stored_maps_need_an_image_folder_split(dataset):
    args = argparse.Namespace(teacher_maps='m', teacher_model='', teacher_topk=0, class_map='')
    with pytest.raises(ConfigError, match=r'^--teacher-maps needs an image-folder train split \(--dataset left empty\)$'):
        wrap_train_dataset(args, dataset, (3, 16, 16), 8)


def test_a_faulty_shard_says_how_to_remake_it(tmp_path):
    _write_pattern_stores(tmp_path)
    os.remove(tmp_path / 'store' / 'shard-00000.npy')
    with pytest.raises(ConfigError) as error:
        MapStore(str(tmp_path / 'store'))
    assert str(error.value).endswith("shard-00000.npy is not a .npy array ([Errno 2] No such file or directory: '"
                                     f"{tmp_path / 'store' / 'shard-00000.npy'}'); delete the shard's .npy and .json "
                                     "and rerun tools/precompute_teacher_maps.py with the store's flags to remake it")


def test_a_shard_is_its_data_and_a_record_of_its_keys_and_checksums_and_bad_arrays_are_refused(tmp_path):
    maps = np.arange(2 * 2 * 1 * 2 * 2, dtype=np.float16).reshape(2, 2, 1, 2, 2)
    write_shard(str(tmp_path), 0, maps, ['a/0.png', 'b/1.png'])
    record = json.loads((tmp_path / 'shard-00000.json').read_text())
    assert record == dict(count=2, keys=['a/0.png', 'b/1.png'],
                          keys_sha256=hashlib.sha256(b'["a/0.png", "b/1.png"]').hexdigest(),
                          rows_sha256=hashlib.sha256(maps.tobytes()).hexdigest())  # both rows, in order
    for bad, keys in ((maps[:1], ['a/0.png', 'b/1.png']), (np.concatenate([maps] * 2, axis=1), ['a/0.png', 'b/1.png']),
                      (maps.astype(np.float32), ['a/0.png', 'b/1.png']), (maps[:, :, 0], ['a/0.png', 'b/1.png'])):
        with pytest.raises(ValueError, match=r'a shard is fp16 \[n, 2, K, h, w\] with n keys'):
            write_shard(str(tmp_path), 1, bad, keys)
    assert sorted(os.listdir(tmp_path)) == ['shard-00000.json', 'shard-00000.npy']


def test_each_shard_is_memory_mapped_once_per_process(tmp_path, monkeypatch):
    """Not read whole (129 shards of 65 MB in every loader worker), and not mapped anew for every sample."""
    _write_pattern_stores(tmp_path)
    store = MapStore(str(tmp_path / 'store'))
    loads, load = [], np.load
    monkeypatch.setattr(np, 'load', lambda *args, **kwargs: loads.append(kwargs) or load(*args, **kwargs))
    for _ in range(3):
        values, _ = store.read('b/img.png')
        assert torch.equal(values[1], torch.arange(64.).view(8, 8))
    assert loads == [dict(mmap_mode='r')] and isinstance(store._arrays[0].base, np.memmap)  # a view of the map


@pytest.mark.parametrize('augment, slots', [
    ('rand-m9-n3', 3),  # RandAugment: its layers
    ('rand-m9-n0', 0),
    ('v0', 2),  # AutoAugment: its longest sub-policy
    ('rand-m9-n1 rand-m9-n2', 3),  # two augment steps: the ops of both
])
def test_op_slots_are_the_most_geometric_ops_a_sample_can_get(augment, slots):
    from timm.data.auto_augment import auto_augment_transform
    steps = [RandomResizedCropAndInterpolation(8)]
    for spec in augment.split():
        steps.append(rand_augment_transform(spec, {}) if spec.startswith('rand') else auto_augment_transform(spec, {}))
    log = GeometryLog()
    instrument_transform(transforms.Compose(steps + [MaybeToTensor()]), log)
    assert log.slots == slots and log.crop_last is False


@pytest.mark.parametrize('step, message', [
    ('augmix', r'--teacher-maps cannot follow the geometry of AugMix \(--aa augmix-\*\)'),
    ('flip-both-sides', '--teacher-maps follows flips and geometric ops all after the crop'),
])
def test_pipelines_whose_geometry_cannot_be_followed_are_refused(step, message):
    from timm.data.auto_augment import augment_and_mix_transform
    crop = RandomResizedCropAndInterpolation(8)
    steps = ([crop, augment_and_mix_transform('augmix-m5-w3', {})] if step == 'augmix' else
             [transforms.RandomHorizontalFlip(), crop, transforms.RandomVerticalFlip()])
    with pytest.raises(ConfigError, match='^' + message):
        instrument_transform(transforms.Compose(steps), GeometryLog())


def test_records_of_another_layout_are_refused_when_the_layout_is_given():
    record = pack_record(1, 1, np.zeros((2, 1, 2, 2), np.float32), (0.5, 0., 0., 0., 0.5, 0.), [], 0, (4, 4))
    layout = RecordLayout.of(record[None])
    for records in (torch.stack([record] * 2)[:, :-1], torch.stack([record] * 2)[None]):
        with pytest.raises(ValueError, match=r'stored-map targets must be B x 22 records of StoredMapDataset, got'):
            record_maps(records, (2, 2), layout)


def test_record_maps_reads_the_whole_map_as_crop_map_does_on_a_grid_of_another_shape():
    """A record of the whole image reads its map onto the token grid with crop_map's samples a token (a 12 x 4 map
    on a 2 x 4 grid: 6 x 6 a token), on rows and columns of different counts."""
    own = torch.rand(12, 4, generator=torch.Generator().manual_seed(0))
    top = torch.stack([own[None], torch.zeros(1, 12, 4)]).numpy()
    record = pack_record(0, 0, top, (4 / 16, 0., 0., 0., 12 / 48, 0.), [], 0, (48, 16))
    expected = crop_map(own, (0, 0, 4, 12), (2, 4))
    assert torch.allclose(record_maps(record[None], (2, 4))[1][0], expected, atol=1e-6)


class _ManyImages(torch.utils.data.Dataset):
    """`count` image keys without images: what StoredMapDataset reads of a split when it is built."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.reader = self

    def filename(self, index: int) -> str:
        return f'a/{index:05d}.png'

    def __len__(self) -> int:
        return self.count


def test_a_split_larger_than_a_lookup_block_finds_every_row_and_names_what_is_missing(tmp_path):
    """Keys are looked up in blocks of 16384: each block its own images (ImageNet has 78 blocks); the rows are
    int32, 4 bytes an image; a store lacking some of the split's images is refused naming the count and the first."""
    count = (1 << 14) + 5
    keys = [f'a/{index:05d}.png' for index in range(count)]
    write_shard(str(tmp_path), 0, np.zeros((count, 2, 1, 1, 1), np.float16), keys[::-1])  # stored in reverse
    write_json_atomic(str(tmp_path / MANIFEST), dict(format=FORMAT, teacher='t', topk=1, map_size=[1, 1],
                                                    classes=['a'], split='train', split_folder='train',
                                                    num_images=count, shard_size=count, num_shards=1))
    store = open_map_store(str(tmp_path))
    dataset = StoredMapDataset(_ManyImages(count), store, (1, 1))
    assert dataset.rows.dtype == np.int32 and dataset.rows.tolist() == list(range(count - 1, -1, -1))
    assert store.index is None  # the rows known, the key index is dropped before the loader forks its workers
    with pytest.raises(RuntimeError, match='dropped its key index'):
        store.read('a/00000.png')
    np.testing.assert_array_equal(store.entry_at(dataset.rows[0]), np.zeros((2, 1, 1, 1)))  # rows still read
    with pytest.raises(ConfigError) as error:
        StoredMapDataset(_ManyImages(count + 2), open_map_store(str(tmp_path)), (1, 1))
    assert str(error.value) == (f"--teacher-maps '{tmp_path}' has no maps for 2 of {count + 2} train images (first: "
                                f"'a/{count:05d}.png')")


def test_the_stored_maps_mixer_reads_the_layout_once_copies_and_takes_a_non_square_batch(monkeypatch):
    """The records' layout is read from the first batch only (each read is a device sync); the mixer can be copied
    (no recursion through __getattr__ before its state is set); the token grid is the batch's rows x columns."""
    torch.manual_seed(0)
    x, labels = torch.randn(4, 3, 16, 8), torch.tensor([0, 1, 2, 1])  # a 4 x 2 token grid of 4 px tokens
    own = torch.rand(4, 1, 4, 2)
    records = torch.stack([pack_record(int(label), int(label), torch.stack([score, torch.full_like(score, label)]).numpy(),
                                       (0.25, 0., 0., 0., 0.25, 0.), [], 0, (16, 8)) for label, score in zip(labels, own)])
    full = torch.zeros(4, 3, 4, 2)
    full[torch.arange(4), labels] = record_maps(records, (4, 2))[1]  # what the records read on the batch's grid
    kwargs = dict(mixup_alpha=0., cutmix_alpha=1., num_classes=3, patch_size=4, mode='elem', target_norm='sum',
                  min_tokens=1)
    teacher = TokenMix(**kwargs, teacher=lambda _: full, generator=torch.Generator().manual_seed(3))
    stored = StoredMapsMixer(TokenMix(**kwargs, generator=torch.Generator().manual_seed(3)))
    reads, of = [], RecordLayout.of
    monkeypatch.setattr(RecordLayout, 'of', lambda records: reads.append(records.shape) or of(records))
    for _ in range(3):
        mixed_t, target_t = teacher(x.clone(), labels)
        mixed_s, target_s = stored(x.clone(), records)
        assert torch.equal(mixed_t, mixed_s) and torch.allclose(target_t, target_s)
    assert reads == [records.shape] and stored.layout == RecordLayout(1, 4, 2, 0, 16, 8)
    for copy in (pickle.loads(pickle.dumps(stored)), __import__('copy').deepcopy(stored)):
        assert copy.layout == stored.layout and copy.num_classes == 3


def test_the_token_grid_of_the_stored_maps_is_the_inputs_rows_by_columns(tmp_path):
    dataset, args = _authors_store_and_data(tmp_path, AUTHORS_CLASSES)
    assert wrap_train_dataset(args, dataset, (3, 16, 24), 8).grid == (2, 3)
    assert wrap_train_dataset(args, dataset, (3, 24, 8), 8).grid == (3, 1)


def _edit_json(path, edit) -> None:
    """Rewrite the JSON file at `path` with `edit` (its value -> the new value)."""
    write_json_atomic(str(path), edit(json.loads(Path(path).read_text())))


@pytest.mark.parametrize('map_size, accepted', [
    ([1, 1], True), ([0, 2], False), ([-2, 2], False), ([2, 2.5], False), ([True, 2], False),
])
def test_a_map_size_is_two_counts_of_at_least_one(tmp_path, map_size, accepted):
    _small_store(tmp_path, k=1, size=1 if accepted else 2)
    _edit_json(tmp_path / 'maps' / MANIFEST, lambda manifest: dict(manifest, map_size=map_size))
    if accepted:
        assert MapStore(str(tmp_path / 'maps')).manifest['map_size'] == [1, 1]
        return
    with pytest.raises(ConfigError, match=re.escape(f"manifest.json 'map_size' is {map_size}, not [rows, columns]")):
        MapStore(str(tmp_path / 'maps'))


def test_a_shard_record_that_is_not_an_object_is_one_line(tmp_path):
    _small_store(tmp_path)
    _edit_json(tmp_path / 'maps' / 'shard-00000.json', lambda record: record['keys'])  # a bare list
    with pytest.raises(ConfigError, match=r"^--teacher-maps '.*': shard-00000.json holds no list of image keys; "):
        MapStore(str(tmp_path / 'maps'))


def test_absent_keys_are_minus_one_and_a_key_twice_is_named_even_when_it_is_not_utf8(tmp_path):
    """File names that are not UTF-8 reach Python as surrogate escapes; a store listing one twice names it."""
    _small_store(tmp_path)
    store = MapStore(str(tmp_path / 'maps'))
    assert store.positions(['a/0.png', 'a/1.png', 'z.png']).tolist() == [0, -1, -1]
    name = 'a/\udcff.png'  # the byte 0xff in a file name
    write_shard(str(tmp_path / 'maps'), 0, np.zeros((2, 2, 3, 2, 2), np.float16), [name, name])
    _edit_json(tmp_path / 'maps' / MANIFEST, lambda manifest: dict(manifest, num_images=2, shard_size=2))
    with pytest.raises(ConfigError) as error:
        MapStore(str(tmp_path / 'maps'))
    assert str(error.value).startswith(f"--teacher-maps '{tmp_path / 'maps'}': shard-00000.json lists '{name}' a "
                                       'second time (first in shard-00000.json)')


def test_the_warning_counts_the_shards_without_checksums(tmp_path, caplog):
    root = tmp_path / 'maps'
    os.makedirs(root)
    for shard in range(3):
        write_shard(str(root), shard, np.zeros((1, 2, 1, 1, 1), np.float16), [f'a/{shard}.png'])
    write_json_atomic(str(root / MANIFEST), dict(format=FORMAT, teacher='t', topk=1, map_size=[1, 1], classes=['a'],
                                                split='train', split_folder='train', num_images=3, shard_size=1,
                                                num_shards=3))
    _edit_json(root / 'shard-00001.json', lambda record: dict(count=1, keys=record['keys']))  # as written before
    with caplog.at_level(logging.WARNING):
        MapStore(str(root))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"--teacher-maps '{root}': 1 of 3 shards were written without checksums"), warnings


def test_opening_a_store_maps_its_shards_and_reads_npy_files_of_format_2(tmp_path, monkeypatch):
    """The checksum rows are read through a memory map (not 8.4 GB of ImageNet shards in every process), and a
    shard saved as .npy format 2.0 (numpy's for long headers) passes the header check and reads as version 1.0."""
    _small_store(tmp_path)
    maps = np.load(tmp_path / 'maps' / 'shard-00000.npy')
    with open(tmp_path / 'maps' / 'shard-00000.npy', 'wb') as f:
        np.lib.format.write_array(f, maps, version=(2, 0))
    loads, load = [], np.load
    monkeypatch.setattr(np, 'load', lambda *args, **kwargs: loads.append(kwargs.get('mmap_mode')) or load(*args, **kwargs))
    store = MapStore(str(tmp_path / 'maps'))
    assert loads == ['r']
    assert torch.equal(store.read('a/0.png')[0], torch.tensor([3., 2., 1.]).view(3, 1, 1).expand(3, 2, 2))


def test_the_rows_checksum_samples_eight_rows_of_a_longer_shard(tmp_path):
    """A store written by one version is opened by the next: which rows are hashed is part of the format."""
    maps = np.arange(20 * 2 * 1 * 1 * 1, dtype=np.float16).reshape(20, 2, 1, 1, 1)
    write_shard(str(tmp_path), 0, maps, [f'a/{row}.png' for row in range(20)])
    sampled = maps[[0, 3, 5, 8, 11, 14, 16, 19]]  # 8 rows spread evenly, the first and the last among them
    assert json.loads((tmp_path / 'shard-00000.json').read_text())['rows_sha256'] == hashlib.sha256(
        sampled.tobytes()).hexdigest()


@pytest.mark.parametrize('manifest, message', [
    (dict(format='other/1'), 'manifest.json is not a tokenmix-teacher-maps/1 manifest'),
    ([dict(format=FORMAT)], 'manifest.json is not a tokenmix-teacher-maps/1 manifest'),
])
def test_a_manifest_of_another_format_is_one_line_naming_the_flag(tmp_path, manifest, message):
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as error:
        open_map_store(str(tmp_path))
    assert str(error.value) == f"--teacher-maps '{tmp_path}': {message}"


@pytest.mark.parametrize('convert, found', [
    (lambda maps: maps.astype(np.float32), 'float32 [1, 2, 3, 2, 2]'),
    (np.asfortranarray, 'float16 [1, 2, 3, 2, 2]'),  # the same dtype and shape, in column-major order
])
def test_a_shard_of_another_dtype_or_order_is_refused_by_its_header(tmp_path, convert, found):
    _small_store(tmp_path)
    path = tmp_path / 'maps' / 'shard-00000.npy'
    np.save(path, convert(np.load(path)))
    with pytest.raises(ConfigError, match=re.escape(f'shard-00000.npy holds {found}, the manifest says float16 '
                                                    '[1, 2, 3, 2, 2]')):
        MapStore(str(tmp_path / 'maps'))
