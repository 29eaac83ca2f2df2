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
import csv
import glob
import importlib.util
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from timm.data import RealLabelsImagenet, resolve_data_config
from timm.layers import apply_test_time_pool, set_layer_config
from timm.models import is_model
from timm.utils import check_batch_size_retry, decay_batch_step, random_seed, reparameterize_model

try:
    from sklearn.metrics import f1_score, precision_score, recall_score
    has_sklearn = True
except ImportError:
    has_sklearn = False

from models import load_checkpoint_weights
from tokenmix_train.data import build_dataset, num_dataset_classes
from tokenmix_train.distributed import init_device, is_primary
from tokenmix_train.errors import ConfigError, run_cli
from tokenmix_train.evaluate import build_eval_loader, evaluate
from tokenmix_train.flag_rules import output_problem
from tokenmix_train.logger import StepMeter, setup_logging
from tokenmix_train.model import build_student, patch_size_of
from tokenmix_train.occlusion import OccludedDataset, occlusion_masks
from tokenmix_train.validate_flags import parse_validate_args as parse_args

_logger = logging.getLogger('validate')

CHECKPOINT_PATTERNS = ('*.pth.tar', '*.pth', '*.safetensors')
PARTIAL_FILES = ('tmp.pth.tar', 'recovery_tmp.pth.tar')  # timm's names for a save in progress


def checkpoint_files(path: str) -> List[str]:
    """`path` itself, or every checkpoint file in the folder `path` (sorted; timm's temporary files left out)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise ConfigError(f"--checkpoint '{path}': no such file or folder")
        return [path]
    files = sorted({f for pattern in CHECKPOINT_PATTERNS for f in glob.glob(os.path.join(glob.escape(path), pattern))
                    if os.path.basename(f) not in PARTIAL_FILES})
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
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        f = open(path, 'w', newline='')
    except OSError as e:
        raise ConfigError(f"--results-file '{path}': {e.strerror}") from None
    with f:
        if fmt == 'json':
            json.dump(rows, f, indent=2)
            f.write('\n')
        else:
            writer = csv.DictWriter(f, fieldnames=result_columns(rows), restval='')
            writer.writeheader()
            writer.writerows(rows)


def result_columns(rows: List[Dict[str, Any]]) -> List[str]:
    """Every key of the rows in first-seen order, `error` last (a folder's unreadable file has no metrics)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [c for c in columns if c != 'error'] + ['error'] * ('error' in columns)


def format_table(rows: List[Dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    columns = result_columns(rows)
    cells = [columns] + [[str(r.get(c, '')) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells)


def dataset_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The `create_dataset` arguments of validate.py's own flags (the shared ones are read by `build_dataset`)."""
    return dict(num_samples=args.num_samples, load_bytes=args.tf_preprocessing)


def read_valid_labels(path: str) -> torch.Tensor:
    """The class indices of --valid-labels (one integer a line)."""
    try:
        with open(path) as f:
            labels = torch.tensor([int(line) for line in f if line.strip()], dtype=torch.long)
    except OSError as e:
        raise ConfigError(f"--valid-labels '{path}': {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"--valid-labels '{path}': not one integer a line ({e})") from None
    if len(labels) and int(labels.min()) < 0:  # a negative index would silently pick a class from the end
        raise ConfigError(f"--valid-labels '{path}': class indices must be >= 0, got {int(labels.min())}")
    return labels


def compile_model(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """--torchscript, --torchcompile [--torchcompile-mode] or --aot-autograd, as timm's validate.py does."""
    if args.torchscript:
        return torch.jit.script(model)
    if args.torchcompile:
        return torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.aot_autograd:
        from functorch.compile import memory_efficient_fusion
        return memory_efficient_fusion(model)
    return model


def read_real_labels(dataset, path: str) -> RealLabelsImagenet:
    """timm's ReaL evaluator for the split's files, which must be ImageNet's val files that `path` lists."""
    try:
        real = RealLabelsImagenet(dataset.filenames(basename=True), real_json=path)
    except OSError as e:
        raise ConfigError(f"--real-labels '{path}': {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--real-labels '{path}': not valid JSON ({e})") from None
    except AssertionError:
        raise ConfigError(f"--real-labels '{path}' lists another number of images than the split "
                          f"has ({len(dataset)})") from None
    unknown = [f for f in real.filenames if f not in real.real_labels]
    if unknown:
        raise ConfigError(f"--real-labels '{path}': '{unknown[0]}' is not an ImageNet val file name "
                          f"(ILSVRC2012_val_NNNNNNNN.JPEG)")
    return real


class OutputRecorder:
    """Collects what --real-labels and --metrics-avg need from each batch's logits."""

    def __init__(self, real_labels: Optional[RealLabelsImagenet], metrics_avg: Optional[str]) -> None:
        self.real_labels, self.metrics_avg = real_labels, metrics_avg
        self.predictions: List[torch.Tensor] = []
        self.targets: List[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if self.real_labels is not None:
            self.real_labels.add_result(logits)
        if self.metrics_avg:
            self.predictions.append(logits.argmax(dim=1).cpu())
            self.targets.append(targets.cpu())

    def results(self) -> Dict[str, float]:
        """ReaL top-1/top-5 replacing the plain ones, and precision/recall/F1 over all ranks (%)."""
        out: Dict[str, float] = {}
        if self.real_labels is not None:
            out.update(top1=self.real_labels.get_accuracy(k=1), top5=self.real_labels.get_accuracy(k=5))
        if self.metrics_avg:
            pairs = [(torch.cat(self.predictions), torch.cat(self.targets))]
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, pairs[0])
                pairs = gathered
            predictions = torch.cat([p for p, _ in pairs]).numpy()
            targets = torch.cat([t for _, t in pairs]).numpy()
            avg = self.metrics_avg
            for name, score in (('precision', precision_score), ('recall', recall_score), ('f1_score', f1_score)):
                out[f'{avg}_{name}'] = round(100 * score(targets, predictions, average=avg, zero_division=0), 4)
        return out


def evaluate_with_retry(run: Callable[[int], Dict[str, Any]], batch_size: int, retry: bool) -> Dict[str, Any]:
    """run(batch_size); with --retry, an out-of-memory error retries with timm's smaller batch steps."""
    while True:
        try:
            return run(batch_size)
        except RuntimeError as e:
            if not retry or not check_batch_size_retry(str(e)) or decay_batch_step(batch_size) < 1:
                raise
            batch_size = decay_batch_step(batch_size)
            _logger.warning(f'"{e}" while validating; retrying with batch size {batch_size}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Validate --checkpoint (a file or each file of a folder) at each --occlusion ratio; print and write the rows.

    Bad input raises ConfigError (see `run_main`); 0 when every checkpoint was validated.
    """
    args = parse_args(argv)
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
    device = init_device(args)
    setup_logging(is_primary(args))
    random_seed(args.seed)  # --fuser and --fast-norm are set by build_student, as for train.py
    if args.pretrained_ignored:
        _logger.info("--pretrained ignored: the weights of --checkpoint are validated")
    dataset = build_dataset(args, args.split, '--split', is_training=False, **dataset_kwargs(args))
    found = num_dataset_classes(dataset)
    valid_labels = read_valid_labels(args.valid_labels) if args.valid_labels else None
    if valid_labels is not None:
        if found is not None and found != len(valid_labels):
            raise ConfigError(f"--valid-labels '{args.valid_labels}' lists {len(valid_labels)} classes, the split "
                              f"{args.split} has {found}")
        num_classes = args.num_classes  # the model's own unless given: the subset indexes its classes
    else:
        if args.num_classes and found and found > args.num_classes:
            raise ConfigError(f'--num-classes {args.num_classes} is less than the {found} classes of --split '
                              f'{args.split}')
        num_classes = args.num_classes or found
        if num_classes is None:
            raise ConfigError('--num-classes is required for this dataset (it does not list its classes)')
    if args.real_labels and args.distributed:
        raise ConfigError('--real-labels needs one process (it follows the image order of the whole split)')
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
    data_config = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size,
                                      verbose=is_primary(args))
    patch = args.patch_size or patch_size_of(model) or 16
    height, width = data_config['input_size'][-2:]
    if height % patch or width % patch:
        raise ConfigError(f'--patch-size {patch} does not divide the input size {height}x{width} (--img-size)')
    amp_dtype = (torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16) if args.amp else None
    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    sources = checkpoint_files(args.checkpoint) if args.checkpoint else ['pretrained']
    folder = bool(args.checkpoint) and os.path.isdir(args.checkpoint)
    rows, unreadable = [], []
    for source in sources:
        if args.checkpoint:
            try:
                load_weights(model, source, args.use_ema)
            except ConfigError as e:
                if not folder:
                    raise
                unreadable.append(os.path.basename(source))
                rows.append(dict(model=args.model, checkpoint=source, occlusion='', top1='', top5='', images=0,
                                 seconds=0, error=str(e)))
                continue
        net = reparameterize_model(model) if args.reparam else model
        test_time_pool = False
        if args.test_pool:
            net, test_time_pool = apply_test_time_pool(net, data_config)
        crop_pct = 1.0 if test_time_pool else data_config['crop_pct']
        net = net.to(device=device, dtype=model_dtype)
        if args.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net = compile_model(net, args)
        for ratio in args.occlusion:
            images = dataset
            if ratio > 0:
                masks = occlusion_masks(len(dataset), (height // patch, width // patch), ratio,
                                        args.occlusion_mode, seed=args.seed * 1000 + round(ratio * 1000))
                images = OccludedDataset(dataset, masks, patch)
            recorder = OutputRecorder(read_real_labels(dataset, args.real_labels) if args.real_labels else None,
                                      args.metrics_avg)
            label = f'{os.path.basename(source)} occlusion {ratio:g}'

            def run(batch_size: int) -> Dict[str, Any]:
                loader = build_eval_loader(
                    images, dict(data_config, crop_pct=crop_pct), batch_size, args.workers, args.distributed,
                    device=device, use_prefetcher=not args.no_prefetcher and ratio == 0, pin_memory=args.pin_mem,
                    crop_border_pixels=args.crop_border_pixels, tf_preprocessing=args.tf_preprocessing)
                return evaluate(net, StepMeter(loader, label, args.log_freq, world_size=args.world_size), device,
                                amp_dtype=amp_dtype, input_dtype=model_dtype, class_subset=valid_labels,
                                on_output=recorder)

            result = dict(evaluate_with_retry(run, args.batch_size, args.retry), **recorder.results())
            rows.append(dict(model=args.model, checkpoint=source + (' (EMA)' if args.use_ema else ''),
                             occlusion=ratio, top1=round(result['top1'], 3), top5=round(result['top5'], 3),
                             images=result['count'], seconds=round(result['seconds'], 2),
                             **{k: v for k, v in result.items() if k.startswith(str(args.metrics_avg))}, error=''))
    if is_primary(args):
        print(format_table(rows))
        if args.results_file:
            write_results(rows, args.results_file, args.results_format)
    if unreadable:
        raise ConfigError(f"--checkpoint '{args.checkpoint}': {len(unreadable)} of {len(sources)} checkpoint files "
                          f"could not be validated ({', '.join(unreadable)}); see the error column")
    return 0


def run_main(argv: Optional[Sequence[str]] = None) -> int:
    """main() with bad input reported as one line and exit code 2."""
    return run_cli(main, 'validate.py', argv)


if __name__ == '__main__':
    sys.exit(run_main())
