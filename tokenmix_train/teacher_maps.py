"""Stored teacher maps: the map store, and a train dataset that cuts each image's map to its augmented crop.

A teacher run once over a split (tools/precompute_teacher_maps.py) stores, per image and map position, its top-K
class scores and their class indices. At train time each sample's augmentation geometry is recorded as it is
drawn (the RandomResizedCrop box, the flips, the geometric ops of RandAugment / AutoAugment), in the order the image
got them (timm's: the crop, then flips and ops on it; the authors', `--aug-order authors`: flips and ops on the whole
image, then the crop), and composed into affine maps from the augmented image to the stored map. The loader worker
only writes those and the image's stored top-K scores into the sample's record (its target); on the batch's device
:class:`StoredMapsMixer` reads the whole batch's own-class maps through them onto the token grid in one pass
(:func:`record_maps`, :func:`mixup_ext.sample_maps`) and hands them to TokenMix. So the workers do no tensor work
for the maps (docs/benchmarks.md).

Two layouts are read:

* this project's store (``manifest.json`` + shards): the **whole** image resized to a square of ``img_size``
  (aspect not kept), so every crop box has a map under it. ``shard-NNNNN.npy`` holds an fp16 array
  ``[n, 2, K, h, w]`` (top-K values, then their class indices, best first) for n images in dataset order,
  memory-mapped when read; ``shard-NNNNN.json`` (written last, so its presence means the shard is complete) lists
  the images' paths relative to the split folder, with checksums: 129 shards for ImageNet-1k at 10000 images a
  shard, not 1.28 M files. The manifest's ``classes`` names the teacher's class indices, so labels are matched to
  them by name; the whole store is checked when opened (:class:`MapStore`).
* the authors' layout (TokenLabeling's ``generate_label.py``): ``ROOT/<class folder>/<image stem>.pt``, an fp16
  tensor ``[2, K, h, w]`` per image. Those maps cover only the **centre square** of each image (short side resized,
  centre crop 1.0); a crop reaching outside it reads zero there. Their class indices are the teacher's (ImageNet-1k),
  so each label is matched to its class folder by name.
"""
import glob
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, NoReturn, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.utils.misc import natural_key
from torchvision import transforms
from torchvision.transforms import functional as TF

from mixup_ext import TokenMix, own_map_from_topk, sample_maps, token_grid
from models import CheckpointError, read_checkpoint

from .data import CheckedImageDataset, DatasetView
from .errors import ConfigError
from .transforms import augment_ops

__all__ = ['MANIFEST', 'FORMAT', 'MapStore', 'AuthorsMapStore', 'open_map_store', 'class_names', 'shard_name',
           'shard_done', 'shard_record', 'write_shard', 'write_json_atomic', 'StoredMapDataset', 'StoredMapsMixer',
           'Affine', 'RecordLayout', 'geometry_matrices', 'pack_record', 'record_maps',
           'wrap_train_dataset']

_logger = logging.getLogger(__name__)

MANIFEST = 'manifest.json'
FORMAT = 'tokenmix-teacher-maps/1'
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel')
_PHOTOMETRIC = ('ColorJitter', 'RandomApply', 'RandomGrayscale', 'GaussianBlur', 'MaybePILToTensor', 'MaybeToTensor',
                'ToTensor', 'Normalize', 'RandomErasing', 'ToNumpy', 'PILToTensor', 'ConvertImageDtype')


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


SAMPLE_ROWS = 8  # rows of a shard whose bytes are hashed when it is written and checked when the store is opened


def _key_bytes(keys: Sequence[str]) -> np.ndarray:
    """Image keys as one fixed-width bytes array (UTF-8; file-name bytes that are not UTF-8 kept as they are)."""
    return np.array([key.encode('utf-8', 'surrogateescape') for key in keys], dtype=np.bytes_)


def _keys_digest(keys: Sequence[str]) -> str:
    """sha256 of a shard's key list in order: swapping, editing, adding or dropping a key changes it."""
    return hashlib.sha256(json.dumps(list(keys)).encode()).hexdigest()


def _rows_digest(maps: np.ndarray) -> str:
    """sha256 of `SAMPLE_ROWS` rows of a shard spread evenly over it, its first and last among them."""
    rows = np.unique(np.linspace(0, len(maps) - 1, min(len(maps), SAMPLE_ROWS)).round().astype(np.int64))
    return hashlib.sha256(np.ascontiguousarray(maps[rows]).tobytes()).hexdigest()


def shard_record(maps: np.ndarray, keys: Sequence[str]) -> Dict[str, Any]:
    """A shard's ``.json``: its image keys, and the checksums :class:`MapStore` checks them and its data against."""
    return dict(count=len(keys), keys=list(keys), keys_sha256=_keys_digest(keys), rows_sha256=_rows_digest(maps))


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
    write_json_atomic(path + '.json', shard_record(maps, keys))


class _KeyIndex:
    """Image keys (non-empty), sorted, as one fixed-width bytes array, and each key's position in the order given.

    (longest key + 4) bytes a key in two arrays, no Python object per key: a forked loader worker reads it without
    writing to it, where a dict of 1.28 M keys is copied into each worker page by page as reference counts change
    (docs/benchmarks.md). Sorted as (key, int32 position) records rather than by argsort, whose int64 array, once
    freed, stays in the process as heap the allocator keeps (10 MB at ImageNet scale).
    """

    def __init__(self, keys: np.ndarray) -> None:
        pairs = np.empty(len(keys), dtype=[('key', keys.dtype), ('position', np.int32)])
        pairs['key'], pairs['position'] = keys, np.arange(len(keys), dtype=np.int32)
        pairs.sort(order='key')  # equal keys in the order given: the position breaks ties
        self.sorted, self.positions = pairs['key'].copy(), pairs['position'].copy()

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Each key's position, -1 where it is absent."""
        at = np.searchsorted(self.sorted, keys).clip(max=len(self.sorted) - 1)
        return np.where(self.sorted[at] == keys, self.positions[at], -1)

    def duplicate(self) -> Optional[Tuple[str, int, int]]:
        """A key given twice and its first two positions; None when every key differs."""
        same = np.flatnonzero(self.sorted[1:] == self.sorted[:-1])
        if not len(same):
            return None
        at = same[0]
        return (self.sorted[at].decode('utf-8', 'surrogateescape'), int(self.positions[at]),
                int(self.positions[at + 1]))


_MANIFEST_FIELDS = dict(teacher=str, split=str, split_folder=str, classes=list, map_size=list, topk=int,
                        num_images=int, shard_size=int, num_shards=int)


class _EntryReader:
    """`read` for a store whose `entry(key)` gives one image's fp16 ``[2, K, h, w]``."""

    def read(self, key: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-K values (float32) and class indices (int64) of one image, each K x h x w."""
        entry = torch.from_numpy(np.array(self.entry(key), dtype=np.float32))
        return entry[0], entry[1].round().long()


class MapStore(_EntryReader):
    """This project's store: manifest, shards of fp16 ``[n, 2, K, h, w]``, memory-mapped on first use per process.

    Opening it checks all of it, so that a fault stops train.py before it writes anything, in one line naming
    --teacher-maps, the file and the fault: the manifest's fields and their types; each shard's ``.json`` (JSON,
    as many keys as the manifest gives the shard: `shard_size`, the last one fewer); its ``.npy`` header (fp16
    ``[rows, 2, topk, *map_size]``) against the file's size (a truncated shard); no key in two places; and the
    checksums each ``.json`` was written with (:func:`shard_record`): the sha256 of its key list (a swapped or
    edited key) and of `SAMPLE_ROWS` rows of its ``.npy`` (another shard's or another store's data, an overwritten
    start or end). The data is not hashed whole: for ImageNet-1k at F6's 18 x 18 maps that is 8.4 GB to read in
    every process, against 129 x 8 rows (docs/teacher_maps.md); a change inside a row between the samples goes
    unseen. Shards written before the checksums were recorded get every other check and one warning; rerunning the
    precompute command adds their checksums.

    The index (:class:`_KeyIndex`) takes (longest key + 4) bytes an image: 41.5 MiB for ImageNet-1k.
    """

    coverage = 'whole'

    def __init__(self, root: str) -> None:
        self.root = root
        self.manifest = self.read_manifest(root)
        self._check_manifest()
        shards = self.manifest['num_shards']
        missing = [s for s in range(shards) if not shard_done(root, s)]
        if missing:
            raise ConfigError(
                f"--teacher-maps '{root}': incomplete store, {len(missing)} of {shards} shards missing (first: "
                f'{shard_name(missing[0])}); rerun tools/precompute_teacher_maps.py with the same flags to finish it')
        self.topk, self.shard_size, self.classes = (self.manifest[k] for k in ('topk', 'shard_size', 'classes'))
        keys, unverified = np.empty(self.manifest['num_images'], dtype='S1'), 0  # filled in place: no heap left over
        for shard in range(shards):
            shard_keys, verified = self._check_shard(shard)
            part = _key_bytes(shard_keys)
            if part.itemsize > keys.itemsize:  # longer keys than any before
                keys = keys.astype(part.dtype)
            keys[shard * self.shard_size:shard * self.shard_size + len(part)] = part
            unverified += not verified
        self.index = _KeyIndex(keys)
        twice = self.index.duplicate()
        if twice:
            key, first, second = twice
            self._fault(shard_name(second // self.shard_size) + '.json',
                        f"lists '{key}' a second time (first in {shard_name(first // self.shard_size)}.json)")
        if unverified:
            _logger.warning(f"--teacher-maps '{root}': {unverified} of {shards} shards were written without "
                            'checksums, so swapped keys or replaced data in them cannot be seen (their sizes are '
                            'checked); rerun tools/precompute_teacher_maps.py with the store\'s flags to add them')
        self._arrays: Dict[int, np.ndarray] = {}

    @staticmethod
    def read_manifest(root: str, flag: str = '--teacher-maps') -> Dict[str, Any]:
        """A store's manifest; ConfigError naming `flag` when it is unreadable or of another format."""
        try:
            with open(os.path.join(root, MANIFEST)) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{flag} '{root}': cannot read {MANIFEST} ({e})") from None
        if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
            raise ConfigError(f"{flag} '{root}': {MANIFEST} is not a {FORMAT} manifest")
        return manifest

    def _fault(self, file: str, what: str) -> NoReturn:
        """Stop with one line naming --teacher-maps, the file and what is wrong with it."""
        remedy = '' if file == MANIFEST else ("; delete the shard's .npy and .json and rerun "
                                              "tools/precompute_teacher_maps.py with the store's flags to remake it")
        raise ConfigError(f"--teacher-maps '{self.root}': {file} {what}{remedy}")

    def _check_manifest(self) -> None:
        """Every field the store is read by, of its type; counts and sizes >= 1; as many shards as images fill."""
        manifest = self.manifest
        for name, kind in _MANIFEST_FIELDS.items():
            if name not in manifest:
                self._fault(MANIFEST, f"has no '{name}'")
            value = manifest[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                self._fault(MANIFEST, f"'{name}' is {type(value).__name__}, not {kind.__name__}")
            if kind is int and value < 1:
                self._fault(MANIFEST, f"'{name}' is {value}, not >= 1")
        size, classes = manifest['map_size'], manifest['classes']
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            self._fault(MANIFEST, f"'map_size' is {size}, not [rows, columns]")
        if not all(isinstance(name, str) for name in classes) or len(set(classes)) != len(classes):
            self._fault(MANIFEST, "'classes' is not a list of distinct class names")
        expected = -(-manifest['num_images'] // manifest['shard_size'])
        if manifest['num_shards'] != expected:
            self._fault(MANIFEST, f"gives {manifest['num_shards']} shards for {manifest['num_images']} images of "
                                  f"{manifest['shard_size']} a shard, not {expected}")

    def _check_shard(self, shard: int) -> Tuple[List[str], bool]:
        """A shard's keys, once its files have passed the checks; whether it had checksums to check."""
        manifest, name = self.manifest, shard_name(shard)
        rows = min(self.shard_size, manifest['num_images'] - shard * self.shard_size)
        path = os.path.join(self.root, name)
        try:
            with open(path + '.json', encoding='utf-8') as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            self._fault(name + '.json', f'cannot be read as JSON ({e})')
        keys = record.get('keys') if isinstance(record, dict) else None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            self._fault(name + '.json', 'holds no list of image keys')
        if len(keys) != rows:
            self._fault(name + '.json', f'lists {len(keys)} images, the manifest gives this shard {rows}')
        self._check_npy(name + '.npy', (rows, 2, self.topk, *manifest['map_size']))
        if 'keys_sha256' not in record:
            return keys, False
        if record['keys_sha256'] != _keys_digest(keys):
            self._fault(name + '.json', 'does not match its checksum: its keys were changed (swapped, edited) '
                                        'after it was written')
        if record.get('rows_sha256') != _rows_digest(np.load(path + '.npy', mmap_mode='r')):
            self._fault(name + '.npy', f'does not match the checksum in {name}.json: it holds other data than '
                                       'was written with those keys')
        return keys, True

    def _check_npy(self, file: str, shape: Tuple[int, ...]) -> None:
        """The ``.npy``'s header says fp16 of `shape`, and the file holds all of that data, no more."""
        path = os.path.join(self.root, file)
        try:
            with open(path, 'rb') as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                found, fortran_order, dtype = read_header(f)
                start = f.tell()
        except (OSError, ValueError) as e:
            self._fault(file, f'is not a .npy array ({e})')
        if dtype != np.float16 or fortran_order or tuple(found) != shape:
            self._fault(file, f'holds {dtype} {list(found)}, the manifest says float16 {list(shape)}')
        size, expected = os.path.getsize(path), start + int(np.prod(shape)) * 2
        if size != expected:
            self._fault(file, f'has {size} bytes, its header needs {expected} '
                              f'({"truncated" if size < expected else "bytes after the data"})')

    def positions(self, keys: Sequence[str]) -> np.ndarray:
        """Each image key's row over the shards (int32; -1 where it has no map here)."""
        if self.index is None:
            raise RuntimeError(f"the map store '{self.root}' dropped its key index (forget_keys): read it by row")
        return self.index.find(_key_bytes(keys))

    def forget_keys(self) -> None:
        """Drop the key index (41.5 MiB at ImageNet's 1.28 M images) once the caller keeps each sample's row
        (:class:`StoredMapDataset`), before the loader forks its workers: rows are still read (:meth:`entry_at`),
        keys no longer."""
        self.index = None

    def has_maps(self, keys: Sequence[str]) -> np.ndarray:
        """Whether each image key (its path relative to the split folder) has a map here."""
        return self.positions(keys) >= 0

    def entry_at(self, position: int) -> np.ndarray:
        """The top-K values and their class indices at row `position` over the shards: 2 x K x h x w, a read-only
        fp16 view of the memory-mapped shard (no copy: the loader workers copy it once, into the sample's record)."""
        shard, row = divmod(int(position), self.shard_size)
        array = self._arrays.get(shard)
        if array is None:  # a plain array over the map: indexing a np.memmap costs more than the copy
            array = self._arrays[shard] = np.load(os.path.join(self.root, shard_name(shard) + '.npy'),
                                                  mmap_mode='r').view(np.ndarray)
        return array[row]

    def entry(self, key: str) -> np.ndarray:
        """One image's top-K values and class indices, 2 x K x h x w (as :meth:`entry_at`)."""
        position = int(self.positions([key])[0])
        if position < 0:
            raise KeyError(key)
        return self.entry_at(position)

    def __getstate__(self) -> Dict[str, Any]:  # memory maps are reopened in each worker process
        return dict(self.__dict__, _arrays={})


class AuthorsMapStore(_EntryReader):
    """The authors' layout, ``ROOT/<class folder>/<image stem>.pt`` with fp16 ``[2, K, h, w]`` (centre square).

    K (`topk`) is read from the first file, so a larger --teacher-topk is refused as for a manifest's store. The
    stored class indices are the teacher's, numbered as an image folder numbers its classes: `classes`, the class
    folders in timm's order (natural sort), is the teacher's class list. A store lacking some of the teacher's
    classes would shift every index after them, so one whose first file names a class index beyond its folders
    is refused. Only that file is read when the store is opened (1.28 M files are too many to read each time); any
    file that cannot be read, then or during training, stops the run in one line naming it.
    """

    coverage = 'centre'

    def __init__(self, root: str) -> None:
        self.root = root
        files, folders = [], []
        for entry in os.scandir(root):
            if entry.is_dir():
                names = [name for name in os.listdir(entry.path) if name.endswith('.pt')]
                if names:
                    folders.append(entry.name)
                    files.extend(f'{entry.name}/{name}' for name in names)
        if not files:
            raise ConfigError(f"--teacher-maps '{root}': neither a {MANIFEST} nor <class>/<image>.pt files")
        self.classes = sorted(folders, key=natural_key)
        self.files = _KeyIndex(_key_bytes(files))
        first = min(files)
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

    def has_maps(self, keys: Sequence[str]) -> np.ndarray:
        """Whether each image key (its path relative to the split folder) has a map file here."""
        return self.files.find(_key_bytes([self._file(key) for key in keys])) >= 0

    def _load(self, file: str) -> torch.Tensor:
        try:
            entry = read_checkpoint(os.path.join(self.root, file))
        except (OSError, CheckpointError) as e:
            raise ConfigError(f"--teacher-maps '{self.root}': cannot read '{file}': {e}") from None
        if not isinstance(entry, torch.Tensor) or entry.ndim != 4 or entry.shape[0] != 2:
            raise ConfigError(f"--teacher-maps '{self.root}': '{file}' is not a [2, K, h, w] tensor "
                              f'(got {tuple(getattr(entry, "shape", ())) or type(entry).__name__})')
        return entry

    def entry(self, key: str) -> np.ndarray:
        """One image's top-K values and class indices, 2 x K x h x w (fp16, as stored)."""
        return self._load(self._file(key)).numpy()


def open_map_store(root: str) -> Union[MapStore, AuthorsMapStore]:
    """A :class:`MapStore` when `root` has a manifest, else the authors' per-image layout; checked as each says."""
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
    """What the recording transforms saw for the sample being loaded (one per process, reset per sample).

    `crop_last` is the pipeline's order, set when it is instrumented and kept across samples: the flips and ops act
    on the whole image before the crop (the authors' order, --aug-order authors), else on the crop after it (timm's).
    `slots`, also set then: the most geometric ops a sample can get (RandAugment's layers, AutoAugment's longest
    sub-policy), the op slots of every record.
    """
    image_size: Optional[Tuple[int, int]] = None
    crop: Optional[Tuple[int, int, int, int]] = None
    output_size: Optional[Tuple[int, int]] = None
    hflip: bool = False
    vflip: bool = False
    ops: List[Tuple[Any, tuple]] = field(default_factory=list)
    crop_last: bool = False
    slots: int = 0

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
    """A geometric augment op's function, recording its arguments each time it is applied; a function that resolves
    them on the image (`transforms.WholePixelTranslate`: the shift rounded) records the op it applies instead."""

    def __init__(self, fn, log: GeometryLog) -> None:
        self.fn, self.log = fn, log

    def __call__(self, img, *level_args, **kwargs):
        applied_op = getattr(self.fn, 'applied_op', None)
        self.log.ops.append(applied_op(img, *level_args) if applied_op else (self.fn, level_args))
        return self.fn(img, *level_args, **kwargs)


def instrument_transform(transform: transforms.Compose, log: GeometryLog) -> None:
    """Make a timm train transform record its geometry into `log` (in place; the same random draws), and its order
    (`log.crop_last`). A transform instrumented before (then reordered: --aug-order authors) records into `log` anew.

    Raises ConfigError for a pipeline whose geometry cannot be followed (no RandomResizedCrop, AugMix, other
    geometric transforms, flips or geometric ops on both sides of the crop).
    """
    steps = transform.transforms
    crops = [i for i, t in enumerate(steps) if isinstance(t, RandomResizedCropAndInterpolation)]
    if len(crops) != 1:
        raise ConfigError('--teacher-maps needs the RandomResizedCrop train pipeline (not --no-aug or other crops)')
    moved, slots = [], 0  # positions of the steps that move pixels, besides the crop
    for i, t in enumerate(steps):
        name = type(t).__name__
        if isinstance(t, RandomResizedCropAndInterpolation):
            t.get_params = _RecordedCropParams(type(t).get_params, log)
            log.output_size = tuple(t.size)
        elif isinstance(t, (transforms.RandomHorizontalFlip, transforms.RandomVerticalFlip, _RecordedFlip)):
            vertical = t.vertical if isinstance(t, _RecordedFlip) else isinstance(t, transforms.RandomVerticalFlip)
            steps[i] = _RecordedFlip(t.p, vertical, log)
            moved.append(i)
        elif name == 'AugMixAugment':  # blends several augmented copies: no single geometry to follow
            raise ConfigError('--teacher-maps cannot follow the geometry of AugMix (--aa augmix-*)')
        elif augment_ops(t):
            slots += getattr(t, 'num_layers', None) or max(len(sub) for sub in getattr(t, 'policy', [[]]))
            for op in augment_ops(t):
                if op.name in GEOMETRIC_OPS:
                    op.aug_fn = _RecordedOp(op.aug_fn.fn if isinstance(op.aug_fn, _RecordedOp) else op.aug_fn, log)
                    moved.append(i)
        elif name not in _PHOTOMETRIC:
            raise ConfigError(f'--teacher-maps cannot follow the geometry of the train transform {name}')
    sides = {i < crops[0] for i in moved}
    if len(sides) > 1:
        raise ConfigError("--teacher-maps follows flips and geometric ops all after the crop (timm's order) or all "
                          'before it (--aug-order authors), not on both sides')
    log.crop_last, log.slots = sides == {True}, slots


Affine = Tuple[float, float, float, float, float, float]  # (a, b, c, d, e, f): x' = a x + b y + c, y' = d x + e y + f
_IDENTITY: Affine = (1., 0., 0., 0., 1., 0.)


def _then(first: Affine, second: Affine) -> Affine:
    """`first`, then `second` (plain floats: the loader workers compose these once a sample)."""
    a, b, c, d, e, f = second
    p, q, r, s, t, u = first
    return (a * p + b * s, a * q + b * t, a * r + b * u + c, d * p + e * s, d * q + e * t, d * r + e * u + f)


def _op_matrix(fn: Any, args: tuple, size: Tuple[int, int]) -> Affine:
    """The affine map that a geometric augment op of timm (`fn` with its recorded `args`) applied to an image of
    `size` (width, height) px uses from its output's coordinates to its input's (PIL's convention: pixel k covers
    [k, k + 1)); ValueError for an op that is not one of timm's affine ones."""
    name, (width, height) = getattr(fn, '__name__', type(fn).__name__), size
    if name == 'rotate':  # PIL's Image.rotate about the centre, without expansion
        angle = -math.radians(args[0] % 360.0)
        cos, sin, cx, cy = math.cos(angle), math.sin(angle), width / 2, height / 2
        return cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy
    if name == 'shear_x':
        return 1., args[0], 0., 0., 1., 0.
    if name == 'shear_y':
        return 1., 0., 0., args[0], 1., 0.
    if name in ('translate_x_rel', 'translate_x_abs'):
        return 1., 0., args[0] * (width if name.endswith('_rel') else 1), 0., 1., 0.
    if name in ('translate_y_rel', 'translate_y_abs'):
        return 1., 0., 0., 0., 1., args[0] * (height if name.endswith('_rel') else 1)
    raise ValueError(f'no affine map for the augment op {name}')


def geometry_matrices(log: 'GeometryLog', map_size: Tuple[int, int], coverage: str
                      ) -> Tuple[Affine, List[Tuple[Affine, Tuple[int, int]]]]:
    """The recorded geometry as affine maps from the output image's coordinates: to the stored map's cells, and, per
    geometric op, to that op's input image, with that image's size (width, height): a point outside it is area the
    op brought in, which reads zero (:func:`mixup_ext.sample_maps`).

    timm's order: ops, then the flips, on the crop, which is a box of the image; the authors' order: the crop is a box
    of the image after the ops and the flips.
    """
    top, left, height, width = log.crop
    img_w, img_h = log.image_size
    out_h, out_w = log.output_size
    crop = (width / out_w, 0., left, 0., height / out_h, top)
    x0, y0, x1, y1 = map_box((0, 0, img_h, img_w), log.image_size, map_size, coverage)
    to_map = ((x1 - x0) / img_w, 0., x0, 0., (y1 - y0) / img_h, y0)
    size, chain = ((img_w, img_h), crop) if log.crop_last else ((out_w, out_h), _IDENTITY)
    checks = []
    for fn, args in reversed(log.ops):
        chain = _then(chain, _op_matrix(fn, args, size))
        checks.append((chain, size))
    flip = (-1. if log.hflip else 1., 0., size[0] if log.hflip else 0., 0., -1. if log.vflip else 1.,
            size[1] if log.vflip else 0.)
    chain = _then(chain, flip)
    return _then(chain if log.crop_last else _then(chain, crop), to_map), checks


# a record: label, the label's class in the maps, K, map rows, map cols, op slots, output height and width, then the
# 2 x 3 map to the stored map, per op slot a 2 x 3 map and its bounds, then K x h x w scores and K x h x w classes
_HEAD = 8
_POINTS = 2  # samples a token each way, at least (as many as the map cells a token of the whole image covers)


class RecordLayout(NamedTuple):
    """What a record holds besides its label: top-`k` maps of `h` x `w`, `slots` op slots, the output size."""
    k: int
    h: int
    w: int
    slots: int
    out_h: int
    out_w: int

    @property
    def length(self) -> int:
        return _HEAD + 6 + self.slots * 8 + 2 * self.k * self.h * self.w

    @classmethod
    def of(cls, records: torch.Tensor) -> 'RecordLayout':
        """The layout a batch of records states (read from the first; a device sync where they are on one)."""
        if records.ndim != 2 or records.shape[1] < _HEAD:
            raise ValueError(f'stored-map targets must be B x L records of StoredMapDataset, got '
                             f'{tuple(records.shape)}')
        layout = cls(*(int(v) for v in records[0, 2:_HEAD].tolist()))
        if records.shape[1] != layout.length:
            raise ValueError(f'stored-map targets must be B x {layout.length} records of StoredMapDataset (top-'
                             f'{layout.k} {layout.h} x {layout.w} maps, {layout.slots} op slots), got '
                             f'{tuple(records.shape)}')
        return layout


def pack_record(label: int, own_class: int, top: np.ndarray, to_map: Affine,
                checks: Sequence[Tuple[Affine, Tuple[float, float]]], slots: int,
                output_size: Tuple[int, int]) -> torch.Tensor:
    """One sample's record (float32 vector): its label, the label's class in the maps, its top-K values and class
    indices (`top`, 2 x K x h x w), the affine map from the output image (`output_size`, height and width) to the
    map's cells, and up to `slots` op checks (affine map, image width and height; the slots left empty check
    nothing). Plain floats and one NumPy array: this runs in the loader workers, once a sample."""
    if len(checks) > slots:
        raise RuntimeError(f'{len(checks)} geometric ops recorded for {slots} op slots')
    free = slots - len(checks)  # slots that check nothing: a zero map within infinite bounds
    head = [label, own_class, *top.shape[1:], slots, *output_size, *to_map]
    head += [v for matrix, _ in checks for v in matrix] + [0.] * 6 * free
    head += [bound for _, size in checks for bound in size] + [math.inf] * 2 * free
    record = np.empty(len(head) + top.size, dtype=np.float32)
    record[:len(head)] = head
    record[len(head):].reshape(top.shape)[...] = top  # the one copy of the stored scores, converted to float32
    return torch.from_numpy(record)


def record_maps(records: torch.Tensor, grid: Tuple[int, int], layout: Optional[RecordLayout] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The labels (B, int64) and own-class maps on the token `grid` (B x rows x cols) of a batch of
    :class:`StoredMapDataset` records (B x L): each image's stored top-K scores read through its crop, flips and
    geometric ops in one batched pass, on the records' device (the loader workers only record the geometry).
    `layout`: the records' (:meth:`RecordLayout.of`, read from them when None)."""
    k, h, w, slots, out_h, out_w = layout = layout or RecordLayout.of(records)
    if records.ndim != 2 or records.shape[1] != layout.length:
        raise ValueError(f'stored-map targets must be B x {layout.length} records of StoredMapDataset, got '
                         f'{tuple(records.shape)}')
    n, at = records.shape[0], _HEAD + 6 + slots * 6
    to_map = records[:, _HEAD:_HEAD + 6].reshape(n, 2, 3)
    checks = records[:, _HEAD + 6:at].reshape(n, slots, 2, 3)
    bounds = records[:, at:at + slots * 2].reshape(n, slots, 2)
    top = records[:, at + slots * 2:].reshape(n, 2, k, h, w)
    own = own_map_from_topk(top[:, 0], top[:, 1].round(), records[:, 1].round().long())
    points = max(_POINTS, math.ceil(max(h / grid[0], w / grid[1])))  # crop_map's count for the whole map
    maps = sample_maps(own, to_map, (out_h, out_w), grid, points, checks, bounds)
    return records[:, 0].round().long(), maps


class StoredMapDataset(DatasetView):
    """A train dataset whose targets carry what each sample's own-class map on the token grid is cut from.

    Each item is ``(image, target)`` with target the sample's record (:meth:`record`: label, stored top-K scores,
    geometry); :class:`StoredMapsMixer` cuts the batch's maps from the records on the device. The wrapped dataset's
    transform (set by timm's loader factory through this object's `transform`) is instrumented to record its
    geometry.

    Keys are not kept: each sample's row in this project's store is looked up once, here, and the store's key index
    is then dropped (the rows take 4 bytes an image, 4.9 MiB for ImageNet, against 41.5 MiB); with the authors'
    layout a sample's key is read from the dataset's reader when it is loaded. A
    `CheckedImageDataset` that skips an unreadable image (--skip-bad-images) serves the next readable one, and that
    image's map is served with it.

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
        # this project's store: each sample's row in it, found once (int32, 4 bytes an image; the authors' layout is
        # read by key)
        self.rows = np.empty(len(dataset), dtype=np.int32) if isinstance(store, MapStore) else None
        missing, count, block = [], len(dataset), 1 << 14  # in blocks: no list of 1.28 M keys at once
        for start in range(0, count, block):
            keys = [self.key(i) for i in range(start, min(start + block, count))]
            if self.rows is not None:
                self.rows[start:start + len(keys)] = found = store.positions(keys)
                absent = found < 0
            else:
                absent = ~store.has_maps(keys)
            missing.extend(keys[i] for i in np.flatnonzero(absent))
        if missing:
            split = ': a store of another split?' if len(missing) == count else ''
            raise ConfigError(f"--teacher-maps '{store.root}' has no maps for {len(missing)} of {count} "
                              f"train images (first: '{missing[0]}'){split}")
        if self.rows is not None:
            store.forget_keys()  # each sample's row is known: 4 bytes an image instead of the key index

    def key(self, index: int) -> str:
        """The image key of sample `index`: its path relative to the split folder, as the store lists it."""
        return self.dataset.reader.filename(index)

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

    def record(self, index: int, label: int) -> torch.Tensor:
        """The sample's record (float32): its label, its stored top-K scores and the geometry just recorded, as affine
        maps (:func:`geometry_matrices`); :func:`record_maps` turns a batch of them into maps on the token grid."""
        log = self.log
        if log.crop is None:
            raise RuntimeError('no crop was recorded: the transform was not instrumented')
        top = self.store.entry(self.key(index)) if self.rows is None else self.store.entry_at(self.rows[index])
        if 0 < self.topk < top.shape[1]:
            top = top[:, :self.topk]
        own_class = label if self.teacher_classes is None else self.teacher_classes[label]
        to_map, checks = geometry_matrices(log, top.shape[2:], self.store.coverage)
        return pack_record(label, own_class, top, to_map, checks, log.slots, log.output_size)

    def own_map(self, index: int, label: int) -> torch.Tensor:
        """The sample's own-class map through the geometry just recorded, on the token grid (rows x cols): what
        :func:`record_maps` makes of its record."""
        return record_maps(self.record(index, label)[None], self.grid)[1][0]

    def __getitem__(self, index: int):
        self.log.reset()
        if isinstance(self.dataset, CheckedImageDataset):  # with --skip-bad-images it may serve the next image
            img, label, index = self.dataset.served_item(index)
        else:
            img, label = self.dataset[index]
        return img, self.record(index, int(label))


class StoredMapsMixer:
    """Feeds TokenMix the stored maps the batch carries: :class:`StoredMapDataset` records -> labels, maps on the
    token grid of the batch (:func:`record_maps`, on the batch's device)."""

    def __init__(self, tokenmix: TokenMix) -> None:
        self.tokenmix, self.layout = tokenmix, None

    def __getattr__(self, name: str):
        if name in ('tokenmix', 'layout'):
            raise AttributeError(name)
        return getattr(self.tokenmix, name)

    @property
    def mixup_enabled(self) -> bool:
        return self.tokenmix.mixup_enabled

    @mixup_enabled.setter
    def mixup_enabled(self, value: bool) -> None:
        self.tokenmix.mixup_enabled = value

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.layout is None or target.ndim != 2 or target.shape[1] != self.layout.length:
            self.layout = RecordLayout.of(target)  # read once: the layout is the dataset's, the same every batch
        labels, maps = record_maps(target, token_grid(x.shape[2], x.shape[3], self.tokenmix.patch_size), self.layout)
        return self.tokenmix(x, labels, own_maps=maps)


def _teacher_classes(store: Union[MapStore, AuthorsMapStore], class_to_idx: Dict[str, int],
                     class_map: str) -> Dict[int, int]:
    """Each label's class index in the stored maps, matched by class name in the store's class list (its manifest's,
    or the authors' class folders), so a class subset, a reordered class list or a --class-map works; ConfigError
    naming the first class the store lacks."""
    position = {name: i for i, name in enumerate(store.classes)}
    missing = [name for name in class_names(class_to_idx) if name not in position]
    if missing:
        source = f"--class-map '{class_map}'" if class_map else 'the train split'
        origin = (f'its {len(store.classes)} class folders' if isinstance(store, AuthorsMapStore) else
                  f'the {len(store.classes)} classes its {MANIFEST} lists')
        raise ConfigError(f"--teacher-maps '{store.root}' has no class '{missing[0]}' of {source} "
                          f"({len(missing)} of {len(class_to_idx)} classes missing; the maps' class indices are "
                          f'{origin}, in order, matched by name)')
    return {label: position[name] for name, label in class_to_idx.items()}


def _check_store(store, args: Any, class_to_idx: Dict[str, int], split_dir: str) -> Dict[int, int]:
    """The store must keep --teacher-topk classes and hold every class of this split by name (returned: each label's
    class index in its maps), and, for this project's store, be of this split and the teacher the config names. The
    authors' layout records only its K and its class folders: its split is checked by the image names
    (:class:`StoredMapDataset`)."""
    if args.teacher_topk > store.topk:
        raise ConfigError(f"--teacher-topk {args.teacher_topk}: --teacher-maps '{store.root}' keeps only the top "
                          f'{store.topk}')
    if isinstance(store, AuthorsMapStore):
        _logger.info('--teacher-maps %s: authors\' per-image layout, %d class folders (maps cover the centre square; '
                     'the teacher is not recorded)', store.root, len(store.classes))
        return _teacher_classes(store, class_to_idx, args.class_map)
    manifest = store.manifest
    where = f"--teacher-maps '{store.root}'"
    if os.path.basename(os.path.normpath(split_dir)) != manifest['split_folder']:
        raise ConfigError(f"{where} holds split '{manifest['split']}', the train split is "
                          f"'{os.path.basename(os.path.normpath(split_dir))}'")
    if args.teacher_model and args.teacher_model != manifest['teacher']:
        raise ConfigError(f"{where} was made by teacher '{manifest['teacher']}', not --teacher-model "
                          f"'{args.teacher_model}'")
    return _teacher_classes(store, class_to_idx, args.class_map)


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

