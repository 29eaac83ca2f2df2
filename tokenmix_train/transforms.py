"""Changes to timm's train transform: the order of the augmentation, and a faster RandAugment.

The order: timm's (random-resized crop, flip, RandAugment or colour jitter, then to tensor) or the TokenMix authors'
(flip and RandAugment on the whole image, then the crop: their `relabel/label_transforms_factory.py`, from
TokenLabeling). The authors' pipeline is timm's own pipeline with its crop moved: the steps timm's factory built for
the flags are reused as they are, so magnitudes, interpolation, fill colour, normalisation and random erasing (on the
device with timm's prefetcher) are the timm path's by construction; only the order changes.

The faster augment (--fast-augment): RandAugment / AutoAugment / AugMix with their geometric ops made cheaper, the
rest as timm built it. Translates shift by whole pixels (the drawn shift rounded; a copy where timm's op resamples
the image) and rotate / shear resample bilinearly instead of bicubically: 1.44x a loader core in the authors' order,
1.12x in timm's (docs/benchmarks.md). The ops draw from the random streams exactly as timm's do, so a seed gives the
same ops and magnitudes on both paths (tests/test_fast_augment.py).
"""
import copy
from typing import Any, Callable, List, Optional, Tuple

from PIL import Image
from torchvision import transforms
from timm.data.auto_augment import AugmentOp, translate_x_abs, translate_y_abs
from timm.data.transforms import MaybePILToTensor, MaybeToTensor, RandomResizedCropAndInterpolation, ToNumpy, ToTensor

from .errors import ConfigError

__all__ = ['AUG_ORDERS', 'WholePixelTranslate', 'augment_ops', 'authors_order', 'fast_augment', 'faster_augment']

AUG_ORDERS = ('timm', 'authors')
_TO_TENSOR = (MaybePILToTensor, MaybeToTensor, ToNumpy, ToTensor, transforms.ToTensor, transforms.PILToTensor)


def authors_order(transform: transforms.Compose) -> transforms.Compose:
    """timm's train `transform` (crop, flips, RandAugment / colour steps, to tensor, ...) with its crop moved to just
    before the tensor conversion, so that the flips and RandAugment act on the whole image; the same step objects.

    A pipeline that does not start with timm's random-resized crop is a ConfigError: the order is the crop's.
    """
    steps = list(transform.transforms)
    if not steps or not isinstance(steps[0], RandomResizedCropAndInterpolation):
        raise ConfigError('--aug-order authors moves the random-resized crop, but the train transform starts with '
                          f'{type(steps[0]).__name__ if steps else "nothing"} (use --train-crop-mode rrc)')
    tensor_at = next((i for i, step in enumerate(steps) if isinstance(step, _TO_TENSOR)), len(steps))
    return transforms.Compose(steps[1:tensor_at] + steps[:1] + steps[tensor_at:])


_TRANSLATE_OPS = {'TranslateX': (0, False), 'TranslateY': (1, False), 'TranslateXRel': (0, True),
                 'TranslateYRel': (1, True)}  # timm's op name -> (axis, shift relative to the image's size)
_ROTATE_SHEAR_OPS = ('Rotate', 'ShearX', 'ShearY')


def augment_ops(step: Any) -> List[AugmentOp]:
    """The ops of a timm RandAugment / AugMix (`ops`) or AutoAugment (its sub-policies' ops); [] for another step."""
    ops = getattr(step, 'ops', None)
    if ops is None and hasattr(step, 'policy'):
        ops = [op for sub in step.policy for op in sub]
    return list(ops or [])


class WholePixelTranslate:
    """timm's translate op along `axis` (0: x, 1: y; the drawn shift in pixels, or `relative` to the image's size),
    shifted by whole pixels: timm's absolute translate by the rounded shift, pixel-identical to timm's op where the
    shift is whole and at most half a pixel off elsewhere. With the nearest filter (`faster_augment`) Pillow copies
    pixels where timm's op filters the whole image.

    `applied_op` names what it does to an image as one of timm's ops and its arguments (the stored maps record that).
    """

    def __init__(self, axis: int, relative: bool) -> None:
        self.axis, self.relative = axis, relative

    def applied_op(self, img: Image.Image, amount: float) -> Tuple[Callable, Tuple[int]]:
        """timm's absolute translate function and the whole pixels this op shifts `img` by."""
        pixels = round(amount * img.size[self.axis] if self.relative else amount)
        return (translate_x_abs, translate_y_abs)[self.axis], (pixels,)

    def __call__(self, img: Image.Image, amount: float, **kwargs: Any) -> Image.Image:
        fn, args = self.applied_op(img, amount)
        return fn(img, *args, **kwargs)


def _filter_as_drawn(configured: Any, resample: int) -> Any:
    """`resample` in the shape of an op's `configured` filter: a tuple stays a tuple of as many (timm's op draws one
    with `random.choice`), so the random streams advance as on timm's path."""
    return tuple(resample for _ in configured) if isinstance(configured, (list, tuple)) else resample


def faster_augment(augment: Any, translate: bool = True, resample: Optional[int] = Image.BILINEAR) -> Any:
    """A copy of a timm RandAugment / AutoAugment / AugMix whose translate ops shift by whole pixels (`translate`:
    `WholePixelTranslate`, nearest filter) and whose rotate and shear ops use `resample` (None: as configured);
    the same draws as the original, which is left as it is."""
    augment = copy.deepcopy(augment)
    for op in augment_ops(augment):
        if translate and op.name in _TRANSLATE_OPS:
            op.aug_fn = WholePixelTranslate(*_TRANSLATE_OPS[op.name])
            op.kwargs['resample'] = _filter_as_drawn(op.kwargs['resample'], Image.NEAREST)
        elif resample is not None and op.name in _ROTATE_SHEAR_OPS:
            op.kwargs['resample'] = _filter_as_drawn(op.kwargs['resample'], resample)
    return augment


def fast_augment(transform: transforms.Compose) -> transforms.Compose:
    """timm's train `transform` with its RandAugment / AutoAugment / AugMix step replaced by `faster_augment`'s
    copy (whole-pixel translates, bilinear rotate and shear); the other steps are the same objects.

    A transform without such a step is a ConfigError: --fast-augment would change nothing.
    """
    steps = list(transform.transforms)
    if not any(augment_ops(step) for step in steps):
        raise ConfigError('--fast-augment changes the geometric ops of RandAugment / AutoAugment (--aa), but the '
                          'train transform has none')
    return transforms.Compose([faster_augment(step) if augment_ops(step) else step for step in steps])
