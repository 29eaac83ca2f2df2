#!/usr/bin/env python3
"""Run a teacher once over a dataset split and store each image's top-k class maps for `train.py --teacher-maps`.

    python tools/precompute_teacher_maps.py --data-dir DIR --split train --teacher-model NAME \\
        (--teacher-checkpoint FILE | --teacher-pretrained) --out STORE [--img-size N] [--interpolation MODE] \\
        [--topk K] [--class-map FILE] [-b N] [--workers N]
    torchrun --nproc_per_node 8 tools/precompute_teacher_maps.py ...   # each process takes every 8th shard

Each image is resized whole to img_size x img_size (aspect not kept, nothing cropped away), so every
RandomResizedCrop box of training has a map under it, with the interpolation the teacher was trained with (its
pretrained config: bicubic for NFNet-F6) unless --interpolation names another. Per image and map position the
teacher's top-k scores and class indices are stored in fp16 (see tokenmix_train/teacher_maps.py for the layout),
with a manifest naming the teacher, sizes, interpolation, precision, k, split and the teacher's class list (the names
of its class indices: the split's class folders in order, or --class-map, the list the teacher was trained with, for
a teacher of other classes than the split's), by which train.py matches its labels. Shards are written to a
temporary file and renamed, their key list (with the checksums train.py checks) last: a killed run is resumed by
running the same command again, which skips every finished shard and adds checksums to shards written before they
were recorded.
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np
import torch
from timm.data import ImageDataset, resolve_model_data_config
from timm.data.readers.class_map import load_class_map
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models import build_teacher  # noqa: E402
from tokenmix_train.data import check_image_folder, split_folder  # noqa: E402
from tokenmix_train.distributed import run_cli  # noqa: E402
from tokenmix_train.errors import ConfigError, OneLineParser  # noqa: E402
from tokenmix_train.flag_rules import output_problem  # noqa: E402
from tokenmix_train.teacher_maps import (FORMAT, MANIFEST, MapStore, class_names, shard_done, shard_name,  # noqa: E402
                                         shard_record, write_json_atomic, write_shard)

_logger = logging.getLogger('precompute_teacher_maps')
MAX_FP16_INDEX = 2048  # fp16 holds every integer up to 2048 exactly
INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'box', 'hamming', 'lanczos')  # timm's names


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The tool's flags; a bad value is one line naming the flag, exit code 2."""
    parser = OneLineParser(prog='precompute_teacher_maps.py', description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', required=True, metavar='DIR', help='dataset root (ImageFolder splits)')
    parser.add_argument('--split', default='train', help='split folder to run over (default: train)')
    parser.add_argument('--teacher-model', required=True, metavar='NAME', help='timm name of the teacher')
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument('--teacher-checkpoint', default='', metavar='FILE', help='teacher weights file')
    weights.add_argument('--teacher-pretrained', action='store_true', help="timm's pretrained weights")
    parser.add_argument('--num-classes', type=int, default=None,
                        help="teacher classifier size (default: the class count of --class-map, else of the split)")
    parser.add_argument('--class-map', default='', metavar='FILE',
                        help="the teacher's classes in index order, as timm's --class-map it was trained with (.txt: "
                             "a name a line), recorded in the manifest (default: the split's class folders)")
    parser.add_argument('--out', required=True, metavar='STORE', help='output folder of the map store')
    parser.add_argument('--img-size', type=int, default=None,
                        help="teacher input size, whole image resized to N x N (default: the teacher's own)")
    parser.add_argument('--interpolation', default=None, choices=INTERPOLATIONS,
                        help="resize interpolation (default: the teacher's pretrained config, as it was trained)")
    parser.add_argument('--topk', type=int, default=5, help='classes kept per map position (default: 5)')
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=4, help='data loader processes per rank')
    parser.add_argument('--shard-size', type=int, default=10000, help='images per shard file (default: 10000)')
    parser.add_argument('--device', default=None, help='default: cuda:LOCAL_RANK when available, else cpu')
    parser.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'),
                        help='run the teacher under autocast (default: fp32, as the authors\' maps were made; '
                             'scores are stored in fp16 either way)')
    args = parser.parse_args(argv)
    for name in ('topk', 'batch_size', 'shard_size', 'num_classes', 'img_size'):  # the last two: None = default
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.workers < 0:
        parser.error(f'--workers must be >= 0, got {args.workers}')
    return args


def manifest_for(args: argparse.Namespace, classes: Sequence[str], split_dir: str, num_images: int,
                 map_size: Sequence[int], topk: int) -> dict:
    """The store's manifest: what made it (teacher, weights, sizes, k) and what it covers (split, classes, images)."""
    checkpoint = args.teacher_checkpoint
    return dict(
        format=FORMAT, teacher=args.teacher_model,
        weights=('pretrained' if args.teacher_pretrained else
                 dict(file=os.path.basename(checkpoint), bytes=os.path.getsize(checkpoint))),
        img_size=args.img_size, interpolation=args.interpolation, precision=args.amp_dtype or 'float32',
        map_size=list(map_size), topk=topk, coverage='whole', resize='square',
        split=args.split, split_folder=os.path.basename(os.path.normpath(split_dir)), classes=list(classes),
        num_images=num_images, shard_size=args.shard_size, num_shards=-(-num_images // args.shard_size))


def teacher_class_names(class_map: str, split_classes: Sequence[str]) -> List[str]:
    """The names of the teacher's class indices: --class-map's classes in index order, else the split's."""
    if not class_map:
        return list(split_classes)
    if not os.path.isfile(class_map):
        raise ConfigError(f"--class-map '{class_map}': no such file")
    try:
        class_to_idx = load_class_map(class_map)
    except (AssertionError, OSError, ValueError) as e:  # timm asserts on an extension other than .txt / .pkl
        raise ConfigError(f"--class-map '{class_map}': {e}") from None
    if sorted(class_to_idx.values()) != list(range(len(class_to_idx))):
        raise ConfigError(f"--class-map '{class_map}': class indices are not 0..{len(class_to_idx) - 1}, each once")
    return class_names(class_to_idx)


def write_or_check_manifest(out: str, manifest: dict) -> None:
    """A new store gets its manifest; a store being resumed must have been started with the same settings."""
    path = os.path.join(out, MANIFEST)
    if os.path.exists(path):
        old = MapStore.read_manifest(out, '--out')
        changed = [k for k in manifest if old.get(k) != manifest[k]]
        if changed:
            raise ConfigError(f"--out '{out}' holds a store made with other settings ({', '.join(changed)}); "
                              'use another --out or the same flags to resume it')
        return
    write_json_atomic(path, manifest)


def add_checksums(out: str, shards: Sequence[int]) -> int:
    """Record the checksums of finished shards written before they were (computed from their files as they are
    now, so they guard against later changes only); the number of shards given them."""
    added = 0
    for shard in shards:
        path = os.path.join(out, shard_name(shard))
        try:
            with open(path + '.json') as f:
                record = json.load(f)
            if 'keys_sha256' in record:
                continue
            maps, keys = np.load(path + '.npy', mmap_mode='r'), record['keys']
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--out '{out}': {shard_name(shard)} cannot be read ({e}); delete its .npy and .json "
                              'and rerun to remake it') from None
        write_json_atomic(path + '.json', shard_record(maps, keys))
        added += 1
    return added


@torch.no_grad()
def topk_maps(teacher, images: torch.Tensor, k: int) -> np.ndarray:
    """fp16 [B, 2, k, h, w]: the teacher's k best class scores per position and their class indices."""
    values, indices = teacher(images).topk(k, dim=1)
    return torch.stack([values, indices.to(values.dtype)], dim=1).half().cpu().numpy()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write (or finish) the store under --out; this rank's share of the shards when run by torchrun."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    try:
        device = torch.device(args.device or (f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError as e:
        raise ConfigError(f'--device {args.device}: {e}') from None
    problem = output_problem(args.out, '--out')
    if problem:
        raise ConfigError(problem)

    split_dir = split_folder(args.data_dir, args.split, '--split')
    class_to_idx = check_image_folder(split_dir)
    classes = teacher_class_names(args.class_map, class_names(class_to_idx))
    num_classes = args.num_classes or len(classes)
    if len(classes) > num_classes:
        raise ConfigError(f'--num-classes {num_classes}: the teacher\'s class list (--class-map, else the split\'s '
                          f'class folders) names {len(classes)} classes')
    if num_classes > MAX_FP16_INDEX:
        raise ConfigError(f'--num-classes {num_classes}: class indices are stored in fp16, exact up to '
                          f'{MAX_FP16_INDEX} classes')
    if args.teacher_checkpoint and not os.path.isfile(args.teacher_checkpoint):
        raise ConfigError(f"--teacher-checkpoint '{args.teacher_checkpoint}': no such file")
    try:
        teacher = build_teacher(args.teacher_model, checkpoint=args.teacher_checkpoint or None,
                                pretrained=args.teacher_pretrained, num_classes=num_classes,
                                amp_dtype=args.amp_dtype).to(device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f'--teacher-model {args.teacher_model}: {e}') from None
    data_config = resolve_model_data_config(teacher.model)
    args.img_size = args.img_size or data_config['input_size'][-1]
    args.interpolation = args.interpolation or data_config['interpolation']
    dataset = ImageDataset(split_dir, class_map=class_to_idx, transform=transforms.Compose([
        transforms.Resize((args.img_size, args.img_size), interpolation=str_to_interp_mode(args.interpolation)),
        transforms.ToTensor(), transforms.Normalize(data_config['mean'], data_config['std'])]))
    topk = min(args.topk, num_classes)
    map_size = teacher(torch.zeros(1, 3, args.img_size, args.img_size, device=device)).shape[-2:]
    os.makedirs(args.out, exist_ok=True)
    manifest = manifest_for(args, classes, split_dir, len(dataset), map_size, topk)
    write_or_check_manifest(args.out, manifest)

    num_shards = manifest['num_shards']
    mine = range(rank, num_shards, world)
    upgraded = add_checksums(args.out, [s for s in mine if shard_done(args.out, s)])
    if upgraded:
        _logger.info(f'[rank {rank}] checksums added to {upgraded} shards written without them')
    todo = [s for s in mine if not shard_done(args.out, s)]
    _logger.info(f'[rank {rank}/{world}] {len(dataset)} images in {num_shards} shards of {args.shard_size}; '
                 f'{len(todo)} of this rank\'s shards to do; maps {map_size[0]}x{map_size[1]}, top-{topk}, '
                 f'{args.interpolation} resize, {device}')
    start = time.perf_counter()
    done_images = 0
    for count, shard in enumerate(todo, 1):
        first = shard * args.shard_size
        indices = range(first, min(first + args.shard_size, len(dataset)))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=args.batch_size,
                                             num_workers=args.workers, pin_memory=device.type == 'cuda')
        parts = [topk_maps(teacher, images.to(device, non_blocking=True), topk) for images, _ in loader]
        write_shard(args.out, shard, np.concatenate(parts), [dataset.reader.filename(i) for i in indices])
        done_images += len(indices)
        rate = done_images / (time.perf_counter() - start)
        _logger.info(f'[rank {rank}] {shard_name(shard)} written ({count}/{len(todo)}), {rate:.1f} img/s, '
                     f'about {(len(todo) - count) * args.shard_size / rate:.0f} s left')
    finished = sum(shard_done(args.out, s) for s in range(num_shards))
    _logger.info(f'[rank {rank}] done; store {finished}/{num_shards} shards complete')
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main, 'precompute_teacher_maps.py'))
