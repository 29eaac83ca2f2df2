"""Evaluation that counts every validation image exactly once, on one process or many.

timm's distributed validation pads each rank's share with repeated images so all ranks run the same number of
batches; the repeats slightly change the result. Here each rank takes a strided shard of the dataset without
padding (`ShardedDataset`), the ranks run different numbers of batches on the plain (not DDP-wrapped) model,
and the sums of correct predictions, losses and images are all-reduced at the end. `evaluate` is shared by
train.py and validate.py; its `input_transform` hook changes the images after loading (for example occlusion).
`evaluate_with_retry` is validate.py's --retry: an out-of-memory error retries with a smaller batch.
"""
import logging
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset
from timm.data import create_loader
from timm.utils import check_batch_size_retry, decay_batch_step

from .data import DatasetView
from .distributed import process_group_active

__all__ = ['ShardedDataset', 'build_eval_loader', 'evaluate', 'evaluate_with_retry']

_logger = logging.getLogger(__name__)

InputTransform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OutputHook = Callable[[torch.Tensor, torch.Tensor], None]


class ShardedDataset(DatasetView):
    """Samples rank, rank + world_size, ... of `dataset`: disjoint shards that together cover it once."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f'rank must lie in [0, {world_size}), got {rank}')
        super().__init__(dataset)
        self.indices = range(rank, len(dataset), world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def build_eval_loader(dataset: Dataset, data_config: Dict[str, Any], batch_size: int, workers: int,
                      distributed: bool, *, device: Optional[torch.device] = None, use_prefetcher: bool = True,
                      pin_memory: bool = False, crop_border_pixels: Optional[int] = None,
                      tf_preprocessing: bool = False):
    """timm's eval loader (resize, centre crop, normalise per `data_config`) over this rank's shard.

    `crop_border_pixels` and `tf_preprocessing` have the meaning of timm's validate.py flags of those names.
    Not persistent: each pass draws its worker seed from the main RNG, every epoch alike, so an epoch after a
    resume draws the same random numbers as in an uninterrupted run (see `build_train_loader`).
    """
    if distributed:
        dataset = ShardedDataset(dataset, dist.get_rank(), dist.get_world_size())
    return create_loader(
        dataset,
        input_size=data_config['input_size'],
        batch_size=batch_size,
        is_training=False,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        num_workers=workers,
        crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode'),
        crop_border_pixels=crop_border_pixels,
        tf_preprocessing=tf_preprocessing,
        pin_memory=pin_memory,
        device=device if device is not None else torch.device('cpu'),
        use_prefetcher=use_prefetcher,
        persistent_workers=False,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, *, amp_dtype: Optional[torch.dtype] = None,
             input_transform: Optional[InputTransform] = None, input_dtype: Optional[torch.dtype] = None,
             class_subset: Optional[torch.Tensor] = None, on_output: Optional[OutputHook] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over every image the loaders of all ranks yield.

    `model` must not be DDP-wrapped (ranks run different numbers of batches). `input_transform(images, targets)`
    returns the images to classify; `input_dtype` casts them (a model in another dtype). `class_subset` keeps
    only those logit columns, in that order, so targets index the subset (timm's --valid-labels).
    `on_output(logits, targets)` sees each batch's (subset) logits. Returns dict(top1, top5, loss, count,
    seconds); all but `seconds` are global.
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct top-1, correct top-5, loss, images
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    for images, targets in loader:
        images, targets = images.to(device, dtype=input_dtype), targets.to(device)
        if input_transform is not None:
            images = input_transform(images, targets)
        with autocast():
            logits = model(images)
        logits = logits.float()
        if class_subset is not None:
            logits = logits[:, class_subset.to(device)]
        if on_output is not None:
            on_output(logits, targets)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets.view(-1, 1))
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                             F.cross_entropy(logits, targets, reduction='sum'),
                             torch.tensor(targets.numel(), device=device)]).to(sums)
    if process_group_active():
        dist.all_reduce(sums)
    model.train(was_training)
    correct1, correct5, loss, count = sums.tolist()
    denom = max(count, 1.0)
    return dict(top1=100.0 * correct1 / denom, top5=100.0 * correct5 / denom, loss=loss / denom,
                count=int(count), seconds=time.perf_counter() - start)


def evaluate_with_retry(run: Callable[[int], Dict[str, Any]], batch_size: int, retry: bool) -> Dict[str, Any]:
    """run(batch_size); with `retry` (--retry) a RuntimeError (out of memory) retries with timm's smaller batch
    steps down to 1, unless timm's `check_batch_size_retry` deems it fatal (an illegal memory access)."""
    while True:
        try:
            return run(batch_size)
        except RuntimeError as e:
            if not retry or not check_batch_size_retry(str(e)) or decay_batch_step(batch_size) < 1:
                raise
            batch_size = decay_batch_step(batch_size)
            _logger.warning(f'"{e}" while validating; retrying with batch size {batch_size}')
