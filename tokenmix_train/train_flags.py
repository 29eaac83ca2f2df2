"""train.py's flag tables: every flag of timm's train.py (same name, default and meaning), plus TokenMix and teacher
flags, in argument groups as timm's train.py has them.

Tables only: `-c FILE.yaml` is read by `config_file`, cross-flag and value rules live in `flag_rules`, and
`args.parse_train_args` puts the three together. Every boolean flag has a `--no-...` form.
"""
import argparse

from timm.utils import ParseKwargs

from .errors import OneLineParser
from .transforms import AUG_ORDERS
from .preemption import SIGNAL_NAMES

__all__ = ['build_train_parser']

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
                       help='resume full model and optimizer state from checkpoint (default: none); `latest` (or '
                            '`auto`): the newest loadable checkpoint of --output/--experiment, a fresh start when '
                            'it holds none')
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
    group.add_argument('--aug-order', type=str, default='timm', choices=AUG_ORDERS,
                       help='"timm": random-resized crop, flip, then RandAugment / colour jitter on the crop; '
                            '"authors": the TokenMix authors\' order, flip and RandAugment on the whole image, then '
                            'the crop (default: timm)')
    group.add_argument('--fast-augment', action=BOOL, default=False,
                       help='faster geometric ops in RandAugment / AutoAugment (--aa): translates by whole pixels (the '
                            'drawn shift rounded), bilinear rotate and shear instead of bicubic; the same draws. '
                            '1.44x a loader core in the authors\' order, 1.12x in timm\'s (default: off, timm\'s ops)')
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


def _add_seed_loader_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Seed and data loader parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--worker-seeding', type=str, default='all', choices=('all', 'part'),
                       help='worker seed mode (default: all)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='how many training processes to use (default: 4)')
    group.add_argument('--pin-mem', action=BOOL, default=False,
                       help='pin CPU memory in DataLoader for more efficient transfer to GPU')
    _negated(group, '--no-prefetcher', '--prefetcher', 'disable fast prefetcher')
    group.add_argument('--use-multi-epochs-loader', action=BOOL, default=False,
                       help='use the multi-epochs-loader to save time at the beginning of every epoch')


def _add_eval_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Evaluation and checkpoint parameters')
    group.add_argument('--val-interval', type=int, default=1, metavar='N',
                       help='how many epochs between validation and checkpointing')
    group.add_argument('--eval-metric', default='top1', type=str, choices=('top1', 'top5', 'loss'),
                       help='metric ranking checkpoints (default: "top1")')
    group.add_argument('--tta', type=int, default=0, metavar='N',
                       help='test/inference time augmentation factor (not in training here: use validate.py)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of checkpoints to keep (default: 10)')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='how many updates to wait before writing a recovery checkpoint (0: never); it holds '
                            'the position in the epoch, which --resume continues step for step')
    group.add_argument('--preempt-signal', nargs='+', default=['TERM', 'USR1'], choices=SIGNAL_NAMES + ('none',),
                       metavar='SIG', help='signals that stop the run at the next step after saving its position '
                                           '(exit code 3; --resume latest continues): any of %(choices)s '
                                           '(default: TERM USR1)')


def _add_output_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Output and logging parameters')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='path to output folder (default: none, current dir)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of train experiment, name of sub-folder for output')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='how many batches to wait before logging training status')
    group.add_argument('--save-images', action=BOOL, default=False,
                       help='save images of input batches every log interval for debugging')
    group.add_argument('--log-wandb', action=BOOL, default=False,
                       help='log training and validation metrics to wandb (pip install wandb)')
    group.add_argument('--wandb-project', default=None, type=str, help='wandb project name')
    group.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    group.add_argument('--wandb-resume-id', default='', type=str, metavar='ID',
                       help='if resuming a run, the id of the run in wandb')


def _add_scheduled_resolution_args(parser: argparse.ArgumentParser) -> None:
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


def _add_naflex_args(parser: argparse.ArgumentParser) -> None:
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


def _add_distillation_args(parser: argparse.ArgumentParser) -> None:
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


def build_train_parser() -> argparse.ArgumentParser:
    """The training parser, arguments grouped as in timm's train.py; an error is one line."""
    parser = OneLineParser(prog='train.py', description='TokenMix training (timm flags)')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config file: its values are the defaults, the command line overrides them')
    for add in (_add_dataset_args, _add_model_args, _add_device_args, _add_optimizer_args, _add_schedule_args,
                _add_augmentation_args, _add_bn_ema_args, _add_seed_loader_args, _add_eval_checkpoint_args,
                _add_output_logging_args, _add_scheduled_resolution_args, _add_naflex_args, _add_distillation_args,
                _add_tokenmix_args):
        add(parser)
    return parser
