"""Own-class maps from top-k teacher outputs, and a stored map cut to an augmented crop (METHOD.md section 2).

Pure tensor functions (no files): the map store and the dataset that records each crop live in
``tokenmix_train.teacher_maps``.

Top-k truncation (the authors' maps): the map of an image's own class is zero wherever that class is not among
the teacher's k highest scores at that position, so background positions, where some other class wins, carry no
mass. A crop of a stored map is the crop box resampled bilinearly onto the token grid (``roi_align``), with boxes
given as (x0, y0, x1, y1) in the map's own coordinates (pixel k covers [k, k + 1)).
"""
import math
from typing import Tuple

import torch
from torchvision.ops import roi_align

__all__ = ['truncate_to_topk', 'own_map_from_topk', 'crop_map']


def truncate_to_topk(own: torch.Tensor, maps: torch.Tensor, k: int) -> torch.Tensor:
    """`own` (B x h x w, the own-class channel of `maps`, B x C x h x w) zeroed where its class is outside the top k.

    ``k <= 0`` or ``k >= C`` keeps the channel whole. A class tied with the k-th score counts as inside.
    """
    if k <= 0 or k >= maps.shape[1]:
        return own
    kth = maps.topk(k, dim=1).values[:, -1]
    return torch.where(own >= kth, own, torch.zeros_like(own))


def own_map_from_topk(values: torch.Tensor, indices: torch.Tensor, label: int, k: int = 0) -> torch.Tensor:
    """One image's own-class map (h x w, float32) from its stored top-K scores and class indices (K x h x w each).

    Entries are ordered best first (as ``torch.topk`` writes them); ``0 < k < K`` uses only the first k.
    Positions where `label` is not among them are zero.
    """
    if values.ndim != 3 or values.shape != indices.shape:
        raise ValueError(f'values and indices must both be K x h x w, got {tuple(values.shape)} and '
                         f'{tuple(indices.shape)}')
    if 0 < k < values.shape[0]:
        values, indices = values[:k], indices[:k]
    hit = indices.to(torch.int64) == label
    return (values.float() * hit).sum(0)


def crop_map(own_map: torch.Tensor, box: Tuple[float, float, float, float], size: Tuple[int, int],
             hflip: bool = False, vflip: bool = False) -> torch.Tensor:
    """The part of `own_map` (h x w) under `box` = (x0, y0, x1, y1), resampled to `size` (rows, cols), then flipped.

    Each output cell is the mean of bilinear samples of the map over the cell (``roi_align``, at least 2 x 2
    samples a cell), which is what average-pooling a teacher's map of the crop itself gives when the teacher is
    translation-equivariant. Samples more than a pixel outside the map read zero (roi_align's rule).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f'crop box must have x1 > x0 and y1 > y0, got {box}')
    rows, cols = size
    ratio = max(2, math.ceil(max((y1 - y0) / rows, (x1 - x0) / cols)))
    boxes = torch.tensor([[0., x0, y0, x1, y1]], dtype=torch.float32)
    out = roi_align(own_map.float()[None, None], boxes, output_size=(rows, cols), spatial_scale=1.0,
                    sampling_ratio=ratio, aligned=True)[0, 0]
    dims = [d for d, on in ((-1, hflip), (-2, vflip)) if on]
    return out.flip(dims) if dims else out
