"""Command line of train.py: timm's flag names and meanings, plus the TokenMix and teacher flags.

`parse_args(argv)` reads an optional YAML file given with `-c/--config` whose values become the defaults
(the command line still overrides them); a YAML key that is not a flag is an error naming it. Checks that
need nothing but the flags themselves (an odd batch with mixing, teacher flags without a teacher, ...)
end in `parser.error`, so the message names the flag and the exit code is 2.
"""
import argparse
import math
from typing import Any, Dict, List, Optional, Sequence

import yaml
from timm.utils import ParseKwargs

__all__ = ['build_parser', 'parse_args', 'args_to_yaml', 'mixing_enabled', 'resolve_lr']


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                        help='path to dataset (positional is deprecated, use --data-dir)')
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name ("<type>/<name>") (default: ImageFolder/ImageTar if empty)')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='allow download of dataset for torch/ and tfds/ datasets that support it')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='dataset validation split (default: validation)')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='path to class to idx mapping file (default: "")')
    group.add_argument('--skip-bad-images', action='store_true', default=False,
                       help='skip unreadable images (counted and logged) instead of stopping with an error')


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet50', type=str, metavar='MODEL',
                       help='name of model to train (default: "resnet50")')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start with pretrained version of specified network (if avail)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='load this checkpoint into model after initialization (default: none)')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume full model and optimizer state from checkpoint (default: none)')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='prevent resume of optimizer state when resuming model')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of label classes (default: the number of class folders in the train split)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL',
                       help='global pool type, one of (fast, avg, max, avgmax, avgmaxc). Model default if None.')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='image size; also builds ViT-family models at this size (default: model default)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels (default: 3)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar=('C', 'H', 'W'),
                       help='input all image dimensions (d h w, e.g. --input-size 3 224 224)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                       help='input image center crop percent (for validation only)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help='override mean pixel value of dataset')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help='override std deviation of dataset')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='image resize interpolation type (overrides model)')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='input batch size for training, per process (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='validation batch size override (default: None)')
    group.add_argument('--channels-last', action='store_true', default=False, help='use channels_last memory layout')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='the number of steps to accumulate gradients (default: 1)')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='enable gradient checkpointing through model blocks/stages')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='other model arguments as key=value (e.g. patch_size=8)')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='enable compilation w/ specified backend (default: inductor)')


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default=None, type=str,
                       help='device to use for training (default: "cuda" when available, else "cpu")')
    group.add_argument('--amp', action='store_true', default=False,
                       help='use native torch AMP (mixed precision) for the student')
    group.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'),
                       help='lower precision AMP dtype (default: float16)')
    group.add_argument('--apex-amp', action='store_true', default=False,
                       help='use NVIDIA apex AMP (O1) instead of native AMP; needs apex installed')
    group.add_argument('--dist-backend', default=None, type=str,
                       help='torch.distributed backend (default: nccl on cuda, gloo on cpu)')
    group.add_argument('--dist-url', default=None, type=str, help='torch.distributed init url (default: env://)')
    group.add_argument('--local-rank', '--local_rank', default=0, type=int,
                       help='set by torch.distributed.launch; torchrun uses the LOCAL_RANK variable')
    group.add_argument('--sync-bn', action='store_true', default=False,
                       help='synchronise BatchNorm statistics across processes during training')
    group.add_argument('--dist-bn', type=str, default='reduce', choices=('broadcast', 'reduce', ''),
                       help='BatchNorm statistics across processes before each evaluation: "reduce" (average), '
                            '"broadcast" (from rank 0) or "" (leave; default: reduce)')


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='optimizer (default: "sgd")')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON',
                       help='optimizer epsilon (default: None, use opt default)')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                       help='optimizer betas (default: None, use opt default)')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='clip gradient norm (default: None, no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm', choices=('norm', 'value', 'agc'),
                       help='gradient clipping mode (default: "norm")')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='other optimizer arguments as key=value')


def _add_schedule_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='LR scheduler (default: "cosine")')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='apply LR scheduler step on update instead of epoch end')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate, overrides lr-base if set (default: None)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate: lr = lr_base * global_batch_size / lr_base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV',
                       help='base learning rate batch size (divisor, default: 256)')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR',
                       help='warmup learning rate (default: 1e-5)')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR',
                       help='lower lr bound for cyclic schedulers that hit 0 (default: 0)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train (default: 300)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                       help='manual epoch number (useful on restarts)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='list of decay epoch indices for multistep lr. must be increasing')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N',
                       help='epochs to warmup LR, if scheduler supports')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='exclude warmup period from decay schedule')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='patience epochs for Plateau LR scheduler (default: 10)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                       help='LR decay rate (default: 0.1)')


def _add_augmentation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False,
                       help='disable all training augmentation, override other train aug args')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='random resize scale (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random resize aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                       help='color jitter factor (default: 0.4)')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='use AutoAugment policy, e.g. "rand-m9-mstd0.5-inc1" (default: None)')
    group.add_argument('--bce-loss', action='store_true', default=False, help='enable BCE loss w/ Mixup/CutMix use')
    group.add_argument('--bce-target-thresh', type=float, default=None,
                       help='threshold for binarizing softened BCE targets (default: None, disabled)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase prob (default: 0.)')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='random erase count (default: 1)')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix', type=float, default=0.0,
                       help='cutmix alpha, cutmix enabled if > 0; with --tokenmix the token branch (default: 0.)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='probability of performing mixup or cutmix when either/both is enabled')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of switching to cutmix (token mixing) when both are enabled')
    group.add_argument('--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'),
                       help='how to apply mixup/cutmix params: per "batch", "pair", or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='turn off mixup after this epoch, disabled if 0 (default: 0)')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='training interpolation (random, bilinear, bicubic; default: "random")')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate (default: 0.)')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate (default: None)')


def _add_tokenmix_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('TokenMix parameters', 'TokenMix replaces timm Mixup; the region '
                                      '(--cutmix) branch becomes token mixing')
    group.add_argument('--tokenmix', action='store_true', default=False, help='mix with TokenMix instead of Mixup')
    group.add_argument('--tokenmix-mask', default='block', choices=('block', 'random'),
                       help='token mask shape: BEiT-style blocks or uniformly random tokens (default: block)')
    group.add_argument('--tokenmix-min-tokens', type=int, default=14, metavar='N',
                       help='tokens pasted from the partner on top of (1 - lam) * N (default: 14)')
    group.add_argument('--tokenmix-lam', default='constant', choices=('constant', 'beta'),
                       help='lam of token batches: 0.5 as the authors, or a Beta(cutmix, cutmix) draw')
    group.add_argument('--tokenmix-target', default='auto', choices=('auto', 'teacher', 'area'),
                       help='label weights from the teacher\'s activation maps or the token area '
                            '(default: auto = teacher when --teacher-model is given)')
    group.add_argument('--tokenmix-target-norm', default=None, choices=('none', 'sum'),
                       help='"none": raw teacher weights (authors, for BCE); "sum": weights sum to 1 '
                            '(default: none with --bce-loss, else sum)')
    group.add_argument('--tokenmix-patch-size', type=int, default=None, metavar='N',
                       help='token size in pixels (default: the student\'s patch size, 16 for models without one)')
    group = parser.add_argument_group('Teacher parameters', 'frozen teacher giving TokenMix its label weights')
    group.add_argument('--teacher-model', default='', type=str, metavar='MODEL', help='timm name of the teacher')
    group.add_argument('--teacher-checkpoint', default='', type=str, metavar='PATH',
                       help='teacher weights (a timm checkpoint; EMA weights when present)')
    group.add_argument('--teacher-pretrained', action='store_true', default=False,
                       help='load the teacher\'s pretrained timm weights')
    group.add_argument('--teacher-img-size', type=int, default=None, metavar='N',
                       help='resize the teacher\'s input to N px (cheaper targets; default: the student\'s size)')
    group.add_argument('--teacher-amp', action='store_true', default=False,
                       help='run the teacher under autocast with --amp-dtype')
    group.add_argument('--teacher-topk', type=int, default=0, metavar='K',
                       help='zero the own-class map where the class is outside the teacher\'s top K (authors: 5; '
                            'default: 0 = whole map)')
    group.add_argument('--teacher-maps', default='', type=str, metavar='DIR',
                       help='stored teacher maps (tools/precompute_teacher_maps.py, or the authors\' per-image .pt '
                            'folder) instead of an online teacher; with --teacher-model, that name is checked')


def _add_misc_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='keep an exponential moving average of the model weights')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='decay factor for EMA (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', default=False,
                       help='enable warmup of the EMA decay')
    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='how many batches to wait before logging training status')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of checkpoints to keep (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='how many training processes to use (default: 4)')
    group.add_argument('--pin-mem', action='store_true', default=False,
                       help='pin CPU memory in DataLoader for more efficient transfer to GPU')
    group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='path to output folder (default: none, current dir)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of train experiment, name of sub-folder for output')
    group.add_argument('--eval-metric', default='top1', type=str, choices=('top1', 'top5', 'loss'),
                       help='metric ranking checkpoints (default: "top1")')


def build_parser() -> argparse.ArgumentParser:
    """The training parser, arguments grouped as in timm's train.py."""
    parser = argparse.ArgumentParser(description='TokenMix training (timm flags)')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config file: its values are the defaults, the command line overrides them')
    for add in (_add_dataset_args, _add_model_args, _add_device_args, _add_optimizer_args, _add_schedule_args,
                _add_augmentation_args, _add_tokenmix_args, _add_misc_args):
        add(parser)
    return parser


def _coerce(parser: argparse.ArgumentParser, action: argparse.Action, key: str, value: Any) -> Any:
    """A YAML value as the flag would have parsed it (PyYAML reads `5e-4` as a string)."""
    def one(v: Any) -> Any:
        if action.type is not None and isinstance(v, str):
            try:
                return action.type(v)
            except (TypeError, ValueError):
                parser.error(f'config key "{key}": cannot read {v!r} as {getattr(action.type, "__name__", "value")}')
        return v
    value = [one(v) for v in value] if isinstance(value, list) else one(value)
    if action.choices is not None and value is not None and value not in action.choices:
        parser.error(f'config key "{key}": {value!r} is not one of {sorted(action.choices)}')
    return value


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    """Flag defaults from a YAML file; unknown keys end the parse with an error naming them."""
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError as e:
        parser.error(f'--config {path}: {e.strerror}')
    except yaml.YAMLError as e:
        parser.error(f'--config {path}: not valid YAML ({e})')
    if not isinstance(cfg, dict):
        parser.error(f'--config {path}: expected a mapping of flag names to values')
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
    defaults = {}
    for key, value in cfg.items():
        dest = str(key).replace('-', '_')
        if dest not in actions:
            parser.error(f'--config {path}: unknown key "{key}" (not a train.py flag)')
        defaults[dest] = _coerce(parser, actions[dest], str(key), value)
    return defaults


def mixing_enabled(args: argparse.Namespace) -> bool:
    """Whether Mixup/CutMix (or TokenMix) is active, as timm decides it."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Errors that the flags alone reveal; each names its flag."""
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        parser.error('--data-dir is required')
    positive = dict(batch_size='-b/--batch-size', epochs='--epochs', grad_accum_steps='--grad-accum-steps',
                    log_interval='--log-interval', checkpoint_hist='--checkpoint-hist')
    for dest, flag in positive.items():
        if getattr(args, dest) < 1:
            parser.error(f'{flag} must be >= 1, got {getattr(args, dest)}')
    if args.workers < 0:
        parser.error(f'-j/--workers must be >= 0, got {args.workers}')
    for dest, flag in (('img_size', '--img-size'), ('teacher_img_size', '--teacher-img-size'),
                       ('tokenmix_patch_size', '--tokenmix-patch-size'), ('num_classes', '--num-classes')):
        value = getattr(args, dest)
        if value is not None and value < 1:
            parser.error(f'{flag} must be >= 1, got {value}')
    if args.cutmix_minmax is not None and len(args.cutmix_minmax) != 2:
        parser.error(f'--cutmix-minmax takes two values (min max), got {args.cutmix_minmax}')
    if mixing_enabled(args) and args.batch_size % 2:
        parser.error(f'-b/--batch-size must be even when mixing (--mixup/--cutmix/--tokenmix pair sample i '
                     f'with B-1-i), got {args.batch_size}')
    if args.tokenmix and not mixing_enabled(args):
        parser.error('--tokenmix needs --cutmix > 0 (the token branch) and/or --mixup > 0')
    teacher_flags = dict(teacher_checkpoint='--teacher-checkpoint', teacher_pretrained='--teacher-pretrained',
                         teacher_img_size='--teacher-img-size', teacher_amp='--teacher-amp')
    if args.teacher_topk < 0:
        parser.error(f'--teacher-topk must be >= 0 (0 = whole map), got {args.teacher_topk}')
    if args.teacher_maps:
        for dest, flag in teacher_flags.items():
            if getattr(args, dest):
                parser.error(f'{flag} is for an online teacher; --teacher-maps reads stored maps')
        if args.skip_bad_images:
            parser.error('--skip-bad-images loads the next image in place of a bad one, whose stored map the '
                         'loader cannot tell: fix the images or drop --teacher-maps')
        if not args.tokenmix or args.tokenmix_target == 'area':
            parser.error('--teacher-maps gives TokenMix its label weights: add --tokenmix (and --cutmix > 0) '
                         'without --tokenmix-target area')
    elif not args.teacher_model:
        for dest, flag in teacher_flags.items():
            if getattr(args, dest):
                parser.error(f'{flag} needs --teacher-model')
        if args.tokenmix_target == 'teacher':
            parser.error('--tokenmix-target teacher needs --teacher-model')
    elif not args.tokenmix:
        parser.error('--teacher-model is used by TokenMix only: add --tokenmix (and --cutmix > 0)')
    elif args.tokenmix_target == 'area':
        parser.error('--tokenmix-target area ignores the teacher: drop --teacher-model or use --tokenmix-target auto')
    if args.teacher_checkpoint and args.teacher_pretrained:
        parser.error('--teacher-checkpoint and --teacher-pretrained exclude each other')
    if args.tokenmix_target_norm is None:
        args.tokenmix_target_norm = 'none' if args.bce_loss else 'sum'
    if args.lr_base_scale not in ('', 'linear', 'sqrt'):
        parser.error(f'--lr-base-scale must be "linear" or "sqrt", got "{args.lr_base_scale}"')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse train.py's command line (`sys.argv[1:]` when `argv` is None), YAML defaults first."""
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str)
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_yaml_defaults(parser, known.config))
    args = parser.parse_args(argv)
    _check(parser, args)
    return args


def args_to_yaml(args: argparse.Namespace, keys: Optional[List[str]] = None) -> str:
    """The flags of a run as YAML that `-c` reads back (only parser keys, so it reloads without error)."""
    values = vars(args)
    keys = keys if keys is not None else [a.dest for a in build_parser()._actions if a.dest != 'help']
    return yaml.safe_dump({k: values[k] for k in keys if k in values}, default_flow_style=False, sort_keys=False)


def resolve_lr(args: argparse.Namespace, world_size: int) -> float:
    """timm's rule: --lr when given, else --lr-base scaled by the global batch over --lr-base-size."""
    if args.lr is not None:
        return args.lr
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    return args.lr_base * (math.sqrt(ratio) if scale == 'sqrt' else ratio)
