"""The student: timm's `create_model` with --img-size reaching ViT-family models, size checks, and its placement
(device, --model-dtype, --channels-last) and compilation, shared by train.py and validate.py."""
import os
from functools import partial
from typing import Any, Optional

import torch
from timm.layers import convert_splitbn_model, set_fast_norm
from timm.models import create_model
from timm.utils import set_jit_fuser

import models  # noqa: F401  importing models registers the tiny demo models

from .checkpoint import load_model_weights
from .errors import ConfigError

__all__ = ['build_student', 'check_input_size', 'patch_size_of', 'token_size_of', 'model_dtype_of', 'place_model',
           'compile_model']


def patch_size_of(model: torch.nn.Module) -> Optional[int]:
    """The model's (square) patch size when it embeds patches, else None."""
    patch_embed = getattr(model, 'patch_embed', None)
    size = getattr(patch_embed, 'patch_size', None)
    if size is None:
        return None
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if size[0] != size[1]:
        raise ConfigError(f'--model {type(model).__name__} has non-square patches {size}; TokenMix needs square tokens')
    return int(size[0])


def token_size_of(model: torch.nn.Module, size: Optional[int] = None) -> int:
    """The token size in pixels: `size` (--tokenmix-patch-size, --patch-size) when given, else the model's patch
    size, else 16 (a model without patch embedding: ViT's usual patch)."""
    return size or patch_size_of(model) or 16


_MODEL_FLAGS = dict(bn_momentum='--bn-momentum', bn_eps='--bn-eps', drop_block_rate='--drop-block',
                   drop_path_rate='--drop-path', drop_rate='--drop', global_pool='--gp', in_chans='--in-chans')


def build_student(args: Any, num_classes: int) -> torch.nn.Module:
    """Build --model for `num_classes` as timm's train.py does; --img-size is also passed as `img_size` to models
    that take it (ViT family).

    timm's model flags apply: --drop-block, --bn-momentum/--bn-eps (models that take them), --pretrained-path,
    --head-init-scale/--head-init-bias, --fast-norm, --fuser, --split-bn (one BN per augmentation split).
    """
    flag = partial(getattr, args)
    if flag('fuser', ''):
        set_jit_fuser(args.fuser)
    if flag('fast_norm', False):
        set_fast_norm()
    input_size = flag('input_size', None)
    in_chans = args.in_chans or (input_size[0] if input_size else None)
    kwargs = dict(pretrained=args.pretrained, num_classes=num_classes, drop_rate=args.drop,
                  drop_path_rate=args.drop_path, drop_block_rate=flag('drop_block', None), global_pool=args.gp,
                  in_chans=in_chans, bn_momentum=flag('bn_momentum', None), bn_eps=flag('bn_eps', None))
    if flag('pretrained_path', None):  # validate.py's parser lacks the train-only flags read with `flag`
        if not os.path.isfile(args.pretrained_path):
            raise ConfigError(f"--pretrained-path '{args.pretrained_path}': no such file")
        kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)  # head adapted
    kwargs.update(args.model_kwargs)  # --model-kwargs wins over the flags
    try:
        if args.img_size is not None and 'img_size' not in args.model_kwargs:
            try:
                model = create_model(args.model, img_size=args.img_size, **kwargs)
            except TypeError as e:
                if 'img_size' not in str(e):
                    raise
                model = create_model(args.model, **kwargs)  # a CNN: any input size, set by the data config
        else:
            model = create_model(args.model, **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise ConfigError(f'--model {args.model}: unknown timm model') from None
        raise
    except AssertionError as e:  # timm's model constructors check their arguments with assert
        raise ConfigError(f'--model {args.model}: {e} (check --gp / --model-kwargs)') from None
    except TypeError as e:
        flags = [name for key, name in _MODEL_FLAGS.items() if f"'{key}'" in str(e)]
        if flags:
            raise ConfigError(f'{flags[0]}: --model {args.model} does not take it ({e})') from None
        raise ConfigError(f'--model {args.model} / --model-kwargs: {e}') from None
    if args.initial_checkpoint:
        load_model_weights(model, args.initial_checkpoint, '--initial-checkpoint')
    _init_head(model, flag('head_init_scale', None), flag('head_init_bias', None))
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if flag('split_bn', False):
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    return model


def _init_head(model: torch.nn.Module, scale: Optional[float], bias: Optional[float]) -> None:
    """timm's --head-init-scale (classifier weight and bias scaled) and --head-init-bias (bias set)."""
    if scale is None and bias is None:
        return
    head = model.get_classifier()
    with torch.no_grad():
        if scale is not None:
            head.weight.mul_(scale)
            head.bias.mul_(scale)
        if bias is not None:
            head.bias.fill_(bias)


def check_input_size(model: torch.nn.Module, input_size: tuple, token_size: Optional[int]) -> None:
    """The input must tile into whole patches (and whole TokenMix tokens)."""
    height, width = input_size[-2:]
    patch = patch_size_of(model)
    if patch is not None and (height % patch or width % patch):
        raise ConfigError(f'--img-size {height}x{width} is not a multiple of the patch size {patch} of --model')
    if token_size is not None and (height % token_size or width % token_size):
        raise ConfigError(
            f'--img-size {height}x{width} is not a multiple of the TokenMix token size {token_size} '
            f'(--tokenmix-patch-size)')


def model_dtype_of(args: Any) -> Optional[torch.dtype]:
    """--model-dtype as a torch dtype (None: the model's own float32)."""
    return getattr(torch, args.model_dtype) if args.model_dtype else None


def place_model(model: torch.nn.Module, args: Any, device: torch.device) -> torch.nn.Module:
    """`model` on `device` in --model-dtype, in channels-last memory format with --channels-last."""
    model = model.to(device=device, dtype=model_dtype_of(args))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: torch.nn.Module, args: Any) -> torch.nn.Module:
    """--torchscript, --torchcompile [--torchcompile-mode] or --aot-autograd (validate.py's only), as timm does."""
    if args.torchscript:
        return torch.jit.script(model)
    if args.torchcompile:
        return torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    if getattr(args, 'aot_autograd', False):
        from functorch.compile import memory_efficient_fusion
        return memory_efficient_fusion(model)
    return model
