#!/usr/bin/env python3
"""Target fidelity of teacher weights with top-k own-class maps against the whole map, on demo val images.

    python benchmarks/fidelity_topk.py --data-dir DATA --teacher-checkpoint TEACHER.pth.tar [--topk 1 2 3 5]

The mini table's setting (scripts/mini_table.py): tiny CNN teacher at 32 px, 8 px tokens (4 x 4), token batches
only (no Mixup blend), no label smoothing, weights and true visible shares both normalised to sum 1; the same
masks for every row (one generator seed per batch). Lower is better; 'area' is TokenMix's token-count weights.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mixup_ext import TokenMix  # noqa: E402
from models import build_teacher  # noqa: E402
from tokenmix.fidelity import (fidelity_error, load_demo_objects, normalise_shares, token_paste_masks,  # noqa: E402
                               visible_shares)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', required=True)
    parser.add_argument('--teacher-checkpoint', required=True)
    parser.add_argument('--teacher-model', default='tokenmix_cnn_teacher_64')
    parser.add_argument('--topk', type=int, nargs='+', default=[1, 2, 3, 5])
    parser.add_argument('--images', type=int, default=1000)
    parser.add_argument('-b', '--batch-size', type=int, default=50)
    parser.add_argument('--patch-size', type=int, default=8)
    parser.add_argument('--mask', default='block', choices=('block', 'random'))
    parser.add_argument('--min-tokens', type=int, default=1)
    args = parser.parse_args(argv)
    teacher = build_teacher(args.teacher_model, checkpoint=args.teacher_checkpoint, num_classes=10)
    x_all, y_all, obj_all = load_demo_objects(args.data_dir, 'val', args.images, (0.485, 0.456, 0.406),
                                              (0.229, 0.224, 0.225))
    rows = {'area': None, 'whole map': 0, **{f'top-{k}': k for k in args.topk}}
    errors = {name: [] for name in rows}
    for start in range(0, len(x_all) - args.batch_size + 1, args.batch_size):
        x, y, objects = (t[start:start + args.batch_size] for t in (x_all, y_all, obj_all))
        for name, k in rows.items():
            mixer = TokenMix(mixup_alpha=0., cutmix_alpha=1., label_smoothing=0., num_classes=10,
                             mask_type=args.mask, min_tokens=args.min_tokens, patch_size=args.patch_size,
                             teacher=None if k is None else teacher, teacher_topk=k or 0, target_norm='sum',
                             generator=torch.Generator().manual_seed(start))
            mixer(x.clone(), y)
            shares = normalise_shares(visible_shares(objects, token_paste_masks(mixer.last_mask, args.patch_size)))
            errors[name].append(fidelity_error(mixer.last_weights, shares))
    print(f'{len(x_all)} val images, {args.mask} masks, {args.patch_size} px tokens, batches of {args.batch_size}')
    for name, values in errors.items():
        print(f'{name:<10} {sum(values) / len(values):.4f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
