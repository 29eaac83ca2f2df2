"""A frozen teacher that turns a timm classifier into dense class activation maps (docs/method.md §2).

TokenMix weighs each mixed image's label by how much of its object stays visible, read from a teacher's
class activation map: the classifier applied at every spatial position of the last feature map, before pooling.
``Teacher`` wraps an already built timm classifier; ``build_teacher`` builds one from a timm name and weights.

Families, recognised from timm's model classes and head structure (``forward_features``, ``get_classifier``,
``global_pool``, ``head``, ``num_prefix_tokens``):

* exact - ResNet / ResNet-D / ResNeXt, RegNet, EfficientNet (and timm's other ``EfficientNet``-class models:
  EfficientNetV2, MobileNetV2, MNASNet), NFNet: global average pooling then one linear layer, so the spatial mean
  of the maps equals the model's own logits (up to float error).
* approximate - ConvNeXt (the head's LayerNorm, and pre-logits MLP if any, run after pooling; exact when built with
  ``head_norm_first=True``) and MobileNetV3 (``conv_head`` + activation after pooling): those layers are applied at
  each position, so the maps' mean is close to, not equal to, the logits.
* ViT / DeiT / DeiT-distilled: the final norm (``norm`` or ``fc_norm``) and the head applied to every patch token;
  class, distillation and register tokens are left out; distilled models average their two heads. With average
  pooling and no ``fc_norm`` the identity is exact; class-token models pool differently, so their maps' mean is
  not their logits.
"""
import functools
import logging
import os
from typing import Callable, Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.layers import ClassifierHead, NormMlpClassifierHead, to_2tuple
from timm.models import get_pretrained_cfg
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.nfnet import NormFreeNet
from timm.models.regnet import RegNet
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mixup_ext.targets import check_label_range

from .checkpoint_io import load_checkpoint_weights

__all__ = ['Teacher', 'build_teacher', 'SUPPORTED_FAMILIES']

_logger = logging.getLogger(__name__)

_FAMILIES = (
    (ResNet, 'ResNet / ResNet-D / ResNeXt'),
    (RegNet, 'RegNet'),
    (EfficientNet, 'EfficientNet / EfficientNetV2 / MobileNetV2 / MNASNet'),
    (NormFreeNet, 'NFNet'),
    (ConvNeXt, 'ConvNeXt'),
    (MobileNetV3, 'MobileNetV3'),
    (VisionTransformer, 'ViT / DeiT / DeiT-distilled'),
)
SUPPORTED_FAMILIES = tuple(label for _, label in _FAMILIES)

_AVG_POOLS = ('avg', 'fast', 'fastavg')  # SelectAdaptivePool2d types that are a plain spatial mean
_AMP_DTYPES = (torch.float16, torch.bfloat16)


def _per_position(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a layer written for pooled B x C vectors (Linear, activation) at each position of B x C x h x w."""
    return module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _family(model: nn.Module) -> str:
    for cls, label in _FAMILIES:
        if isinstance(model, cls):
            return label
    raise ValueError(
        f'{type(model).__name__} is not a supported teacher architecture: no class activation maps are defined '
        f'for it. Supported timm families: {", ".join(SUPPORTED_FAMILIES)}')


def _cnn_head(model: nn.Module) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The layers timm runs between global pooling and the classifier, to be applied at each position."""
    head = getattr(model, 'head', None)
    if isinstance(head, ClassifierHead):  # RegNet, NFNet, ConvNeXt with head_norm_first
        pool, layers = head.global_pool, []
    elif isinstance(head, NormMlpClassifierHead):  # ConvNeXt: pool -> LayerNorm2d -> (Linear + act) -> fc
        pool, layers = head.global_pool, [head.norm]
        if not isinstance(head.pre_logits, nn.Identity):
            layers.append(functools.partial(_per_position, head.pre_logits))
    elif hasattr(model, 'norm_head'):  # MobileNetV3: pool -> conv_head (1x1) -> norm_head -> act2 -> classifier
        pool, layers = model.global_pool, [model.conv_head, model.norm_head, model.act2]
    else:  # ResNet, EfficientNet: pool -> classifier
        pool, layers = model.global_pool, []
    pool_type = str(getattr(pool, 'pool_type', '')).lower()
    if pool_type not in _AVG_POOLS:
        raise ValueError(
            f'{type(model).__name__} pools with global_pool={pool_type!r}; a teacher needs global average pooling '
            f'before its classifier (build it with global_pool="avg")')
    return [layer for layer in layers if not isinstance(layer, nn.Identity)]


def _check_vit(model: VisionTransformer) -> bool:
    """Validate a ViT's head; returns whether its maps average exactly to its logits."""
    if getattr(model, 'attn_pool', None) is not None or model.global_pool not in ('token', 'avg'):
        pool = 'map (attention pooling)' if getattr(model, 'attn_pool', None) is not None else model.global_pool
        raise ValueError(
            f'{type(model).__name__} pools its tokens with global_pool={pool!r}; a ViT teacher needs class-token '
            f"('token') or average ('avg') pooling")
    return (model.global_pool == 'avg' and not getattr(model, 'pool_include_prefix', False)
            and isinstance(model.fc_norm, nn.Identity))


def _check_vit_input_size(model: VisionTransformer, size: tuple[int, int]) -> None:
    fixed = getattr(model.patch_embed, 'img_size', None)
    if fixed is not None and not model.dynamic_img_size and getattr(model.patch_embed, 'strict_img_size', True) \
            and tuple(size) != tuple(fixed):
        raise ValueError(
            f'the ViT teacher takes {fixed[0]}x{fixed[1]} inputs, got {size[0]}x{size[1]}: resize with '
            f'img_size={fixed[0]} (--teacher-img-size) or build the teacher with dynamic_img_size=True')


def _classifiers(model: nn.Module) -> tuple[nn.Module, ...]:
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    for head in heads:
        is_1x1 = isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1)
        if not (isinstance(head, nn.Linear) or is_1x1):
            raise ValueError(
                f'{type(model).__name__} has no linear classifier ({type(head).__name__}); a teacher needs one '
                f'(was it built with num_classes=0?)')
    return heads


def _stats(values: Optional[Sequence[float]], name: str) -> Optional[torch.Tensor]:
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() != 3:
        raise ValueError(f'{name} needs 3 per-channel values, got {list(values)}')
    return t.view(1, 3, 1, 1)


def _amp_dtype(dtype: Optional[Union[str, torch.dtype]]) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if resolved not in _AMP_DTYPES:
        raise ValueError(f'amp_dtype must be float16 or bfloat16 (or None), got {dtype!r}')
    return resolved


class Teacher(nn.Module):
    """A frozen timm classifier returning class activation maps for a student's normalised batch.

    Call it on images to get ``B x num_classes x h x w`` maps (float32): the classifier, and any head layers timm
    runs after pooling, applied at every position of the last feature map or every ViT patch token. TokenMix only
    needs each image's own-class map: :meth:`own_class_maps` computes just that channel.

    The wrapped model is put in eval mode for good (``train()`` does not change it), its parameters stop requiring
    gradients, and both methods run under ``torch.no_grad()`` (not ``inference_mode``: inference tensors could not
    be saved for backward if the targets built from the maps meet the student's graph). Keep the teacher out of the
    student's module tree so the optimiser, DDP, EMA and checkpoints never see it.

    Args:
        model: a timm classifier of a supported family (see the module docstring); wrapped in place.
        student_mean, student_std: the normalisation the student's batch carries. When they differ from the
            teacher's ``pretrained_cfg`` mean/std the batch is re-normalised; when left out the batch is assumed to
            be normalised for the teacher already.
        img_size: resize the batch (bilinear, antialiased) to this size first: a cheaper teacher at lower
            resolution. The maps then have the teacher's grid at that size.
        amp_dtype: run the teacher under autocast with this dtype (float16 / bfloat16).
        channels_last: run the teacher in channels-last memory format.
    """

    def __init__(
            self,
            model: nn.Module,
            *,
            student_mean: Optional[Sequence[float]] = None,
            student_std: Optional[Sequence[float]] = None,
            img_size: Optional[Union[int, Sequence[int]]] = None,
            amp_dtype: Optional[Union[str, torch.dtype]] = None,
            channels_last: bool = False,
    ):
        super().__init__()
        self.family = _family(model)
        self.is_vit = isinstance(model, VisionTransformer)
        if self.is_vit:
            self.exact = _check_vit(model)
            self._head_layers = []
        else:
            self._head_layers = _cnn_head(model)
            self.exact = not self._head_layers
        self.num_classes = _classifiers(model)[0].weight.shape[0]

        self.model = model.eval().requires_grad_(False)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.img_size = tuple(to_2tuple(img_size)) if img_size is not None else None
        if self.is_vit and self.img_size is not None:
            _check_vit_input_size(model, self.img_size)
        self.amp_dtype = _amp_dtype(amp_dtype)

        s_mean, s_std = _stats(student_mean, 'student_mean'), _stats(student_std, 'student_std')
        if (s_mean is None) != (s_std is None):
            raise ValueError('give both student_mean and student_std, or neither')
        config = resolve_model_data_config(model)
        t_mean, t_std = _stats(config['mean'], 'teacher mean'), _stats(config['std'], 'teacher std')
        self.renormalizes = s_mean is not None and not (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std))
        if self.renormalizes:
            # student-normalised x -> pixels (x * s_std + s_mean) -> teacher-normalised, as one affine map
            self.register_buffer('_scale', s_std / t_std, persistent=False)
            self.register_buffer('_shift', (s_mean - t_mean) / t_std, persistent=False)

    def train(self, mode: bool = True) -> 'Teacher':
        """Stay in eval mode whatever is asked: the teacher is frozen."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (f'family={self.family!r}, exact={self.exact}, renormalizes={self.renormalizes}, '
                f'img_size={self.img_size}, amp_dtype={self.amp_dtype}, channels_last={self.channels_last}')

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f'teacher input must be a B x 3 x H x W batch, got shape {tuple(images.shape)}')
        x = images
        if self.img_size is not None and tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode='bilinear', align_corners=False, antialias=True)
        if self.renormalizes:
            x = x * self._scale + self._shift
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _vit_features(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        size = tuple(x.shape[-2:])
        _check_vit_input_size(model, size)
        tokens = model.forward_features(x)  # B x N x D, final norm applied (Identity when fc_norm is used)
        gh, gw = model.patch_embed.dynamic_feat_size(size)
        patches = model.fc_norm(tokens[:, model.num_prefix_tokens:])
        if patches.shape[1] != gh * gw:
            raise RuntimeError(f'expected {gh}x{gw} patch tokens, got {patches.shape[1]}')
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], gh, gw)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position inputs of the final linear classifier: B x D x h x w."""
        if self.is_vit:
            return self._vit_features(x)
        feats = self.model.forward_features(x)
        for layer in self._head_layers:
            feats = layer(feats)
        return feats

    def _classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final classifier as C x D weight and C bias; distilled models' two heads averaged."""
        weights, biases = [], []
        for head in _classifiers(self.model):
            w = head.weight.reshape(head.weight.shape[0], -1)
            weights.append(w)
            biases.append(head.bias if head.bias is not None else w.new_zeros(w.shape[0]))
        if len(weights) == 1:
            return weights[0], biases[0]
        return torch.stack(weights).mean(0), torch.stack(biases).mean(0)

    def _autocast(self, x: torch.Tensor):
        return torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class activation maps of every class: B x num_classes x h x w, float32."""
        x = self._prepare(images)
        with self._autocast(x):
            feats = self._features(x)
            weight, bias = self._classifier()
            maps = F.conv2d(feats, weight[:, :, None, None].to(feats.dtype), bias.to(feats.dtype))
        return maps.float()

    @torch.no_grad()
    def own_class_maps(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each image's map for its own class, ``maps[b, labels[b]]``: B x h x w, float32.

        Gathers the labels' classifier rows first, so the B x num_classes x h x w maps are never built.
        ``labels`` are class indices below ``num_classes``.
        """
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(
                f'labels must be {images.shape[0]} integer class indices, got a {labels.dtype} tensor of shape '
                f'{tuple(labels.shape)}')
        check_label_range(labels, self.num_classes, 'labels')
        x = self._prepare(images)
        with self._autocast(x):
            feats = self._features(x)
            weight, bias = self._classifier()
            labels = labels.to(weight.device)
            rows, offsets = weight[labels].to(feats.dtype), bias[labels].to(feats.dtype)
            maps = torch.einsum('bdhw,bd->bhw', feats, rows) + offsets[:, None, None]
        return maps.float()


def build_teacher(
        name: str,
        *,
        checkpoint: Optional[Union[str, os.PathLike]] = None,
        pretrained: bool = False,
        num_classes: Optional[int] = None,
        use_ema: bool = False,
        student_mean: Optional[Sequence[float]] = None,
        student_std: Optional[Sequence[float]] = None,
        img_size: Optional[Union[int, Sequence[int]]] = None,
        amp_dtype: Optional[Union[str, torch.dtype]] = None,
        channels_last: bool = False,
        **model_kwargs,
) -> Teacher:
    """Build a frozen :class:`Teacher` from a timm model name and its weights.

    Args:
        name: timm model name (a registered architecture, optionally with a pretrained tag).
        checkpoint: local weights (see ``models.checkpoint_io.load_state_dict_file``); exclusive with ``pretrained``.
        pretrained: timm's pretrained weights (needs the network); exclusive with ``checkpoint``.
        num_classes: classifier size; must match the checkpoint's (or timm's pretrained weights').
        use_ema: load the checkpoint's EMA weights.
        student_mean, student_std, img_size, amp_dtype, channels_last: see :class:`Teacher`.
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``dynamic_img_size=True`` for a ViT teacher fed
            another resolution than it was built for).

    Raises:
        ValueError: unknown or unsupported model, no weights or both sources given, classifier size mismatch.
        FileNotFoundError: the checkpoint file does not exist.
        RuntimeError: timm's pretrained weights could not be fetched.
    """
    if checkpoint is not None and pretrained:
        raise ValueError('give the teacher either a checkpoint or pretrained=True, not both')
    if checkpoint is None and not pretrained:
        raise ValueError(
            f'teacher {name!r} needs weights: a random teacher gives meaningless maps; pass a checkpoint '
            '(--teacher-checkpoint) or pretrained=True')
    if not timm.is_model(name):
        raise ValueError(f'unknown timm model {name!r} for the teacher')
    if num_classes is not None:
        model_kwargs['num_classes'] = num_classes
    if pretrained:
        pretrained_classes = getattr(get_pretrained_cfg(name), 'num_classes', None)
        if num_classes is not None and pretrained_classes is not None and num_classes != pretrained_classes:
            raise ValueError(
                f"timm's pretrained {name!r} has a classifier for {pretrained_classes} classes, but "
                f'num_classes={num_classes}: its classifier would be random')
        try:
            model = timm.create_model(name, pretrained=True, **model_kwargs)
        except (OSError, RuntimeError, ValueError) as e:  # hub / network / missing-weights errors
            raise RuntimeError(
                f"could not load timm's pretrained weights for teacher {name!r} ({type(e).__name__}: {e}). "
                'They are downloaded from the network; without it, pass a local file with --teacher-checkpoint'
            ) from e
    else:
        model = timm.create_model(name, **model_kwargs)
    teacher = Teacher(
        model, student_mean=student_mean, student_std=student_std, img_size=img_size, amp_dtype=amp_dtype,
        channels_last=channels_last)
    if checkpoint is not None:
        load_checkpoint_weights(teacher.model, checkpoint, use_ema=use_ema)
        _logger.info('Teacher %s loaded from %s%s', name, checkpoint, ' (EMA weights)' if use_ema else '')
    return teacher
