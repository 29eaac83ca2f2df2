#!/usr/bin/env python3
"""Write the "cluttered digits" demo dataset: an ImageFolder that needs no download.

scikit-learn's handwritten digits (8x8, upscaled) are pasted in a random colour at a random place on a dimmed
crop of one of scikit-learn's two sample photographs, over a few distracting fragments cut from other digits.
Train and val images come from disjoint sets of source digits. Besides ``train/<class>/*.png`` and
``val/<class>/*.png`` the tool writes, for every image, the digit's box and pixel mask (``objects.json`` and
``object_masks.npz``), so later checks can measure how much of the digit a token mask leaves visible.
The output is a pure function of the arguments (same seed, same bytes).
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

NUM_CLASSES = 10
VAL_SOURCE_SHARE = 0.25  # share of each class's source digits kept for val images


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, metavar='DIR',
                        help='output folder (created; must be empty if it exists)')
    parser.add_argument('--size', type=int, default=64, help='image side in pixels (default: 64)')
    parser.add_argument('--train-per-class', type=int, default=500, metavar='N', help='train images per class')
    parser.add_argument('--val-per-class', type=int, default=100, metavar='M', help='val images per class')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default: 0)')
    parser.add_argument('--digit-scale', type=float, nargs=2, default=(0.6, 0.85), metavar=('MIN', 'MAX'),
                        help='digit side as a share of the image side (default: 0.6 0.85)')
    parser.add_argument('--dim', type=float, nargs=2, default=(0.2, 0.5), metavar=('MIN', 'MAX'),
                        help='background brightness factor range (default: 0.2 0.5)')
    parser.add_argument('--fragments', type=int, default=2, help='distracting fragments per image (default: 2)')
    args = parser.parse_args(argv)
    if args.size < 16:
        parser.error(f'--size must be at least 16, got {args.size}')
    if args.train_per_class < 1 or args.val_per_class < 1:
        parser.error('--train-per-class and --val-per-class must be at least 1')
    lo, hi = args.digit_scale
    if not 0.1 <= lo <= hi <= 1.0:
        parser.error(f'--digit-scale needs 0.1 <= MIN <= MAX <= 1, got {lo} {hi}')
    lo, hi = args.dim
    if not 0.0 <= lo <= hi <= 1.0:
        parser.error(f'--dim needs 0 <= MIN <= MAX <= 1, got {lo} {hi}')
    if args.fragments < 0:
        parser.error(f'--fragments must be >= 0, got {args.fragments}')
    if os.path.isdir(args.out) and os.listdir(args.out):
        parser.error(f'--out {args.out} exists and is not empty')
    return args


def load_sources() -> Tuple[np.ndarray, np.ndarray, List[np.ndarray]]:
    """Digit images scaled to [0, 1] (N x 8 x 8), their labels, and the sample photographs (H x W x 3 uint8)."""
    from sklearn.datasets import load_digits, load_sample_images
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64), load_sample_images().images


def split_sources(labels: np.ndarray, rng: np.random.Generator) -> Dict[str, List[np.ndarray]]:
    """Per class, disjoint source-digit indices for train and val."""
    out: Dict[str, List[np.ndarray]] = {'train': [], 'val': []}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, int(round(len(idx) * VAL_SOURCE_SHARE)))
        out['val'].append(np.sort(idx[:n_val]))
        out['train'].append(np.sort(idx[n_val:]))
    return out


def upscale(digit: np.ndarray, side: int) -> np.ndarray:
    """8x8 digit in [0, 1] to side x side alpha in [0, 1] (bicubic, so strokes are smooth)."""
    img = Image.fromarray((digit * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A bright, saturated RGB colour in [0, 1]."""
    colour = rng.uniform(0.0, 0.5, size=3)
    colour[rng.integers(3)] = 1.0
    colour[rng.integers(3)] = rng.uniform(0.7, 1.0)
    return colour.astype(np.float32)


def background(photos: List[np.ndarray], size: int, dim: Tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A dimmed random crop of a sample photograph, size x size x 3 in [0, 1]."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.integers(size, min(h, w, 4 * size) + 1))
    y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
    return np.asarray(crop, dtype=np.float32) / 255.0 * rng.uniform(*dim)


def paste(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, y: int, x: int) -> None:
    """Alpha-blend a solid colour through `alpha` onto canvas at (y, x), in place."""
    h, w = alpha.shape
    region = canvas[y:y + h, x:x + w]
    region *= 1.0 - alpha[..., None]
    region += alpha[..., None] * colour


def fragment(digits: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A stroke fragment: a random quarter-to-half crop of an upscaled digit, never a whole digit."""
    side = int(size * rng.uniform(0.45, 0.7))
    full = upscale(digits[rng.integers(len(digits))], side)
    fh, fw = int(side * rng.uniform(0.3, 0.5)), int(side * rng.uniform(0.3, 0.5))
    y, x = int(rng.integers(side - fh + 1)), int(rng.integers(side - fw + 1))
    return full[y:y + fh, x:x + fw]


def make_image(digit: np.ndarray, digits: np.ndarray, photos: List[np.ndarray], args: argparse.Namespace,
               rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """One image (uint8 H x W x 3), the digit's pixel mask (bool H x W) and its box [x0, y0, x1, y1)."""
    size = args.size
    canvas = background(photos, size, tuple(args.dim), rng)
    for _ in range(args.fragments):
        piece = fragment(digits, size, rng)
        fh, fw = piece.shape
        paste(canvas, piece, random_colour(rng), int(rng.integers(size - fh + 1)), int(rng.integers(size - fw + 1)))
    side = int(round(size * rng.uniform(*args.digit_scale)))
    alpha = upscale(digit, side)
    y, x = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
    paste(canvas, alpha, random_colour(rng), y, x)
    mask = np.zeros((size, size), dtype=bool)
    mask[y:y + side, x:x + side] = alpha > 0.25
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    return (np.clip(canvas, 0.0, 1.0) * 255).round().astype(np.uint8), mask, box


def write_split(split: str, sources: List[np.ndarray], per_class: int, digits: np.ndarray, labels: np.ndarray,
                photos: List[np.ndarray], args: argparse.Namespace, rng: np.random.Generator):
    """Write one split's images; return its object records and stacked masks."""
    records, masks = [], []
    for c in range(NUM_CLASSES):
        os.makedirs(os.path.join(args.out, split, str(c)), exist_ok=True)
        for i in range(per_class):
            src = int(sources[c][rng.integers(len(sources[c]))])
            img, mask, box = make_image(digits[src], digits, photos, args, rng)
            rel = f'{split}/{c}/{i:05d}.png'
            Image.fromarray(img).save(os.path.join(args.out, rel), compress_level=1)
            records.append(dict(file=rel, label=int(labels[src]), source_digit=src, box=box, mask_index=len(masks)))
            masks.append(mask)
    return records, np.stack(masks)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    digits, labels, photos = load_sources()
    sources = split_sources(labels, rng)
    objects, masks = {}, {}
    for split, per_class in (('train', args.train_per_class), ('val', args.val_per_class)):
        objects[split], masks[split] = write_split(
            split, sources[split], per_class, digits, labels, photos, args, rng)
    meta = dict(size=args.size, seed=args.seed, digit_scale=list(args.digit_scale), dim=list(args.dim),
                fragments=args.fragments, box_format='x0 y0 x1 y1 (pixels, end exclusive)',
                masks='object_masks.npz: one bool array per split, row = mask_index', **objects)
    with open(os.path.join(args.out, 'objects.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    np.savez_compressed(os.path.join(args.out, 'object_masks.npz'), **masks)
    print(f'wrote {len(objects["train"])} train and {len(objects["val"])} val images to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
