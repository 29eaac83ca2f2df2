"""The student: timm's `create_model` with --img-size reaching ViT-family models, and size checks."""
from typing import Any, Optional

import torch
from timm.models import create_model

from models import load_checkpoint_weights  # importing models also registers the tiny demo models

from .errors import ConfigError

__all__ = ['build_student', 'check_input_size', 'patch_size_of']


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


def build_student(args: Any, num_classes: int) -> torch.nn.Module:
    """Build --model for `num_classes`; --img-size is passed as `img_size` to models that take it (ViT family).

    An input size that is not a multiple of the model's patch size is a ConfigError naming both.
    """
    kwargs = dict(pretrained=args.pretrained, num_classes=num_classes, drop_rate=args.drop,
                  drop_path_rate=args.drop_path, global_pool=args.gp, in_chans=args.in_chans)
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
    except TypeError as e:
        raise ConfigError(f'--model {args.model} / --model-kwargs: {e}') from None
    if args.initial_checkpoint:
        try:
            load_checkpoint_weights(model, args.initial_checkpoint)
        except FileNotFoundError:
            raise ConfigError(f"--initial-checkpoint '{args.initial_checkpoint}': no such file") from None
        except ValueError as e:
            raise ConfigError(f'--initial-checkpoint: {e}') from None
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    return model


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
