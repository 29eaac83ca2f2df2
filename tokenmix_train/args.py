"""Command line of train.py: every flag of timm's train.py (same name, default and meaning), plus TokenMix and
teacher flags.

`parse_train_args(argv)` reads an optional YAML file given with `-c/--config` whose values become the defaults
(the command line still overrides them). It accepts any `args.yaml` written by timm's train.py or by this one:
keys of older timm parsers are ignored with a note, other unknown keys with one warning naming them all. Every
boolean flag has a `--no-...` form. Bad values (wrong type, out of range, unknown choice) end in
`parser.error`: one line naming the flag or key, exit code 2. Compatibility tables live in `args_timm`, value
rules in `args_checks`.
"""
import argparse
import math
import re
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Set, Tuple

import yaml
from timm.utils import ParseKwargs

from .args_checks import check_values, flag_names
from .args_timm import IGNORED_KEYS, WEIGHT_SOURCES, mixing_enabled, unsupported_flags

__all__ = ['OneLineParser', 'build_parser', 'parse_args', 'parse_train_args', 'args_to_yaml', 'mixing_enabled',
           'resolve_lr']

BOOL = argparse.BooleanOptionalAction


def _negated(group, flag: str, positive: str, help: str) -> None:
    """timm's negative switches (`--no-aug`) plus a positive form (`--aug`) that switches them back off."""
    dest = flag[2:].replace('-', '_')
    group.add_argument(flag, dest=dest, action='store_true', default=False, help=help)
    group.add_argument(positive, dest=dest, action='store_false', help=f'undo {flag}')


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                        help='path to dataset (positional is deprecated, use --data-dir)')
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name ("<type>/<name>") (default: ImageFolder/ImageTar if empty)')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='dataset validation split (default: validation)')
    group.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                       help='number of samples in the train split, for iterable datasets (wds/, tfds/, hfids/)')
    group.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                       help='number of samples in the validation split, for iterable datasets')
    group.add_argument('--dataset-download', action=BOOL, default=False,
                       help='allow download of torch/ and tfds/ datasets that support it')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='path to class to idx mapping file (default: "")')
    group.add_argument('--input-img-mode', default=None, type=str,
                       help='image conversion mode of the dataset (default: RGB, L for 1 channel)')
    group.add_argument('--input-key', default=None, type=str, help='dataset key for input images (hfds/, wds/)')
    group.add_argument('--target-key', default=None, type=str, help='dataset key for target labels (hfds/, wds/)')
    group.add_argument('--dataset-trust-remote-code', action=BOOL, default=False,
                       help='allow a Hugging Face dataset to run code from its repository')
    group.add_argument('--skip-bad-images', action=BOOL, default=False,
                       help='skip unreadable images (counted and logged) instead of stopping with an error')


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet50', type=str, metavar='MODEL',
                       help='name of model to train (default: "resnet50")')
    group.add_argument('--pretrained', action=BOOL, default=False,
                       help='start with pretrained version of specified network (if avail)')
    group.add_argument('--pretrained-path', default=None, type=str, metavar='PATH',
                       help='load this file as the pretrained weights (head adapted; with --pretrained)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='load this checkpoint into model after initialization (default: none)')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume full model and optimizer state from checkpoint (default: none)')
    _negated(group, '--no-resume-opt', '--resume-opt', 'prevent resume of optimizer state when resuming model')
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
    group.add_argument('--channels-last', action=BOOL, default=False, help='use channels_last memory layout')
    group.add_argument('--fuser', default='', type=str, choices=('', 'te', 'old', 'nvfuser'), help='select jit fuser')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='the number of steps to accumulate gradients (default: 1)')
    group.add_argument('--grad-checkpointing', action=BOOL, default=False,
                       help='enable gradient checkpointing through model blocks/stages')
    group.add_argument('--fast-norm', action=BOOL, default=False, help='enable experimental fast-norm')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='other model arguments as key=value (e.g. patch_size=8)')
    group.add_argument('--head-init-scale', default=None, type=float, help='multiply the classifier init by this')
    group.add_argument('--head-init-bias', default=None, type=float, help='set the classifier bias to this')
    group.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None)')
    group.add_argument('--torchscript', action=BOOL, default=False, help='torch.jit.script the full model')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='enable compilation w/ specified backend (default: inductor)')


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default=None, type=str,
                       help='device to use for training (default: "cuda" when available, else "cpu")')
    group.add_argument('--amp', action=BOOL, default=False,
                       help='use native torch AMP (mixed precision) for the student')
    group.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'),
                       help='lower precision AMP dtype (default: float16)')
    group.add_argument('--model-dtype', default=None, type=str, choices=('float32', 'float16', 'bfloat16'),
                       help='model dtype override (non-AMP) (default: float32)')
    group.add_argument('--apex-amp', action=BOOL, default=False,
                       help='use NVIDIA apex AMP (O1) instead of native AMP; needs apex installed')
    _negated(group, '--no-ddp-bb', '--ddp-bb', 'force broadcast buffers for native DDP to off')
    group.add_argument('--synchronize-step', action=BOOL, default=False,
                       help='torch.cuda.synchronize() at the end of each step')
    group.add_argument('--dist-backend', default=None, type=str,
                       help='torch.distributed backend (default: nccl on cuda, gloo on cpu)')
    group.add_argument('--dist-url', default=None, type=str, help='torch.distributed init url (default: env://)')
    group.add_argument('--local-rank', '--local_rank', default=0, type=int,
                       help='set by torch.distributed.launch; torchrun uses the LOCAL_RANK variable')
    group.add_argument('--device-modules', default=None, type=str, nargs='+',
                       help='Python modules to import for a device backend')


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
    group.add_argument('--layer-decay-min-scale', type=float, default=0,
                       help='layer-wise lr decay minimum scale clamp (default: 0)')
    group.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                       help='layer-wise lr decay scale below which parameters are frozen (default: None)')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='other optimizer arguments as key=value (e.g. amsgrad=True)')


def _add_schedule_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='LR scheduler (default: "cosine")')
    group.add_argument('--sched-on-updates', action=BOOL, default=False,
                       help='apply LR scheduler step on update instead of epoch end')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate, overrides lr-base if set (default: None)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate: lr = lr_base * global_batch_size / lr_base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV',
                       help='base learning rate batch size (divisor, default: 256)')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='learning rate noise on/off epoch percentages')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT',
                       help='learning rate noise limit percent (default: 0.67)')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV',
                       help='learning rate noise std-dev (default: 1.0)')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT',
                       help='learning rate cycle len multiplier (default: 1.0)')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT',
                       help='amount to decay each learning rate cycle (default: 0.5)')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N',
                       help='learning rate cycle limit, cycles enabled if > 1')
    group.add_argument('--lr-k-decay', type=float, default=1.0, help='learning rate k-decay for cosine/poly')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR',
                       help='warmup learning rate (default: 1e-5)')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR',
                       help='lower lr bound for cyclic schedulers that hit 0 (default: 0)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train (default: 300)')
    group.add_argument('--epoch-repeats', type=float, default=0., metavar='N',
                       help='epoch repeat multiplier (times to repeat dataset epoch per train epoch, iterable '
                            'datasets)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                       help='manual epoch number (useful on restarts)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='list of decay epoch indices for multistep lr. must be increasing')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N',
                       help='epochs to warmup LR, if scheduler supports')
    group.add_argument('--warmup-prefix', action=BOOL, default=False,
                       help='exclude warmup period from decay schedule')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='patience epochs for Plateau LR scheduler (default: 10)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                       help='LR decay rate (default: 0.1)')


def _add_augmentation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Augmentation and regularization parameters')
    _negated(group, '--no-aug', '--aug', 'disable all training augmentation, override other train aug args')
    group.add_argument('--train-crop-mode', type=str, default=None, help='crop mode in train (default: rrc)')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='random resize scale (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random resize aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                       help='color jitter factor (default: 0.4)')
    group.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT',
                       help='probability of applying any color jitter')
    group.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT',
                       help='probability of applying random grayscale conversion')
    group.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT',
                       help='probability of applying gaussian blur')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='use AutoAugment policy, e.g. "rand-m9-mstd0.5-inc1" (default: None)')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='number of augmentation repetitions (timm\'s RepeatAugSampler; default: 0)')
    group.add_argument('--aug-splits', type=int, default=0,
                       help='number of augmentation splits (default: 0, valid: 0 or >=2)')
    group.add_argument('--jsd-loss', action=BOOL, default=False,
                       help='enable Jensen-Shannon Divergence + CE loss; use with --aug-splits')
    group.add_argument('--bce-loss', action=BOOL, default=False, help='enable BCE loss w/ Mixup/CutMix use')
    group.add_argument('--bce-sum', action=BOOL, default=False, help='sum over classes when using BCE loss')
    group.add_argument('--bce-target-thresh', type=float, default=None,
                       help='threshold for binarizing softened BCE targets (default: None, disabled)')
    group.add_argument('--bce-pos-weight', type=float, default=None, help='positive weighting for BCE loss')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase prob (default: 0.)')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='random erase count (default: 1)')
    group.add_argument('--resplit', action=BOOL, default=False,
                       help='do not random erase first (clean) augmentation split')
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
    group.add_argument('--drop-connect', type=float, default=None, metavar='PCT',
                       help='drop connect rate, deprecated: taken as --drop-path when that is not given')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate (default: None)')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='drop block rate (default: None)')


def _add_bn_ema_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Batch norm parameters')
    group.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override (if not None)')
    group.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override (if not None)')
    group.add_argument('--sync-bn', action=BOOL, default=False,
                       help='synchronise BatchNorm statistics across processes (timm\'s converter)')
    group.add_argument('--dist-bn', type=str, default='reduce', choices=('broadcast', 'reduce', ''),
                       help='BatchNorm statistics across processes before each evaluation: "reduce" (average), '
                            '"broadcast" (from rank 0) or "" (leave; default: reduce)')
    group.add_argument('--split-bn', action=BOOL, default=False,
                       help='enable separate BN layers per augmentation split')
    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action=BOOL, default=False,
                       help='keep an exponential moving average of the model weights')
    group.add_argument('--model-ema-force-cpu', action=BOOL, default=False,
                       help='keep the EMA on the CPU (rank 0 only); disables EMA validation')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='decay factor for EMA (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action=BOOL, default=False, help='enable warmup of the EMA decay')


def _add_tokenmix_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('TokenMix parameters', 'TokenMix replaces timm Mixup; the region '
                                      '(--cutmix) branch becomes token mixing')
    group.add_argument('--tokenmix', action=BOOL, default=False, help='mix with TokenMix instead of Mixup')
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
    group.add_argument('--teacher-pretrained', action=BOOL, default=False,
                       help='load the teacher\'s pretrained timm weights')
    group.add_argument('--teacher-img-size', type=int, default=None, metavar='N',
                       help='resize the teacher\'s input to N px (cheaper targets; default: the student\'s size)')
    group.add_argument('--teacher-amp', action=BOOL, default=False,
                       help='run the teacher under autocast with --amp-dtype')
    group.add_argument('--teacher-topk', type=int, default=0, metavar='K',
                       help='zero the own-class map where the class is outside the teacher\'s top K (authors: 5; '
                            'default: 0 = whole map; with --teacher-maps, every class the store keeps)')
    group.add_argument('--teacher-maps', default='', type=str, metavar='DIR',
                       help='stored teacher maps (tools/precompute_teacher_maps.py, or the authors\' per-image .pt '
                            'folder) instead of an online teacher; with --teacher-model, that name is checked')


def _add_misc_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--worker-seeding', type=str, default='all', choices=('all', 'part'),
                       help='worker seed mode (default: all)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='how many batches to wait before logging training status')
    group.add_argument('--val-interval', type=int, default=1, metavar='N',
                       help='how many epochs between validation and checkpointing')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='how many updates to wait before writing a recovery checkpoint (0: never)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of checkpoints to keep (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='how many training processes to use (default: 4)')
    group.add_argument('--save-images', action=BOOL, default=False,
                       help='save images of input batches every log interval for debugging')
    group.add_argument('--pin-mem', action=BOOL, default=False,
                       help='pin CPU memory in DataLoader for more efficient transfer to GPU')
    _negated(group, '--no-prefetcher', '--prefetcher', 'disable fast prefetcher')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='path to output folder (default: none, current dir)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of train experiment, name of sub-folder for output')
    group.add_argument('--eval-metric', default='top1', type=str, choices=('top1', 'top5', 'loss'),
                       help='metric ranking checkpoints (default: "top1")')
    group.add_argument('--tta', type=int, default=0, metavar='N',
                       help='test/inference time augmentation factor (not in training here: use validate.py)')
    group.add_argument('--use-multi-epochs-loader', action=BOOL, default=False,
                       help='use the multi-epochs-loader to save time at the beginning of every epoch')
    group.add_argument('--log-wandb', action=BOOL, default=False,
                       help='log training and validation metrics to wandb (pip install wandb)')
    group.add_argument('--wandb-project', default=None, type=str, help='wandb project name')
    group.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    group.add_argument('--wandb-resume-id', default='', type=str, metavar='ID',
                       help='if resuming a run, the id of the run in wandb')
    group = parser.add_argument_group('Scheduled resolution parameters')
    group.add_argument('--train-img-sizes', type=int, nargs='+', default=None,
                       help='per-batch square image sizes for scheduled resolution training')
    group.add_argument('--train-batch-sizes', type=int, nargs='+', default=None,
                       help='batch size for each --train-img-sizes choice (default: --batch-size for every choice)')
    group.add_argument('--train-size-probs', type=float, nargs='+', default=None,
                       help='base sampling weights for --train-img-sizes (default: uniform)')
    group.add_argument('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'),
                       help='resolution choice schedule; progressive moves from the first size to the last')
    group.add_argument('--train-size-schedule-spread', type=float, default=0.65,
                       help='progressive schedule spread in resolution-choice index units (default: 0.65)')
    group.add_argument('--train-size-random-mix', type=float, default=0.1,
                       help='fraction of uniform random choices mixed into a progressive schedule (default: 0.1)')
    group.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None,
                       help='fixed loader batches (before gradient accumulation) per epoch; inferred if unspecified')
    group.add_argument('--variable-batch-loss-scale', default='none', type=str, choices=('none', 'sqrt', 'linear'),
                       help='scale gradients relative to the policy-average scheduled batch size')
    group = parser.add_argument_group('NaFlex parameters', 'accepted for timm compatibility; not supported here')
    group.add_argument('--naflex-loader', action=BOOL, default=False,
                       help='use NaFlex loader (requires NaFlex compatible model)')
    group.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024],
                       help='sequence lengths to use for NaFlex loader')
    group.add_argument('--naflex-max-seq-len', type=int, default=576,
                       help='fixed maximum sequence length for NaFlex loader (validation)')
    group.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None,
                       help='list of patch sizes for variable patch size training')
    group.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None,
                       help='probabilities for each patch size')
    group.add_argument('--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear'),
                       help='scale loss (gradient) by batch_size')
    group.add_argument('--naflex-patchify-channels-first', action=BOOL, default=False,
                       help='emit NaFlex patches in C-P-P layout')
    group = parser.add_argument_group('Knowledge distillation parameters',
                                      'timm\'s KD flags: accepted, not supported here (see README)')
    group.add_argument('--kd-model-name', default=None, type=str, help='name of teacher model for distillation')
    group.add_argument('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'],
                       help='type of distillation (default: logit)')
    group.add_argument('--kd-loss-type', default='kl', type=str, help='loss function for logit distillation')
    group.add_argument('--distill-loss-weight', default=None, type=float, help='weight for distillation loss')
    group.add_argument('--task-loss-weight', default=None, type=float, help='weight for task loss')
    group.add_argument('--kd-temperature', default=4.0, type=float, help='temperature for distillation softmax')
    group.add_argument('--kd-student-feature-dim', default=None, type=int, help='student feature dimension')
    group.add_argument('--kd-teacher-feature-dim', default=None, type=int, help='teacher feature dimension')
    group.add_argument('--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard'],
                       help='token distillation type (default: soft)')


class OneLineParser(argparse.ArgumentParser):
    """An error is one line (`PROG: error: ...`, exit code 2): the usage of dozens of flags would bury it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def build_parser() -> argparse.ArgumentParser:
    """The training parser, arguments grouped as in timm's train.py."""
    parser = OneLineParser(prog='train.py', description='TokenMix training (timm flags)')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config file: its values are the defaults, the command line overrides them')
    for add in (_add_dataset_args, _add_model_args, _add_device_args, _add_optimizer_args, _add_schedule_args,
                _add_augmentation_args, _add_bn_ema_args, _add_misc_args, _add_tokenmix_args):
        add(parser)
    return parser


class _StrictLoader(yaml.SafeLoader):
    """YAML whose booleans are only true/false (YAML 1.1 also reads yes/no/on/off as booleans)."""


_BOOL_TAG = 'tag:yaml.org,2002:bool'
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r'^(?:true|True|TRUE|false|False|FALSE)$'), list('tTfF'))


def _is_bool_action(action: argparse.Action) -> bool:
    return isinstance(action, (BOOL, argparse._StoreTrueAction, argparse._StoreFalseAction))


def _coerce(action: argparse.Action, value: Any) -> Tuple[Any, Optional[str]]:
    """A YAML value as the flag would have parsed it, or (None, what is wrong).

    null is taken only where the flag's own default is None (timm writes those flags as null in its args.yaml).
    """
    if value is None:
        return None, (None if action.default is None else f'needs a value, got null (default: {action.default!r})')
    if _is_bool_action(action):
        return (value, None) if isinstance(value, bool) else (None, f'expects true or false, got {value!r}')
    if isinstance(action, ParseKwargs):
        return (value, None) if isinstance(value, dict) else (None, f'expects a mapping of key: value, got {value!r}')
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if many != isinstance(value, list):
        return None, (f'expects a list, got {value!r}' if many else f'expects one value, got a list {value!r}')
    kind = action.type or str
    name = {int: 'an integer', float: 'a number', str: 'text'}.get(kind, getattr(kind, '__name__', 'a value'))

    def one(v: Any) -> Any:
        if isinstance(v, (bool, list, dict)) or (kind is int and isinstance(v, float)):
            raise ValueError
        return kind(v)

    try:
        value = [one(v) for v in value] if many else one(value)
    except (TypeError, ValueError):
        return None, f'expects {name}, got {value!r}'
    if isinstance(action.nargs, int) and len(value) != action.nargs:
        return None, f'expects {action.nargs} values, got {len(value)}'
    for v in value if many else [value]:
        if action.choices is not None and v not in action.choices:
            return None, f'{v!r} is not one of {sorted(action.choices)}'
    return value, None


def _read_yaml(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            cfg = yaml.load(f, Loader=_StrictLoader) or {}
    except OSError as e:
        parser.error(f'--config {path}: {e.strerror}')
    except yaml.YAMLError as e:
        parser.error(f'--config {path}: not valid YAML ({" ".join(str(e).split())})')
    if not isinstance(cfg, dict):
        parser.error(f'--config {path}: expected a mapping of flag names to values')
    return cfg


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> Tuple[Dict[str, Any], List[str]]:
    """Flag defaults from a YAML file, and notes on the keys it ignores (one line per kind)."""
    actions: Dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest != 'help':
            actions.setdefault(action.dest, action)
    defaults, legacy, unknown = {}, [], []
    for key, value in _read_yaml(parser, path).items():
        dest = str(key).replace('-', '_')
        if dest in actions:
            defaults[dest], problem = _coerce(actions[dest], value)
            if problem:
                parser.error(f'--config {path}: key "{key}" {problem}')
        elif dest in IGNORED_KEYS:
            legacy.append(str(key))
        else:
            unknown.append(str(key))
    notes = []
    if legacy:
        notes.append(('info', f'--config {path}: ignored keys of older timm versions or set by the run: '
                              f'{", ".join(legacy)}'))
    if unknown:
        notes.append(('warning', f'--config {path}: unknown keys (not train.py flags, ignored): {", ".join(unknown)}'))
    return defaults, notes


def _given_on_command_line(argv: Optional[Sequence[str]]) -> Set[str]:
    """The dests that `argv` itself sets (not the YAML, not the defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(parser.parse_known_args(argv)[0]))


def _prefer_command_line_weights(args: argparse.Namespace, given: Set[str], from_yaml: Set[str]) -> List[str]:
    """A weights source given on the command line switches off another source set by the YAML for that model."""
    notes = []
    for model, sources in WEIGHT_SOURCES.items():
        chosen = [s for s in sources if s in given and getattr(args, s)]
        for other in sources:
            if chosen and other not in chosen and other in from_yaml and other not in given and getattr(args, other):
                setattr(args, other, False if isinstance(getattr(args, other), bool) else '')
                notes.append(('info', f'{model} weights: --{chosen[0].replace("_", "-")} on the command line replaces '
                                      f'"{other}" of the config file'))
    return notes


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Errors that the flags alone reveal; each names its flag. Resolves derived defaults."""
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        parser.error('--data-dir is required')
    for problem in (check_values(args, flag_names(parser)), unsupported_flags(args)):
        if problem:
            parser.error(problem)
    # the batches that are mixed: --train-batch-sizes when given (-b then only sizes validation batches)
    flag, sizes = ('--train-batch-sizes', args.train_batch_sizes) if args.train_batch_sizes else \
        ('-b/--batch-size', [args.batch_size])
    odd = [size for size in sizes if size % 2]
    if mixing_enabled(args) and odd:
        parser.error(f'{flag} must be even when mixing (--mixup/--cutmix/--tokenmix pair sample i with B-1-i), '
                     f'got {odd[0]}')
    if args.tokenmix and not mixing_enabled(args):
        parser.error('--tokenmix needs --cutmix > 0 (the token branch) and/or --mixup > 0')
    teacher_flags = dict(teacher_checkpoint='--teacher-checkpoint', teacher_pretrained='--teacher-pretrained',
                         teacher_img_size='--teacher-img-size', teacher_amp='--teacher-amp')
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
        for dest, flag in dict(teacher_flags, teacher_topk='--teacher-topk').items():
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
    if args.drop_connect is not None and args.drop_path is None:
        args.drop_path = args.drop_connect  # timm's deprecated alias


Note = Tuple[str, str]


def parse_train_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str, List[Note]]:
    """Parse train.py's command line (`sys.argv[1:]` when `argv` is None), YAML defaults first.

    Returns the arguments (derived defaults resolved), the YAML text for `args.yaml` (what the user set, before
    any derived default is resolved, so a re-launch with other flags resolves them afresh), and notes for the
    log as (level, message).
    """
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str)
    known, _ = config_parser.parse_known_args(argv)
    notes: List[Note] = []
    from_yaml: Dict[str, Any] = {}
    if known.config:
        from_yaml, notes = _yaml_defaults(parser, known.config)
        parser.set_defaults(**from_yaml)
    args = parser.parse_args(argv)
    if known.config:
        notes += _prefer_command_line_weights(args, _given_on_command_line(argv), set(from_yaml))
    text = args_to_yaml(args)
    _check(parser, args)
    return args, text, notes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """`parse_train_args` without the args.yaml text and notes."""
    return parse_train_args(argv)[0]


def args_to_yaml(args: argparse.Namespace) -> str:
    """The flags of a run as YAML that `-c` reads back (only parser keys, so it reloads without a warning)."""
    values = vars(args)
    keys = list(dict.fromkeys(a.dest for a in build_parser()._actions if a.dest != 'help'))
    return yaml.safe_dump({k: values[k] for k in keys if k in values}, default_flow_style=False, sort_keys=False)


def resolve_lr(args: argparse.Namespace, world_size: int, batch_size: Optional[float] = None) -> float:
    """timm's rule: --lr when given, else --lr-base scaled by the global batch over --lr-base-size.

    `batch_size` replaces --batch-size (the policy-average batch of scheduled resolution training).
    """
    if args.lr is not None:
        return args.lr
    global_batch = (batch_size or args.batch_size) * world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    return args.lr_base * (math.sqrt(ratio) if scale == 'sqrt' else ratio)
