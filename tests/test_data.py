"""tokenmix_train.data: the class count of a split against --num-classes, the transform passthrough of the
datasets that serve another dataset's samples, and the image served in place of an unreadable one."""
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from timm.data import ImageDataset

from tokenmix_train.data import (CheckedImageDataset, DatasetView, ImageReadError, num_dataset_classes,
                                 resolve_num_classes)
from tokenmix_train.evaluate import ShardedDataset
from tokenmix_train.occlusion import OccludedDataset
from tokenmix_train.teacher_maps import StoredMapDataset


def _split(num_classes):
    """A dataset whose reader lists `num_classes` classes (None: a reader without a class index)."""
    classes = None if num_classes is None else {str(i): i for i in range(num_classes)}
    return SimpleNamespace(reader=SimpleNamespace(class_to_idx=classes))


def test_class_count_comes_from_the_flag_else_the_split():
    assert num_dataset_classes(_split(4)) == 4 and num_dataset_classes(_split(None)) is None
    assert resolve_num_classes(None, _split(4), 'the train split') == 4
    assert resolve_num_classes(10, _split(4), 'the train split') == 10  # more outputs than classes: allowed
    assert resolve_num_classes(4, _split(4), 'the train split') == 4
    assert resolve_num_classes(7, _split(None), 'the train split') == 7


def test_class_count_errors_name_the_flag_and_the_split():
    with pytest.raises(ValueError, match=r'^--num-classes 3 is less than the 4 classes of --split val$'):
        resolve_num_classes(3, _split(4), '--split val')
    with pytest.raises(ValueError, match=r'^--num-classes 3 is less than the 4 classes of the train split$'):
        resolve_num_classes(3, _split(4), 'the train split')
    with pytest.raises(ValueError, match=r'^--num-classes is required for this dataset \(it does not list its '
                                         r'classes\)$'):
        resolve_num_classes(None, _split(None), 'the train split')


class Images:
    """A dataset with a transform attribute, as timm's are."""

    def __init__(self):
        self.transform = None

    def __len__(self):
        return 4


def test_a_view_reads_and_writes_the_wrapped_transform():
    base = Images()
    views = [DatasetView(base), ShardedDataset(base, 0, 2), OccludedDataset(base, torch.zeros(4, 2, 2), 8)]
    for value, view in enumerate(views):
        view.transform = value
        assert base.transform == value and view.transform == value and view.dataset is base
    base.transform = 'set below'
    assert [view.transform for view in views] == ['set below'] * 3
    assert issubclass(StoredMapDataset, DatasetView)


def test_a_skipping_dataset_says_which_image_it_served(tmp_path):
    """With skip_bad a broken image is replaced by the next readable one (wrapping at the end), and `served_item`
    names it, so that per-image data added on top (stored maps) follows the image."""
    os.makedirs(tmp_path / 'c')
    for i in range(4):
        Image.new('RGB', (4, 4), (60 * i, 0, 0)).save(tmp_path / 'c' / f'{i}.png')
    for broken in ('1.png', '3.png'):
        (tmp_path / 'c' / broken).write_bytes(b'not a png')
    skipping = CheckedImageDataset(ImageDataset(str(tmp_path)), skip_bad=True)
    served = {index: skipping.served_item(index) for index in range(4)}
    assert {index: item[2] for index, item in served.items()} == {0: 0, 1: 2, 2: 2, 3: 0}
    assert [item[0].getpixel((0, 0))[0] for item in served.values()] == [0, 120, 120, 0]
    assert skipping.num_skipped == 2
    image, label = skipping[1]
    assert image.getpixel((0, 0))[0] == 120 and label == 0
    with pytest.raises(ImageReadError, match=r"^cannot read image '.*1.png' .*pass --skip-bad-images$"):
        CheckedImageDataset(ImageDataset(str(tmp_path))).served_item(1)


class _EpochBatches(torch.utils.data.BatchSampler):
    """A batch sampler that takes the epoch itself (as timm's scheduled-resolution one does)."""
    epoch = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class _EpochData(torch.utils.data.Dataset):
    epoch = None

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> int:
        return index

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def test_the_epoch_reaches_the_dataset_and_the_sampler_that_takes_it():
    """set_loader_epoch as timm's loop does it: the dataset, and the batch sampler when it takes the epoch, else the
    sampler; loader_batches looks behind timm's repeating sampler (--use-multi-epochs-loader)."""
    from timm.data.loader import MultiEpochsDataLoader
    from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

    from tokenmix_train.data import loader_batches, set_loader_epoch
    for kind in (DataLoader, MultiEpochsDataLoader):
        data, own = _EpochData(), _EpochBatches(SequentialSampler(range(6)), 2, drop_last=False)
        loader = kind(data, batch_sampler=own)
        assert loader_batches(loader) is own
        set_loader_epoch(loader, 3)
        assert (data.epoch, own.epoch) == (3, 3)
        sampler = DistributedSampler(range(6), num_replicas=1, rank=0)
        loader = kind(list(range(6)), sampler=sampler, batch_size=2)
        assert type(loader_batches(loader)) is torch.utils.data.BatchSampler and loader_batches(loader).sampler is \
            sampler
        set_loader_epoch(loader, 4)
        assert sampler.epoch == 4


def test_a_loader_moved_to_another_sampler_keeps_every_other_setting():
    """--aug-repeats on one process swaps the sampler of timm's loader (behind its prefetcher or not); nothing else
    of the loader changes. Nothing is iterated: the settings are read off the new loader."""
    from timm.data.loader import PrefetchLoader
    from torch.utils.data import DataLoader, SequentialSampler

    from tokenmix_train.data import _with_sampler

    def collate(samples):
        return samples

    def init(worker_id):
        pass

    data = list(range(8))
    loader = DataLoader(data, batch_size=3, drop_last=True, num_workers=2, collate_fn=collate, pin_memory=True,
                        worker_init_fn=init, persistent_workers=True)
    sampler = SequentialSampler(data)
    swapped = _with_sampler(loader, sampler)
    assert swapped.sampler is sampler and swapped.dataset is data
    assert (swapped.batch_size, swapped.drop_last, swapped.num_workers, swapped.collate_fn, swapped.pin_memory,
            swapped.worker_init_fn, swapped.persistent_workers) == (3, True, 2, collate, True, init, True)
    prefetcher = PrefetchLoader(DataLoader(data, batch_size=2), device=torch.device('cpu'))
    assert _with_sampler(prefetcher, sampler) is prefetcher and prefetcher.loader.sampler is sampler


class _Reader:
    """A reader of two image files whose second sample has no label (as an unlabelled split's reader gives)."""

    def __init__(self, folder):
        self.files = [str(folder / 'a.png'), str(folder / 'b.png')]

    def __getitem__(self, index):
        return self.files[index], [2, None][index]

    def __len__(self):
        return 2

    def filename(self, index, basename=False, absolute=False):
        return self.files[index] if absolute else os.path.basename(self.files[index])


def test_images_keep_or_take_the_input_mode_and_labels_pass_the_target_transform(tmp_path):
    """input_img_mode None keeps the file's mode (a palette image stays one), a mode converts to it; a label goes
    through target_transform, a missing label is -1; an unreadable file is named by its absolute path."""
    Image.new('P', (4, 4)).save(tmp_path / 'a.png')
    Image.new('L', (4, 4), 7).save(tmp_path / 'b.png')

    def dataset(mode, target_transform=None):
        return CheckedImageDataset(SimpleNamespace(reader=_Reader(tmp_path), load_bytes=False, input_img_mode=mode,
                                                   transform=None, target_transform=target_transform))
    assert [image.mode for image, _ in (dataset(None)[0], dataset(None)[1])] == ['P', 'L']
    assert [image.mode for image, _ in (dataset('RGB')[0], dataset('RGB')[1])] == ['RGB', 'RGB']
    assert dataset('L')[1][0].getpixel((0, 0)) == 7
    assert [dataset(None)[i][1] for i in (0, 1)] == [2, -1]
    assert [dataset(None, lambda t: t * 10)[i][1] for i in (0, 1)] == [20, -1]
    (tmp_path / 'b.png').write_bytes(b'broken')
    with pytest.raises(ImageReadError, match=f"^cannot read image '{tmp_path / 'b.png'}' "):
        dataset('RGB')[1]


def _train_loader(tmp_path, *argv, distributed=False, interpolation='bilinear'):
    """build_train_loader over four 8 x 8 images with train.py's flags `argv` (CPU, no workers); `interpolation` is
    the data config's (the model's)."""
    from tokenmix_train.args import parse_train_args
    from tokenmix_train.data import build_train_loader
    os.makedirs(tmp_path / 'c', exist_ok=True)
    for i in range(4):
        Image.new('RGB', (8, 8), (i, 0, 0)).save(tmp_path / 'c' / f'{i}.png')
    args = parse_train_args(['--data-dir', str(tmp_path), '-b', '2', '--workers', '0', '--device', 'cpu', *argv])[0]
    args.distributed = distributed
    config = dict(input_size=(3, 8, 8), interpolation=interpolation, mean=(0.5,) * 3, std=(0.5,) * 3)
    return build_train_loader(ImageDataset(str(tmp_path)), args, config, torch.device('cpu'))


def test_aug_splits_wrap_the_dataset_and_aug_repeats_reach_timms_distributed_sampler(tmp_path):
    """--aug-splits 2 and 3 give timm's AugMixDataset with that many views (2 is its default); workers are not
    persistent; in a (one-process gloo) distributed run --aug-repeats reaches the sampler timm's loader builds."""
    from timm.data import AugMixDataset
    from timm.data.distributed_sampler import RepeatAugSampler
    for splits in (2, 3):
        loader = _train_loader(tmp_path, '--aug-splits', str(splits))
        assert isinstance(loader.dataset, AugMixDataset) and loader.dataset.num_splits == splits
    assert not isinstance(_train_loader(tmp_path).dataset, AugMixDataset)
    # workers start afresh each epoch (timm's default would keep them)
    assert not _train_loader(tmp_path, '--workers', '2').loader.persistent_workers
    store = torch.distributed.FileStore(str(tmp_path / 'store'), 1)
    torch.distributed.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        sampler = _train_loader(tmp_path, '--aug-repeats', '3', distributed=True).sampler
    finally:
        torch.distributed.destroy_process_group()
    assert isinstance(sampler, RepeatAugSampler) and sampler.num_repeats == 3


def test_fast_augment_reaches_the_augmented_splits_of_aug_splits(tmp_path):
    """With --aug-splits the RandAugment to speed up is AugMixDataset's augmentation (the clean view has none)."""
    def translate(loader):
        [step] = [t for t in loader.dataset.augmentation.transforms if type(t).__name__ == 'RandAugment']
        return next(type(op.aug_fn).__name__ for op in step.ops if op.name == 'TranslateXRel')

    flags = ['--aug-splits', '2', '--aa', 'rand-m9-mstd0.5']
    assert translate(_train_loader(tmp_path, *flags)) == 'function'  # timm's own op
    assert translate(_train_loader(tmp_path, *flags, '--fast-augment')) == 'WholePixelTranslate'


def test_class_folders_in_natural_order_images_behind_links_and_unknown_val_classes(tmp_path):
    """Class indices in timm's natural order ('2' before '10'); images reached through a linked folder count; each
    empty class folder is named although its siblings hold images; a val class the train split lacks is refused."""
    from tokenmix_train.data import check_image_folder
    from tokenmix_train.errors import ConfigError
    for name in ('10', '2'):
        os.makedirs(tmp_path / 'train' / name)
        Image.new('RGB', (2, 2)).save(tmp_path / 'train' / name / 'x.png')
    os.makedirs(tmp_path / 'elsewhere')
    Image.new('RGB', (2, 2)).save(tmp_path / 'elsewhere' / 'y.png')
    os.makedirs(tmp_path / 'train' / 'linked')
    os.symlink(tmp_path / 'elsewhere', tmp_path / 'train' / 'linked' / 'images')
    assert check_image_folder(str(tmp_path / 'train')) == {'2': 0, '10': 1, 'linked': 2}
    os.makedirs(tmp_path / 'train' / 'empty')
    with pytest.raises(ConfigError, match=f"^class folder '{tmp_path / 'train' / 'empty'}' holds no images$"):
        check_image_folder(str(tmp_path / 'train'))
    os.rmdir(tmp_path / 'train' / 'empty')
    with pytest.raises(ConfigError, match="has classes that the train split lacks: 10, 2$"):
        check_image_folder(str(tmp_path / 'train'), {'linked': 0})


def test_no_reader_or_no_class_index_means_no_class_count():
    assert num_dataset_classes(object()) is None and num_dataset_classes(SimpleNamespace(reader=object())) is None


def test_aug_repeats_on_one_process_use_timms_repeat_sampler_for_this_process_alone(tmp_path):
    from timm.data.distributed_sampler import RepeatAugSampler
    sampler = _train_loader(tmp_path, '--aug-repeats', '2').sampler  # 3 is timm's default
    assert isinstance(sampler, RepeatAugSampler)
    assert (sampler.num_repeats, sampler.num_replicas, sampler.rank) == (2, 1, 0)


def _spy_on_create_dataset(monkeypatch, size=3):
    """Replace timm's create_dataset in tokenmix_train.data by a recorder of (name, keywords) returning `size`
    samples: what build_dataset asks timm for, for the datasets (wds/, tfds/, hfids/) not installed here."""
    import tokenmix_train.data as data_module
    calls = []
    monkeypatch.setattr(data_module, 'create_dataset', lambda name, **kwargs: calls.append((name, kwargs)) or
                        list(range(size)))
    return calls


def test_each_split_asks_timm_for_its_own_sample_count_repeats_and_options(monkeypatch, tmp_path):
    """The train split gets --train-num-samples and --epoch-repeats, the val split --val-num-samples and no repeats;
    both get -b, --seed, the image mode of --input-size's channel count and the caller's extra keywords. A parser
    without the optional flags (validate.py's has fewer) gets timm's defaults: no download, no remote code, 0
    repeats, RGB."""
    from tokenmix_train.args import parse_train_args
    from tokenmix_train.data import build_dataset
    from tokenmix_train.errors import ConfigError
    calls = _spy_on_create_dataset(monkeypatch)
    args = parse_train_args(['--data-dir', str(tmp_path), '--dataset', 'wds/shards', '-b', '16', '--seed', '7',
                             '--train-num-samples', '60', '--val-num-samples', '30', '--epoch-repeats', '2',
                             '--input-size', '1', '8', '8'])[0]
    assert build_dataset(args, 'train', '--train-split', is_training=True) == [0, 1, 2]
    build_dataset(args, 'validation', '--val-split', is_training=False, load_bytes=True)
    both = dict(root=str(tmp_path), class_map='', batch_size=16, seed=7, download=False, input_img_mode='L',
                trust_remote_code=False, input_key=None, target_key=None)
    assert calls == [('wds/shards', dict(both, split='train', is_training=True, num_samples=60, repeats=2.0)),
                     ('wds/shards', dict(both, split='validation', is_training=False, num_samples=30,
                                         load_bytes=True))]
    calls.clear()
    bare = SimpleNamespace(data_dir=str(tmp_path), dataset='wds/shards', class_map='', batch_size=4, seed=0,
                           skip_bad_images=False)
    build_dataset(bare, 'train', '--train-split', is_training=True)
    assert calls == [('wds/shards', dict(root=str(tmp_path), split='train', is_training=True, class_map='',
                                         batch_size=4, seed=0, download=False, input_img_mode='RGB',
                                         trust_remote_code=False, input_key=None, target_key=None, num_samples=None,
                                         repeats=0))]
    _spy_on_create_dataset(monkeypatch, size=0)
    with pytest.raises(ConfigError, match=f"^no images found for split 'validation' in '{tmp_path}' "
                                          r"\(--val-split\)$"):
        build_dataset(args, 'validation', '--val-split', is_training=False)


def test_a_folder_val_split_takes_the_train_class_index_and_the_channels_of_input_size(tmp_path):
    """Val labels are the train split's indices (a one-image val split of the second class is label 1, not 0), images
    are read in mode L when --input-size asks for one channel, and a missing split folder is named with its flag."""
    from tokenmix_train.args import parse_train_args
    from tokenmix_train.data import build_dataset
    from tokenmix_train.errors import ConfigError
    for split, classes in (('train', 'abc'), ('val', 'b')):
        for name in classes:
            os.makedirs(tmp_path / split / name)
            Image.new('RGB', (4, 4), (200, 100, 0)).save(tmp_path / split / name / '0.png')
    args = parse_train_args(['--data-dir', str(tmp_path), '--input-size', '1', '8', '8'])[0]
    train = build_dataset(args, 'train', '--train-split', is_training=True)
    val = build_dataset(args, 'validation', '--val-split', is_training=False, class_to_idx=train.reader.class_to_idx)
    assert type(val) is CheckedImageDataset and len(val) == 1
    image, label = val[0]
    assert label == 1 and image.mode == 'L' and image.getpixel((0, 0)) == Image.new('RGB', (1, 1), (200, 100, 0)) \
        .convert('L').getpixel((0, 0))
    assert [label for _, label in train] == [0, 1, 2] and train[0][0].mode == 'L'
    assert build_dataset(args, 'validation', '--val-split', is_training=False)[0][1] == 0  # no index given: its own
    rgb = parse_train_args(['--data-dir', str(tmp_path)])[0]
    assert build_dataset(rgb, 'train', '--train-split', is_training=True)[0][0].mode == 'RGB'
    with pytest.raises(ConfigError, match=r"has no 'test' split folder \(--val-split\)$"):
        build_dataset(args, 'test', '--val-split', is_training=False)


def test_a_checked_dataset_keeps_the_wrapped_datasets_bytes_and_transforms(tmp_path):
    """CheckedImageDataset serves what the timm dataset it wraps would: undecoded bytes with load_bytes, its transform
    and its target transform."""
    os.makedirs(tmp_path / 'c')
    Image.new('RGB', (4, 4), (9, 9, 9)).save(tmp_path / 'c' / '0.png')
    raw = (tmp_path / 'c' / '0.png').read_bytes()
    checked = CheckedImageDataset(ImageDataset(str(tmp_path), load_bytes=True, transform=lambda data: ('seen', data),
                                               target_transform=lambda label: label + 5))
    assert checked[0] == (('seen', raw), 5)


def test_no_aug_resizes_with_the_models_interpolation_and_the_schedule_takes_the_seed(tmp_path):
    """--train-interpolation picks the augmented crop's interpolation, unless it is empty or --no-aug is given: then
    the data config's (the model's) resizes, as in timm's train.py. Scheduled resolutions draw their batch schedule
    from --seed."""
    from torchvision.transforms import InterpolationMode

    def first_step(*argv):
        loader = _train_loader(tmp_path, *argv, interpolation='bicubic')
        return loader.dataset.transform.transforms[0].interpolation
    assert first_step('--train-interpolation', 'nearest') == InterpolationMode.NEAREST
    assert first_step('--train-interpolation', 'nearest', '--no-aug') == InterpolationMode.BICUBIC
    assert first_step('--train-interpolation', '') == InterpolationMode.BICUBIC
    sampler = _train_loader(tmp_path, '--train-img-sizes', '8', '16', '--seed', '7').loader.batch_sampler
    assert type(sampler).__name__ == 'ScheduledBatchSampler' and sampler.seed == 7
