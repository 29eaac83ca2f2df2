"""Datasets and loaders: timm's factories behind checks that turn bad input into clear errors.

A folder dataset is checked before anything is written: the data dir and the split folder exist, no class
folder is empty, and every val class is a train class (val labels use the train class index). Images are read
strictly: an unreadable file stops the run with a `ConfigError` naming it, or, with `skip_bad=True`, is logged,
counted and replaced by the next readable sample.
"""
import logging
import multiprocessing
import os
from typing import Any, Dict, Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset
from timm.data import AugMixDataset, ImageDataset, create_dataset, create_loader
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.dataset_factory import _search_split
from timm.data.loader import PrefetchLoader
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key

from .errors import ConfigError
from .transforms import authors_order, fast_augment

__all__ = ['CheckedImageDataset', 'DatasetView', 'ImageReadError', 'build_dataset', 'check_image_folder',
           'num_dataset_classes', 'resolve_num_classes', 'build_train_loader', 'loader_batches', 'set_loader_epoch']

_logger = logging.getLogger(__name__)


class ImageReadError(ConfigError):
    """An image file cannot be decoded."""


class DatasetView(Dataset):
    """A dataset that serves the samples of another one, `dataset` (a shard of it, or its images changed).

    `transform` reads and writes the wrapped dataset's transform, so timm's `create_loader` can set it through
    the view.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    @property
    def transform(self) -> Any:
        return self.dataset.transform

    @transform.setter
    def transform(self, value: Any) -> None:
        self.dataset.transform = value


class CheckedImageDataset(ImageDataset):
    """timm's `ImageDataset` over the same reader, but an unreadable image is an error naming the file.

    timm silently moves on to the next sample; here that only happens with `skip_bad=True`, and the skips are
    counted in `skipped` (shared with loader worker processes).
    """

    def __init__(self, dataset: ImageDataset, skip_bad: bool = False) -> None:
        super().__init__(None, reader=dataset.reader, load_bytes=dataset.load_bytes,
                         input_img_mode=dataset.input_img_mode, transform=dataset.transform,
                         target_transform=dataset.target_transform)
        self.skip_bad = skip_bad
        self.skipped = multiprocessing.Value('q', 0)

    def _load(self, index: int):
        img, target, *_ = self.reader[index]
        if self.load_bytes:
            return img.read(), target
        with Image.open(img) as im:
            return (im.convert(self.input_img_mode) if self.input_img_mode else im.copy()), target

    def __getitem__(self, index: int):
        img, target, _ = self.served_item(index)
        return img, target

    def served_item(self, index: int) -> Tuple[Any, Any, int]:
        """`self[index]` and the index of the sample served: `index`, or with `skip_bad` the next readable one, so
        that a wrapper adding per-image data (the stored maps of `teacher_maps.StoredMapDataset`) takes that image's."""
        for _ in range(len(self)):
            try:
                img, target = self._load(index)
                break
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                name = self.reader.filename(index, absolute=True)
                if not self.skip_bad:
                    raise ImageReadError(
                        f"cannot read image '{name}' ({e}); fix or remove it, or pass --skip-bad-images") from None
                with self.skipped.get_lock():
                    self.skipped.value += 1
                _logger.warning(f"skipped unreadable image '{name}' ({e})")
                index = (index + 1) % len(self)
        else:
            raise ImageReadError('no readable image in the dataset')
        if self.transform is not None:
            img = self.transform(img)
        target = -1 if target is None else (self.target_transform(target) if self.target_transform else target)
        return img, target, index

    @property
    def num_skipped(self) -> int:
        """Images skipped so far (all worker processes together)."""
        return int(self.skipped.value)


def split_folder(root: str, split: str, flag: str) -> str:
    """The folder of `split` under `root` (timm's synonyms: 'validation' finds 'val'), or a ConfigError."""
    if not os.path.isdir(root):
        raise ConfigError(f"--data-dir '{root}' is not a directory")
    folder = _search_split(root, split)
    if os.path.normpath(folder) == os.path.normpath(root):
        raise ConfigError(f"--data-dir '{root}' has no '{split}' split folder ({flag})")
    return folder


def check_image_folder(folder: str, class_to_idx: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Check an ImageFolder split: at least one class, no empty class folder, classes known to `class_to_idx`.

    Returns the folder's classes in timm's order (natural sort), the train split's class index being the
    reference for val.
    """
    extensions = get_img_extensions(as_set=True)
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not classes:
        raise ConfigError(f"'{folder}' has no class folders (expected <split>/<class>/<image>)")
    for name in classes:
        found = any(os.path.splitext(f)[1].lower() in extensions
                    for _, _, files in os.walk(os.path.join(folder, name), followlinks=True) for f in files)
        if not found:
            raise ConfigError(f"class folder '{os.path.join(folder, name)}' holds no images")
    if class_to_idx is not None:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise ConfigError(f"'{folder}' has classes that the train split lacks: {', '.join(unknown[:5])}")
        return class_to_idx
    return {c: i for i, c in enumerate(sorted(classes, key=natural_key))}


def _flag(args: Any, name: str, default: Any = None) -> Any:
    """A flag's value, or `default` for a parser without it (validate.py's has fewer flags than train.py's)."""
    return getattr(args, name, default)


def build_dataset(args: Any, split: str, flag: str, *, is_training: bool,
                  class_to_idx: Optional[Dict[str, int]] = None, **dataset_kwargs: Any):
    """The dataset of one split via timm's `create_dataset`, checked first when it is a plain image folder.

    `dataset_kwargs` go to `create_dataset` as they are (download, input_key, target_key, num_samples, ...).
    """
    class_map: Any = args.class_map
    if class_map and not os.path.isfile(class_map):
        raise ConfigError(f"--class-map '{class_map}': no such file")
    keys = dict(input_key=_flag(args, 'input_key'), target_key=_flag(args, 'target_key'))
    if not args.dataset and any(keys.values()):
        raise ConfigError('--input-key/--target-key: only for hfds/, wds/ (and tfds/) datasets, not an image folder')
    if not args.dataset:
        folder = split_folder(args.data_dir, split, flag)
        if not args.class_map:
            class_map = check_image_folder(folder, class_to_idx)
    elif args.data_dir and not os.path.exists(args.data_dir):
        raise ConfigError(f"--data-dir '{args.data_dir}' does not exist")
    input_size = _flag(args, 'input_size')
    channels = _flag(args, 'in_chans') or (input_size[0] if input_size else 3)
    extra = dict(num_samples=_flag(args, 'train_num_samples'), repeats=_flag(args, 'epoch_repeats', 0)) \
        if is_training else dict(num_samples=_flag(args, 'val_num_samples'))
    options = dict(download=_flag(args, 'dataset_download', False),
                   input_img_mode=_flag(args, 'input_img_mode') or ('L' if channels == 1 else 'RGB'),
                   trust_remote_code=_flag(args, 'dataset_trust_remote_code', False), **keys, **extra)
    options.update(dataset_kwargs)
    try:
        dataset = create_dataset(args.dataset, root=args.data_dir, split=split, is_training=is_training,
                                 class_map=class_map, batch_size=args.batch_size, seed=args.seed, **options)
    except (RuntimeError, FileNotFoundError) as e:  # torchvision: "Dataset not found. You can use download=True"
        raise ConfigError(f"--dataset {args.dataset} ({flag} '{split}'): {e}") from None
    if len(dataset) == 0:
        raise ConfigError(f"no images found for split '{split}' in '{args.data_dir}' ({flag})")
    if type(dataset) is ImageDataset:
        dataset = CheckedImageDataset(dataset, skip_bad=args.skip_bad_images)
    return dataset


def num_dataset_classes(dataset) -> Optional[int]:
    """Number of classes of a dataset whose reader keeps a class index (None when it does not say)."""
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    return len(class_to_idx) if class_to_idx else None


def resolve_num_classes(num_classes: Optional[int], dataset, split: str) -> int:
    """--num-classes, else the class count of `dataset`; a dataset with more classes than asked is an error.

    `split` names the dataset in that error ('the train split', '--split val').
    """
    found = num_dataset_classes(dataset)
    if num_classes is None:
        if found is None:
            raise ConfigError('--num-classes is required for this dataset (it does not list its classes)')
        return found
    if found is not None and found > num_classes:
        raise ConfigError(f'--num-classes {num_classes} is less than the {found} classes of {split}')
    return num_classes


def _with_sampler(loader, sampler):
    """`loader` (timm's, maybe behind its prefetcher) drawing its samples from `sampler` instead."""
    inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
    replaced = type(inner)(inner.dataset, batch_size=inner.batch_size, sampler=sampler, drop_last=inner.drop_last,
                           num_workers=inner.num_workers, collate_fn=inner.collate_fn, pin_memory=inner.pin_memory,
                           worker_init_fn=inner.worker_init_fn, persistent_workers=inner.persistent_workers)
    if isinstance(loader, PrefetchLoader):
        loader.loader = replaced
        return loader
    return replaced


def build_train_loader(dataset, args: Any, data_config: Dict[str, Any], device: torch.device):
    """timm's training loader (augmentation per timm flags); mixing is left to the caller, on the device.

    --aug-order authors moves timm's crop after the flip and RandAugment (`transforms.authors_order`);
    --fast-augment swaps RandAugment / AutoAugment for its faster copy (`transforms.fast_augment`; with
    --aug-splits, that of the augmented splits).
    --aug-repeats uses timm's `RepeatAugSampler` on one process too (timm's loader has it only when
    distributed); --aug-splits wraps the dataset in timm's `AugMixDataset` (clean + augmented views).
    Workers are started afresh each epoch (not persistent, as timm's default would keep them): their random
    streams then come from the main process's RNG at the start of the epoch, which a checkpoint restores, so
    a resumed run draws the same augmentations as an uninterrupted one.
    """
    if args.aug_splits > 1:
        dataset = AugMixDataset(dataset, num_splits=args.aug_splits)
    repeats_here = args.aug_repeats and not args.distributed
    loader = create_loader(
        dataset,
        input_size=data_config['input_size'],
        batch_size=args.batch_size,
        is_training=True,
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        re_split=args.resplit,
        train_crop_mode=args.train_crop_mode,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob,
        auto_augment=args.aa,
        num_aug_repeats=0 if repeats_here else args.aug_repeats,
        num_aug_splits=args.aug_splits,
        interpolation=data_config['interpolation'] if args.no_aug or not args.train_interpolation
        else args.train_interpolation,
        mean=data_config['mean'],
        std=data_config['std'],
        num_workers=args.workers,
        distributed=args.distributed,
        pin_memory=args.pin_mem,
        device=device,
        use_prefetcher=not args.no_prefetcher,
        use_multi_epochs_loader=args.use_multi_epochs_loader,
        worker_seeding=args.worker_seeding,
        input_size_choices=args.train_img_sizes,
        batch_size_choices=args.train_batch_sizes,
        batch_choice_weights=args.train_size_probs,
        batch_choice_seed=args.seed,
        batch_choice_schedule=args.train_size_schedule,
        batch_schedule_epochs=args.epochs if args.train_size_schedule == 'progressive' else None,
        batch_schedule_spread=args.train_size_schedule_spread,
        batch_schedule_random_mix=args.train_size_random_mix,
        num_batches=args.train_batches_per_epoch,
        persistent_workers=False,
    )
    if args.aug_order == 'authors' and not args.no_aug:
        dataset.transform = authors_order(dataset.transform)
    if args.fast_augment and not args.no_aug:
        if isinstance(dataset, AugMixDataset):
            dataset.augmentation = fast_augment(dataset.augmentation)
        else:
            dataset.transform = fast_augment(dataset.transform)
    if repeats_here:
        loader = _with_sampler(loader, RepeatAugSampler(dataset, num_replicas=1, rank=0,
                                                        num_repeats=args.aug_repeats))
    return loader


def loader_batches(loader) -> Any:
    """The batch sampler of `loader` (behind timm's repeating sampler with --use-multi-epochs-loader)."""
    batches = loader.batch_sampler
    return batches.sampler if type(batches).__name__ == '_RepeatSampler' else batches


def set_loader_epoch(loader, epoch: int) -> None:
    """Tell the loader's dataset and (batch) sampler the epoch, as timm does before each training epoch."""
    if hasattr(loader.dataset, 'set_epoch'):
        loader.dataset.set_epoch(epoch)
    if hasattr(loader_batches(loader), 'set_epoch'):
        loader_batches(loader).set_epoch(epoch)
    elif hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)
