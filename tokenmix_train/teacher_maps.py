"""Stored teacher maps: the map store, and a train dataset that cuts each image's map to its augmented crop.

A teacher run once over a split (tools/precompute_teacher_maps.py) stores, per image and map position, its top-K
class scores and their class indices. At train time each sample's augmentation geometry is recorded as it is
drawn (the RandomResizedCrop box, the flips, the geometric ops of RandAugment / AutoAugment), the image's
own-class map is cut to that crop, flipped, put through the same geometric ops and averaged onto the token
grid; the batch carries it beside the label and :class:`StoredMapsMixer` hands it to TokenMix.

Two layouts are read:

* this project's store (``manifest.json`` + shards): the **whole** image resized to a square of ``img_size``
  (aspect not kept), so every crop box has a map under it. ``shard-NNNNN.npy`` holds an fp16 array
  ``[n, 2, K, h, w]`` (top-K values, then their class indices, best first) for n images in dataset order,
  memory-mapped when read; ``shard-NNNNN.json`` (written last, so its presence means the shard is complete) lists
  the images' paths relative to the split folder: 129 shards for ImageNet-1k at 10000 images a shard, not 1.28 M files.
* the authors' layout (TokenLabeling's ``generate_label.py``): ``ROOT/<class folder>/<image stem>.pt``, an fp16
  tensor ``[2, K, h, w]`` per image. Those maps cover only the **centre square** of each image (short side resized,
  centre crop 1.0); a crop reaching outside it reads zero there. Their class indices are the teacher's (ImageNet-1k),
  so each label is matched to its class folder by name.
"""
import glob
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import AugmentOp
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.utils.misc import natural_key
from torchvision import transforms
from torchvision.transforms import functional as TF

from mixup_ext import TokenMix, crop_map, own_map_from_topk, token_grid

from .data import DatasetView
from .errors import ConfigError

__all__ = ['MANIFEST', 'FORMAT', 'MapStore', 'AuthorsMapStore', 'open_map_store', 'class_names', 'shard_name',
           'shard_done', 'write_shard', 'write_json_atomic', 'StoredMapDataset', 'StoredMapsMixer',
           'wrap_train_dataset']

_logger = logging.getLogger(__name__)

MANIFEST = 'manifest.json'
FORMAT = 'tokenmix-teacher-maps/1'
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel')
_PHOTOMETRIC = ('ColorJitter', 'RandomApply', 'RandomGrayscale', 'GaussianBlur', 'MaybePILToTensor', 'MaybeToTensor',
                'ToTensor', 'Normalize', 'RandomErasing', 'ToNumpy', 'PILToTensor', 'ConvertImageDtype')
_REPLAY_CELLS = 4  # geometric ops replayed on 4 x 4 points a token, then averaged (alignment test: 0.015 L1)


def shard_name(shard: int) -> str:
    """The file name (without extension) of shard number `shard`."""
    return f'shard-{shard:05d}'


def class_names(class_to_idx: Dict[str, int]) -> List[str]:
    """Class folder names in label order: the class list a store's manifest records and training checks."""
    return [name for name, _ in sorted(class_to_idx.items(), key=lambda item: item[1])]


def write_json_atomic(path: str, value: Any) -> None:
    """Write JSON to a temporary file and rename it: a reader sees the old file, the new one, or none."""
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(value, f)
    os.replace(tmp, path)


def shard_done(root: str, shard: int) -> bool:
    """Whether a shard is complete (its key list, written after its data, exists)."""
    return os.path.exists(os.path.join(root, shard_name(shard) + '.json'))


def write_shard(root: str, shard: int, maps: np.ndarray, keys: Sequence[str]) -> None:
    """Write one shard (fp16 ``[n, 2, K, h, w]`` and its n image keys): data first, the key list last, each renamed
    into place, so a killed run never leaves a shard that a reader would take as complete. The temporary files a
    killed writer of the same shard left behind are removed first (one process owns a shard at a time)."""
    if maps.dtype != np.float16 or maps.ndim != 5 or maps.shape[1] != 2 or maps.shape[0] != len(keys):
        raise ValueError(f'a shard is fp16 [n, 2, K, h, w] with n keys, got {maps.dtype} {maps.shape}, '
                         f'{len(keys)} keys')
    path = os.path.join(root, shard_name(shard))
    for stale in glob.glob(glob.escape(path) + '.*.tmp-*'):
        os.remove(stale)
    tmp = f'{path}.npy.tmp-{os.getpid()}'
    with open(tmp, 'wb') as f:
        np.save(f, maps)
    os.replace(tmp, path + '.npy')
    write_json_atomic(path + '.json', dict(count=len(keys), keys=list(keys)))


class MapStore:
    """This project's store: manifest, shards of fp16 ``[n, 2, K, h, w]``, memory-mapped on first use per process."""

    coverage = 'whole'

    def __init__(self, root: str) -> None:
        self.root = root
        self.manifest = self.read_manifest(root)
        shards = self.manifest['num_shards']
        missing = [s for s in range(shards) if not shard_done(root, s)]
        if missing:
            raise ConfigError(
                f"--teacher-maps '{root}': incomplete store, {len(missing)} of {shards} shards missing (first: "
                f'{shard_name(missing[0])}); rerun tools/precompute_teacher_maps.py with the same flags to finish it')
        self.index: Dict[str, Tuple[int, int]] = {}
        for s in range(shards):
            with open(os.path.join(root, shard_name(s) + '.json')) as f:
                for row, key in enumerate(json.load(f)['keys']):
                    self.index[key] = (s, row)
        self.topk = int(self.manifest['topk'])
        self._arrays: Dict[int, np.ndarray] = {}

    @staticmethod
    def read_manifest(root: str) -> Dict[str, Any]:
        """A store's manifest; ConfigError when unreadable or of another format."""
        try:
            with open(os.path.join(root, MANIFEST)) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"map store '{root}': cannot read {MANIFEST} ({e})") from None
        if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
            raise ConfigError(f"map store '{root}': {MANIFEST} is not a {FORMAT} manifest")
        return manifest

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def read(self, key: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-K values (float32) and class indices (int64) of one image, each K x h x w."""
        shard, row = self.index[key]
        array = self._arrays.get(shard)
        if array is None:
            array = self._arrays[shard] = np.load(os.path.join(self.root, shard_name(shard) + '.npy'), mmap_mode='r')
        entry = torch.from_numpy(np.array(array[row], dtype=np.float32))
        return entry[0], entry[1].round().long()

    def __getstate__(self) -> Dict[str, Any]:  # memory maps are reopened in each worker process
        return dict(self.__dict__, _arrays={})


class AuthorsMapStore:
    """The authors' layout, ``ROOT/<class folder>/<image stem>.pt`` with fp16 ``[2, K, h, w]`` (centre square).

    K (`topk`) is read from the first file, so a larger --teacher-topk is refused as for a manifest's store. The
    stored class indices are the teacher's, numbered as an image folder numbers its classes: `classes`, the class
    folders in timm's order (natural sort), is the teacher's class list. A store lacking some of the teacher's
    classes would shift every index after them, so one whose first file names a class index beyond its folders
    is refused.
    """

    coverage = 'centre'

    def __init__(self, root: str) -> None:
        self.root = root
        self.files = set()
        folders = []
        for entry in os.scandir(root):
            if entry.is_dir():
                names = [name for name in os.listdir(entry.path) if name.endswith('.pt')]
                if names:
                    folders.append(entry.name)
                    self.files.update(f'{entry.name}/{name}' for name in names)
        if not self.files:
            raise ConfigError(f"--teacher-maps '{root}': neither a {MANIFEST} nor <class>/<image>.pt files")
        self.classes = sorted(folders, key=natural_key)
        first = min(self.files)
        entry = self._load(first)
        self.topk = entry.shape[1]
        top = int(entry[1].float().max())
        if top >= len(self.classes):
            raise ConfigError(f"--teacher-maps '{root}': '{first}' names class {top} but the store has "
                              f'{len(self.classes)} class folders (class i is the i-th folder by name, so a store '
                              'needs every class of its teacher)')

    @staticmethod
    def _file(key: str) -> str:
        folder, name = os.path.split(key)
        return f'{os.path.basename(folder)}/{os.path.splitext(name)[0]}.pt'

    def __contains__(self, key: str) -> bool:
        return self._file(key) in self.files

    def _load(self, file: str) -> torch.Tensor:
        entry = torch.load(os.path.join(self.root, file), map_location='cpu')
        if not isinstance(entry, torch.Tensor) or entry.ndim != 4 or entry.shape[0] != 2:
            raise ConfigError(f"--teacher-maps: '{file}' is not a [2, K, h, w] tensor "
                              f'(got {tuple(getattr(entry, "shape", ())) or type(entry).__name__})')
        return entry

    def read(self, key: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-K values (float32) and class indices (int64) of one image, each K x h x w."""
        entry = self._load(self._file(key))
        return entry[0].float(), entry[1].float().round().long()


def open_map_store(root: str) -> Union[MapStore, AuthorsMapStore]:
    """A :class:`MapStore` when `root` has a manifest, else the authors' per-image layout."""
    if not os.path.isdir(root):
        raise ConfigError(f"--teacher-maps '{root}' is not a directory")
    if os.path.exists(os.path.join(root, MANIFEST)):
        return MapStore(root)
    return AuthorsMapStore(root)


def map_box(crop: Tuple[int, int, int, int], image_size: Tuple[int, int], map_size: Tuple[int, int],
            coverage: str) -> Tuple[float, float, float, float]:
    """A crop (top, left, height, width) of an image of (width, height) px as (x0, y0, x1, y1) in map cells.

    'whole': the map spans the whole image; 'centre': it spans the centred square of side min(width, height).
    """
    top, left, height, width = crop
    img_w, img_h = image_size
    rows, cols = map_size
    if coverage == 'whole':
        sx, sy, ox, oy = cols / img_w, rows / img_h, 0., 0.
    else:
        side = min(img_w, img_h)
        sx, sy, ox, oy = cols / side, rows / side, (img_w - side) / 2, (img_h - side) / 2
    return (left - ox) * sx, (top - oy) * sy, (left + width - ox) * sx, (top + height - oy) * sy


@dataclass
class GeometryLog:
    """What the recording transforms saw for the sample being loaded (one per process, reset per sample)."""
    image_size: Optional[Tuple[int, int]] = None
    crop: Optional[Tuple[int, int, int, int]] = None
    output_size: Optional[Tuple[int, int]] = None
    hflip: bool = False
    vflip: bool = False
    ops: List[Tuple[Any, tuple]] = field(default_factory=list)

    def reset(self) -> None:
        self.image_size, self.crop, self.hflip, self.vflip, self.ops = None, None, False, False, []


class _RecordedCropParams:
    """RandomResizedCropAndInterpolation.get_params, recording the image size and the box it draws."""

    def __init__(self, get_params, log: GeometryLog) -> None:
        self.get_params, self.log = get_params, log

    def __call__(self, img, scale, ratio):
        box = self.get_params(img, scale, ratio)
        self.log.image_size, self.log.crop = tuple(img.size), tuple(int(v) for v in box)
        return box


class _RecordedFlip(torch.nn.Module):
    """A random flip that draws like torchvision's (one torch.rand) and records whether it flipped."""

    def __init__(self, p: float, vertical: bool, log: GeometryLog) -> None:
        super().__init__()
        self.p, self.vertical, self.log = p, vertical, log

    def forward(self, img):
        if torch.rand(1) < self.p:
            setattr(self.log, 'vflip' if self.vertical else 'hflip', True)
            return TF.vflip(img) if self.vertical else TF.hflip(img)
        return img


class _RecordedOp:
    """A geometric augment op's function, recording its arguments each time it is applied."""

    def __init__(self, fn, log: GeometryLog) -> None:
        self.fn, self.log = fn, log

    def __call__(self, img, *level_args, **kwargs):
        self.log.ops.append((self.fn, level_args))
        return self.fn(img, *level_args, **kwargs)


def _augment_ops(t) -> List[AugmentOp]:
    ops = getattr(t, 'ops', None)  # RandAugment
    if ops is None and hasattr(t, 'policy'):  # AutoAugment: sub-policies of ops
        ops = [op for sub in t.policy for op in sub]
    return list(ops or [])


def instrument_transform(transform: transforms.Compose, log: GeometryLog) -> None:
    """Make a timm train transform record its geometry into `log` (in place; the same random draws).

    Raises ConfigError for a pipeline whose geometry cannot be followed (no RandomResizedCrop, AugMix, other
    geometric transforms).
    """
    steps = transform.transforms
    crops = [t for t in steps if isinstance(t, RandomResizedCropAndInterpolation)]
    if len(crops) != 1:
        raise ConfigError('--teacher-maps needs the RandomResizedCrop train pipeline (not --no-aug or other crops)')
    for i, t in enumerate(steps):
        name = type(t).__name__
        if isinstance(t, RandomResizedCropAndInterpolation):
            t.get_params = _RecordedCropParams(type(t).get_params, log)
            log.output_size = tuple(t.size)
        elif isinstance(t, (transforms.RandomHorizontalFlip, transforms.RandomVerticalFlip)):
            steps[i] = _RecordedFlip(t.p, isinstance(t, transforms.RandomVerticalFlip), log)
        elif name == 'AugMixAugment':  # blends several augmented copies: no single geometry to follow
            raise ConfigError('--teacher-maps cannot follow the geometry of AugMix (--aa augmix-*)')
        elif _augment_ops(t):
            for op in _augment_ops(t):
                if op.name in GEOMETRIC_OPS and not isinstance(op.aug_fn, _RecordedOp):
                    op.aug_fn = _RecordedOp(op.aug_fn, log)
        elif name not in _PHOTOMETRIC:
            raise ConfigError(f'--teacher-maps cannot follow the geometry of the train transform {name}')


def replay_geometry(grid_map: torch.Tensor, ops: Sequence[Tuple[Any, tuple]], output_size: Tuple[int, int],
                    grid: Tuple[int, int]) -> torch.Tensor:
    """Apply recorded geometric augment ops to a crop's map (given at `_REPLAY_CELLS` points a token), then average
    it onto the token grid. Absolute translations are scaled from image pixels to map points; empty areas read 0."""
    rows, cols = grid_map.shape
    image = Image.fromarray(grid_map.numpy(), mode='F')
    scale = cols / output_size[1]
    for fn, args in ops:
        if getattr(fn, '__name__', '').startswith('translate_') and fn.__name__.endswith('_abs'):
            args = tuple(a * scale for a in args)
        image = fn(image, *args, fillcolor=0.0, resample=Image.BILINEAR)
    out = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return F.adaptive_avg_pool2d(out[None], grid)[0]


class StoredMapDataset(DatasetView):
    """A train dataset whose targets carry each sample's own-class map on the token grid, cut to its crop.

    Each item is ``(image, target)`` with target a float32 vector ``[label, map (grid rows x cols, row-major)]``;
    :class:`StoredMapsMixer` unpacks it on the device. The wrapped dataset's transform (set by timm's loader
    factory through this object's `transform`) is instrumented to record its geometry.

    Args:
        dataset: a timm ImageDataset over an image folder (its reader gives each sample's relative path).
        store: an opened map store.
        grid: token grid (rows, cols) of the student's input.
        topk: use the first `topk` stored classes per position (0: all stored).
        teacher_classes: each label's class index in the stored maps (None: the label itself).
    """

    def __init__(self, dataset, store, grid: Tuple[int, int], topk: int = 0,
                 teacher_classes: Optional[Dict[int, int]] = None) -> None:
        super().__init__(dataset)
        self.store, self.grid, self.topk, self.teacher_classes = store, grid, topk, teacher_classes
        self.log = GeometryLog()
        self.keys = [dataset.reader.filename(i) for i in range(len(dataset))]
        missing = [k for k in self.keys if k not in store]
        if missing:
            split = ': a store of another split?' if len(missing) == len(self.keys) else ''
            raise ConfigError(f"--teacher-maps '{store.root}' has no maps for {len(missing)} of {len(self.keys)} "
                              f"train images (first: '{missing[0]}'){split}")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name in ('dataset', '__setstate__'):  # not yet set while unpickling
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @DatasetView.transform.setter
    def transform(self, value: Any) -> None:
        if value is not None:
            instrument_transform(value, self.log)
        DatasetView.transform.fset(self, value)

    def own_map(self, index: int, label: int) -> torch.Tensor:
        """The sample's own-class map cut to the geometry just recorded, on the token grid (rows x cols)."""
        log = self.log
        if log.crop is None:
            raise RuntimeError('no crop was recorded: the transform was not instrumented')
        values, indices = self.store.read(self.keys[index])
        own_class = label if self.teacher_classes is None else self.teacher_classes[label]
        full = own_map_from_topk(values, indices, own_class, self.topk)
        box = map_box(log.crop, log.image_size, tuple(full.shape), self.store.coverage)
        if not log.ops:
            return crop_map(full, box, self.grid, hflip=log.hflip, vflip=log.vflip)
        fine = (self.grid[0] * _REPLAY_CELLS, self.grid[1] * _REPLAY_CELLS)
        cut = crop_map(full, box, fine, hflip=log.hflip, vflip=log.vflip)
        return replay_geometry(cut, log.ops, log.output_size, self.grid)

    def __getitem__(self, index: int):
        self.log.reset()
        img, label = self.dataset[index]
        grid_map = self.own_map(index, int(label))
        return img, torch.cat([torch.tensor([float(label)]), grid_map.flatten()])


class StoredMapsMixer:
    """Feeds TokenMix the stored maps the batch carries: targets ``B x (1 + rows * cols)`` -> labels, maps."""

    def __init__(self, tokenmix: TokenMix) -> None:
        self.tokenmix = tokenmix

    def __getattr__(self, name: str):
        if name == 'tokenmix':
            raise AttributeError(name)
        return getattr(self.tokenmix, name)

    @property
    def mixup_enabled(self) -> bool:
        return self.tokenmix.mixup_enabled

    @mixup_enabled.setter
    def mixup_enabled(self, value: bool) -> None:
        self.tokenmix.mixup_enabled = value

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        rows, cols = token_grid(x.shape[2], x.shape[3], self.tokenmix.patch_size)
        if target.ndim != 2 or target.shape[1] != 1 + rows * cols:
            raise ValueError(f'stored-map targets must be B x (1 + {rows} * {cols}) (label, map), got '
                             f'{tuple(target.shape)}: is the train dataset a StoredMapDataset?')
        labels = target[:, 0].round().long()
        return self.tokenmix(x, labels, own_maps=target[:, 1:].reshape(-1, rows, cols))


def _authors_classes(store: AuthorsMapStore, class_to_idx: Dict[str, int], class_map: str) -> Dict[int, int]:
    """Each label's class index in the authors' maps, matched by class name (so a class subset or a --class-map
    works); ConfigError naming the first class that has no folder in the store."""
    position = {name: i for i, name in enumerate(store.classes)}
    missing = [name for name in class_names(class_to_idx) if name not in position]
    if missing:
        source = f"--class-map '{class_map}'" if class_map else 'the train split'
        raise ConfigError(f"--teacher-maps '{store.root}' has no class folder '{missing[0]}' of {source} "
                          f'({len(missing)} of {len(class_to_idx)} classes missing; the maps\' class indices are '
                          f'its {len(store.classes)} folders in order, matched by name)')
    return {label: position[name] for name, label in class_to_idx.items()}


def _check_store(store, args: Any, class_to_idx: Dict[str, int], split_dir: str) -> Optional[Dict[int, int]]:
    """The store must keep --teacher-topk classes and be for this split's classes, this split, and the teacher the
    config names. The authors' layout records only its K and its class folders: its classes are matched by name
    (the returned label -> class index in its maps), its split by the image names (:class:`StoredMapDataset`)."""
    if args.teacher_topk > store.topk:
        raise ConfigError(f"--teacher-topk {args.teacher_topk}: --teacher-maps '{store.root}' keeps only the top "
                          f'{store.topk}')
    if isinstance(store, AuthorsMapStore):
        _logger.info('--teacher-maps %s: authors\' per-image layout, %d class folders (maps cover the centre square; '
                     'the teacher is not recorded)', store.root, len(store.classes))
        return _authors_classes(store, class_to_idx, args.class_map)
    manifest = store.manifest
    classes = class_names(class_to_idx)
    where = f"--teacher-maps '{store.root}'"
    if manifest['classes'] != classes:
        raise ConfigError(f'{where} was made for {len(manifest["classes"])} classes that differ from the train '
                          f'split\'s {len(classes)}')
    if os.path.basename(os.path.normpath(split_dir)) != manifest['split_folder']:
        raise ConfigError(f"{where} holds split '{manifest['split']}', the train split is "
                          f"'{os.path.basename(os.path.normpath(split_dir))}'")
    if args.teacher_model and args.teacher_model != manifest['teacher']:
        raise ConfigError(f"{where} was made by teacher '{manifest['teacher']}', not --teacher-model "
                          f"'{args.teacher_model}'")
    return None


def wrap_train_dataset(args: Any, dataset: torch.utils.data.Dataset, input_size: Sequence[int],
                       token_size: int) -> torch.utils.data.Dataset:
    """The train dataset wrapped to carry stored maps (--teacher-maps), or `dataset` itself without that flag."""
    if not args.teacher_maps:
        return dataset
    reader = getattr(dataset, 'reader', None)
    if not hasattr(reader, 'class_to_idx') or not hasattr(reader, 'root'):
        raise ConfigError('--teacher-maps needs an image-folder train split (--dataset left empty)')
    store = open_map_store(args.teacher_maps)
    teacher_classes = _check_store(store, args, reader.class_to_idx, reader.root)
    grid = token_grid(input_size[-2], input_size[-1], token_size)
    return StoredMapDataset(dataset, store, grid, args.teacher_topk, teacher_classes)

