"""Own-class maps from top-k teacher outputs, a stored map cut to an augmented crop, and maps resampled onto the
token grid (docs/method.md section 2).

Pure tensor functions (no files): the map store and the dataset that records each crop live in
``tokenmix_train.teacher_maps``.

Top-k truncation (the authors' maps): the map of an image's own class is zero wherever that class is not among
the teacher's k highest scores at that position, so background positions, where some other class wins, carry no
mass. A crop of a stored map is the crop box resampled bilinearly onto the token grid (``roi_align``), with boxes
given as (x0, y0, x1, y1) in the map's own coordinates (pixel k covers [k, k + 1)).

A whole map meets the token grid through ``area_resample``: each token is the mean of the map over the token's
square, a map cell counting by the area it shares with it, for any pair of sizes.
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ['truncate_to_topk', 'own_map_from_topk', 'sample_maps', 'crop_map', 'overlap_matrix', 'area_resample']


def truncate_to_topk(own: torch.Tensor, maps: torch.Tensor, k: int) -> torch.Tensor:
    """`own` (B x h x w, the own-class channel of `maps`, B x C x h x w) zeroed where its class is outside the top k.

    ``k <= 0`` or ``k >= C`` keeps the channel whole. A class tied with the k-th score counts as inside.
    """
    if k <= 0 or k >= maps.shape[1]:
        return own
    kth = maps.topk(k, dim=1).values[:, -1]
    return torch.where(own >= kth, own, torch.zeros_like(own))


def own_map_from_topk(values: torch.Tensor, indices: torch.Tensor, label: Union[int, torch.Tensor],
                      k: int = 0) -> torch.Tensor:
    """Own-class maps (... x h x w, float32) from stored top-K scores and class indices (... x K x h x w each).

    Entries are ordered best first (as ``torch.topk`` writes them); ``0 < k < K`` uses only the first k. `label` is
    one class for all, or one per map (a tensor of the leading shape, a batch's labels). Positions where the label
    is not among them are zero.
    """
    if values.ndim < 3 or values.shape != indices.shape:
        raise ValueError(f'values and indices must both be ... x K x h x w, got {tuple(values.shape)} and '
                         f'{tuple(indices.shape)}')
    if 0 < k < values.shape[-3]:
        values, indices = values[..., :k, :, :], indices[..., :k, :, :]
    label = torch.as_tensor(label, device=indices.device)
    hit = indices.to(torch.int64) == label.to(torch.int64)[..., None, None, None]
    return (values.float() * hit).sum(-3)


def sample_maps(maps: torch.Tensor, to_map: torch.Tensor, out_size: Tuple[int, int], grid: Tuple[int, int],
                points: int, checks: Optional[torch.Tensor] = None, bounds: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """Maps (N x h x w) read through one affine transform each onto a token grid (N x rows x cols, float32).

    An output image of `out_size` (H, W) px is split into the `grid` (rows, cols) of tokens; each token is the mean
    of `points` x `points` samples spread evenly over its cell. A sample at output point p = (x, y) (pixel k covers
    [k, k + 1)) reads the map at ``to_map[n] @ (x, y, 1)`` (N x 2 x 3, map cells, same convention), bilinearly as
    ``roi_align`` reads: clamped to the edge within a cell outside the map, zero beyond. `checks` (N x S x 2 x 3)
    with `bounds` (N x S x 2, width and height): a sample whose point ``checks[n, s] @ (x, y, 1)`` falls outside
    [0, width) x [0, height) reads zero (the empty area an augmentation op brought into the image it acted on).
    So a crop, flips and affine augment ops, composed into these matrices, cut a whole batch's maps in one pass.
    """
    n, (h, w), (rows, cols), (out_h, out_w) = maps.shape[0], maps.shape[-2:], grid, out_size
    device = maps.device
    steps_y = (torch.arange(rows * points, device=device, dtype=torch.float32) + 0.5) * (out_h / (rows * points))
    steps_x = (torch.arange(cols * points, device=device, dtype=torch.float32) + 0.5) * (out_w / (cols * points))
    ys, xs = (v.reshape(-1) for v in torch.meshgrid(steps_y, steps_x, indexing='ij'))  # M output points

    def through(matrices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # ... x 2 x 3 -> x, y: ... x M
        m = matrices.float()[..., None]
        return m[..., 0, 0, :] * xs + m[..., 0, 1, :] * ys + m[..., 0, 2, :], \
            m[..., 1, 0, :] * xs + m[..., 1, 1, :] * ys + m[..., 1, 2, :]

    x, y = through(to_map)  # N x M, map cells
    # roi_align reads a point at cell coordinate u - 0.5, zero when below -1 or above the size, else clamped
    keep = (x >= -0.5) & (x <= w + 0.5) & (y >= -0.5) & (y <= h + 0.5)
    if checks is not None:
        cx, cy = through(checks)  # N x S x M
        limits = bounds.float()[..., None]
        keep &= ((cx >= 0) & (cx < limits[:, :, 0]) & (cy >= 0) & (cy < limits[:, :, 1])).all(1)
    normalised = torch.stack([2 * x / w - 1, 2 * y / h - 1], dim=-1).reshape(n, rows * points, cols * points, 2)
    read = F.grid_sample(maps.float()[:, None], normalised, mode='bilinear', padding_mode='border',
                         align_corners=False)[:, 0]
    read = read * keep.reshape(n, rows * points, cols * points)
    return F.avg_pool2d(read[:, None], points)[:, 0]


def crop_map(own_map: torch.Tensor, box: Tuple[float, float, float, float], size: Tuple[int, int],
             hflip: bool = False, vflip: bool = False) -> torch.Tensor:
    """The part of `own_map` (h x w) under `box` = (x0, y0, x1, y1), resampled to `size` (rows, cols), then flipped.

    Each output cell is the mean of bilinear samples of the map over the cell (as ``roi_align``, at least 2 x 2
    samples a cell), which is what area-resampling a teacher's map of the crop itself gives when the teacher is
    translation- and scale-equivariant (the crop is resized to the input size, so the teacher sees its content at
    another scale than the stored map's). Samples more than a cell outside the map read zero (roi_align's rule).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f'crop box must have x1 > x0 and y1 > y0, got {box}')
    rows, cols = size
    points = max(2, math.ceil(max((y1 - y0) / rows, (x1 - x0) / cols)))
    # the output is a `cols` x `rows` px image of the box; a flip mirrors where each output point reads
    sx, sy = (x1 - x0) / cols, (y1 - y0) / rows
    ax, bx = (-sx, x1) if hflip else (sx, x0)
    ay, by = (-sy, y1) if vflip else (sy, y0)
    to_map = torch.tensor([[[ax, 0., bx], [0., ay, by]]])
    return sample_maps(own_map[None], to_map, (rows, cols), (rows, cols), points)[0]


def overlap_matrix(size_in: int, size_out: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """size_out x size_in float32: the share of output cell i that input cell j covers, both rows of cells spanning
    the same length.

    Output cell i covers [i * size_in / size_out, (i + 1) * size_in / size_out) in input cells, so each row sums
    to 1. The overlaps are integers once both sides are scaled by size_out, so the only rounding is one division.
    """
    if size_in <= 0 or size_out <= 0:
        raise ValueError(f'sizes must be positive, got {size_in} -> {size_out}')
    start_out = torch.arange(size_out, device=device).view(-1, 1) * size_in
    start_in = torch.arange(size_in, device=device).view(1, -1) * size_out
    overlap = torch.minimum(start_out + size_in, start_in + size_out) - torch.maximum(start_out, start_in)
    return overlap.clamp(min=0).float() / size_in


def area_resample(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Maps (... x h x w) resampled to `size` (rows, cols), float32: each output cell the mean of the map over its
    square, a map cell counting by the area it shares with that square.

    Adaptive average pooling does this only when each side divides the other (14 -> 7, 7 -> 14): otherwise its
    windows overlap unevenly (one map cell counts 0.51-2.04x of its area from 10 to 14). Those dividing cases keep
    adaptive pooling, bit for bit; the others use separable overlap matrices, ``W_h @ map @ W_w^T``.
    """
    if maps.ndim < 2:
        raise ValueError(f'maps must be ... x h x w, got shape {tuple(maps.shape)}')
    (h, w), (rows, cols) = maps.shape[-2:], size
    flat = maps.float().reshape(-1, 1, h, w)
    if all(a % b == 0 or b % a == 0 for a, b in ((h, rows), (w, cols))):
        out = F.adaptive_avg_pool2d(flat, (rows, cols))
    else:
        out = overlap_matrix(h, rows, maps.device) @ flat @ overlap_matrix(w, cols, maps.device).T
    return out.reshape(*maps.shape[:-2], rows, cols)
