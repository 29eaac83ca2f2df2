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
import torch.nn.functional as F
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mixup_ext import TokenMix, area_weights  # noqa: E402
from models import build_teacher  # noqa: E402
from tokenmix.fidelity import load_demo_objects, normalise_shares, token_paste_masks, visible_shares  # noqa: E402
from tokenmix.pictures import render_png  # noqa: E402

BAR_COLOURS = ((230, 120, 40), (60, 130, 230))  # own label (A), partner label (B)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', required=True, help='demo data written by tools/make_demo_data.py')
    parser.add_argument('--split', default='val', help='split to draw images from (default: val)')
    parser.add_argument('--pairs', type=int, default=4, help='pairs (rows) to show (default: 4)')
    parser.add_argument('--patch-size', type=int, default=8, help='token size in pixels (default: 8)')
    parser.add_argument('--min-tokens', type=int, default=1, help='TokenMix min_tokens (default: 1, the demo\'s)')
    parser.add_argument('--mask', default='block', choices=('block', 'random'), help='token mask type')
    parser.add_argument('--teacher-model', default='tokenmix_cnn_teacher_64', help='timm name of the teacher')
    parser.add_argument('--teacher-checkpoint', default='', help='teacher weights; without them no teacher bars')
    parser.add_argument('--num-classes', type=int, default=10, help='classes of the teacher (default: 10)')
    parser.add_argument('--scale', type=int, default=4, help='pixel upscaling of every cell (default: 4)')
    parser.add_argument('--seed', type=int, default=0, help='mask seed (default: 0)')
    parser.add_argument('--out', required=True, help='PNG file to write')
    args = parser.parse_args(argv)
    for name in ('pairs', 'patch_size', 'scale'):
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


def weight_chart(groups: List[tuple], side: int) -> torch.Tensor:
    """A side x side bar chart: per group (name, (w_A, w_B)) two bars, A orange and B blue, scale 0..1."""
    img = Image.new('RGB', (side, side), 'white')
    draw = ImageDraw.Draw(img)
    top, bottom = 4, side - 14
    slot = side / len(groups)
    for g, (name, (w_a, w_b)) in enumerate(groups):
        x0 = g * slot + slot * 0.15
        bar = slot * 0.33
        for k, w in enumerate((w_a, w_b)):
            h = (bottom - top) * max(0.0, min(1.0, float(w)))
            left = x0 + k * bar
            draw.rectangle([left, bottom - h, left + bar - 2, bottom], fill=BAR_COLOURS[k])
        draw.text((g * slot + 2, bottom + 2), name, fill='black')
    draw.line([0, bottom, side, bottom], fill='black')
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def render(args: argparse.Namespace) -> torch.Tensor:
    """The picture as a 3 x H x W tensor in [0, 1]."""
    images, labels, objects = load_demo_objects(args.data_dir, args.split, 2 * args.pairs, IMAGENET_DEFAULT_MEAN,
                                                IMAGENET_DEFAULT_STD)
    if len(images) < 2 * args.pairs:
        raise ValueError(f'--pairs {args.pairs} needs {2 * args.pairs} images, the split has {len(images)}')
    teacher = None
    if args.teacher_checkpoint:
        teacher = build_teacher(args.teacher_model, checkpoint=args.teacher_checkpoint,
                                num_classes=args.num_classes,
                                student_mean=IMAGENET_DEFAULT_MEAN, student_std=IMAGENET_DEFAULT_STD)
    mixer = TokenMix(mixup_alpha=0., cutmix_alpha=1., label_smoothing=0., mode='pair', num_classes=args.num_classes,
                     mask_type=args.mask, min_tokens=args.min_tokens, patch_size=args.patch_size,
                     teacher=teacher, target='teacher' if teacher else 'area', target_norm='sum',
                     generator=torch.Generator().manual_seed(args.seed))
    mixed, _ = mixer(images.clone(), labels)
    paste = token_paste_masks(mixer.last_mask, args.patch_size)
    true = normalise_shares(visible_shares(objects, paste))
    area = area_weights(mixer.last_mask)
    side = images.shape[-1] * args.scale
    cells = []
    for i in range(args.pairs):
        j = len(images) - 1 - i
        groups = [('area', area[i]), ('true', true[i])]
        if teacher is not None:
            groups.insert(1, ('tchr', mixer.last_weights[i]))
        row = torch.stack([to_pixels(images[i:i + 1])[0], to_pixels(images[j:j + 1])[0],
                           paste[i].float().expand(3, -1, -1), to_pixels(mixed[i:i + 1])[0]])
        row = F.interpolate(row, scale_factor=args.scale, mode='nearest')
        cells.extend(list(row) + [weight_chart(groups, side)])
    return make_grid(cells, nrow=5, padding=2, pad_value=1.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    grid = render_png(lambda: render(args), args.out, 'show_mix.py')
    if grid is None:
        return 2
    print(f'wrote {args.out} ({grid.shape[2]} x {grid.shape[1]} px, {args.pairs} pairs)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
