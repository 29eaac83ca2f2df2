"""Target fidelity: how well a mixing method's label weights match what is really visible of each object.

A mixed image i keeps the pixels of image i outside its paste mask and shows the partner's (image B-1-i) pixels
inside it. Knowing each image's object pixels (the demo dataset saves them), the true visible share of image i's
object is the fraction of its object pixels left uncovered, and the partner's is the fraction of the partner's
object pixels pasted in. Label weights (B x 2: own label, partner label, as ``TokenMix.last_weights``) are faithful
when they equal these shares; the fidelity error is their mean absolute difference. Area weights (CutMix) miss
whenever the objects are not spread evenly; teacher weights track them as far as the teacher finds the object.

Pure tensor functions; the masks may come from TokenMix (token masks, see :func:`token_paste_masks`) or from any
mixer applied to an "indicator" batch (:func:`indicator_batch`, :func:`paste_masks_from_indicator`), which is how
timm's own ``Mixup`` (whose box is not exposed) is measured without re-implementing it.
"""
import json
import os
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from mixup_ext import masks_to_pixels

__all__ = ['visible_shares', 'normalise_shares', 'fidelity_error', 'token_paste_masks', 'indicator_batch',
           'paste_masks_from_indicator', 'weights_from_indicator_targets', 'load_demo_objects']


def visible_shares(object_masks: torch.Tensor, paste_masks: torch.Tensor) -> torch.Tensor:
    """True visible shares (B x 2) of each mixed image's own object and its partner's object.

    Args:
        object_masks: B x H x W, bool or float in [0, 1]: the object pixels of the unmixed images, in the geometry
            of the mixed batch.
        paste_masks: B x H x W (or B x 1 x H x W) bool: True where mixed image i shows its partner B-1-i.

    Column 0 is the share of image i's object pixels left visible, column 1 the share of the partner's object
    pixels pasted in. An image without object pixels gives NaN in the entries that need it.
    """
    if paste_masks.dim() == 4 and paste_masks.shape[1] == 1:
        paste_masks = paste_masks[:, 0]
    if object_masks.dim() != 3 or object_masks.shape != paste_masks.shape:
        raise ValueError(f'object_masks and paste_masks must both be B x H x W of one size, got '
                         f'{tuple(object_masks.shape)} and {tuple(paste_masks.shape)}')
    if paste_masks.dtype != torch.bool:
        raise ValueError(f'paste_masks must be bool, got {paste_masks.dtype}')
    objects = object_masks.float()
    partner = objects.flip(0)
    totals = objects.flatten(1).sum(1)
    kept = (objects * ~paste_masks).flatten(1).sum(1) / totals
    pasted = (partner * paste_masks).flatten(1).sum(1) / totals.flip(0)
    return torch.stack([kept, pasted], dim=1)


def normalise_shares(shares: torch.Tensor) -> torch.Tensor:
    """Shares rescaled to sum 1 per row: the label split a sum-normalised target should have (NaN if both 0)."""
    return shares / shares.sum(1, keepdim=True)


def fidelity_error(weights: torch.Tensor, shares: torch.Tensor) -> float:
    """Mean absolute difference between label weights and true shares (B x 2), over the finite shares."""
    if weights.shape != shares.shape or weights.dim() != 2 or weights.shape[1] != 2:
        raise ValueError(f'weights and shares must both be B x 2, got {tuple(weights.shape)} and '
                         f'{tuple(shares.shape)}')
    valid = torch.isfinite(shares)
    if not valid.any():
        raise ValueError('no finite shares: no mixed image has object pixels')
    return (weights.float() - shares.float()).abs()[valid].mean().item()


def token_paste_masks(token_masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """TokenMix's B x gh x gw token masks as B x H x W pixel paste masks."""
    return masks_to_pixels(token_masks, patch_size)[:, 0]


def indicator_batch(batch_size: int, height: int, width: int) -> torch.Tensor:
    """B x 3 x H x W images where image b is filled with the value b: a mixer's output then tells each pixel's source.

    Call the mixer with these and labels ``arange(B)`` (the mixer built for ``num_classes=B`` and no label smoothing):
    :func:`paste_masks_from_indicator` reads the paste masks and :func:`weights_from_indicator_targets` the weights.
    """
    return torch.arange(batch_size, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, height, width).clone()


def paste_masks_from_indicator(mixed: torch.Tensor) -> torch.Tensor:
    """B x H x W bool: where mixed indicator image i holds its partner's value B-1-i.

    Raises ValueError when pixels hold neither value (a Mixup blend, which has no paste mask).
    """
    source = mixed[:, 0]
    own = torch.arange(mixed.shape[0], dtype=source.dtype, device=source.device).view(-1, 1, 1)
    pasted = source == own.flip(0)
    if not (pasted | (source == own)).all():
        raise ValueError('mixed indicator images hold blended values: a Mixup (blend) batch has no paste mask; '
                         'measure the region (CutMix / token) branch only')
    return pasted


def weights_from_indicator_targets(targets: torch.Tensor) -> torch.Tensor:
    """B x 2 label weights from the B x B soft targets of an indicator batch (labels arange(B), no smoothing)."""
    b = targets.shape[0]
    if targets.shape != (b, b):
        raise ValueError(f'indicator targets must be B x B (num_classes = batch size), got {tuple(targets.shape)}')
    idx = torch.arange(b, device=targets.device)
    return torch.stack([targets[idx, idx], targets[idx, idx.flip(0)]], dim=1)


def load_demo_objects(data_dir: str, split: str, count: int, mean: Sequence[float],
                      std: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first `count` images of a demo-data split (tools/make_demo_data.py), evenly over its classes.

    Returns normalised images (B x 3 x H x W, as stored: no resize or crop, so they line up with the masks),
    labels (B,) and object masks (bool B x H x W) read from ``objects.json`` and ``object_masks.npz``.
    """
    meta_path = os.path.join(data_dir, 'objects.json')
    try:
        with open(meta_path) as f:
            records = json.load(f)[split]
    except FileNotFoundError:
        raise ValueError(f'{meta_path} not found: --data-dir must be written by tools/make_demo_data.py') from None
    except KeyError:
        raise ValueError(f'{meta_path} has no split {split!r}') from None
    # interleave the classes (records are grouped by class) so a prefix of the list covers all of them
    by_class = {}
    for r in records:
        by_class.setdefault(r['label'], []).append(r)
    order = [r for group in zip(*by_class.values()) for r in group][:count]
    with np.load(os.path.join(data_dir, 'object_masks.npz')) as masks:
        objects = torch.from_numpy(masks[split][[r['mask_index'] for r in order]])
    pixels = np.stack([np.asarray(Image.open(os.path.join(data_dir, r['file'])).convert('RGB')) for r in order])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    images = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return images, torch.tensor([r['label'] for r in order]), objects
