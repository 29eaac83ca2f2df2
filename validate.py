#!/usr/bin/env python3
"""Top-1 / top-5 of checkpoints, clean and under occlusion: `python validate.py --data-dir DIR --model NAME
--checkpoint PATH [--occlusion 0 0.25 0.5]`.

Checkpoints: this repo's and timm's `*.pth.tar` (model or `--use-ema`), DeiT-style (`model`, `model_ema`), bare
state dicts and `.safetensors`; `--checkpoint DIR` validates every checkpoint file in DIR (an unreadable one is a
row with its error, and the exit code is 2 once the table and results file are written). Under torchrun each
process takes a disjoint shard of the split and every image is counted exactly once, so the numbers equal a
single-process run. Bad input is one line on stderr and exit code 2.

Every flag of timm's validate.py is accepted with timm's name, default and meaning, implemented with timm's own
pieces (data config, transforms, ReaL labels, test-time pool, reparameterisation, compile, batch-size retry);
the few that cannot apply here (--num-gpu > 1, --naflex-loader, --amp-impl apex) stop with one line saying why.
"""
import argparse
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from timm.data import resolve_data_config
from timm.layers import apply_test_time_pool, set_layer_config
from timm.models import is_model
from timm.utils import random_seed, reparameterize_model

from tokenmix_train.checkpoint import checkpoint_files, load_model_weights
from tokenmix_train.data import build_dataset, num_dataset_classes, resolve_num_classes
from tokenmix_train.distributed import init_device, is_primary, run_cli
from tokenmix_train.errors import ConfigError
from tokenmix_train.evaluate import build_eval_loader, evaluate, evaluate_with_retry
from tokenmix_train.flag_rules import output_problem
from tokenmix_train.logger import StepMeter, setup_logging
from tokenmix_train.model import build_student, compile_model, model_dtype_of, place_model, token_size_of
from tokenmix_train.occlusion import OccludedDataset, occlusion_masks
from tokenmix_train.precision import amp_dtype_of
from tokenmix_train.results import (OutputRecorder, format_table, has_sklearn, read_real_labels, read_valid_labels,
                                    write_results)
from tokenmix_train.validate_flags import parse_validate_args

_logger = logging.getLogger('validate')


@dataclass(frozen=True)
class Validation:
    """What the evaluation of every checkpoint and occlusion ratio shares."""
    args: argparse.Namespace
    dataset: Dataset
    data_config: Dict[str, Any]
    device: torch.device
    patch: int  # occlusion patch size in pixels
    valid_labels: Optional[torch.Tensor]  # --valid-labels: the logit columns kept


def dataset_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The `create_dataset` arguments of validate.py's own flags (the shared ones are read by `build_dataset`)."""
    return dict(num_samples=args.num_samples, load_bytes=args.tf_preprocessing)


def check_flags(args: argparse.Namespace) -> None:
    """What can be checked before any data is read: --results-file writable, one known --model, the packages
    that --tf-preprocessing and --metrics-avg need."""
    if args.results_file:  # checked before hours of evaluation, not after the table
        if os.path.isdir(args.results_file):
            raise ConfigError(f"--results-file '{args.results_file}' is a folder")
        problem = output_problem(os.path.dirname(os.path.abspath(args.results_file)), '--results-file',
                                 args.results_file)
        if problem:
            raise ConfigError(problem)
    if not is_model(args.model):
        raise ConfigError(f"--model {args.model}: unknown timm model (timm's bulk validation of 'all', wildcards or "
                          f"a file of names is not supported here: validate one model at a time)")
    if args.tf_preprocessing and importlib.util.find_spec('tensorflow') is None:
        raise ConfigError('--tf-preprocessing needs TensorFlow, which is not installed (pip install tensorflow-cpu)')
    if args.metrics_avg and not has_sklearn:
        raise ConfigError('--metrics-avg needs scikit-learn, which is not installed')


def resolve_classes(args: argparse.Namespace, dataset: Dataset) -> Tuple[Optional[int], Optional[torch.Tensor]]:
    """(the model's class count, the --valid-labels class indices or None).

    With --valid-labels the model keeps its own classes unless --num-classes is given: the subset indexes them.
    """
    if not args.valid_labels:
        return resolve_num_classes(args.num_classes, dataset, f'--split {args.split}'), None
    valid_labels = read_valid_labels(args.valid_labels)
    found = num_dataset_classes(dataset)
    if found is not None and found != len(valid_labels):
        raise ConfigError(f"--valid-labels '{args.valid_labels}' lists {len(valid_labels)} classes, the split "
                          f"{args.split} has {found}")
    return args.num_classes, valid_labels


def build_model(args: argparse.Namespace, num_classes: Optional[int],
                valid_labels: Optional[torch.Tensor]) -> torch.nn.Module:
    """--model (timm's pretrained weights when no --checkpoint replaces them), whose classes --valid-labels index."""
    with set_layer_config(scriptable=args.torchscript or None):
        try:
            model = build_student(args, num_classes)
        except (RuntimeError, OSError) as e:
            if not args.pretrained:
                raise
            raise ConfigError(f"--model {args.model}: timm's pretrained weights are not available ({e}); pass "
                              f"--checkpoint") from None
    if valid_labels is not None and int(valid_labels.max()) >= model.num_classes:
        raise ConfigError(f"--valid-labels '{args.valid_labels}' has class {int(valid_labels.max())}, the model "
                          f"only {model.num_classes} classes")
    return model


def occlusion_patch(args: argparse.Namespace, model: torch.nn.Module, data_config: Dict[str, Any]) -> int:
    """--patch-size (default: the model's patch size, else 16), which must tile the input size."""
    patch = token_size_of(model, args.patch_size)
    height, width = data_config['input_size'][-2:]
    if height % patch or width % patch:
        raise ConfigError(f'--patch-size {patch} does not divide the input size {height}x{width} (--img-size)')
    return patch


def prepare_net(model: torch.nn.Module, run: Validation) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The network evaluated (--reparam, --test-pool, placed, compiled) and its data config: a test-time pool
    takes the whole image (crop 1.0)."""
    net = reparameterize_model(model) if run.args.reparam else model
    test_time_pool = False
    if run.args.test_pool:
        net, test_time_pool = apply_test_time_pool(net, run.data_config)
    net = compile_model(place_model(net, run.args, run.device), run.args)
    return net, dict(run.data_config, crop_pct=1.0 if test_time_pool else run.data_config['crop_pct'])


def evaluate_images(run: Validation, net: torch.nn.Module, images: Dataset, data_config: Dict[str, Any],
                    recorder: OutputRecorder, label: str, prefetch: bool, batch_size: int) -> Dict[str, Any]:
    """One pass of `net` over `images` in batches of `batch_size` (`evaluate`'s metrics)."""
    args = run.args
    loader = build_eval_loader(
        images, data_config, batch_size, args.workers, args.distributed, device=run.device,
        use_prefetcher=not args.no_prefetcher and prefetch, pin_memory=args.pin_mem,
        crop_border_pixels=args.crop_border_pixels, tf_preprocessing=args.tf_preprocessing)
    return evaluate(net, StepMeter(loader, label, args.log_freq, world_size=args.world_size), run.device,
                    amp_dtype=amp_dtype_of(args), input_dtype=model_dtype_of(args), class_subset=run.valid_labels,
                    on_output=recorder)


def occlusion_row(run: Validation, net: torch.nn.Module, data_config: Dict[str, Any], source: str,
                  ratio: float) -> Dict[str, Any]:
    """The row of checkpoint `source` at one --occlusion ratio (its masks depend only on seed and ratio)."""
    args, images = run.args, run.dataset
    if ratio > 0:
        height, width = data_config['input_size'][-2:]
        masks = occlusion_masks(len(run.dataset), (height // run.patch, width // run.patch), ratio,
                                args.occlusion_mode, seed=args.seed * 1000 + round(ratio * 1000))
        images = OccludedDataset(run.dataset, masks, run.patch)
    recorder = OutputRecorder(read_real_labels(run.dataset, args.real_labels) if args.real_labels else None,
                              args.metrics_avg)
    evaluate_at = partial(evaluate_images, run, net, images, data_config, recorder,
                          f'{os.path.basename(source)} occlusion {ratio:g}', ratio == 0)
    result = dict(evaluate_with_retry(evaluate_at, args.batch_size, args.retry), **recorder.results())
    return dict(model=args.model, checkpoint=source + (' (EMA)' if args.use_ema else ''), occlusion=ratio,
                top1=round(result['top1'], 3), top5=round(result['top5'], 3), images=result['count'],
                seconds=round(result['seconds'], 2),
                **{k: v for k, v in result.items() if k.startswith(str(args.metrics_avg))}, error='')


def checkpoint_rows(run: Validation, model: torch.nn.Module, source: str) -> List[Dict[str, Any]]:
    """The rows of one checkpoint, a row per --occlusion ratio; an unreadable file of a --checkpoint folder is
    one row with its error (a single file's error stops the run)."""
    args = run.args
    if args.checkpoint:
        try:
            load_model_weights(model, source, '--checkpoint', args.use_ema)
        except ConfigError as e:
            if not os.path.isdir(args.checkpoint):
                raise
            return [dict(model=args.model, checkpoint=source, occlusion='', top1='', top5='', images=0, seconds=0,
                         error=str(e))]
    net, data_config = prepare_net(model, run)
    return [occlusion_row(run, net, data_config, source, ratio) for ratio in args.occlusion]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Validate --checkpoint (a file or each file of a folder) at each --occlusion ratio; print and write the rows.

    Bad input raises ConfigError (see `run_main`); 0 when every checkpoint was validated.
    """
    args = parse_validate_args(argv)
    check_flags(args)
    device = init_device(args)
    setup_logging(is_primary(args))
    random_seed(args.seed)  # --fuser and --fast-norm are set by build_student, as for train.py
    if args.pretrained_ignored:
        _logger.info("--pretrained ignored: the weights of --checkpoint are validated")
    dataset = build_dataset(args, args.split, '--split', is_training=False, **dataset_kwargs(args))
    num_classes, valid_labels = resolve_classes(args, dataset)
    if args.real_labels and args.distributed:
        raise ConfigError('--real-labels needs one process (it follows the image order of the whole split)')
    model = build_model(args, num_classes, valid_labels)
    data_config = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size,
                                      verbose=is_primary(args))
    run = Validation(args, dataset, data_config, device, occlusion_patch(args, model, data_config), valid_labels)
    sources = checkpoint_files(args.checkpoint) if args.checkpoint else ['pretrained']
    rows = [row for source in sources for row in checkpoint_rows(run, model, source)]
    if is_primary(args):
        print(format_table(rows))
        if args.results_file:
            write_results(rows, args.results_file, args.results_format)
    unreadable = [os.path.basename(row['checkpoint']) for row in rows if row['error']]
    if unreadable:
        raise ConfigError(f"--checkpoint '{args.checkpoint}': {len(unreadable)} of {len(sources)} checkpoint files "
                          f"could not be validated ({', '.join(unreadable)}); see the error column")
    return 0


def run_main(argv: Optional[Sequence[str]] = None) -> int:
    """main() with bad input reported as one line and exit code 2."""
    return run_cli(main, 'validate.py', argv)


if __name__ == '__main__':
    sys.exit(run_main())
