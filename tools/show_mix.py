#!/usr/bin/env python3
"""TokenMix in pictures (the paper's Figure 1 kind): pairs, token masks, mixed images and their label weights.

One row per pair of demo images (tools/make_demo_data.py): image A, its partner B, the token mask (white = token
taken from B), the mixed image, and a bar chart of A's and B's label weights: by token area (what CutMix gives),
by the teacher's activation maps (when --teacher-checkpoint is given), and the true visible share of each digit
from the saved pixel masks (normalised to sum 1, like the weights). Writes one PNG.

    python tools/show_mix.py --data-dir output/demo/data --teacher-checkpoint output/demo/teacher/model_best.pth.tar \
        --out docs/tokenmix_mix.png
"""
import argparse
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mixup_ext import TokenMix, area_weights  # noqa: E402
from models import build_teacher  # noqa: E402
from tokenmix_train.fidelity import load_demo_objects, normalise_shares, token_paste_masks, visible_shares  # noqa: E402
from tokenmix_train.pictures import render_png  # noqa: E402

BAR_COLOURS = ('tab:orange', 'tab:blue')  # own label (A), partner label (B)
COLUMNS = ('image A', 'partner B', 'token mask\n(white: tokens from B)', 'mixed image', 'label weights')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', required=True, help='demo data written by tools/make_demo_data.py')
    parser.add_argument('--split', default='val', help='split to draw images from (default: val)')
    parser.add_argument('--pairs', type=int, default=4, help='pairs (rows) to show (default: 4)')
    parser.add_argument('--patch-size', type=int, default=4, help='token size in pixels (default: 4, the mini table\'s)')
    parser.add_argument('--min-tokens', type=int, default=5, help='TokenMix min_tokens (default: 5, the mini table\'s)')
    parser.add_argument('--mask', default='block', choices=('block', 'random'), help='token mask type')
    parser.add_argument('--teacher-model', default='tokenmix_cnn_teacher_64', help='timm name of the teacher')
    parser.add_argument('--teacher-checkpoint', default='', help='teacher weights; without them no teacher bars')
    parser.add_argument('--teacher-img-size', type=int, default=None,
                        help='teacher input size (default: the image size; the mini table\'s teacher: 64)')
    parser.add_argument('--num-classes', type=int, default=10, help='classes of the teacher (default: 10)')
    parser.add_argument('--seed', type=int, default=0, help='mask seed (default: 0)')
    parser.add_argument('--out', required=True, help='PNG file to write')
    args = parser.parse_args(argv)
    for name in ('pairs', 'patch_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.teacher_checkpoint and not os.path.isfile(args.teacher_checkpoint):
        parser.error(f'--teacher-checkpoint {args.teacher_checkpoint}: no such file')
    return args


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised B x 3 x H x W images back to [0, 1]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def weight_bars(ax, groups: List[tuple]) -> None:
    """Per group (name, (w_A, w_B)) two bars on a 0..1 scale: A's own label (orange) and the partner's (blue)."""
    x = np.arange(len(groups))
    for k, who in enumerate(('own label (A)', 'partner label (B)')):
        ax.bar(x + (k - 0.5) * 0.38, [float(w[k]) for _, w in groups], width=0.38, color=BAR_COLOURS[k], label=who)
    ax.set_xticks(x, [name for name, _ in groups], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_yticks([0, 0.5, 1])
    ax.tick_params(axis='y', labelsize=7)


def render(args: argparse.Namespace) -> Figure:
    """The picture: one row per pair, the five columns of COLUMNS, a legend for the bars."""
    images, labels, objects = load_demo_objects(args.data_dir, args.split, 2 * args.pairs, IMAGENET_DEFAULT_MEAN,
                                                IMAGENET_DEFAULT_STD)
    if len(images) < 2 * args.pairs:
        raise ValueError(f'--pairs {args.pairs} needs {2 * args.pairs} images, the split has {len(images)}')
    teacher = None
    if args.teacher_checkpoint:
        teacher = build_teacher(args.teacher_model, checkpoint=args.teacher_checkpoint,
                                num_classes=args.num_classes, img_size=args.teacher_img_size,
                                student_mean=IMAGENET_DEFAULT_MEAN, student_std=IMAGENET_DEFAULT_STD)
    mixer = TokenMix(mixup_alpha=0., cutmix_alpha=1., label_smoothing=0., mode='pair', num_classes=args.num_classes,
                     mask_type=args.mask, min_tokens=args.min_tokens, patch_size=args.patch_size,
                     teacher=teacher, target='teacher' if teacher else 'area', target_norm='sum',
                     generator=torch.Generator().manual_seed(args.seed))
    mixed, _ = mixer(images.clone(), labels)
    paste = token_paste_masks(mixer.last_mask, args.patch_size)
    true = normalise_shares(visible_shares(objects, paste))
    area = area_weights(mixer.last_mask)
    fig = Figure(figsize=(1.6 * len(COLUMNS), 1.6 * args.pairs + 1.1))
    axes = fig.subplots(args.pairs, len(COLUMNS), squeeze=False)
    for i in range(args.pairs):
        j = len(images) - 1 - i
        cells = (to_pixels(images[i:i + 1])[0], to_pixels(images[j:j + 1])[0], paste[i].float().expand(3, -1, -1),
                 to_pixels(mixed[i:i + 1])[0])
        for ax, cell in zip(axes[i], cells):
            ax.imshow(cell.permute(1, 2, 0).numpy(), interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(f'digit {int(labels[i])}', fontsize=9)
        axes[i][1].set_ylabel(f'digit {int(labels[j])}', fontsize=9)
        groups = [('area', area[i])] + ([('teacher', mixer.last_weights[i])] if teacher else []) + [('true', true[i])]
        weight_bars(axes[i][4], groups)
    for ax, title in zip(axes[0], COLUMNS):
        ax.set_title(title, fontsize=9)
    handles, names = axes[0][4].get_legend_handles_labels()
    fig.legend(handles, names, loc='lower center', ncol=2, fontsize=8, frameon=False)
    fig.text(0.5, 0.055, 'weights by token area (what CutMix gives), by the teacher\'s class maps, and the true '
             'visible share of each digit', ha='center', fontsize=7)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if render_png(lambda: render(args), args.out, 'show_mix.py') is None:
        return 2
    print(f'wrote {args.out} ({args.pairs} pairs)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
