"""Compatibility with timm's train.py beyond its current flags: old `args.yaml` keys, flags that cannot apply here,
and which flags load weights into which model.

`IGNORED_KEYS` are the keys of every earlier timm train.py parser (from the history of
huggingface/pytorch-image-models' train.py) that the current one dropped, plus values a timm-derived script stores
about the run itself. A YAML holding them still loads; they are ignored with one note.
"""
import argparse
from typing import Dict, Optional, Tuple

__all__ = ['IGNORED_KEYS', 'WEIGHT_SOURCES', 'UNSUPPORTED', 'mixing_enabled', 'unsupported_flags']

OLD_TIMM_KEYS = frozenset((
    'alpha_kd', 'amp_impl', 'aot_autograd', 'aug_repeat', 'bn_tf', 'dynamo', 'dynamo_backend', 'initial_batch_size',
    'iters_to_accum', 'jsd', 'milestones', 'mixup_elem', 'native_amp', 'num_gpu', 'reduce_bn', 'repp',
    'use_kd_only_loss', 'use_wandb', 'validation_batch_size_multiplier', 'wandb_project_name',
))
RUN_STATE_KEYS = frozenset(('prefetcher', 'distributed', 'world_size', 'rank'))
IGNORED_KEYS = OLD_TIMM_KEYS | RUN_STATE_KEYS

# model -> the flags that each give it weights; one given on the command line switches off the others from -c
WEIGHT_SOURCES: Dict[str, Tuple[str, ...]] = {
    'student': ('initial_checkpoint', 'pretrained'),
    'teacher': ('teacher_checkpoint', 'teacher_pretrained', 'teacher_maps'),
}

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


def mixing_enabled(args: argparse.Namespace) -> bool:
    """Whether Mixup/CutMix (or TokenMix) is active, as timm decides it."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


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
