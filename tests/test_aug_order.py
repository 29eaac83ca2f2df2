"""--aug-order: timm's train augmentation order (crop, flip, RandAugment) or the TokenMix authors' (flip and
RandAugment on the whole image, then the crop), built by build_train_loader from timm's own steps; its flag rules."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

from tokenmix_train.args import parse_train_args
from tokenmix_train.data import build_train_loader
from tokenmix_train.errors import ConfigError
from tokenmix_train.teacher_maps import StoredMapDataset, open_map_store, record_maps
from tokenmix_train.transforms import authors_order

SIZE = 32
DATA_CONFIG = dict(input_size=(3, SIZE, SIZE), interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
                   std=IMAGENET_DEFAULT_STD)
RECIPE = ['--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--train-interpolation', 'bicubic']


class Pictures(Dataset):
    """`length` seeded random 96 x 72 RGB pictures, labelled 0; `transform` set by the loader factory."""

    def __init__(self, length: int = 4) -> None:
        self.length, self.transform = length, None

    def __len__(self) -> int:
        return self.length

    def picture(self, index: int) -> Image.Image:
        return Image.fromarray(np.random.default_rng(index).integers(0, 256, (72, 96, 3), dtype=np.uint8))

    def __getitem__(self, index: int):
        return self.transform(self.picture(index)), 0


def _loader(*flags: str, dataset=None):
    """build_train_loader for `flags` (one process, no workers) and the dataset it set the transform of."""
    args = parse_train_args(['--data-dir', 'd', '-b', '2', '-j', '0', '--device', 'cpu', *flags])[0]
    args.distributed = False  # set by init_device in train.py
    dataset = Pictures() if dataset is None else dataset
    return build_train_loader(dataset, args, DATA_CONFIG, torch.device('cpu')), dataset


def _names(transform) -> list:
    return [type(step).__name__ for step in transform.transforms]


@pytest.mark.parametrize('prefetcher, tail', [
    ([], ['MaybePILToTensor']),
    (['--no-prefetcher'], ['MaybeToTensor', 'Normalize', 'RandomErasing']),
])
def test_authors_order_is_timms_steps_with_the_crop_after_flip_and_randaugment(prefetcher, tail):
    (timm_loader, timm), (authors_loader, authors) = (_loader(*RECIPE, *prefetcher, '--aug-order', order)
                                                      for order in ('timm', 'authors'))
    crop_flip_ra = ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment']
    assert _names(timm.transform) == crop_flip_ra + tail
    assert _names(authors.transform) == crop_flip_ra[1:] + crop_flip_ra[:1] + tail
    # the same steps with the same parameters (magnitudes, interpolation, fill, erasing), only moved
    assert sorted(map(repr, timm.transform.transforms)) == sorted(map(repr, authors.transform.transforms))
    if not prefetcher:  # normalisation and random erasing stay on the device, as timm's prefetcher does them
        assert repr(authors_loader.random_erasing) == repr(timm_loader.random_erasing)
        assert authors_loader.random_erasing.probability == 0.25


def test_the_crop_box_is_drawn_on_the_flipped_whole_image():
    """With the same seeds both orders draw the same box and the same flip; the box is in the coordinates of the
    image as it is (timm) or of the image already flipped (authors)."""
    flags = ['--hflip', '1', '--color-jitter', '0', '--train-interpolation', 'bilinear']
    (_, timm), (_, authors) = (_loader(*flags, '--aug-order', order) for order in ('timm', 'authors'))
    crop = timm.transform.transforms[0]
    picture = timm.picture(0)
    outputs, boxes = [], []
    for transform in (timm.transform, authors.transform, None):
        random.seed(3)
        torch.manual_seed(3)
        if transform is None:
            boxes.append(crop.get_params(picture, crop.scale, crop.ratio))
        else:
            outputs.append(transform(picture))
    (top, left, height, width), = boxes
    assert left + width / 2 != picture.width / 2  # an off-centre box: its mirror is another box

    def cut(img: Image.Image) -> torch.Tensor:
        return TF.pil_to_tensor(TF.resized_crop(img, top, left, height, width, [SIZE, SIZE],
                                                transforms.InterpolationMode.BILINEAR))

    assert torch.equal(outputs[0], cut(picture).flip(-1))  # timm: cut, then flip
    assert torch.equal(outputs[1], cut(TF.hflip(picture)))  # authors: flip, then cut
    assert not torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize('order, seen', [('timm', (SIZE, SIZE)), ('authors', (96, 72))])
def test_randaugment_acts_on_the_crop_or_on_the_whole_image(order, seen):
    _, dataset = _loader(*RECIPE, '--aug-order', order)
    steps = dataset.transform.transforms
    at = _names(dataset.transform).index('RandAugment')
    sizes, randaugment = [], steps[at]
    steps[at] = lambda img: sizes.append(img.size) or randaugment(img)
    dataset[0]
    assert sizes == [seen]


def test_stored_maps_follow_the_authors_order_through_the_loader(tmp_path):
    """The loader instruments timm's pipeline, then reorders it: the stored-map dataset records in the new order."""
    for name in ('a', 'b'):
        os.makedirs(tmp_path / 'train' / name)
        os.makedirs(tmp_path / 'maps' / name)
        Image.new('RGB', (40, 32), (100, 150, 200)).save(tmp_path / 'train' / name / '0.png')
        torch.save(torch.stack([torch.ones(1, 8, 8), torch.full((1, 8, 8), float(name == 'b'))]).half(),
                   tmp_path / 'maps' / name / '0.pt')
    for order, crop_last in (('timm', False), ('authors', True)):
        stored = StoredMapDataset(ImageDataset(str(tmp_path / 'train')), open_map_store(str(tmp_path / 'maps')),
                                  (4, 4))
        loader, _ = _loader(*RECIPE, '--aug-order', order, '--hflip', '1', dataset=stored)
        assert stored.log.crop_last is crop_last
        assert _names(stored.transform)[0] == ('_RecordedFlip' if crop_last else 'RandomResizedCropAndInterpolation')
        images, targets = next(iter(loader))
        labels, own_maps = record_maps(targets, (4, 4))  # top-1 8 x 8 maps, RandAugment's 2 op slots: 158 values
        assert images.shape == (2, 3, SIZE, SIZE) and targets.shape == (2, 158) and own_maps.shape == (2, 4, 4)
        assert sorted(labels.tolist()) == [0, 1]
        assert stored.log.hflip  # the flip (probability 1) was recorded by the reordered pipeline


@pytest.mark.parametrize('flags, message', [
    (['--train-crop-mode', 'rkrc'], '--aug-order authors moves the random-resized crop (--train-crop-mode rrc), '
                                    'which --train-crop-mode rkrc replaces'),
    (['--aug-splits', '2'], '--aug-order authors and --aug-splits exclude each other'),
    (['--train-img-sizes', '32', '48'], '--aug-order authors and --train-img-sizes exclude each other here'),
])
def test_combinations_the_authors_order_cannot_follow_are_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        parse_train_args(['--data-dir', 'd', '--aug-order', 'authors', *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f'train.py: error: {message}') and len(err.splitlines()) == 1
    parse_train_args(['--data-dir', 'd', '--aug-order', 'timm', *flags])  # timm's order takes them


def test_no_aug_overrides_the_order_as_every_augmentation_flag():
    (_, timm), (_, authors) = (_loader('--no-aug', '--aug-order', order) for order in ('timm', 'authors'))
    assert _names(authors.transform) == _names(timm.transform) == ['Resize', 'CenterCrop', 'MaybePILToTensor']


def test_authors_order_needs_timms_random_resized_crop_first():
    with pytest.raises(ConfigError, match='--aug-order authors moves the random-resized crop, but the train '
                                          r'transform starts with Resize \(use --train-crop-mode rrc\)'):
        authors_order(transforms.Compose([transforms.Resize(SIZE), transforms.ToTensor()]))
