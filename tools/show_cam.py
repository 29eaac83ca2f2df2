#!/usr/bin/env python3
"""Where do trained models look? Class activation maps of one or two checkpoints over demo val images, side by side.

For each image: the image, then per checkpoint the map of the image's true class over it (red = high). The maps
come from ``models.Teacher`` wrapped around the trained model: a ViT's head applied to every patch token, a CNN's
classifier at every position of its last feature map. A model that learnt the digit rather than the clutter
lights up the digit ("focus on the foreground"). Writes one PNG: one row per image.

    python tools/show_cam.py --data-dir output/demo/data --model tokenmix_vit_tiny_p8_64 --img-size 32 \
        --checkpoint runs/mixup/model_best.pth.tar runs/tokenmix/model_best.pth.tar --out docs/tokenmix_cam.png
"""
import argparse
import os
import sys
from typing import Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.utils import ParseKwargs
from torchvision.utils import make_grid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import Teacher, load_checkpoint_weights  # noqa: E402
from tokenmix.fidelity import load_demo_objects  # noqa: E402
from tokenmix.pictures import render_png  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', required=True, help='demo data written by tools/make_demo_data.py')
    parser.add_argument('--split', default='val', help='split to draw images from (default: val)')
    parser.add_argument('--images', type=int, default=6, help='images (rows) to show (default: 6)')
    parser.add_argument('--model', required=True, help='timm model name of the checkpoints')
    parser.add_argument('--checkpoint', required=True, nargs='+', metavar='PATH', help='one or two checkpoints')
    parser.add_argument('--use-ema', action='store_true', help='use the checkpoints\' EMA weights')
    parser.add_argument('--num-classes', type=int, default=10, help='classes of the model (default: 10)')
    parser.add_argument('--img-size', type=int, default=None, help='build ViT-family models at this size')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='more model arguments as key=value, as given to train.py')
    parser.add_argument('--scale', type=int, default=4, help='pixel upscaling of every cell (default: 4)')
    parser.add_argument('--out', required=True, help='PNG file to write')
    args = parser.parse_args(argv)
    if len(args.checkpoint) > 2:
        parser.error(f'--checkpoint takes one or two files, got {len(args.checkpoint)}')
    for path in args.checkpoint:
        if not os.path.isfile(path):
            parser.error(f'--checkpoint {path}: no such file')
    if args.images < 1 or args.scale < 1:
        parser.error('--images and --scale must be >= 1')
    return args


def create_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model of --model with --num-classes, --img-size and --model-kwargs."""
    kwargs = dict(args.model_kwargs, **(dict(img_size=args.img_size) if args.img_size else {}))
    return timm.create_model(args.model, num_classes=args.num_classes, **kwargs)


def class_maps(args: argparse.Namespace, checkpoint: str, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each image's own-class activation map under one checkpoint, resized to the image and scaled to [0, 1]."""
    model = create_model(args)
    load_checkpoint_weights(model, checkpoint, use_ema=args.use_ema)
    maps = Teacher(model).own_class_maps(images, labels)
    maps = F.interpolate(maps[:, None], size=images.shape[-2:], mode='bilinear', align_corners=False)[:, 0]
    low = maps.flatten(1).min(1).values.view(-1, 1, 1)
    high = maps.flatten(1).max(1).values.view(-1, 1, 1)
    return (maps - low) / (high - low).clamp(min=1e-12)


def overlay(pixels: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """Blend a [0, 1] map over dimmed images as a black-to-red-to-yellow ramp."""
    ramp = torch.stack([(heat * 2).clamp(max=1), (heat * 2 - 1).clamp(min=0), torch.zeros_like(heat)], dim=1)
    return 0.4 * pixels + 0.6 * ramp


def render(args: argparse.Namespace) -> torch.Tensor:
    """The picture as a 3 x H x W tensor in [0, 1]."""
    config = resolve_data_config({}, model=create_model(args))
    images, labels, _ = load_demo_objects(args.data_dir, args.split, args.images, config['mean'], config['std'])
    mean, std = torch.tensor(config['mean']).view(1, 3, 1, 1), torch.tensor(config['std']).view(1, 3, 1, 1)
    pixels = (images * std + mean).clamp(0, 1)
    columns = [pixels] + [overlay(pixels, class_maps(args, path, images, labels)) for path in args.checkpoint]
    cells = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: image, map 1[, map 2]
    cells = F.interpolate(cells, scale_factor=args.scale, mode='nearest')
    return make_grid(cells, nrow=len(columns), padding=2, pad_value=1.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    grid = render_png(lambda: render(args), args.out, 'show_cam.py')
    if grid is None:
        return 2
    print(f'wrote {args.out} ({grid.shape[2]} x {grid.shape[1]} px, {len(args.checkpoint)} checkpoint(s))')
    return 0


if __name__ == '__main__':
    sys.exit(main())
