"""Every rule on the values of train.py's and validate.py's flags: ranges, names known to timm, flags that cannot
apply here, and the combinations of flags that exclude or need each other.

Types are argparse's job. Each check returns the first problem as one line naming the flag (None when all is
well), so the parser can end with it (exit code 2) before anything is built or written. Names are checked against
timm itself (its optimizer registry, its scheduler factory, its transforms), so a name timm accepts is never
refused here.
"""
import argparse
import math
import os
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import str_to_interp_mode
from timm.optim import get_optimizer_info
from timm.scheduler import create_scheduler_v2

from .mixing import mixing_enabled

__all__ = ['check_train_args', 'check_values', 'check_shared_values', 'flag_names', 'output_problem',
           'unsupported_flags']

Rule = Tuple[Callable[[Any], bool], str]
AT_LEAST_1: Rule = (lambda v: v >= 1, '>= 1')
NON_NEGATIVE: Rule = (lambda v: v >= 0, '>= 0')
POSITIVE: Rule = (lambda v: v > 0, '> 0')
PROBABILITY: Rule = (lambda v: 0 <= v <= 1, 'in [0, 1]')
FRACTION: Rule = (lambda v: 0 <= v < 1, 'in [0, 1)')

# dest -> rule, applied to every value of a list flag; None values (flag not set) and dests the parser lacks are
# skipped, so validate.py's parser uses the same table (num_samples to num_gpu are its own)
RULES: Dict[str, Rule] = dict(
    batch_size=AT_LEAST_1, epochs=AT_LEAST_1, grad_accum_steps=AT_LEAST_1, log_interval=AT_LEAST_1,
    checkpoint_hist=AT_LEAST_1, val_interval=AT_LEAST_1, lr_base_size=AT_LEAST_1, lr_cycle_limit=AT_LEAST_1,
    validation_batch_size=AT_LEAST_1, img_size=AT_LEAST_1, in_chans=AT_LEAST_1, input_size=AT_LEAST_1,
    num_classes=AT_LEAST_1, teacher_img_size=AT_LEAST_1, tokenmix_patch_size=AT_LEAST_1,
    train_num_samples=AT_LEAST_1, val_num_samples=AT_LEAST_1, train_img_sizes=AT_LEAST_1,
    train_batch_sizes=AT_LEAST_1, train_batches_per_epoch=AT_LEAST_1,
    num_samples=AT_LEAST_1, patch_size=AT_LEAST_1, log_freq=AT_LEAST_1, num_gpu=AT_LEAST_1,
    crop_border_pixels=NON_NEGATIVE,
    workers=NON_NEGATIVE, recovery_interval=NON_NEGATIVE, warmup_epochs=NON_NEGATIVE, cooldown_epochs=NON_NEGATIVE,
    patience_epochs=NON_NEGATIVE, start_epoch=NON_NEGATIVE, decay_milestones=NON_NEGATIVE,
    mixup_off_epoch=NON_NEGATIVE, recount=NON_NEGATIVE, tokenmix_min_tokens=NON_NEGATIVE, tta=NON_NEGATIVE,
    teacher_topk=NON_NEGATIVE,
    warmup_lr=NON_NEGATIVE, min_lr=NON_NEGATIVE, weight_decay=NON_NEGATIVE, lr_noise=NON_NEGATIVE,
    lr_noise_pct=NON_NEGATIVE, lr_noise_std=NON_NEGATIVE, mixup=NON_NEGATIVE, cutmix=NON_NEGATIVE,
    color_jitter=NON_NEGATIVE, aug_repeats=NON_NEGATIVE, epoch_repeats=NON_NEGATIVE, train_size_probs=NON_NEGATIVE,
    train_size_schedule_spread=NON_NEGATIVE, layer_decay_min_scale=NON_NEGATIVE, mean=NON_NEGATIVE,
    lr=POSITIVE, lr_base=POSITIVE, opt_eps=POSITIVE, clip_grad=POSITIVE, layer_decay=POSITIVE,
    decay_epochs=POSITIVE, decay_rate=POSITIVE, lr_cycle_mul=POSITIVE, lr_cycle_decay=POSITIVE,
    lr_k_decay=POSITIVE, bce_pos_weight=POSITIVE, bn_eps=POSITIVE, std=POSITIVE, crop_pct=POSITIVE,
    kd_temperature=POSITIVE,
    momentum=PROBABILITY, hflip=PROBABILITY, vflip=PROBABILITY, reprob=PROBABILITY, mixup_prob=PROBABILITY,
    mixup_switch_prob=PROBABILITY, color_jitter_prob=PROBABILITY, grayscale_prob=PROBABILITY,
    gaussian_blur_prob=PROBABILITY, model_ema_decay=PROBABILITY, bce_target_thresh=PROBABILITY,
    bn_momentum=PROBABILITY, train_size_random_mix=PROBABILITY, cutmix_minmax=PROBABILITY,
    smoothing=FRACTION, drop=FRACTION, drop_path=FRACTION, drop_connect=FRACTION, drop_block=FRACTION,
    opt_betas=FRACTION,
)
ERASE_MODES = ('pixel', 'rand', 'const', '')  # timm's RandomErasing
CROP_MODES = ('rrc', 'rkrc', 'rkrr')  # timm's transforms_factory

# dest -> (flag, why it cannot apply here); the run stops when the flag is set to anything but its no-op value
UNSUPPORTED: Dict[str, Tuple[str, str]] = {
    'torchscript': ('--torchscript', 'TorchScript is not supported here (deprecated since torch 2.0, and the '
                                     'training loop, EMA and teacher run eagerly); use --torchcompile'),
    'naflex_loader': ('--naflex-loader', 'NaFlex batches are variable-length patch sequences, but TokenMix, the '
                                         'teacher and evaluation here work on fixed image grids'),
    'kd_model_name': ('--kd-model-name', "timm's knowledge distillation (a loss on a teacher's logits or features) "
                                         'is not implemented here; the teacher here (--teacher-model) gives TokenMix '
                                         'its label weights, it is no distillation loss'),
    'tta': ('--tta', "evaluation here counts every val image once; test-time augmentation needs a TTA loader, "
                     "which timm's train.py does not build either (use validate.py)"),
}
NO_OP_VALUES = {'tta': (0, 1)}


def flag_names(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """dest -> the flag as users type it ('-b/--batch-size')."""
    names: Dict[str, str] = {}
    for action in parser._actions:
        if action.option_strings:
            names.setdefault(action.dest, '/'.join(s for s in action.option_strings if not s.startswith('--no-')
                                                   or action.dest.startswith('no_')))
    return names


def _as_list(value: Any) -> Iterable[Any]:
    return value if isinstance(value, (list, tuple)) else [value]


def _ranges(args: argparse.Namespace, flags: Dict[str, str]) -> Optional[str]:
    for dest, (ok, text) in RULES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        for v in _as_list(value):
            if not (isinstance(v, (int, float)) and not math.isnan(v) and ok(v)):
                return f'{flags.get(dest, dest)} must be {text}, got {v}'
    return None


def _pairs(args: argparse.Namespace) -> Optional[str]:
    """Flags that take a (min, max) pair or values that must come in a set order."""
    for dest, flag, upper in (('scale', '--scale', 1.0), ('ratio', '--ratio', math.inf),
                              ('cutmix_minmax', '--cutmix-minmax', 1.0)):
        value = getattr(args, dest)
        if value is None:
            continue
        if len(value) != 2 or not 0 < value[0] <= value[1] <= upper:
            bound = '' if upper == math.inf else f' <= {upper:g}'
            return f'{flag} takes two values 0 < min <= max{bound}, got {value}'
    if list(args.decay_milestones) != sorted(args.decay_milestones):
        return f'--decay-milestones must be increasing, got {args.decay_milestones}'
    if args.lr_noise is not None and len(args.lr_noise) > 2:
        return f'--lr-noise takes one or two epoch fractions, got {args.lr_noise}'
    if args.aug_splits != 0 and args.aug_splits < 2:
        return f'--aug-splits must be 0 or >= 2, got {args.aug_splits}'
    sizes = args.train_img_sizes
    for flag, value in (('--train-batch-sizes', args.train_batch_sizes), ('--train-size-probs', args.train_size_probs)):
        if value is not None and (sizes is None or len(value) != len(sizes)):
            return f'{flag} takes one value per --train-img-sizes size ({len(sizes or ())}), got {len(value)}'
    return None


def _compile_backends() -> Tuple[str, ...]:
    import torch._dynamo  # slow to import: only when --torchcompile is given
    return tuple(torch._dynamo.list_backends(exclude_tags=()))


def _channels(args: argparse.Namespace) -> Optional[str]:
    """--mean and --std give one value, or one per input channel."""
    channels = args.in_chans or (args.input_size[0] if args.input_size else 3)
    for flag, value in (('--mean', args.mean), ('--std', args.std)):
        if value is not None and len(value) not in (1, channels):
            counts = '1 value (1 input channel)' if channels == 1 else f'1 or {channels} values (one per input channel)'
            return f'{flag} takes {counts}, got {len(value)}'
    return None


def _interpolation(flag: str, mode: str, extra: Tuple[str, ...]) -> Optional[str]:
    """`mode` is one of timm's interpolation names or one of `extra` ('': the model's; 'random' in training)."""
    if mode in extra:
        return None
    try:
        str_to_interp_mode(mode)
    except KeyError:
        return f'{flag} {mode}: unknown interpolation'
    return None


def _shared_names(args: argparse.Namespace) -> Optional[str]:
    """Names of flags validate.py shares: interpolation, image mode, compile backend."""
    problem = _interpolation('--interpolation', args.interpolation, ('',))
    if problem:
        return problem
    if args.input_img_mode is not None and args.input_img_mode not in Image.MODES:
        return f'--input-img-mode {args.input_img_mode}: not a PIL image mode ({", ".join(Image.MODES)})'
    if args.torchcompile and args.torchcompile not in _compile_backends():
        return f'--torchcompile {args.torchcompile}: unknown backend (see torch._dynamo.list_backends())'
    return None


def _names(args: argparse.Namespace) -> Optional[str]:
    """Names timm looks up: optimizer, scheduler, train interpolation, random erasing, crop mode, AutoAugment."""
    name = args.opt.lower().split('_')[-1]
    try:
        get_optimizer_info(name)
    except ValueError:
        return f'--opt {args.opt}: unknown optimizer (see timm.optim.list_optimizers())'
    try:
        create_scheduler_v2(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), sched=args.sched)
    except ValueError:
        return f'--sched {args.sched}: unknown scheduler'
    if args.lr_base_scale not in ('', 'linear', 'sqrt'):
        return f'--lr-base-scale must be "linear" or "sqrt", got "{args.lr_base_scale}"'
    problem = _interpolation('--train-interpolation', args.train_interpolation, ('random', ''))
    if problem:
        return problem
    if args.remode not in ERASE_MODES:
        return f'--remode must be one of {ERASE_MODES[:3]}, got "{args.remode}"'
    if args.train_crop_mode is not None and args.train_crop_mode not in CROP_MODES:
        return f'--train-crop-mode must be one of {CROP_MODES}, got "{args.train_crop_mode}"'
    if args.aa:
        try:
            create_transform(32, is_training=True, auto_augment=args.aa)
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            return f'--aa {args.aa}: {e or "not a timm augmentation policy"}'
    return None


def check_shared_values(args: argparse.Namespace, flags: Dict[str, str]) -> Optional[str]:
    """The checks of the flags validate.py shares with train.py (ranges, --mean/--std per channel, interpolation,
    image mode, compile backend): the first problem as one line naming the flag, or None."""
    return _ranges(args, flags) or _channels(args) or _shared_names(args)


def check_values(args: argparse.Namespace, flags: Dict[str, str]) -> Optional[str]:
    """The first out-of-range value or unknown name among train.py's flags, as one line naming the flag."""
    return check_shared_values(args, flags) or _pairs(args) or _names(args)


def unsupported_flags(args: argparse.Namespace) -> Optional[str]:
    """One line for the first flag set that cannot apply here, or the first combination timm refuses."""
    for dest, (flag, why) in UNSUPPORTED.items():
        if getattr(args, dest) not in NO_OP_VALUES.get(dest, (None, False)):
            return f'{flag}: {why}'
    if args.model_dtype not in (None, 'float32') and (args.amp or args.apex_amp):
        return f'--model-dtype {args.model_dtype} excludes --amp (timm: AMP needs a float32 model)'
    if args.wandb_resume_id and not args.resume:
        return '--wandb-resume-id needs --resume (it continues a wandb run)'
    if args.jsd_loss and args.aug_splits < 2:
        return '--jsd-loss needs --aug-splits >= 2 (the loss compares the splits)'
    if args.split_bn and args.aug_splits < 2 and not args.resplit:
        return '--split-bn needs --aug-splits >= 2 or --resplit'
    if args.split_bn and args.sync_bn:
        return '--split-bn and --sync-bn exclude each other'
    if args.aug_splits and mixing_enabled(args):
        return '--aug-splits cannot be mixed (--mixup/--cutmix): the pairs would cross augmentation splits'
    if args.aug_splits and args.no_prefetcher:
        return '--aug-splits needs the prefetcher (drop --no-prefetcher): timm collates split batches there'
    if args.aug_splits and args.train_img_sizes is not None:
        return '--aug-splits and --train-img-sizes exclude each other (timm: not supported together)'
    if args.aug_repeats and args.train_img_sizes is not None:
        return '--aug-repeats and --train-img-sizes exclude each other here'
    if args.use_multi_epochs_loader and args.train_img_sizes is not None:
        return '--use-multi-epochs-loader and --train-img-sizes exclude each other (timm: not supported together)'
    return None


def _mixed_batches(args: argparse.Namespace) -> Optional[str]:
    """Mixing pairs sample i with B-1-i, so every mixed batch is even; --tokenmix needs a mixing branch."""
    # the batches that are mixed: --train-batch-sizes when given (-b then only sizes validation batches)
    flag, sizes = ('--train-batch-sizes', args.train_batch_sizes) if args.train_batch_sizes else \
        ('-b/--batch-size', [args.batch_size])
    odd = [size for size in sizes if size % 2]
    if mixing_enabled(args) and odd:
        return (f'{flag} must be even when mixing (--mixup/--cutmix/--tokenmix pair sample i with B-1-i), '
                f'got {odd[0]}')
    if args.tokenmix and not mixing_enabled(args):
        return '--tokenmix needs --cutmix > 0 (the token branch) and/or --mixup > 0'
    return None


def _teacher(args: argparse.Namespace) -> Optional[str]:
    """The teacher gives TokenMix its label weights: stored maps or an online teacher, with one weights source."""
    online = dict(teacher_checkpoint='--teacher-checkpoint', teacher_pretrained='--teacher-pretrained',
                  teacher_img_size='--teacher-img-size', teacher_amp='--teacher-amp')
    if args.teacher_maps:
        for dest, flag in online.items():
            if getattr(args, dest):
                return f'{flag} is for an online teacher; --teacher-maps reads stored maps'
        if not args.tokenmix or args.tokenmix_target == 'area':
            return ('--teacher-maps gives TokenMix its label weights: add --tokenmix (and --cutmix > 0) '
                    'without --tokenmix-target area')
    elif not args.teacher_model:
        for dest, flag in dict(online, teacher_topk='--teacher-topk').items():
            if getattr(args, dest):
                return f'{flag} needs --teacher-model'
        if args.tokenmix_target == 'teacher':
            return '--tokenmix-target teacher needs --teacher-model'
    elif not args.tokenmix:
        return '--teacher-model is used by TokenMix only: add --tokenmix (and --cutmix > 0)'
    elif args.tokenmix_target == 'area':
        return '--tokenmix-target area ignores the teacher: drop --teacher-model or use --tokenmix-target auto'
    if args.teacher_checkpoint and args.teacher_pretrained:
        return '--teacher-checkpoint and --teacher-pretrained exclude each other'
    return None


def _aug_order(args: argparse.Namespace) -> Optional[str]:
    """--aug-order authors moves timm's random-resized crop after the flip and RandAugment, in the one pipeline that
    has it; --no-aug turns every augmentation off, and with it their order (as it overrides every augmentation flag)."""
    if args.aug_order != 'authors' or args.no_aug:
        return None
    if args.train_crop_mode not in (None, 'rrc'):
        return (f'--aug-order authors moves the random-resized crop (--train-crop-mode rrc), which --train-crop-mode '
                f'{args.train_crop_mode} replaces')
    if args.aug_splits:
        return '--aug-order authors and --aug-splits exclude each other (the splits share timm\'s crop-first pipeline)'
    if args.train_img_sizes is not None:
        return '--aug-order authors and --train-img-sizes exclude each other here'
    return None


def check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """train.py's rules in order (--data-dir, values, flags that cannot apply, augmentation order, mixed batches,
    teacher): the first problem ends in `parser.error`, one line naming the flag. Then the defaults derived from
    other flags are set."""
    args.data_dir = args.data_dir or args.data
    problem = (None if args.data_dir else '--data-dir is required') or check_values(args, flag_names(parser)) \
        or unsupported_flags(args) or _aug_order(args) or _mixed_batches(args) or _teacher(args)
    if problem:
        parser.error(problem)
    if args.tokenmix_target_norm is None:
        args.tokenmix_target_norm = 'none' if args.bce_loss else 'sum'
    if args.drop_connect is not None and args.drop_path is None:
        args.drop_path = args.drop_connect  # timm's deprecated alias


def output_problem(path: str, flag: str = '--output', shown: Optional[str] = None) -> Optional[str]:
    """Why the run could not write under `path` (a file in the way, no write permission, a read-only file
    system), or None. The nearest existing folder decides, since the missing ones will be created in it.
    The message names `flag` with `shown` (default: `path`), e.g. the file that goes in that folder."""
    shown = path if shown is None else shown
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{flag} '{shown}': '{probe}' is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{flag} '{shown}': cannot write in '{probe}' (no permission or a read-only file system)"
    return None
