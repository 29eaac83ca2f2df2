"""CPU cost of the authors' augmentation order against timm's, measured in the same run (one loader worker's view).

The DeiT-S TokenMix recipe's train transform (configs/imagenet/deit_small_tokenmix_300ep.yaml, RandAugment
rand-m9-mstd0.5-inc1, 224 px, prefetcher) as build_train_loader builds it with --aug-order timm and authors, on
ImageNet-sized pictures (500 x 375, 375 x 500, 500 x 333, 400 x 300): (a) the transform alone, (b) a whole sample
of the stored-map dataset (transform and the own-class map of an 18 x 18 top-5 map, the authors' F6 setting, cut
to the 14 x 14 grid; read from the authors' per-image layout). The two orders take turns in bursts
(`median_seconds`), on one thread as a loader worker has.

Usage: python benchmarks/bench_aug_order.py [--images N] [--repeats N]
"""
import argparse
import os
import platform
import random
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file from a checkout that was not pip-installed
    sys.path.insert(0, ROOT)

from benchmarks.bench_mixup import median_seconds  # noqa: E402
from tokenmix_train.args import parse_train_args  # noqa: E402
from tokenmix_train.data import build_train_loader  # noqa: E402
from tokenmix_train.teacher_maps import StoredMapDataset, open_map_store  # noqa: E402

RECIPE = os.path.join(ROOT, 'configs', 'imagenet', 'deit_small_tokenmix_300ep.yaml')
SIZES = ((500, 375), (375, 500), (500, 333), (400, 300))
DATA_CONFIG = dict(input_size=(3, 224, 224), interpolation='bicubic', mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225))


def write_pictures(root: str, count: int) -> None:
    """`count` smooth random pictures (JPEG) of one class, and an authors'-layout 18 x 18 top-5 map each."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, 'train', 'c'))
    os.makedirs(os.path.join(root, 'maps', 'c'))
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BICUBIC).save(os.path.join(root, 'train', 'c', f'{i}.jpg'))
        values = torch.from_numpy(rng.random((5, 18, 18), dtype=np.float32)).sort(0, descending=True).values
        indices = torch.arange(5.).view(5, 1, 1).expand(5, 18, 18)
        torch.save(torch.stack([values, indices]).half(), os.path.join(root, 'maps', 'c', f'{i}.pt'))
    for k in range(1, 5):  # the store's teacher has the 5 classes its maps name
        os.makedirs(os.path.join(root, 'maps', f'd{k}'))
        torch.save(torch.zeros(2, 5, 18, 18).half(), os.path.join(root, 'maps', f'd{k}', '0.pt'))


def train_dataset(root: str, order: str, stored: bool):
    """The train split with the recipe's train transform in `order`, wrapped for stored maps when `stored`."""
    args = parse_train_args(['-c', RECIPE, '--data-dir', root, '--aug-order', order, '--workers', '0',
                             '--device', 'cpu'])[0]
    args.distributed = False
    dataset = ImageDataset(os.path.join(root, 'train'))
    if stored:
        dataset = StoredMapDataset(dataset, open_map_store(os.path.join(root, 'maps')), (14, 14), topk=5)
    build_train_loader(dataset, args, DATA_CONFIG, torch.device('cpu'))
    return dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=30)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        write_pictures(root, opts.images)
        pictures = [Image.open(os.path.join(root, 'train', 'c', f'{i}.jpg')).convert('RGB') for i in range(opts.images)]
        print(f'{platform.node()} {platform.processor()} torch {torch.__version__}, {opts.images} pictures, '
              f'median of {opts.repeats} passes')
        for what, stored in (('(a) transform', False), ('(b) stored-map sample', True)):
            timm, authors = (train_dataset(root, order, stored) for order in ('timm', 'authors'))
            if stored:
                passes = [lambda d=d: [d[i] for i in range(opts.images)] for d in (timm, authors)]
            else:
                passes = [lambda d=d: [d.transform(p) for p in pictures] for d in (timm, authors)]
            seconds = median_seconds(*passes, repeats=opts.repeats, burst=1)
            per_image = [1000 * s / opts.images for s in seconds]
            print(f'{what}: timm {per_image[0]:.2f} ms an image, authors {per_image[1]:.2f} ms, '
                  f'ratio {per_image[1] / per_image[0]:.2f}')


if __name__ == '__main__':
    main()
