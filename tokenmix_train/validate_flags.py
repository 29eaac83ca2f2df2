"""Command line of validate.py: every flag of timm's validate.py (same name, default and meaning), plus occlusion.

`parse_validate_args(argv)` also applies train.py's value rules to the flags both scripts take (`flag_rules`), and
stops with one line saying why for the few timm flags that cannot apply here (--num-gpu > 1, --naflex-loader,
--amp-impl apex).
"""
import argparse
from typing import Optional, Sequence

from timm.utils import ParseKwargs

from .errors import OneLineParser
from .flag_rules import check_shared_values, flag_names
from .occlusion import OCCLUSION_MODES

__all__ = ['build_validate_parser', 'parse_validate_args']


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (same as --data-dir)')
    data = parser.add_argument_group('Dataset')
    data.add_argument('--data-dir', metavar='DIR', help='dataset root (an ImageFolder with a split folder)')
    data.add_argument('--dataset', default='', metavar='NAME',
                      help='timm dataset type + name ("<type>/<name>"; default: image folder)')
    data.add_argument('--split', default='validation', metavar='NAME',
                      help='split to validate (default: "validation", which also finds "val")')
    data.add_argument('--num-samples', type=int, default=None, metavar='N',
                      help='samples in the split, for iterable datasets (wds/, tfds/)')
    data.add_argument('--dataset-download', action='store_true', help='download torch/ and tfds/ datasets')
    data.add_argument('--class-map', default='', metavar='FILE', help='class name to index map (timm format)')
    data.add_argument('--input-key', default=None, metavar='KEY', help='dataset key of the images (hfds/, wds/)')
    data.add_argument('--input-img-mode', default=None, metavar='MODE',
                      help='PIL mode the images are converted to (default: RGB, L for 1 input channel)')
    data.add_argument('--target-key', default=None, metavar='KEY', help='dataset key of the labels (hfds/, wds/)')
    data.add_argument('--dataset-trust-remote-code', action='store_true',
                      help="let a Hugging Face dataset run code from its repository")
    data.add_argument('--skip-bad-images', action='store_true', help='skip (and count) unreadable images')


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group('Model')
    model.add_argument('--model', '-m', default='dpn92', metavar='NAME', help='timm model name (default: dpn92)')
    model.add_argument('--pretrained', action='store_true',
                       help="timm's pretrained weights (needs the network); the default without --checkpoint")
    model.add_argument('--checkpoint', default='', metavar='PATH', help='checkpoint file, or a folder of them')
    model.add_argument('--use-ema', action='store_true', help='validate the EMA weights of the checkpoint')
    model.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help="classes of the model (default: the split's class count; the model's own with "
                            "--valid-labels)")
    model.add_argument('--gp', default=None, metavar='POOL', help='global pool type (default: the model\'s)')
    model.add_argument('--in-chans', type=int, default=None, metavar='N', help='input channels (default: 3)')
    model.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='input size; ViT-family models are built at this size, as train.py does')
    model.add_argument('--input-size', default=None, nargs=3, type=int, metavar=('C', 'H', 'W'),
                       help='input channels, height and width (default: the model\'s)')
    model.add_argument('--use-train-size', action='store_true',
                       help="the model's train input size even when its config gives a test size")
    model.add_argument('--crop-pct', type=float, default=None, metavar='F', help='centre-crop share (default: model)')
    model.add_argument('--crop-mode', default=None, metavar='MODE',
                       help="crop mode: 'center', 'squash' or 'border' (default: the model's)")
    model.add_argument('--crop-border-pixels', type=int, default=None, metavar='N',
                       help='pixels cropped from each image border before resizing')
    model.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override the mean')
    model.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override the std')
    model.add_argument('--interpolation', default='', metavar='NAME', help='resize interpolation (default: model)')
    model.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='more model arguments')
    model.add_argument('--test-pool', action='store_true',
                       help="test-time pooling when the input is larger than the model's (timm)")
    model.add_argument('--reparam', action='store_true', help='reparameterize the model (RepVGG, MobileOne, ...)')


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group('Run')
    run.add_argument('-b', '--batch-size', type=int, default=256, metavar='N', help='batch size (default: 256)')
    run.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading workers (default: 4)')
    run.add_argument('--num-gpu', type=int, default=1, metavar='N',
                     help='1 (several GPUs: torchrun, one process each; see README)')
    run.add_argument('--no-prefetcher', action='store_true', help="no timm prefetcher (normalise in the workers)")
    run.add_argument('--pin-mem', action='store_true', help='pin CPU memory in the loader')
    run.add_argument('--channels-last', action='store_true', help='channels_last memory layout')
    run.add_argument('--device', default=None, help='device (default: cuda when available, else cpu)')
    run.add_argument('--amp', action='store_true', help='autocast with --amp-dtype')
    run.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    run.add_argument('--amp-impl', default='native', choices=('native', 'apex'),
                     help="AMP implementation of timm < 1.0.23 (only 'native' here)")
    run.add_argument('--model-dtype', default=None, choices=('float32', 'float16', 'bfloat16'),
                     help='cast the model and inputs to this dtype instead of AMP (default: float32)')
    run.add_argument('--tf-preprocessing', action='store_true',
                     help="TensorFlow's preprocessing (needs TensorFlow installed)")
    run.add_argument('--fuser', default='', choices=('', 'te', 'old', 'nvfuser'), help='TorchScript fuser')
    run.add_argument('--fast-norm', action='store_true', help="timm's experimental fast norm layers")
    compile_group = run.add_mutually_exclusive_group()
    compile_group.add_argument('--torchscript', action='store_true', help='torch.jit.script the model')
    compile_group.add_argument('--torchcompile', nargs='?', default=None, const='inductor', metavar='BACKEND',
                               help='torch.compile the model with this backend (default: inductor)')
    compile_group.add_argument('--aot-autograd', action='store_true', help="functorch's memory-efficient fusion")
    run.add_argument('--torchcompile-mode', default=None, metavar='MODE', help='torch.compile mode (default: None)')
    run.add_argument('--retry', action='store_true', help='on out-of-memory, retry with smaller batches (timm)')
    run.add_argument('--seed', type=int, default=42, help='random seed, also of the occlusion masks (default: 42)')
    run.add_argument('--log-freq', '--log-interval', dest='log_freq', type=int, default=10, metavar='N',
                     help='batches between progress lines (default: 10)')
    run.add_argument('--naflex-loader', action='store_true', help="timm's NaFlex loader (not supported here)")
    run.add_argument('--naflex-max-seq-len', type=int, default=576, metavar='N',
                     help='sequence length of the NaFlex loader (with --naflex-loader)')
    run.add_argument('--dist-backend', default=None, help='torch.distributed backend (default: nccl / gloo)')
    run.add_argument('--dist-url', default=None, help='torch.distributed init url (default: env://)')
    run.add_argument('--local-rank', '--local_rank', default=0, type=int, help=argparse.SUPPRESS)


def _add_occlusion_args(parser: argparse.ArgumentParser) -> None:
    occl = parser.add_argument_group('Occlusion robustness')
    occl.add_argument('--occlusion', type=float, nargs='+', default=[0.], metavar='R',
                      help='shares of patches to drop, each in [0, 1); 0 is the clean accuracy (default: 0)')
    occl.add_argument('--occlusion-mode', default='random', choices=tuple(OCCLUSION_MODES),
                      help="'random' patches or 'block' regions (default: random)")
    occl.add_argument('--patch-size', type=int, default=None, metavar='N',
                      help="occlusion patch size in pixels (default: the model's patch size, else 16)")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group('Output')
    out.add_argument('--results-file', default='', metavar='FILE', help='write the rows here too')
    out.add_argument('--results-format', default=None, choices=('csv', 'json'),
                     help='results file format (default: from the file extension, else csv)')
    out.add_argument('--real-labels', default='', metavar='FILE',
                     help="ImageNet 'ReaL' labels (real.json): top-1/top-5 against them (timm's RealLabelsImagenet)")
    out.add_argument('--valid-labels', default='', metavar='FILE',
                     help='text file of model class indices, one a line: only these logits count, the split\'s '
                          'classes being these in order (ImageNet-A/R style subsets)')
    out.add_argument('--metrics-avg', default=None, choices=('micro', 'macro', 'weighted'),
                     help='also precision, recall and F1 with this averaging (scikit-learn)')


def build_validate_parser() -> argparse.ArgumentParser:
    """validate.py's parser: timm's validate.py flags, plus occlusion; an error is one line."""
    parser = OneLineParser(prog='validate.py', description='Validate checkpoints: top-1/top-5, clean and occluded')
    for add in (_add_dataset_args, _add_model_args, _add_run_args, _add_occlusion_args, _add_output_args):
        add(parser)
    return parser


def parse_validate_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check validate.py's command line (`sys.argv[1:]` when `argv` is None); each error names its flag."""
    parser = build_validate_parser()
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or args.data
    if not args.data_dir and not args.dataset:
        parser.error('--data-dir is required')
    for ratio in args.occlusion:
        if not 0. <= ratio < 1.:
            parser.error(f'--occlusion ratios must lie in [0, 1), got {ratio}')
    problem = check_shared_values(args, flag_names(parser))  # train.py's rules for the flags both take
    if problem:
        parser.error(problem)
    if args.naflex_loader:  # accepted for timm's command lines, but cannot apply here
        parser.error("--naflex-loader: NaFlex batches of varying size do not fit this evaluation (occlusion masks "
                     "and shards need fixed-size images); use timm's validate.py")
    if args.amp_impl == 'apex':
        parser.error('--amp-impl apex: apex AMP is not used for validation here; --amp is native AMP')
    if args.num_gpu > 1:
        parser.error(f'--num-gpu {args.num_gpu}: DataParallel is not used here; run `torchrun --nproc_per_node '
                     f'{args.num_gpu} validate.py ...` (one process a GPU, every image counted once)')
    if args.amp and args.model_dtype not in (None, 'float32'):
        parser.error(f'--amp needs a float32 model, not --model-dtype {args.model_dtype}')
    if args.use_ema and not args.checkpoint:
        parser.error('--use-ema needs --checkpoint')
    if args.crop_mode not in (None, 'center', 'squash', 'border'):
        parser.error(f"--crop-mode must be 'center', 'squash' or 'border', got '{args.crop_mode}'")
    if args.results_format is None:
        args.results_format = 'json' if args.results_file.endswith('.json') else 'csv'
    if args.in_chans is None and args.input_size is not None:
        args.in_chans = args.input_size[0]
    # timm: without a checkpoint the pretrained weights are validated; a checkpoint replaces them, so none
    # are fetched then
    args.pretrained_ignored = args.pretrained and bool(args.checkpoint)
    args.pretrained = not args.checkpoint
    # what the shared model builder reads besides these flags, at train.py's defaults
    for key, value in dict(drop=0., drop_path=None, initial_checkpoint='', grad_checkpointing=False).items():
        setattr(args, key, value)
    return args
