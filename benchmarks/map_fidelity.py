#!/usr/bin/env python3
"""Which teacher map gives TokenMix label weights closest to the true visible object shares (target fidelity).

    python benchmarks/map_fidelity.py --data-dir DATA --teacher-checkpoint T1.pth.tar [T2.pth.tar ...] \
        [--teacher-img-size 64 0] [--patch-size 4 8 --min-tokens 5 1] [--topk 1 3 5] [--softmax] [--oracle]

Fidelity error as tokenmix_train/mini_table.py defines it: TokenMix's label weights on token batches (no Mixup
blend, no label smoothing) against the true visible shares of the two digits from the demo data's pixel masks, shares
normalised to sum 1, mean absolute difference; lower is better. Weights are normalised to sum 1 too
(``--target-norm sum``, the definition); ``--target-norm none`` keeps the raw teacher weights, which is what a run
trained with BCE (the table's TokenMix rows) has in its mixer. Rows, all on the same masks and image pairs:

* ``area``: token-count weights (TokenMix without a teacher);
* per teacher and input size: ``whole`` (the own-class map, ``--teacher-topk 0``), ``top-K`` (zeroed where the
  class is outside the teacher's top K), ``softmax`` (the own-class channel of the softmax over classes at each
  position; TokenMix has no such option, so this map exists only here, passed to the mixer as ``own_maps``);
* ``oracle``: the digit's pixel mask average-pooled to the teacher's map grid, what a perfect teacher of that
  resolution would give (``--oracle``): the error left by the map's resolution alone.

Teacher maps are computed once per image (the same functions TokenMix uses: ``own_class_maps``,
``truncate_to_topk``) and passed to the mixer per batch, so every row sees identical masks. Each of ``--draws``
draws re-pairs the images (a random order, batches of ``-b``, partner of i is B-1-i, one block mask a batch as in
timm's 'batch' mode); a batch is one unit: the 95% t interval of a row's mean, and of its paired difference to
``area`` (or ``--reference``), is over the draws x batches units. Rows are also split by the quartile of each mixed
image's own digit pixel share (digit pixels / image pixels).
"""
import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the packages of this checkout, also where they are not pip-installed (the GPU machine)
    sys.path.insert(0, ROOT)

from mixup_ext import TokenMix, own_class_maps, truncate_to_topk  # noqa: E402
from models import build_teacher  # noqa: E402
from tokenmix_train.distributed import run_cli  # noqa: E402
from tokenmix_train.errors import ConfigError  # noqa: E402
from tokenmix_train.fidelity import (  # noqa: E402
    fidelity_error, load_demo_objects, normalise_shares, token_paste_masks, visible_shares)
from tokenmix_train.mini_stats import t_interval  # noqa: E402
from tokenmix_train.mixing import mixer_generator  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the demo student's and the tiny teacher's (ImageNet)
QUARTILES = 4


def teacher_maps(teacher: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The teacher's class maps (N x C x h x w) of all images, in batches."""
    return torch.cat([teacher(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def own_maps_of(maps: torch.Tensor, labels: torch.Tensor, topk: Sequence[int],
                softmax: bool) -> Dict[str, torch.Tensor]:
    """Own-class maps (N x h x w) per map kind: 'whole', 'top-K' for each K, and 'softmax' if asked."""
    own = own_class_maps(maps, labels, maps.shape[1])
    out = {'whole': own, **{f'top-{k}': truncate_to_topk(own, maps, k) for k in topk}}
    if softmax:
        out['softmax'] = own_class_maps(maps.softmax(1), labels, maps.shape[1])
    return out


def oracle_maps(objects: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """The digits' pixel masks (N x H x W) average-pooled to `size`: a perfect teacher's map at that resolution."""
    return F.adaptive_avg_pool2d(objects.float()[:, None], size)[:, 0]


def object_pixel_share(objects: torch.Tensor) -> torch.Tensor:
    """Share of each image's pixels that belong to its digit (N,)."""
    return objects.flatten(1).float().mean(1)


def quartile_of(values: torch.Tensor) -> Tuple[torch.Tensor, List[float]]:
    """Quartile index (0-3) of each value and the 5 edges (min, 25%, 50%, 75%, max)."""
    edges = torch.quantile(values.double(), torch.linspace(0, 1, QUARTILES + 1, dtype=torch.float64))
    index = torch.bucketize(values.double(), edges[1:-1], right=True)
    return index, edges.tolist()


def measure(labels: torch.Tensor, objects: torch.Tensor, maps: Dict[str, Optional[torch.Tensor]], *,
            patch_size: int, min_tokens: int, mask_type: str = 'block', target_norm: str = 'sum', draws: int = 10,
            batch_size: int = 50, seed: int = 0, quartile: Optional[torch.Tensor] = None) -> Dict[str, np.ndarray]:
    """Fidelity error per row and batch unit: {row: array (draws x batches, 1 + QUARTILES)}.

    `maps` holds each row's own-class maps for all images (None: area weights). Column 0 is the batch's error,
    column 1 + q the error over the batch's images of quartile q (`quartile`, N ints; NaN when none is there).
    All rows share each unit's image order and mask (the same generator seed).
    """
    n = len(labels)
    batches = n // batch_size
    if batch_size < 2 or batch_size % 2 or batches == 0:
        raise ValueError(f'batch size must be even, >= 2 and at most the {n} images, got {batch_size}')
    quartile = torch.zeros(n, dtype=torch.long) if quartile is None else quartile
    num_classes = int(labels.max()) + 1
    out = {name: np.full((draws * batches, 1 + QUARTILES), np.nan) for name in maps}
    for draw in range(draws):
        order = torch.from_numpy(np.random.default_rng([seed, draw]).permutation(n))
        for b in range(batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            dummy = torch.zeros(batch_size, 3, *objects.shape[-2:])  # pixels do not enter the weights
            for name, own in maps.items():
                mixer = TokenMix(mixup_alpha=0., cutmix_alpha=1., label_smoothing=0., num_classes=num_classes,
                                 mask_type=mask_type, min_tokens=min_tokens, patch_size=patch_size,
                                 target='area' if own is None else 'auto', target_norm=target_norm,
                                 generator=mixer_generator(seed, draw * batches + b))
                mixer(dummy.clone(), labels[idx], own_maps=None if own is None else own[idx])
                shares = normalise_shares(visible_shares(objects[idx], token_paste_masks(mixer.last_mask,
                                                                                         patch_size)))
                row = out[name][draw * batches + b]
                row[0] = fidelity_error(mixer.last_weights, shares)
                for q in range(QUARTILES):
                    sel = quartile[idx] == q
                    if sel.any():
                        row[1 + q] = fidelity_error(mixer.last_weights[sel], shares[sel])
    return out


def cell(values: np.ndarray) -> str:
    """'mean ± 95% half-width' over the finite values."""
    mean, half = t_interval(values[np.isfinite(values)].tolist())
    return f'{mean:.4f} ± {half:.4f}'


def diff_cell(values: np.ndarray, base: np.ndarray) -> str:
    """Paired difference to `base` over the units where both are finite, '+mean ± half-width', '*' if it excludes 0."""
    d = values - base
    mean, half = t_interval(d[np.isfinite(d)].tolist())
    return f'{mean:+.4f} ± {half:.4f}' + ('*' if abs(mean) > half else '')


def report(results: Dict[str, np.ndarray], edges: List[float], reference: str = 'area') -> str:
    """Markdown: each row's error and paired difference to `reference`, overall and per digit pixel-share quartile."""
    ranges = [f'Q{q + 1} {100 * edges[q]:.0f}-{100 * edges[q + 1]:.0f}%' for q in range(QUARTILES)]
    header = ['row', 'error', f'vs {reference}'] + ranges
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    base = results[reference]
    for name, values in results.items():
        per_q = [cell(values[:, 1 + q]) if name == reference else diff_cell(values[:, 1 + q], base[:, 1 + q])
                 for q in range(QUARTILES)]
        lines.append('| ' + ' | '.join([name, cell(values[:, 0]),
                                         '—' if name == reference else diff_cell(values[:, 0], base[:, 0])] + per_q)
                     + ' |')
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', required=True, help='demo data (tools/make_demo_data.py) with object masks')
    parser.add_argument('--teacher-checkpoint', nargs='+', default=[], help='one or more teacher checkpoints')
    parser.add_argument('--teacher-model', default='tokenmix_cnn_teacher_64')
    parser.add_argument('--teacher-img-size', type=int, nargs='+', default=[64],
                        help='input sizes for the teacher (0: the images as stored); default 64, the mini table\'s')
    parser.add_argument('--topk', type=int, nargs='*', default=[1, 3, 5])
    parser.add_argument('--softmax', action='store_true', help='add the softmax-over-classes own-class map')
    parser.add_argument('--oracle', action='store_true', help='add the digit masks pooled to each teacher map grid')
    parser.add_argument('--images', type=int, default=1000, help='val images (evenly over classes)')
    parser.add_argument('--draws', type=int, default=10, help='re-pairings of the images, each with new masks')
    parser.add_argument('-b', '--batch-size', type=int, default=50)
    parser.add_argument('--patch-size', type=int, nargs='+', default=[4], help='token sizes in pixels')
    parser.add_argument('--min-tokens', type=int, nargs='+', default=[5], help='one per --patch-size')
    parser.add_argument('--mask', default='block', choices=('block', 'random'))
    parser.add_argument('--target-norm', default='sum', choices=('sum', 'none'))
    parser.add_argument('--reference', default='area',
                        help="the row every other is compared with, paired (default: area; or a row name as printed, "
                             "e.g. 'teacher/model_best@64px whole')")
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.min_tokens) != len(args.patch_size):
        parser.error(f'--min-tokens needs one value per --patch-size ({len(args.patch_size)}), '
                     f'got {len(args.min_tokens)}')
    if args.batch_size < 2 or args.batch_size % 2 or args.images < args.batch_size:
        parser.error(f'-b/--batch-size must be even, >= 2 and at most --images {args.images}, got {args.batch_size}')
    if args.draws < 2:
        parser.error(f'--draws must be >= 2 (an interval needs two units), got {args.draws}')
    if any(k < 1 for k in args.topk) or any(s < 0 for s in args.teacher_img_size):
        parser.error('--topk values must be >= 1 and --teacher-img-size values >= 0')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the fidelity table of every row; bad input raises ConfigError (one line via `run_cli`)."""
    args = parse_args(argv)
    try:
        images, labels, objects = load_demo_objects(args.data_dir, 'val', args.images, MEAN, STD)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f'--data-dir: {e}') from None
    share = object_pixel_share(objects)
    quartile, edges = quartile_of(share)
    print(f'{len(labels)} val images of {args.data_dir}; digit pixel share: mean {share.mean():.3f}, '
          f'min / quartile edges / max ' + ' / '.join(f'{e:.3f}' for e in edges))
    maps: Dict[str, Optional[torch.Tensor]] = {'area': None}
    for path in args.teacher_checkpoint:
        for size in args.teacher_img_size:
            try:
                teacher = build_teacher(args.teacher_model, checkpoint=path, num_classes=10, img_size=size or None)
            except (ValueError, FileNotFoundError, RuntimeError) as e:
                raise ConfigError(f'--teacher-checkpoint {path}: {e}') from None
            full = teacher_maps(teacher, images, args.batch_size)
            top1 = (full.mean((2, 3)).argmax(1) == labels).float().mean().item()
            stem = os.path.basename(path).split('.')[0]
            tag = f'{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{stem}@{size or images.shape[-1]}px'
            print(f'teacher {tag} ({path}): {full.shape[-2]}x{full.shape[-1]} maps, top-1 of the pooled maps '
                  f'{100 * top1:.1f}%')
            maps.update({f'{tag} {k}': v for k, v in own_maps_of(full, labels, args.topk, args.softmax).items()})
            if args.oracle and f'oracle {full.shape[-2]}x{full.shape[-1]}' not in maps:
                maps[f'oracle {full.shape[-2]}x{full.shape[-1]}'] = oracle_maps(objects, full.shape[-2:])
    if args.reference not in maps:
        raise ConfigError(f"--reference '{args.reference}' is not a row (rows: {', '.join(maps)})")
    for patch, min_tokens in zip(args.patch_size, args.min_tokens):
        results = measure(labels, objects, maps, patch_size=patch, min_tokens=min_tokens, mask_type=args.mask,
                          target_norm=args.target_norm, draws=args.draws, batch_size=args.batch_size, seed=args.seed,
                          quartile=quartile)
        units = len(results['area'])
        grid = images.shape[-1] // patch
        print(f'\n{args.mask} masks, {patch} px tokens ({grid}x{grid}), min_tokens {min_tokens}, weights '
              f'normalised: {args.target_norm}; {args.draws} draws x {units // args.draws} batches of '
              f'{args.batch_size} = {units} units; mean ± 95% t half-width; * = interval excludes 0; quartile '
              f'columns: error of {args.reference}, then each row minus it, on the images of that digit pixel-share '
              f'quartile')
        print(report(results, edges, args.reference))
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main, 'map_fidelity.py'))
