"""--fast-augment (`transforms.fast_augment`): RandAugment / AutoAugment with whole-pixel translates and bilinear
rotate / shear, against timm's path. The same seeds draw the same ops and magnitudes; over a few hundred small
augmented images the two paths' per-image statistics have the same distributions within stated bounds (and three
kinds of wrong code fail those bounds); the stored maps record the shift the op applied; the flag reaches the train
transform that build_train_loader builds from parsed arguments, and is off by default."""
import os
import random
from typing import Any, Callable, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, create_transform
from timm.data.auto_augment import rotate, translate_x_abs, translate_x_rel, translate_y_abs, translate_y_rel
from torch.utils.data import Dataset

from tokenmix_train.args import parse_train_args
from tokenmix_train.data import build_train_loader
from tokenmix_train.errors import ConfigError
from tokenmix_train.teacher_maps import StoredMapDataset, _op_matrix, open_map_store
from tokenmix_train.transforms import WholePixelTranslate, augment_ops, faster_augment

SIZE = 48
RECIPE_AA = 'rand-m9-mstd0.5-inc1'  # the DeiT recipes' RandAugment: 2 ops of 15 an image, each with p 0.5
FILL = (124, 116, 104)  # timm's fill colour (ImageNet's mean), which rotate, shear and translate bring in
DATA_CONFIG = dict(input_size=(3, 32, 32), interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
                   std=IMAGENET_DEFAULT_STD)


def _augment(interpolation: str = 'bicubic') -> Any:
    """The recipe's RandAugment as timm's factory builds it ('random': each affine op draws bilinear or bicubic)."""
    steps = create_transform(SIZE, is_training=True, auto_augment=RECIPE_AA, interpolation=interpolation).transforms
    return next(step for step in steps if augment_ops(step))


def _seed(seed: int) -> None:
    """The streams RandAugment draws from: NumPy picks the ops, `random` their application, magnitude and filter."""
    random.seed(seed)
    np.random.seed(seed)


def _marked_images(count: int, seed: int = 0) -> List[Image.Image]:
    """`count` RGB images of SIZE px: smooth colour noise around timm's fill colour, a fine grain (s.d. 4 levels) and
    a bright 6 px square, the marker, at a random place at least 8 px from the border."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = np.clip(np.array(FILL) + rng.normal(0, 12, (SIZE // 4, SIZE // 4, 3)), 0, 255).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.BILINEAR), np.float64)
        pixels += rng.normal(0, 4, pixels.shape)
        y, x = rng.integers(8, SIZE - 14, 2)
        pixels[y:y + 6, x:x + 6] = (250, 240, 60)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def _centroid(pixels: np.ndarray) -> np.ndarray:
    """(x, y) centre of the squared deviation from the per-channel median: the marker's place, whichever colour a
    photometric op (invert, solarize, posterize) gave it."""
    weights = ((pixels - np.median(pixels, axis=(0, 1))) ** 2).sum(-1)
    ys, xs = np.mgrid[:pixels.shape[0], :pixels.shape[1]]
    return np.array([(weights * xs).sum(), (weights * ys).sum()]) / max(weights.sum(), 1e-9)


STATISTICS = ('mean', 'std', 'gradient', 'dx', 'dy')


def _statistics(img: Image.Image, original: Image.Image) -> List[float]:
    """STATISTICS of an augmented image: mean and standard deviation of its levels, mean absolute difference of
    neighbouring pixels, and the marker's displacement from its place in the `original` (px)."""
    pixels = np.asarray(img, np.float64)
    gradient = np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean()
    dx, dy = _centroid(pixels) - _centroid(np.asarray(original, np.float64))
    return [pixels.mean(), pixels.std(), gradient, dx, dy]


def _paired_statistics(augment: Any, fast: Any, images: List[Image.Image]) -> Tuple[np.ndarray, np.ndarray]:
    """STATISTICS (images x 5) of timm's `augment` and of `fast` on each image, both after seeding by its index."""
    timm_rows, fast_rows = [], []
    for index, img in enumerate(images):
        for path, rows in ((augment, timm_rows), (fast, fast_rows)):
            _seed(index)
            rows.append(_statistics(path(img), img))
    return np.array(timm_rows), np.array(fast_rows)


def _recording(augment: Any, calls: List[Tuple[str, tuple]]) -> Any:
    """`augment` with each op's function recording (op name, its drawn arguments) into `calls` before it runs."""
    def recorded(name: str, fn: Callable) -> Callable:
        def call(img, *args, **kwargs):
            calls.append((name, args))
            return fn(img, *args, **kwargs)
        return call
    for op in augment_ops(augment):
        op.aug_fn = recorded(op.name, op.aug_fn)
    return augment


@pytest.mark.parametrize('interpolation', ['bicubic', 'random'])
def test_fast_path_draws_timms_ops_and_magnitudes(interpolation):
    """Seeded alike, both paths apply the same ops with the same drawn arguments and leave the random streams in the
    same state (timm's 'random' filter is still drawn, from a tuple of the fast filter)."""
    timm_calls, fast_calls = [], []
    augment = _augment(interpolation)
    fast = _recording(faster_augment(augment), fast_calls)
    augment = _recording(augment, timm_calls)
    for index, img in enumerate(_marked_images(200)):
        _seed(index)
        augment(img)
        state = random.getstate(), np.random.get_state()[1].tolist()
        _seed(index)
        fast(img)
        assert (random.getstate(), np.random.get_state()[1].tolist()) == state
    assert fast_calls == timm_calls
    names = [name for name, _ in timm_calls]
    assert len(names) > 150 and {'TranslateXRel', 'TranslateYRel', 'Rotate', 'ShearX', 'ShearY'} <= set(names)


# bounds of test_fast_path_statistics_match_timms; measured on its 400 images (2026-12-05, Pillow 12.3, timm 1.0.31),
# and with wrong code (temporary edits of transforms.py): translation dropped / halved, rotate turned the other way
KS_P_MIN = 0.05  # KS p-value each distribution keeps (measured: mean 1.0, std 0.13, dx 1.0, dy 1.0)
MOVED_SHARE_MAX = 0.02  # images whose marker lands > 1 px from timm's (measured: 0.75%; wrong: 15.25, 15.25, 6.75%)
LEVEL_P95_MAX = 0.8  # 95th percentile of the paired |difference| of mean and std, levels (measured: 0.34, 0.66)
GRADIENT_LOSS_MAX = 0.05  # loss of the mean neighbour gradient, fast against timm's (measured: 2.1%)


def test_fast_path_statistics_match_timms():
    """400 marked images, each through timm's RandAugment and the fast one with the same seed. Same distribution
    (KS) of the mean, standard deviation and marker displacement; paired: the marker where timm's path puts it
    (whole-pixel translates are at most half a pixel off), levels within LEVEL_P95_MAX. The neighbour gradient is
    bounded, not KS-tested: bilinear rotate and shear soften the 4-level grain (-12.5% median on the 34% of images
    whose gradient changed; KS p = 0.005), the filter change --fast-augment buys its speed with."""
    timm_path, fast_path = _paired_statistics(_augment(), faster_augment(_augment()), _marked_images(400))
    for k in (0, 1, 3, 4):
        assert stats.ks_2samp(timm_path[:, k], fast_path[:, k]).pvalue > KS_P_MIN, STATISTICS[k]
    moved = np.hypot(*(timm_path[:, 3:] - fast_path[:, 3:]).T)
    assert np.mean(moved > 1.0) <= MOVED_SHARE_MAX, np.sort(moved)[-20:]
    assert np.quantile(np.abs(timm_path[:, :2] - fast_path[:, :2]), 0.95, axis=0).max() < LEVEL_P95_MAX
    assert 1 - fast_path[:, 2].mean() / timm_path[:, 2].mean() < GRADIENT_LOSS_MAX
    displaced = np.hypot(timm_path[:, 3], timm_path[:, 4]) > 3
    assert 0.2 < displaced.mean() < 0.6  # the markers do move: translates, rotations and shears were applied


def test_whole_pixel_translate_is_timms_op_on_whole_pixels():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    kwargs = dict(fillcolor=(1, 2, 3), resample=Image.BICUBIC)
    for axis, timm_op, pct in ((0, translate_x_rel, 0.2), (0, translate_x_rel, -0.34), (1, translate_y_rel, 0.3)):
        for resample in (Image.BICUBIC, Image.NEAREST):  # NEAREST: the copy faster_augment asks for
            fast = WholePixelTranslate(axis, relative=True)(img, pct, fillcolor=(1, 2, 3), resample=resample)
            assert np.array_equal(np.asarray(fast), np.asarray(timm_op(img, pct, **kwargs)))
    # a fractional shift is rounded to whole pixels: 0.23 * 50 = 11.5 -> 12 px; -4.2 -> -4 px
    assert WholePixelTranslate(0, relative=True).applied_op(img, 0.23) == (translate_x_abs, (12,))
    shifted = np.asarray(WholePixelTranslate(0, relative=True)(img, 0.23, **kwargs))
    assert np.array_equal(shifted[:, :38], np.asarray(img)[:, 12:]) and (shifted[:, 38:] == (1, 2, 3)).all()
    assert WholePixelTranslate(1, relative=False).applied_op(img, -4.2) == (translate_y_abs, (-4,))
    assert np.array_equal(np.asarray(WholePixelTranslate(1, relative=False)(img, -4.2, **kwargs))[4:],
                          np.asarray(img)[:-4])


def test_faster_augment_is_a_copy_that_changes_only_the_affine_ops():
    for interpolation, bilinear, nearest in (('bicubic', Image.BILINEAR, Image.NEAREST),
                                             ('random', (Image.BILINEAR,) * 2, (Image.NEAREST,) * 2)):
        augment = _augment(interpolation)
        before = {op.name: (op.aug_fn, op.kwargs['resample']) for op in augment.ops}
        fast = {op.name: op for op in faster_augment(augment).ops}
        assert type(fast['TranslateXRel'].aug_fn) is WholePixelTranslate
        assert (fast['TranslateYRel'].aug_fn.axis, fast['TranslateYRel'].aug_fn.relative) == (1, True)
        assert fast['TranslateXRel'].kwargs['resample'] == nearest
        assert {fast[name].kwargs['resample'] for name in ('Rotate', 'ShearX', 'ShearY')} == {bilinear}
        assert fast['Rotate'].aug_fn is rotate
        assert all(fast[name].aug_fn is fn and fast[name].kwargs['resample'] == resample
                   for name, (fn, resample) in before.items() if name not in (
                       'TranslateXRel', 'TranslateYRel', 'Rotate', 'ShearX', 'ShearY'))
        assert {op.name: (op.aug_fn, op.kwargs['resample']) for op in augment.ops} == before  # the original kept
    assert faster_augment(_augment(), translate=False, resample=None).ops[14].aug_fn is translate_y_rel


class _Pictures(Dataset):
    """Four seeded random 60 x 45 RGB pictures labelled 0; `transform` set by the loader factory."""

    transform = None

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        img = Image.fromarray(np.random.default_rng(index).integers(0, 256, (45, 60, 3), dtype=np.uint8))
        return self.transform(img), 0


def _train_transform(*flags: str, dataset: Any = None) -> Any:
    """The train transform build_train_loader sets on `dataset` for train.py's parsed `flags` (CPU, no workers); with
    --aug-splits, that of the augmented splits."""
    args = parse_train_args(['--data-dir', 'd', '-b', '2', '-j', '0', '--device', 'cpu', *flags])[0]
    args.distributed = False  # set by init_device in train.py
    served = build_train_loader(_Pictures() if dataset is None else dataset, args, DATA_CONFIG,
                                torch.device('cpu')).dataset  # timm's AugMixDataset with --aug-splits
    return served.augmentation if hasattr(served, 'augmentation') else served.transform


def _affine_ops(transform: Any) -> dict:
    """op name -> (type of its function, its filter) for the affine ops of the transform's RandAugment."""
    augment = next(step for step in transform.transforms if augment_ops(step))
    return {op.name: (type(op.aug_fn).__name__, op.kwargs['resample']) for op in augment.ops
            if op.name in ('TranslateXRel', 'Rotate', 'ShearY')}


@pytest.mark.parametrize('order', ['timm', 'authors'])
def test_the_flag_reaches_the_train_transform_and_is_off_by_default(order):
    recipe = ['--aa', RECIPE_AA, '--train-interpolation', 'bicubic', '--aug-order', order]
    timm_ops = dict(TranslateXRel=('function', Image.BICUBIC), Rotate=('function', Image.BICUBIC),
                    ShearY=('function', Image.BICUBIC))
    assert _affine_ops(_train_transform(*recipe)) == timm_ops
    fast = _train_transform(*recipe, '--fast-augment')
    assert _affine_ops(fast) == dict(TranslateXRel=('WholePixelTranslate', Image.NEAREST),
                                     Rotate=('function', Image.BILINEAR), ShearY=('function', Image.BILINEAR))
    assert [type(t).__name__ for t in fast.transforms] == [
        type(t).__name__ for t in _train_transform(*recipe).transforms]  # the same steps, in the same order
    assert _affine_ops(_train_transform(*recipe, '--fast-augment', '--no-fast-augment')) == timm_ops


def test_the_flag_reaches_the_augmented_splits_and_needs_an_augment():
    splits = _train_transform('--aa', 'rand-m9-mstd0.5', '--aug-splits', '2', '--fast-augment')
    assert _affine_ops(splits)['TranslateXRel'][0] == 'WholePixelTranslate'
    assert [type(t).__name__ for t in _train_transform('--no-aug', '--fast-augment').transforms] == [
        'Resize', 'CenterCrop', 'MaybePILToTensor']  # --no-aug overrides every augmentation flag
    with pytest.raises(ConfigError, match=r'^--fast-augment changes the geometric ops of RandAugment / AutoAugment '
                                          r'\(--aa\), but the train transform has none$'):
        _train_transform('--fast-augment')


def test_stored_maps_record_the_whole_pixel_shift_the_op_applied(tmp_path):
    """With --fast-augment on a stored-maps dataset, the recorded translate is timm's absolute one by the rounded
    shift (the same draws as timm's path, which records the drawn fraction), and its affine map reads, on a linear
    ramp, exactly what the wired op writes (as test_op_matrices_are_what_timm_ops_do_to_an_image does for timm's)."""
    os.makedirs(tmp_path / 'train' / 'a')
    os.makedirs(tmp_path / 'maps' / 'a')
    for k in range(3):
        Image.new('RGB', (40, 30), (100, 150, 200)).save(tmp_path / 'train' / 'a' / f'{k}.png')
        torch.save(torch.stack([torch.ones(1, 8, 8), torch.zeros(1, 8, 8)]).half(), tmp_path / 'maps' / 'a' / f'{k}.pt')
    recorded = {}
    for flags in ([], ['--fast-augment']):
        stored = StoredMapDataset(ImageDataset(str(tmp_path / 'train')), open_map_store(str(tmp_path / 'maps')),
                                  (4, 4))
        augment = next(step for step in _train_transform('--aa', 'rand-m9-mstd0.5-inc1', *flags,
                                                         dataset=stored).transforms if augment_ops(step))
        augment.ops = [op for op in augment.ops if op.name in ('TranslateXRel', 'TranslateYRel')]
        for op in augment.ops:
            op.prob = 1.0
        recorded[bool(flags)] = []
        for index in range(3):
            _seed(index)
            stored[index]
            recorded[bool(flags)].append(list(stored.log.ops))
    for timm_ops, fast_ops in zip(recorded[False], recorded[True]):
        assert len(timm_ops) == len(fast_ops) == 2
        for (timm_fn, (pct,)), (fn, (pixels,)) in zip(timm_ops, fast_ops):
            axis = 0 if timm_fn is translate_x_rel else 1
            assert fn is (translate_x_abs, translate_y_abs)[axis] and pixels == round(pct * 32) != pct * 32
    translate = next(op for op in augment.ops if op.name == 'TranslateXRel')
    width, height = 40, 30
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = Image.fromarray((xs + 100 * ys).astype(np.float32), mode='F')
    out = np.asarray(translate.aug_fn(ramp, 0.23, fillcolor=-1.0, resample=translate.kwargs['resample']))
    fn, args = stored.log.ops[-1]
    assert (fn, args) == (translate_x_abs, (9,))  # 0.23 * 40 = 9.2 px drawn, 9 applied
    matrix = np.array(_op_matrix(fn, args, (width, height))).reshape(-1, 3)[:2]  # output -> input, 2 x 3
    at = np.stack([xs + 0.5, ys + 0.5, np.ones_like(xs)], -1) @ matrix.T
    inside = at[..., 0] < width
    assert inside.sum() == 31 * height and (out[~inside] == -1.0).all()
    np.testing.assert_array_equal(out[inside], (at[..., 0] - 0.5 + 100 * (at[..., 1] - 0.5))[inside])
