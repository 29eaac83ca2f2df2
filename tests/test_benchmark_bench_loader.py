"""benchmarks/bench_loader.py and tools/make_jpeg_data.py: the data, the candidate paths' draws and pixels, the
DCT scale rule, RandAugment op timing rows, and the whole benchmark on a few images (the whole-pixel translate and
`faster_augment` the candidates use: tests/test_fast_augment.py)."""
import functools
import io
import math
import os
import random
import re
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp

from conftest import TINY_TEACHER, load_script

bench = load_script('benchmarks/bench_loader.py')
jpeg = load_script('tools/make_jpeg_data.py')
RECIPE_AA = 'rand-m9-mstd0.5-inc1'


def _tree(root: str) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), 'rb').read()
            for d, _, files in os.walk(root) for f in files}


def _recipe_steps(order: str = 'timm'):
    """The DeiT recipe's train transform as timm's loader builds it with the prefetcher (uint8 tensors out): crop,
    flip, RandAugment, to tensor; in the authors' order the crop comes after RandAugment."""
    steps = create_transform(224, is_training=True, auto_augment=RECIPE_AA, interpolation='bicubic',
                             use_prefetcher=True, re_prob=0.25, re_mode='pixel').transforms
    return steps if order == 'timm' else steps[1:3] + steps[:1] + steps[3:]


@functools.lru_cache(maxsize=None)
def _jpeg_bytes(size, seed=0) -> bytes:
    buffer = io.BytesIO()
    jpeg.make_image(np.random.default_rng(seed), size).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_jpeg_folder_is_deterministic_textured_and_imagenet_sized(tmp_path):
    paths = jpeg.write_image_folder(str(tmp_path / 'a'), images=6, classes=3, val_images=2, seed=1)
    jpeg.write_image_folder(str(tmp_path / 'b'), images=6, classes=3, val_images=2, seed=1)
    jpeg.write_image_folder(str(tmp_path / 'c'), images=6, classes=3, val_images=2, seed=2)
    a = _tree(str(tmp_path / 'a'))
    assert a == _tree(str(tmp_path / 'b')) and a != _tree(str(tmp_path / 'c'))
    assert sorted(a) == sorted([f'train/class{i % 3:04d}/img{i:06d}.JPEG' for i in range(6)] +
                               [f'val/class{i:04d}/img{i:06d}.JPEG' for i in range(2)])
    assert [os.path.relpath(p, tmp_path / 'a') for p in paths] == [f'train/class{i % 3:04d}/img{i:06d}.JPEG'
                                                                   for i in range(6)]
    sizes = {size for size, _ in jpeg.SIZES}
    for path in paths:
        with Image.open(path) as img:
            assert img.format == 'JPEG' and img.mode == 'RGB' and img.size in sizes
    # texture: a 500 x 375 file at quality 90 weighs what an ImageNet photograph does (a flat image: ~5 KB)
    assert 80_000 < len(_jpeg_bytes((500, 375))) < 150_000


def test_sizes_follow_imagenet_shares():
    rng = np.random.default_rng(0)
    counts = Counter(jpeg.draw_size(rng) for _ in range(4000))
    assert counts[(500, 375)] / 4000 == pytest.approx(0.40, abs=0.03)
    assert max(w for w, _ in counts) == 640 and min(w * h for w, h in counts) == 250 * 250


def test_ensure_image_folder_keeps_a_finished_folder_and_replaces_a_partial_one(tmp_path):
    out = str(tmp_path / 'data')
    os.makedirs(out + '.partial/train/stale')
    assert jpeg.ensure_image_folder(out, images=2, classes=1) == out
    assert not os.path.exists(out + '.partial') and len(_tree(out)) == 2
    jpeg.ensure_image_folder(out, images=5, classes=1)  # exists: left as it is
    assert len(_tree(out)) == 2


def test_dct_scale_keeps_the_box_at_least_the_output_size():
    assert bench.dct_scale((447, 900), (224, 224)) == 1
    assert bench.dct_scale((448, 448), (224, 224)) == 2
    assert bench.dct_scale((900, 1000), (224, 224)) == 4
    assert bench.dct_scale((4000, 4000), (224, 224)) == 8  # libjpeg scales down by 8 at most
    assert bench.dct_scale((1000, 500), (448, 224)) == 2  # each side against its own output side


def test_draft_decodes_smaller_with_timms_box_and_pixels():
    data = _jpeg_bytes((1280, 960), seed=3)
    crop = _recipe_steps()[0]
    crop.scale = (0.9, 1.0)  # a box that allows 1/4: decoded at 320 x 240
    random.seed(0)
    img, box = bench.draft_decode(data, 'RGB', crop)
    random.seed(0)
    top, left, h, w = crop.get_params(Image.open(io.BytesIO(data)), crop.scale, crop.ratio)
    assert img.size == (320, 240)
    np.testing.assert_allclose(box, (left / 4, top / 4, (left + w) / 4, (top + h) / 4))
    random.seed(0)
    full = np.asarray(crop(Image.open(io.BytesIO(data)).convert('RGB')), dtype=np.float32)
    fast = np.asarray(img.resize((224, 224), Image.BICUBIC, box=box), dtype=np.float32)
    assert np.abs(full - fast).mean() < 4  # the same region: DCT-scaled and resized pixels differ a little
    assert np.abs(full - np.roll(fast, 3, axis=1)).mean() > 8  # a box 3 px off is much further away


def test_dct_scale_shares_count_the_boxes_of_each_size():
    crop = _recipe_steps()[0]
    assert bench.dct_scale_shares([(250, 250), (500, 375)], crop) == {1: 1.0, 2: 0.0, 4: 0.0, 8: 0.0}
    crop.scale = (0.9, 1.0)
    shares = bench.dct_scale_shares([(1280, 960)], crop, draws=50)
    assert shares[1] == 0 and shares[2] + shares[4] == 1 and shares[4] > 0  # 1/4 needs a box side >= 896
    state = random.getstate()
    bench.dct_scale_shares([(1280, 960)], crop, draws=5)
    assert random.getstate() == state  # the caller's stream is left as it was
    crop.size = (448, 224)  # a tall output: 1/2 needs a box 896 px high
    assert bench.dct_scale_shares([(1280, 700)], crop, draws=50)[1] == 1.0  # boxes at most 700 px high
    assert bench.dct_scale_shares([(700, 1280)], crop, draws=50)[2] == 1.0  # sizes are (width, height)


@pytest.mark.parametrize('order', ['timm', 'authors'])
@pytest.mark.parametrize('name', [c.name for c in bench.available_candidates()])
def test_candidates_draw_as_timm_and_make_nearly_its_pixels(name, order):
    candidate = next(c for c in bench.CANDIDATES if c.name == name)
    steps = _recipe_steps(order)
    path = bench.make_path(candidate, steps, 'RGB')
    if order == 'authors' and candidate.decode == 'draft':
        assert path is None  # the box is drawn after RandAugment: not known before the decode
        return
    baseline = bench.make_path(bench.CANDIDATES[0], steps, 'RGB')
    # the same draws; only filters differ: bilinear vs bicubic, Pillow's box-filter reduce, sub-pixel shifts
    tolerance = 6 if candidate.resample else 2 if candidate.resize == 'reduce' else 1.5 if candidate.translate else 0.5
    diffs = []
    for seed in range(6):
        data = _jpeg_bytes((500, 375), seed)
        bench.seed_all(seed)
        expected = baseline(data)
        state = random.getstate(), np.random.get_state()[1].tolist(), torch.random.get_rng_state()
        bench.seed_all(seed)
        out = path(data)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
        assert (random.getstate(), np.random.get_state()[1].tolist()) == state[:2]  # the same number of draws
        assert torch.equal(torch.random.get_rng_state(), state[2])
        diffs.append((out.float() - expected.float()).abs().mean().item())
    assert max(diffs) < tolerance, diffs


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_augment_candidates_change_the_geometric_ops_they_name():
    steps = _recipe_steps()
    augment = steps[2]
    augment.ops = [op for op in augment.ops if op.name in ('TranslateXRel', 'Rotate')]
    for op in augment.ops:
        op.prob = 1.0
    baseline = bench.make_path(bench.CANDIDATES[0], steps, 'RGB')
    diffs = {}
    for candidate in bench.available_candidates():
        path = bench.make_path(candidate, steps, 'RGB')
        for seed in range(3):
            bench.seed_all(seed)
            expected = baseline(_jpeg_bytes((500, 375), seed))
            bench.seed_all(seed)
            diff = (path(_jpeg_bytes((500, 375), seed)).float() - expected.float()).abs().mean().item()
            diffs[candidate.name] = diffs.get(candidate.name, 0.0) + diff / 3
    translate = {name for name in diffs if 'translate' in name and 'bilinear' not in name}
    bilinear = {name for name in diffs if 'bilinear' in name}
    assert len(translate) == 2 and len(bilinear) == 1
    assert all(0.3 < diffs[name] for name in translate | bilinear), diffs  # the named op is really replaced
    plain_translate = diffs['RandAugment: whole-pixel translate']
    assert all(diffs[name] > plain_translate + 0.03 for name in bilinear), diffs  # rotate's filter changes too
    reduce = {name for name in diffs if 'reduce' in name}
    assert all(diffs[name] < (2 if name in reduce else 0.5) for name in diffs.keys() - translate - bilinear), diffs


@pytest.mark.parametrize('order', ['timm', 'authors'])
def test_the_baseline_is_timms_transform(order):
    steps = _recipe_steps(order)
    data = _jpeg_bytes((375, 500), 7)
    bench.seed_all(4)
    out = bench.make_path(bench.CANDIDATES[0], steps, 'RGB')(data)
    bench.seed_all(4)
    img = Image.open(io.BytesIO(data)).convert('RGB')
    for step in steps:
        img = step(img)
    assert torch.equal(out, img)


def test_augment_op_rows_cover_every_op_with_a_tensor_counterpart():
    augment = _recipe_steps()[2]
    images = [Image.fromarray(np.full((32, 32, 3), 100, np.uint8))] * 2
    rows = bench.augment_op_seconds(augment, images)
    assert [r[0] for r in rows] == [op.name for op in augment.ops] and len(rows) == 15
    assert all(r[1] > 0 and r[2] > 0 for r in rows)  # no NaN: every op has a tensor counterpart
    assert sum(r[3] for r in rows) == pytest.approx(1.0)  # 2 layers x p 0.5
    t = torch.full((3, 32, 32), 100, dtype=torch.uint8)
    for name, op in bench.tensor_ops().items():
        args = {'Rotate': (10.,), 'Posterize': (4,), 'Solarize': (128,), 'SolarizeAdd': (20,)}.get(
            name, (0.1,) if 'Translate' in name or 'Shear' in name else (1.5,) if name in (
                'Color', 'Contrast', 'Brightness', 'Sharpness') else ())
        assert op(t, *args).shape == t.shape, name


def test_an_op_without_tensor_counterpart_counts_its_pil_time():
    augment = _recipe_steps()[2]
    augment.ops = [AugmentOp('PosterizeOriginal', prob=0.5, magnitude=9, hparams=augment.ops[0].hparams),
                   augment.ops[0]]
    rows = bench.augment_op_seconds(augment, [Image.fromarray(np.full((16, 16, 3), 90, np.uint8))])
    assert math.isnan(rows[0][2]) and not math.isnan(rows[1][2])
    total = bench.augment_table(rows)[-1]
    fastest = (rows[0][1] * rows[0][3] + min(rows[1][1], rows[1][2]) * rows[1][3]) * 1e3
    assert total.endswith(f'(faster of the two per op: {fastest:.3f}) |')


def test_cores_needed_and_spread():
    assert bench.cores_needed(3527, 130) == 28 and bench.cores_needed(260, 130) == 2
    assert bench.cores_needed(15, 15 / 13) == 13  # 13.000000000000002 in floats: still 13 cores
    assert bench.spread([3.0, 1.0, 2.0]) == '2.000 (1.000-3.000)'


def test_bad_input_is_one_line_naming_the_flag(tmp_path, capsys):
    assert bench.run_cli(bench.main, 'bench_loader.py', ['--data-dir', str(tmp_path / 'none')]) == 2
    assert f"--data-dir '{tmp_path / 'none'}' is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(['--rounds', '0'])
    assert stop.value.code == 2 and '--rounds' in capsys.readouterr().err
    steps = create_transform(224, is_training=True, train_crop_mode='rkrc').transforms
    with pytest.raises(bench.ConfigError, match='random-resized-crop train pipeline'):
        bench.make_path(bench.CANDIDATES[0], steps, 'RGB')


def _rows(text: str, table_start: str) -> list:
    lines = text[text.index(table_start):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith('|'):
            break
        rows.append([cell.strip() for cell in line.strip('|').split('|')])
    return rows


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_whole_benchmark_on_a_few_images(tmp_path, capsys, teacher_checkpoint, monkeypatch):
    data = str(tmp_path / 'jpeg')
    jpeg.write_image_folder(data, images=6, classes=2, seed=0)
    store = str(tmp_path / 'store')
    tool = load_script('tools/precompute_teacher_maps.py')
    assert tool.main(['--data-dir', data, '--teacher-model', TINY_TEACHER, '--teacher-checkpoint',
                      teacher_checkpoint, '--num-classes', '10', '--out', store, '--img-size', '32',
                      '--workers', '0']) == 0
    capsys.readouterr()
    assert bench.main(['--data-dir', data, '--rounds', '2', '--round-images', '3', '--ra-images', '2',
                       '--feed', '1000', '--teacher-maps', store, '--', '--teacher-model', TINY_TEACHER]) == 0
    out = capsys.readouterr().out
    stages = _rows(out, '| stage |')
    order = re.search(r'transform: (.*)', out).group(1).split(', ')  # the recipe's order of the steps
    assert sorted(order) == ['RandAugment', 'crop-resize', 'flip', 'to-tensor']
    assert [r[0] for r in stages] == ['read bytes', 'decode', *order, 'collate', 'normalize (prefetcher)',
                                      'random erasing (prefetcher)', 'sum of the worker stages']
    shares = [int(r[2].rstrip('%')) for r in stages[:7]]
    assert 97 <= sum(shares) <= 103 and stages[7][2] == 'on the device in training'
    workers = _rows(out, '| worker job')
    assert [r[0] for r in workers] == ["train.py's loader", 'with stored maps (--teacher-maps)']
    for _, ms, img_s, cores in workers:  # --feed 1000: the cores needed are ms an image, rounded up
        per_image = float(ms.split()[0])
        assert abs(int(img_s) - 1000 / per_image) <= 1 and int(cores) == math.ceil(per_image)
    ratios = _rows(out, '| stored maps against the plain loader')
    assert [r[0].split(',')[0] for r in ratios] == ['worker img/s', "the batch's maps cut (`record_maps`; on the "
                                                    'device in training)', 'worker + that cut on this core']
    worker_ratio, cut_ms, both_ratio = (float(r[1].split()[0]) for r in ratios)
    assert 0 < both_ratio < worker_ratio and cut_ms > 0  # the cut's time comes off the ratio
    candidates = _rows(out, '| path (bytes')
    assert sorted(r[0] for r in candidates) == sorted(c.name for c in bench.available_candidates())
    assert candidates[0][2] == '1.000 (1.000-1.000)' and candidates[0][5] == '0.00'
    measured = [r for r in candidates[1:] if not r[1].startswith('n/a')]
    assert all(float(r[5]) < 6 for r in measured)  # the same draws: nearly the same pixels
    drafts = sum(c.decode == 'draft' for c in bench.CANDIDATES) if order[0] != 'crop-resize' else 0
    assert len(measured) == len(candidates) - 1 - drafts  # no DCT-scaled decode when the crop is not first
    ops = _rows(out, '| op |')
    assert len(ops) == 16 and ops[-1][0] == 'all ops, expected' and ops[-1][3] == '1.00'
    assert re.search(r'2 rounds of 3 images', out)
    assert re.search(r'allow a DCT scale-down \(20 draws an image\): 1/2: 0.0%, 1/4: 0.0%, 1/8: 0.0%', out)
    reads = []
    monkeypatch.setitem(bench.CLOCKS, 'cpu', lambda: reads.append(1) or float(len(reads)))  # each read: one second on
    assert bench.main(['--data-dir', data, '--rounds', '1', '--round-images', '2', '--workers-only', '--clock', 'cpu',
                       '--teacher-maps', store, '--', '--teacher-model', TINY_TEACHER]) == 0
    out = capsys.readouterr().out  # (a) alone: the worker job and the stored-maps ratios, no candidates or ops
    assert re.search(r'1 rounds of 2 images, one torch thread, cpu clock', out)
    # every timed call reads the clock twice, one second apart: 2 loads and a collate over 2 images, 1.5 s an image
    assert reads and _rows(out, '| worker job')[0][1] == '1500.000 (1500.000-1500.000)'
    assert _rows(out, '| worker job') and _rows(out, '| stored maps against') and '(b)' not in out and '(c)' not in out


def test_timer_sums_seconds_of_its_clock():
    ticks = iter([1.0, 3.5, 10.0, 10.25])
    timer = bench.Timer(lambda: next(ticks))
    timer('decode', lambda: None)
    timer('decode', lambda: None)
    assert timer.spent == {'decode': 2.75} and bench.CLOCKS == {'wall': time.perf_counter, 'cpu': time.thread_time}
