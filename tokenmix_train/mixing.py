"""What turns a batch into a training signal: the frozen teacher, the mixer (TokenMix or timm Mixup), the loss.

The mixer runs on the device after the loader (never in collate), so the teacher sees the same augmented
batch that is mixed. Each rank mixes with its own generator, seeded from --seed and the rank.
"""
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mixup_ext import TokenMix
from models import CheckpointError, Teacher, build_teacher

from .errors import ConfigError
from .teacher_maps import StoredMapsMixer

__all__ = ['build_teacher_from_args', 'build_mixer', 'build_criterion', 'mixer_generator', 'mixing_enabled']

Mixer = Union[TokenMix, Mixup, StoredMapsMixer]


def mixing_enabled(args: Any) -> bool:
    """Whether Mixup/CutMix (or TokenMix) is active, as timm decides it."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def mixer_generator(seed: int, rank: int) -> torch.Generator:
    """A CPU generator for this rank's masks, its stream apart from the global RNG seeded with seed + rank."""
    state = np.random.SeedSequence([seed, rank, 0x70C3]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def build_teacher_from_args(args: Any, num_classes: int, mean: Sequence[float], std: Sequence[float],
                            device: torch.device) -> Optional[Teacher]:
    """The frozen teacher of --teacher-model on `device` (None without one); bad flags become ConfigError."""
    if not args.teacher_model or args.teacher_maps:
        return None
    try:  # its construction draws no numbers from the global RNG, so the data order is the same with or without it
        with torch.random.fork_rng(devices=[]):
            teacher = build_teacher(
                args.teacher_model, checkpoint=args.teacher_checkpoint or None, pretrained=args.teacher_pretrained,
                num_classes=num_classes, student_mean=mean, student_std=std, img_size=args.teacher_img_size,
                amp_dtype=args.amp_dtype if args.teacher_amp else None, channels_last=args.channels_last)
    except FileNotFoundError as e:
        raise ConfigError(f"--teacher-checkpoint '{e.filename}': no such file") from None
    except CheckpointError as e:
        raise ConfigError(f'--teacher-checkpoint: {e}') from None
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f'--teacher-model {args.teacher_model}: {e}') from None
    return teacher.to(device)


def build_mixer(args: Any, num_classes: int, token_size: int, teacher: Optional[Teacher],
                generator: torch.Generator) -> Optional[Mixer]:
    """TokenMix (--tokenmix) or timm's Mixup from the timm flags; None when mixing is off."""
    if not mixing_enabled(args):
        return None
    common = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                  prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                  label_smoothing=args.smoothing, num_classes=num_classes)
    try:
        if not args.tokenmix:
            return Mixup(**common)
        mixer = TokenMix(**common, mask_type=args.tokenmix_mask, min_tokens=args.tokenmix_min_tokens,
                         lam_mode=args.tokenmix_lam, patch_size=token_size, teacher=teacher,
                         target='auto' if args.teacher_maps else args.tokenmix_target,
                         target_norm=args.tokenmix_target_norm, teacher_topk=args.teacher_topk, generator=generator)
        return StoredMapsMixer(mixer) if args.teacher_maps else mixer
    except ValueError as e:
        raise ConfigError(f'mixing flags (--mixup/--cutmix/--tokenmix-*): {e}') from None


def build_criterion(args: Any) -> torch.nn.Module:
    """timm's choice of training loss: JSD + CE over augmentation splits (--jsd-loss), soft-target CE or BCE with
    mixing, else label smoothing CE; BCE takes --bce-sum, --bce-pos-weight and --bce-target-thresh."""
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if args.jsd_loss:
        return JsdCrossEntropy(num_splits=args.aug_splits, smoothing=args.smoothing)
    if mixing_enabled(args):
        return BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        if args.bce_loss:
            return BinaryCrossEntropy(smoothing=args.smoothing, **bce)
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()
