#!/usr/bin/env python3
"""Where do trained models look? Class activation maps of one or two checkpoints over demo val images, side by side.

For each image: the image, then per checkpoint the map of the image's true class over it (colour bar: low to
high), each column titled with its model (--labels, default the checkpoint's folder name). The maps
come from ``models.Teacher`` wrapped around the trained model: a ViT's head applied to every patch token, a CNN's
classifier at every position of its last feature map. A model that learnt the digit rather than the clutter
lights up the digit ("focus on the foreground"). Writes one PNG: one row per image.

    python tools/show_cam.py --data-dir output/demo/data --model tokenmix_vit_tiny_p8_64 --img-size 32 \
        --checkpoint runs/mixup/model_best.pth.tar runs/tokenmix/model_best.pth.tar \
        --labels 'Mixup + CutMix' 'TokenMix' --out docs/tokenmix_cam.png
"""
import argparse
import os
import sys
from typing import Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from timm.data import resolve_data_config
from timm.utils import ParseKwargs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import Teacher, load_checkpoint_weights  # noqa: E402
from tokenmix_train.fidelity import load_demo_objects  # noqa: E402
from tokenmix_train.pictures import render_png  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', required=True, help='demo data written by tools/make_demo_data.py')
    parser.add_argument('--split', default='val', help='split to draw images from (default: val)')
    parser.add_argument('--images', type=int, default=6, help='images (rows) to show (default: 6)')
    parser.add_argument('--model', required=True, help='timm model name of the checkpoints')
    parser.add_argument('--checkpoint', required=True, nargs='+', metavar='PATH', help='one or two checkpoints')
    parser.add_argument('--labels', nargs='+', default=None, metavar='NAME',
                        help='column title per checkpoint (default: the name of its folder)')
    parser.add_argument('--use-ema', action='store_true', help='use the checkpoints\' EMA weights')
    parser.add_argument('--num-classes', type=int, default=10, help='classes of the model (default: 10)')
    parser.add_argument('--img-size', type=int, default=None, help='build ViT-family models at this size')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='more model arguments as key=value, as given to train.py')
    parser.add_argument('--out', required=True, help='PNG file to write')
    args = parser.parse_args(argv)
    if len(args.checkpoint) > 2:
        parser.error(f'--checkpoint takes one or two files, got {len(args.checkpoint)}')
    for path in args.checkpoint:
        if not os.path.isfile(path):
            parser.error(f'--checkpoint {path}: no such file')
    if args.labels is None:
        args.labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.checkpoint]
    elif len(args.labels) != len(args.checkpoint):
        parser.error(f'--labels takes one name per checkpoint: {len(args.checkpoint)}, got {len(args.labels)}')
    if args.images < 1:
        parser.error(f'--images must be >= 1, got {args.images}')
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


CMAP = 'inferno'  # dark = low, yellow = high


def overlay(pixels: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """Blend a [0, 1] map (colour map CMAP) over dimmed images; B x 3 x H x W in [0, 1]."""
    ramp = torch.from_numpy(colormaps[CMAP](heat.numpy())[..., :3]).permute(0, 3, 1, 2).float()
    return 0.4 * pixels + 0.6 * ramp


def render(args: argparse.Namespace) -> Figure:
    """The picture: one row per image; columns the image, then each checkpoint's true-class map; a colour bar."""
    config = resolve_data_config({}, model=create_model(args))
    images, labels, _ = load_demo_objects(args.data_dir, args.split, args.images, config['mean'], config['std'])
    mean, std = torch.tensor(config['mean']).view(1, 3, 1, 1), torch.tensor(config['std']).view(1, 3, 1, 1)
    pixels = (images * std + mean).clamp(0, 1)
    columns = [pixels] + [overlay(pixels, class_maps(args, path, images, labels)) for path in args.checkpoint]
    titles = ['image'] + [f'{name}:\ntrue-class map' for name in args.labels]
    fig = Figure(figsize=(1.9 * len(columns) + 0.8, 1.7 * len(images) + 0.6))
    axes = fig.subplots(len(images), len(columns), squeeze=False)
    for i in range(len(images)):
        for k, column in enumerate(columns):
            axes[i][k].imshow(column[i].permute(1, 2, 0).numpy(), interpolation='nearest')
            axes[i][k].set_xticks([])
            axes[i][k].set_yticks([])
        axes[i][0].set_ylabel(f'digit {int(labels[i])}', fontsize=9)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=9)
    bar = fig.colorbar(ScalarMappable(cmap=CMAP), ax=axes, fraction=0.05, ticks=[0, 1])
    bar.ax.set_yticklabels(['low', 'high'], fontsize=8)
    bar.set_label('activation of the true class (per image)', fontsize=8)
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if render_png(lambda: render(args), args.out, 'show_cam.py') is None:
        return 2
    print(f'wrote {args.out} ({args.images} images, {len(args.checkpoint)} checkpoint(s))')
    return 0


if __name__ == '__main__':
    sys.exit(main())
