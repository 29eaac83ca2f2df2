"""Memory of the map store's index at ImageNet-1k scale, and the cost of checking a store's data when it is opened.

(a) A synthetic store of 1,281,167 ImageNet-like keys (``n01440764/n01440764_10026.JPEG``) in 129 shards of 10000,
    written by `write_shard` with checksums (maps of 1 x 1 positions, top-1: the index does not depend on the map
    size), indexed two ways, each in a fresh forked process over the same timm reader: the dict of (shard, row)
    tuples and the dataset's key list that `MapStore` / `StoredMapDataset` kept before, against the arrays
    (`MapStore` and `StoredMapDataset` as they are), and without maps (the reader alone, the baseline of the
    worker's figure). Printed: the time to open (the arrays' includes every check of the store), the process's RSS
    growth, its peak, and what is left of it once glibc's `malloc_trim` has handed freed heap back (the live part),
    and the private dirty memory (`/proc/self/smaps_rollup`) of a worker forked afterwards, as a DataLoader forks its
    workers, before and after `--reads` random reads (each touching the reader's sample as the image load does,
    then looking the map up and reading it).
(b) The data check: a full sha256 of one ImageNet-size shard file (10000 x 2 x 5 x 18 x 18 fp16, NFNet-F6 maps at
    576 px) from the page cache against the sampled rows `MapStore` hashes, best of 3, and both times 129 shards.

Usage: python benchmarks/bench_map_index.py [--images N] [--shard-size N] [--reads N]
"""
import argparse
import ctypes
import datetime
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from typing import Callable, Dict

import numpy as np
import torch
from timm.data import ImageDataset
from timm.data.readers.reader_image_folder import ReaderImageFolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file from a checkout that was not pip-installed
    sys.path.insert(0, ROOT)

from tokenmix_train.teacher_maps import (FORMAT, MANIFEST, MapStore, StoredMapDataset, _rows_digest,  # noqa: E402
                                         shard_name, write_json_atomic, write_shard)

SPLIT = '/data/imagenet/train'  # the reader's root: never read, the keys are paths relative to it


def imagenet_like_keys(count: int, classes: int = 1000) -> list:
    """`count` keys ``<wnid>/<wnid>_<number>.JPEG`` over `classes` folders, numbers of 1 to 5 digits as ImageNet's,
    in timm's order (by class folder, then by natural order of the name)."""
    rng = np.random.default_rng(0)
    per_class = np.full(classes, count // classes) + (np.arange(classes) < count % classes)
    keys = []
    for c, n in enumerate(per_class):
        wnid = f'n{1440764 + 7919 * c:08d}'
        keys.extend(f'{wnid}/{wnid}_{number}.JPEG' for number in np.sort(rng.choice(60000, n, replace=False)) + 1)
    return keys


def write_store(root: str, keys: list, shard_size: int) -> None:
    """The store's manifest and shards, as tools/precompute_teacher_maps.py writes them (1 x 1 top-1 maps)."""
    shards = -(-len(keys) // shard_size)
    for shard in range(shards):
        part = keys[shard * shard_size:(shard + 1) * shard_size]
        write_shard(root, shard, np.zeros((len(part), 2, 1, 1, 1), np.float16), part)
    write_json_atomic(os.path.join(root, MANIFEST), dict(
        format=FORMAT, teacher='synthetic', topk=1, map_size=[1, 1], classes=sorted({k.split('/')[0] for k in keys}),
        split='train', split_folder='train', num_images=len(keys), shard_size=shard_size, num_shards=shards))


def reader_of(keys: list) -> ReaderImageFolder:
    """timm's image-folder reader holding `keys` as its samples, without scanning a folder."""
    reader = ReaderImageFolder.__new__(ReaderImageFolder)
    reader.root = SPLIT
    classes = {}
    reader.samples = [(f'{SPLIT}/{key}', classes.setdefault(key.split('/')[0], len(classes))) for key in keys]
    reader.class_to_idx = classes
    return reader


def memory_kb(field: str, source: str = '/proc/self/smaps_rollup') -> int:
    """One field (kB) of /proc/self/smaps_rollup or /proc/self/status."""
    with open(source) as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise KeyError(field)


def in_child(fn: Callable[[], Dict[str, float]]) -> Dict[str, float]:
    """fn() run in a forked child process (a fresh copy of this one, as a DataLoader worker is); its result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            result = json.dumps(fn()).encode()
        except BaseException as e:  # report it to the parent rather than printing a child's traceback
            result = json.dumps(dict(error=repr(e))).encode()
        os.write(write_end, result)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, 'rb') as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    if 'error' in result:
        raise RuntimeError(result['error'])
    return result


def old_index(root: str, dataset: ImageDataset):
    """The index as it was built before: a dict key -> (shard, row), the dataset's key list, the membership check."""
    with open(os.path.join(root, MANIFEST)) as f:
        shards = json.load(f)['num_shards']
    index = {}
    for s in range(shards):
        with open(os.path.join(root, shard_name(s) + '.json')) as f:
            for row, key in enumerate(json.load(f)['keys']):
                index[key] = (s, row)
    keys = [dataset.reader.filename(i) for i in range(len(dataset))]
    assert not [k for k in keys if k not in index]
    arrays = {}

    def read(i: int):
        shard, row = index[keys[i]]
        array = arrays.get(shard)
        if array is None:
            array = arrays[shard] = np.load(os.path.join(root, shard_name(shard) + '.npy'), mmap_mode='r')
        return torch.from_numpy(np.array(array[row], dtype=np.float32))
    return read


def no_index(root: str, dataset: ImageDataset):
    """No maps: what the reader alone costs a worker."""
    return lambda i: None


def new_index(root: str, dataset: ImageDataset):
    """The index as it is now: `MapStore` (checked whole) under a `StoredMapDataset`, which keeps each sample's row
    and drops the store's key index; a read copies the row, as a sample's record does."""
    wrapped = StoredMapDataset(dataset, MapStore(root), (1, 1))
    return lambda i: np.array(wrapped.store.entry_at(wrapped.rows[i]), dtype=np.float32)


def measure(build, root: str, dataset: ImageDataset, reads: np.ndarray) -> Dict[str, float]:
    """In this (forked) process: build the index, then fork a worker that reads; the memory figures in MiB."""
    rss0, start = memory_kb('Rss'), time.perf_counter()
    read = build(root, dataset)
    seconds, rss1, peak = time.perf_counter() - start, memory_kb('Rss'), memory_kb('VmHWM', '/proc/self/status')
    try:
        ctypes.CDLL(None).malloc_trim(0)
        live = (memory_kb('Rss') - rss0) / 1024
    except (OSError, AttributeError):  # not glibc
        live = float('nan')
    samples = dataset.reader.samples

    def worker() -> Dict[str, float]:
        dirty, start = [memory_kb('Private_Dirty') / 1024], time.perf_counter()
        for half in np.array_split(reads, 2):
            for i in half.tolist():
                path, target = samples[i]  # what loading the image touches
                read(i)
            dirty.append(memory_kb('Private_Dirty') / 1024)
        return dict(dirty=dirty, us_per_read=(time.perf_counter() - start) / len(reads) * 1e6)

    return dict(open_s=seconds, rss=(rss1 - rss0) / 1024, peak=(peak - rss0) / 1024, live=live, **in_child(worker))


def bench_index(images: int, shard_size: int, reads: int) -> None:
    keys = imagenet_like_keys(images)
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        write_store(root, keys, shard_size)
        print(f'(a) {images} keys (longest {max(map(len, keys))} characters) in {-(-images // shard_size)} shards, '
              f'written in {time.perf_counter() - start:.1f} s; {reads} random reads in the worker')
        dataset = ImageDataset(None, reader=reader_of(keys))
        del keys
        order = np.random.default_rng(1).integers(0, images, reads)
        print(f'{"index":<26} {"open s":>6} {"RSS growth MiB":>14} {"peak":>6} {"live":>6} '
              f'{"worker Private_Dirty MiB: fork, half, all reads":>48} {"us/read":>7}')
        for name, build in (('none (timm reader only)', no_index), ('dict + key list (before)', old_index),
                             ('arrays (MapStore now)', new_index)):
            r = in_child(lambda: measure(build, root, dataset, order))
            print(f'{name:<26} {r["open_s"]:>6.1f} {r["rss"]:>14.1f} {r["peak"]:>6.1f} {r["live"]:>6.1f} '
                  f'{"":>27}{r["dirty"][0]:>5.1f} {r["dirty"][1]:>7.1f} {r["dirty"][2]:>7.1f} '
                  f'{r["us_per_read"]:>7.1f}')


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_hash(shards: int = 129) -> None:
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((10000, 2, 5, 18, 18)).astype(np.float16)
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, 'shard.npy')
        np.save(path, maps)

        def full():
            digest = hashlib.sha256()
            with open(path, 'rb') as f:
                for block in iter(lambda: f.read(1 << 20), b''):
                    digest.update(block)
            return digest.hexdigest()

        full_s = best_seconds(full)
        sampled_s = best_seconds(lambda: _rows_digest(np.load(path, mmap_mode='r')))
    size = maps.nbytes
    print(f'(b) one shard of {size / 1e6:.1f} MB (file in the page cache), best of 3: full sha256 '
          f'{full_s * 1e3:.1f} ms, sampled rows {sampled_s * 1e3:.2f} ms; x {shards} shards '
          f'({size * shards / 1e9:.2f} GB): {full_s * shards:.1f} s against {sampled_s * shards:.2f} s a process')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=1281167)
    parser.add_argument('--shard-size', type=int, default=10000)
    parser.add_argument('--reads', type=int, default=200000)
    args = parser.parse_args()
    print(f'{datetime.date.today()}, {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, '
          f'NumPy {np.__version__}, torch {torch.__version__}')
    bench_index(args.images, args.shard_size, args.reads)
    bench_hash()


if __name__ == '__main__':
    main()
