#!/usr/bin/env python3
"""Write an ImageNet-like ImageFolder of JPEG files, for measuring the input pipeline on real decode work.

    python tools/make_jpeg_data.py --out output/jpeg_data --images 800 [--classes 10] [--val-images 20]
        [--seed 0] [--quality 90]

Sizes follow ImageNet's train split: mostly 500 x 375, 375 x 500 and 500 x 333, some up to 640 x 480 and some
smaller. The content is textured so that a file costs what a photograph costs to decode (libjpeg's work grows
with the coded bits): smooth colour noise at several scales, a few filled shapes, fine grain; at quality 90
(4:2:0 chroma, Pillow's default) a 500 x 375 image takes about 110 KB, near ImageNet's mean file size.
Every image is a pure function of (seed, index): the same flags write the same bytes.
"""
import argparse
import os
import shutil
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

# (width, height) and how often each occurs, roughly ImageNet's train split.
SIZES: Tuple[Tuple[Tuple[int, int], float], ...] = (
    ((500, 375), 0.40), ((375, 500), 0.12), ((500, 333), 0.14), ((333, 500), 0.04), ((500, 500), 0.06),
    ((640, 480), 0.06), ((480, 640), 0.02), ((500, 400), 0.06), ((400, 300), 0.05), ((300, 225), 0.03),
    ((250, 250), 0.02),
)
GRAIN = 24.0  # standard deviation of the fine grain, in 8-bit levels


def draw_size(rng: np.random.Generator) -> Tuple[int, int]:
    """One (width, height) drawn from SIZES."""
    weights = np.array([w for _, w in SIZES])
    return SIZES[rng.choice(len(SIZES), p=weights / weights.sum())][0]


def _smooth_noise(rng: np.random.Generator, size: Tuple[int, int]) -> np.ndarray:
    """Colour noise summed over octaves (cells of 1/4 down to 1/64 of the image), float H x W x 3 around 0."""
    width, height = size
    out = np.zeros((height, width, 3), np.float32)
    for octave, amplitude in enumerate((70.0, 40.0, 24.0, 14.0, 10.0, 12.0)):
        cells = 4 * 2 ** octave
        coarse = rng.normal(0.0, 1.0, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        layer = np.stack([np.asarray(Image.fromarray(coarse[..., c], mode='F').resize(size, Image.BICUBIC))
                          for c in range(3)], axis=-1)
        out += amplitude * layer
    return out


def make_image(rng: np.random.Generator, size: Tuple[int, int]) -> Image.Image:
    """A textured RGB image of `size` (width, height): smooth noise, 3-8 shapes, grain."""
    width, height = size
    base = rng.uniform(60, 190, 3).astype(np.float32) + _smooth_noise(rng, size)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(image, np.float32) + rng.normal(0.0, GRAIN, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_image_folder(out: str, images: int, classes: int = 10, val_images: int = 0, seed: int = 0,
                       quality: int = 90) -> List[str]:
    """Write `out/train/<class>/*.JPEG` (`images` in all, classes taking turns) and `out/val/...` (`val_images`).

    Returns the train files' paths in writing order. `out` must not hold a train or val folder yet.
    """
    paths = []
    for split, count, offset in (('train', images, 0), ('val', val_images, images)):
        for index in range(count):
            folder = os.path.join(out, split, f'class{index % classes:04d}')
            os.makedirs(folder, exist_ok=True)
            rng = np.random.default_rng([seed, offset + index])
            path = os.path.join(folder, f'img{index:06d}.JPEG')
            make_image(rng, draw_size(rng)).save(path, quality=quality)
            if split == 'train':
                paths.append(path)
    return paths


def ensure_image_folder(out: str, images: int, classes: int = 10, val_images: int = 0, seed: int = 0,
                        quality: int = 90) -> str:
    """`out`, written by :func:`write_image_folder` unless it exists: built under `out.partial` and renamed, so a
    killed run never leaves a half-written folder that a later run would take for a finished one."""
    if not os.path.isdir(out):
        partial = out.rstrip(os.sep) + '.partial'
        shutil.rmtree(partial, ignore_errors=True)
        write_image_folder(partial, images, classes, val_images, seed, quality)
        os.replace(partial, out)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, metavar='DIR', help='output folder (must not exist)')
    parser.add_argument('--images', type=int, default=800, metavar='N', help='train images (default: 800)')
    parser.add_argument('--classes', type=int, default=10, help='class folders (default: 10)')
    parser.add_argument('--val-images', type=int, default=20, metavar='N', help='val images (default: 20)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default: 0)')
    parser.add_argument('--quality', type=int, default=90, help='JPEG quality (default: 90)')
    args = parser.parse_args(argv)
    if args.images < 1 or args.classes < 1 or args.val_images < 0:
        parser.error('--images and --classes must be at least 1, --val-images at least 0')
    if not 1 <= args.quality <= 100:
        parser.error(f'--quality must be within 1..100, got {args.quality}')
    if os.path.exists(args.out):
        parser.error(f'--out {args.out} exists')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    ensure_image_folder(args.out, args.images, args.classes, args.val_images, args.seed, args.quality)
    print(f'wrote {args.images} train and {args.val_images} val JPEG files to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
