#!/usr/bin/env python3
"""The table of scripts/mini_table.sh: top-1 (clean, occluded) over seeds and target fidelity per method.

Reads OUT/runs/<method>-s<seed>/ (train.py's args.yaml, validate.py's validate.csv), measures each run's target
fidelity on demo val images with the mixer its flags build, prints a Markdown table and writes it to OUT/table.md.

Target fidelity is measured on the region branch (CutMix boxes for timm Mixup, token masks for TokenMix; a Mixup
blend has no paste mask): label weights, as the run's mixer computes them without label smoothing, against the
true visible shares of the two digits from the saved pixel masks, both normalised to sum 1 (every row here
trains with soft-target cross-entropy, whose targets sum to 1). Lower is better.
"""
import argparse
import copy
import csv
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from timm.data import resolve_data_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tokenmix.args import parse_args as parse_train_args  # noqa: E402
from tokenmix.fidelity import (fidelity_error, indicator_batch, load_demo_objects, normalise_shares,  # noqa: E402
                               paste_masks_from_indicator, token_paste_masks, visible_shares,
                               weights_from_indicator_targets)
from tokenmix.mixing import build_mixer, build_teacher_from_args, mixer_generator  # noqa: E402
from tokenmix.model import build_student, patch_size_of  # noqa: E402

METHODS = {
    'a_mixup_cutmix': '(a) timm Mixup + CutMix',
    'b_tokenmix_area': '(b) TokenMix, area targets',
    'c_tokenmix_teacher': '(c) TokenMix, teacher targets (block)',
    'd_tokenmix_teacher_random': '(d) TokenMix, teacher targets (random)',
}


def run_fidelity(run_dir: str, data_dir: str, images: int, batch_size: int) -> float:
    """Target fidelity error of one run's mixer on `images` demo val images (mean over batches)."""
    args = parse_train_args(['-c', os.path.join(run_dir, 'args.yaml'), '--data-dir', data_dir])
    model = build_student(args, 10)
    config = resolve_data_config(vars(args), model=model)
    token_size = args.tokenmix_patch_size or patch_size_of(model) or 16
    x_all, y_all, obj_all = load_demo_objects(data_dir, 'val', images, config['mean'], config['std'])
    probe = copy.copy(args)  # the region branch on every batch, weights without smoothing
    probe.mixup, probe.mixup_prob, probe.smoothing = 0.0, 1.0, 0.0
    teacher = build_teacher_from_args(args, 10, config['mean'], config['std'], torch.device('cpu'))
    np.random.seed(args.seed)  # timm's Mixup draws from numpy's global generator
    errors = []
    for start in range(0, len(x_all) - batch_size + 1, batch_size):
        x, y, objects = (t[start:start + batch_size] for t in (x_all, y_all, obj_all))
        if args.tokenmix:
            mixer = build_mixer(probe, 10, token_size, teacher, mixer_generator(args.seed, start))
            mixer(x.clone(), y)
            paste, weights = token_paste_masks(mixer.last_mask, token_size), mixer.last_weights
        else:
            mixer = build_mixer(probe, len(x), token_size, None, mixer_generator(args.seed, start))
            mixed, targets = mixer(indicator_batch(len(x), x.shape[-2], x.shape[-1]), torch.arange(len(x)))
            paste, weights = paste_masks_from_indicator(mixed), weights_from_indicator_targets(targets)
        errors.append(fidelity_error(weights, normalise_shares(visible_shares(objects, paste))))
    if not errors:
        raise ValueError(f'--fidelity-images {images} is less than one batch of {batch_size}')
    return float(np.mean(errors))


def read_top1(run_dir: str) -> Dict[float, float]:
    with open(os.path.join(run_dir, 'validate.csv')) as f:
        return {float(r['occlusion']): float(r['top1']) for r in csv.DictReader(f)}


def mean_spread(values: List[float], digits: int) -> str:
    """'mean ± sample std' (just the value for one seed)."""
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}'


def build_table(out: str, data_dir: str, images: int, batch_size: int, occlusions: Sequence[float]) -> str:
    runs_dir = os.path.join(out, 'runs')
    header = ['method', 'seeds', 'clean top-1'] + [f'top-1 occl. {r:g}' for r in occlusions] + ['fidelity error']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for key, label in METHODS.items():
        runs = sorted(d for d in os.listdir(runs_dir) if d.rsplit('-s', 1)[0] == key)
        if not runs:
            continue
        top1 = [read_top1(os.path.join(runs_dir, r)) for r in runs]
        fid = [run_fidelity(os.path.join(runs_dir, r), data_dir, images, batch_size) for r in runs]
        cells = [label, str(len(runs)), mean_spread([t[0.0] for t in top1], 1)]
        cells += [mean_spread([t[r] for t in top1], 1) for r in occlusions]
        cells.append(mean_spread(fid, 3))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, help='the mini-table folder (holds runs/)')
    parser.add_argument('--data-dir', required=True, help='the demo data the runs used')
    parser.add_argument('--fidelity-images', type=int, default=1000, help='val images for target fidelity')
    parser.add_argument('--fidelity-batch', type=int, default=50, help='images per mixed batch (even)')
    parser.add_argument('--occlusion', type=float, nargs='+', default=[0.25, 0.5], help='occlusion columns')
    args = parser.parse_args(argv)
    if args.fidelity_batch < 2 or args.fidelity_batch % 2:
        parser.error(f'--fidelity-batch must be even and >= 2, got {args.fidelity_batch}')
    if not os.path.isdir(os.path.join(args.out, 'runs')):
        parser.error(f'--out {args.out} has no runs/ folder')
    table = build_table(args.out, args.data_dir, args.fidelity_images, args.fidelity_batch, args.occlusion)
    with open(os.path.join(args.out, 'table.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
