"""The order of the train augmentation: timm's (random-resized crop, flip, RandAugment or colour jitter, then to
tensor) or the TokenMix authors' (flip and RandAugment on the whole image, then the crop: their
`relabel/label_transforms_factory.py`, from TokenLabeling).

The authors' pipeline is timm's own pipeline with its crop moved: the steps timm's factory built for the flags are
reused as they are, so magnitudes, interpolation, fill colour, normalisation and random erasing (on the device with
timm's prefetcher) are the timm path's by construction; only the order changes.
"""
from torchvision import transforms
from timm.data.transforms import MaybePILToTensor, MaybeToTensor, RandomResizedCropAndInterpolation, ToNumpy, ToTensor

from .errors import ConfigError

__all__ = ['AUG_ORDERS', 'authors_order']

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
