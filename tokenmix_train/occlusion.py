"""Occlusion robustness: drop a share of each image's patches before the model sees it.

Dropped patches are set to zero in the normalised input, i.e. to the dataset mean colour. The masks depend only
on (seed, ratio, mode, dataset size), one per dataset index, so every model and every process count sees the
same occluded inputs.
"""
from typing import Any, Tuple

import torch
from torch.utils.data import Dataset

from mixup_ext import block_token_masks, masks_to_pixels, random_token_masks

from .data import DatasetView

OCCLUSION_MODES = {'random': random_token_masks, 'block': block_token_masks}

__all__ = ['OCCLUSION_MODES', 'occlusion_masks', 'OccludedDataset']


def occlusion_masks(num_images: int, grid: Tuple[int, int], ratio: float, mode: str, seed: int) -> torch.Tensor:
    """Bool masks (num_images x gh x gw), True on the patches to drop: `ratio` of them ('random': exactly,
    'block': separate rectangles covering about that many)."""
    if not 0. <= ratio < 1.:
        raise ValueError(f'occlusion ratio must lie in [0, 1), got {ratio}')
    if mode not in OCCLUSION_MODES:
        raise ValueError(f"occlusion mode must be one of {tuple(OCCLUSION_MODES)}, got '{mode}'")
    count = round(ratio * grid[0] * grid[1])
    generator = torch.Generator().manual_seed(seed)
    return OCCLUSION_MODES[mode](num_images, grid, count, generator=generator)


class OccludedDataset(DatasetView):
    """Wraps a dataset of normalised C x H x W tensors; item i has the patches of `masks[i]` set to zero."""

    def __init__(self, dataset: Dataset, masks: torch.Tensor, patch_size: int) -> None:
        if len(masks) != len(dataset):
            raise ValueError(f'{len(masks)} occlusion masks for a dataset of {len(dataset)} images')
        super().__init__(dataset)
        self.masks, self.patch_size = masks, patch_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Any]:
        image, target = self.dataset[index]
        drop = masks_to_pixels(self.masks[index:index + 1], self.patch_size)[0]
        if drop.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f'occlusion grid of patch_size {self.patch_size} covers {tuple(drop.shape[-2:])} pixels but the '
                f'image is {tuple(image.shape[-2:])}: --patch-size must divide the input size')
        return image.masked_fill(drop, 0.), target
