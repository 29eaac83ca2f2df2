#!/usr/bin/env python3
"""Top-1 / top-5 of checkpoints, clean and under occlusion: `python validate.py --data-dir DIR --model NAME
--checkpoint PATH [--occlusion 0 0.25 0.5]`.

Checkpoints: this repo's and timm's `*.pth.tar` (model or `--use-ema`), DeiT-style (`model`, `model_ema`), bare
state dicts and `.safetensors`; `--checkpoint DIR` validates every checkpoint file in DIR. Under torchrun each
process takes a disjoint shard of the split and every image is counted exactly once, so the numbers equal a
single-process run. Bad input is one line on stderr and exit code 2.
"""
import argparse
import csv
import glob
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
from timm.data import resolve_data_config
from timm.utils import ParseKwargs

from models import load_checkpoint_weights
from tokenmix.data import build_dataset, num_dataset_classes
from tokenmix.distributed import init_device, is_primary
from tokenmix.errors import ConfigError, run_cli
from tokenmix.evaluate import build_eval_loader, evaluate
from tokenmix.logger import setup_logging
from tokenmix.model import build_student, patch_size_of
from tokenmix.occlusion import OCCLUSION_MODES, OccludedDataset, occlusion_masks
from tokenmix.progress import Progress

_logger = logging.getLogger('validate')

CHECKPOINT_PATTERNS = ('*.pth.tar', '*.pth', '*.safetensors')
COLUMNS = ('model', 'checkpoint', 'occlusion', 'top1', 'top5', 'images', 'seconds')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Validate checkpoints: top-1/top-5, clean and occluded')
    parser.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (same as --data-dir)')
    data = parser.add_argument_group('Dataset')
    data.add_argument('--data-dir', metavar='DIR', help='dataset root (an ImageFolder with a split folder)')
    data.add_argument('--dataset', default='', metavar='NAME', help='timm dataset type (default: image folder)')
    data.add_argument('--dataset-download', action='store_true', default=False,
                      help='allow download of dataset for torch/ and tfds/ datasets that support it')
    data.add_argument('--split', default='validation', metavar='NAME',
                      help='split to validate (default: "validation", which also finds "val")')
    data.add_argument('--class-map', default='', metavar='FILE', help='class name to index map (timm format)')
    data.add_argument('--skip-bad-images', action='store_true', help='skip (and count) unreadable images')
    model = parser.add_argument_group('Model')
    model.add_argument('--model', required=True, metavar='NAME', help='timm model name')
    weights = model.add_mutually_exclusive_group(required=True)
    weights.add_argument('--checkpoint', default='', metavar='PATH', help='checkpoint file, or a folder of them')
    weights.add_argument('--pretrained', action='store_true', help="timm's pretrained weights (needs the network)")
    model.add_argument('--use-ema', action='store_true', help='validate the EMA weights of the checkpoint')
    model.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='classes of the model (default: the split\'s class count)')
    model.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='input size; ViT-family models are built at this size, as train.py does')
    model.add_argument('--crop-pct', type=float, default=None, metavar='F', help='centre-crop share (default: model)')
    model.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='more model arguments')
    run = parser.add_argument_group('Run')
    run.add_argument('-b', '--batch-size', type=int, default=256, metavar='N', help='batch size (default: 256)')
    run.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading workers (default: 4)')
    run.add_argument('--amp', action='store_true', help='autocast with --amp-dtype')
    run.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    run.add_argument('--channels-last', action='store_true', help='channels_last memory layout')
    run.add_argument('--device', default=None, help='device (default: cuda when available, else cpu)')
    run.add_argument('--dist-backend', default=None, help='torch.distributed backend (default: nccl / gloo)')
    run.add_argument('--dist-url', default=None, help='torch.distributed init url (default: env://)')
    run.add_argument('--local-rank', '--local_rank', default=0, type=int, help=argparse.SUPPRESS)
    run.add_argument('--log-interval', type=int, default=50, metavar='N', help='batches between progress lines')
    occl = parser.add_argument_group('Occlusion robustness')
    occl.add_argument('--occlusion', type=float, nargs='+', default=[0.], metavar='R',
                      help='shares of patches to drop, each in [0, 1); 0 is the clean accuracy (default: 0)')
    occl.add_argument('--occlusion-mode', default='random', choices=tuple(OCCLUSION_MODES),
                      help="'random' patches or 'block' regions (default: random)")
    occl.add_argument('--patch-size', type=int, default=None, metavar='N',
                      help="occlusion patch size in pixels (default: the model's patch size, else 16)")
    occl.add_argument('--seed', type=int, default=0, help='seed of the occlusion masks (same for every model)')
    out = parser.add_argument_group('Output')
    out.add_argument('--results-file', default='', metavar='FILE', help='write the rows here too')
    out.add_argument('--results-format', default=None, choices=('csv', 'json'),
                     help='results file format (default: from the file extension, else csv)')
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check validate.py's command line; each error names its flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or args.data
    if not args.data_dir and not args.dataset:
        parser.error('--data-dir is required')
    for ratio in args.occlusion:
        if not 0. <= ratio < 1.:
            parser.error(f'--occlusion ratios must lie in [0, 1), got {ratio}')
    for flag, value in (('-b/--batch-size', args.batch_size), ('--patch-size', args.patch_size or 1),
                        ('--num-classes', args.num_classes or 1), ('--img-size', args.img_size or 1),
                        ('--log-interval', args.log_interval)):
        if value < 1:
            parser.error(f'{flag} must be >= 1, got {value}')
    if args.use_ema and not args.checkpoint:
        parser.error('--use-ema needs --checkpoint')
    if args.results_format is None:
        args.results_format = 'json' if args.results_file.endswith('.json') else 'csv'
    # what the shared model builder reads besides these flags, at train.py's defaults
    for key, value in dict(drop=0., drop_path=None, gp=None, in_chans=None, initial_checkpoint='',
                           grad_checkpointing=False).items():
        setattr(args, key, value)
    return args


def checkpoint_files(path: str) -> List[str]:
    """`path` itself, or every checkpoint file in the folder `path` (sorted)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise ConfigError(f"--checkpoint '{path}': no such file or folder")
        return [path]
    files = sorted({f for pattern in CHECKPOINT_PATTERNS for f in glob.glob(os.path.join(path, pattern))})
    if not files:
        raise ConfigError(f"--checkpoint '{path}': the folder holds no {' / '.join(CHECKPOINT_PATTERNS)} files")
    return files


def load_weights(model: torch.nn.Module, path: str, use_ema: bool) -> None:
    """Fill `model` from `path`; anything that does not fit is a ConfigError naming the file."""
    try:
        load_checkpoint_weights(model, path, use_ema=use_ema)
    except FileNotFoundError:
        raise ConfigError(f"--checkpoint '{path}': no such file") from None
    except ValueError as e:
        raise ConfigError(f'--checkpoint: {e}' + ('' if not use_ema or 'EMA' not in str(e) else ' (--use-ema)')) \
            from None


def write_results(rows: List[Dict[str, Any]], path: str, fmt: str) -> None:
    """All rows to `path`, as CSV (header + one line a row) or a JSON list."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w', newline='') as f:
        if fmt == 'json':
            json.dump(rows, f, indent=2)
            f.write('\n')
        else:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


def format_table(rows: List[Dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    cells = [list(COLUMNS)] + [[str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = init_device(args)
    setup_logging(is_primary(args))
    dataset = build_dataset(args, args.split, '--split', is_training=False)
    found = num_dataset_classes(dataset)
    if args.num_classes and found and found > args.num_classes:
        raise ConfigError(f'--num-classes {args.num_classes} is less than the {found} classes of --split {args.split}')
    num_classes = args.num_classes or found
    if num_classes is None:
        raise ConfigError('--num-classes is required for this dataset (it does not list its classes)')
    model = build_student(args, num_classes)
    data_config = resolve_data_config(dict(img_size=args.img_size, crop_pct=args.crop_pct), model=model)
    patch = args.patch_size or patch_size_of(model) or 16
    height, width = data_config['input_size'][-2:]
    if height % patch or width % patch:
        raise ConfigError(f'--patch-size {patch} does not divide the input size {height}x{width} (--img-size)')
    amp_dtype = (torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16) if args.amp else None
    sources = checkpoint_files(args.checkpoint) if args.checkpoint else ['pretrained']
    rows = []
    for source in sources:
        if args.checkpoint:
            load_weights(model, source, args.use_ema)
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        for ratio in args.occlusion:
            images = dataset
            if ratio > 0:
                masks = occlusion_masks(len(dataset), (height // patch, width // patch), ratio,
                                        args.occlusion_mode, seed=args.seed * 1000 + round(ratio * 1000))
                images = OccludedDataset(dataset, masks, patch)
            loader = build_eval_loader(images, data_config, args.batch_size, args.workers, args.distributed,
                                       device=device, use_prefetcher=False)
            label = f'{os.path.basename(source)} occlusion {ratio:g}'
            result = evaluate(model, Progress(loader, label, args.log_interval, args.world_size), device,
                              amp_dtype=amp_dtype)
            rows.append(dict(model=args.model, checkpoint=source + (' (EMA)' if args.use_ema else ''),
                             occlusion=ratio, top1=round(result['top1'], 3), top5=round(result['top5'], 3),
                             images=result['count'], seconds=round(result['seconds'], 2)))
    if is_primary(args):
        print(format_table(rows))
        if args.results_file:
            write_results(rows, args.results_file, args.results_format)
    return 0


def run_main(argv: Optional[Sequence[str]] = None) -> int:
    """main() with bad input reported as one line and exit code 2."""
    return run_cli(main, 'validate.py', argv)


if __name__ == '__main__':
    sys.exit(run_main())
