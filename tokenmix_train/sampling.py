"""Data order and augmentation draws that a run resumed in the middle of an epoch replays exactly.

timm's training loader draws its order and augmentations from streams that depend on how far the loader got
and on the worker count: the single-process shuffle and each epoch's worker seeds come from the main process's
global RNG, and each worker's augmentations from the samples that worker served before. `resumable_loader`
rebuilds such a loader so that everything is a function of (seed, epoch, rank, batch position) alone:
- the order: the sampler of each epoch is seeded by the epoch (timm's distributed samplers already are; the
  single-process shuffle becomes one that is), so the epoch's batches are known without running them;
- the augmentations: each sample is served with Python's, NumPy's and torch's RNGs seeded from its position in
  the epoch (`SeededBatch`), whichever process or worker serves it; the main process's streams are left as they
  were; timm's prefetcher erasing (main process, per batch) is seeded by the batch's position (`SeededErasing`);
- the loader's own draw (the workers' base seed) comes from a generator seeded by the epoch, not the global RNG.
`ResumableBatchSampler.skip_to(n)` then starts the epoch at batch n without reading the batches before,
with the same batches, in the same order, augmented the same way as the uninterrupted run; the worker count no
longer changes a single draw.
"""
import random
import signal
from typing import Any, Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler
from torch.utils.data.distributed import DistributedSampler
from timm.data.loader import MultiEpochsDataLoader, PrefetchLoader

from .data import DatasetView, loader_batches

__all__ = ['SeededBatch', 'SeededBatches', 'SeededErasing', 'ResumableBatchSampler', 'resumable_loader',
           'start_epoch_at', 'batch_seed', 'sample_seed']


LOADER, SAMPLES, ERASING = 0, 1, 2  # the streams of an epoch: the loader's own draws, the samples', the erasing
_MASK = 2 ** 64 - 1


def batch_seed(seed: int, epoch: int, rank: int, position: int, stream: int = SAMPLES) -> int:
    """The seed of `stream` at `position` (a batch's; for SAMPLES, 0) of `rank`'s `epoch`: independent for every
    tuple."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream, position]).generate_state(1, np.uint64)[0] >> 1)


def sample_seed(epoch_seed: int, position: int) -> int:
    """The seed of the sample at `position` of an epoch whose SAMPLES seed is `epoch_seed` (splitmix64: a few
    integer operations, so the main process can seed every sample of a batch cheaply)."""
    z = (epoch_seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) >> 1


class SeededBatch(list):
    """A batch of sample indices with the seed each sample is augmented from."""

    def __init__(self, indices: Sequence[Any], seeds: Sequence[int]) -> None:
        super().__init__(indices)
        self.seeds = list(seeds)


class SeededBatches(DatasetView):
    """Serves each sample of a `SeededBatch` with the RNGs seeded by its seed, then restores the process's streams
    (which matters when the main process serves batches itself, --workers 0). Seeds per sample, not per batch, so
    how the samples are cut into batches (-b, --grad-accum-steps) does not change their augmentations."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index]

    def __getitems__(self, batch: Sequence[Any]) -> List[Any]:
        seeds = getattr(batch, 'seeds', None)
        if seeds is None:
            return [self.dataset[index] for index in batch]
        saved = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
        try:
            return [self._seeded(index, seed) for index, seed in zip(batch, seeds)]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.default_generator.set_state(saved[2])

    def _seeded(self, index: Any, seed: int) -> Any:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.random.default_generator.manual_seed(seed)
        return self.dataset[index]

    def set_epoch(self, epoch: int) -> None:
        """timm's scheduled-resolution dataset changes its transforms by epoch: pass the epoch on."""
        if hasattr(self.dataset, 'set_epoch'):
            self.dataset.set_epoch(epoch)


class ResumableBatchSampler(Sampler):
    """`batch_sampler`'s batches as `SeededBatch`es, each sample seeded by (seed, epoch, rank, its position in the
    epoch); `skip_to(n)` makes the epoch's passes (and its length) start at batch n, until `set_epoch` moves to
    another epoch. `set_epoch` reaches the wrapped (batch) sampler and reseeds `generator`, the loader's own."""

    def __init__(self, batch_sampler: Any, seed: int, rank: int, generator: torch.Generator) -> None:
        self.batch_sampler, self.seed, self.rank, self.generator = batch_sampler, seed, rank, generator
        self.epoch, self.first = 0, 0
        self.erasing: Optional[SeededErasing] = None  # the prefetcher's erasing, when it has one
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # timm's repeating loader sets the epoch again as each pass starts
            self.epoch, self.first = epoch, 0
        self.generator.manual_seed(batch_seed(self.seed, epoch, self.rank, 0, LOADER))
        inner = self.batch_sampler if hasattr(self.batch_sampler, 'set_epoch') \
            else getattr(self.batch_sampler, 'sampler', None)
        if hasattr(inner, 'set_epoch'):
            inner.set_epoch(epoch)

    def __getattr__(self, name: str) -> Any:  # the wrapped sampler's attributes (timm's average_batch_size, ...)
        if name in ('batch_sampler', 'sampler'):  # 'sampler': timm's repeating loader must find this one's set_epoch
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)

    def skip_to(self, batches: int) -> None:
        """Start the next pass at batch `batches` (the batches before are neither read nor augmented)."""
        self.first = batches

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.first, 0)

    def __iter__(self) -> Iterator[SeededBatch]:
        first, samples = self.first, 0
        epoch_seed = batch_seed(self.seed, self.epoch, self.rank, 0)
        for position, batch in enumerate(self.batch_sampler):
            if position >= first:
                yield SeededBatch(batch, [sample_seed(epoch_seed, samples + i) for i in range(len(batch))])
            samples += len(batch)


def start_epoch_at(loader: Any, epoch: int, first_batch: int = 0) -> None:
    """Make `loader`'s next pass serve `epoch` from batch `first_batch` on (the batches before are neither read
    nor augmented). Call it right before iterating; `loader` comes from `resumable_loader`."""
    batches = loader_batches(loader)
    if not isinstance(batches, ResumableBatchSampler):
        if first_batch:
            raise ValueError('a run resumed within an epoch needs the loader of sampling.resumable_loader')
        return
    batches.skip_to(first_batch)
    if batches.erasing is not None:  # erased in the main process, in batch order, from the epoch's first on
        batches.erasing.restart(epoch, first_batch)


class SeededErasing:
    """timm's prefetcher erasing (run on the device in the main process, one batch ahead of training) drawn from
    each batch's position instead of the main process's streams, which a checkpoint between two batches could not
    split."""

    def __init__(self, erasing: Callable[[torch.Tensor], torch.Tensor], seed: int, rank: int) -> None:
        self.erasing, self.seed, self.rank = erasing, seed, rank
        self.epoch, self.position = 0, 0

    def __getattr__(self, name: str) -> Any:  # timm's settings (probability, mode, ...) read through
        if name == 'erasing':
            raise AttributeError(name)
        return getattr(self.erasing, name)

    def restart(self, epoch: int, position: int) -> None:
        """The next call erases the batch at `position` of `epoch`."""
        self.epoch, self.position = epoch, position

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        seed = batch_seed(self.seed, self.epoch, self.rank, self.position, ERASING)
        self.position += 1
        cuda = [images.device] if images.device.type == 'cuda' else []
        saved = random.getstate()
        with torch.random.fork_rng(devices=cuda, device_type='cuda'):
            random.seed(seed)
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            try:
                return self.erasing(images)
            finally:
                random.setstate(saved)


class _QuietWorker:
    """A loader worker's init: ignore the stop signals but SIGTERM (the main process handles them; a scheduler that
    signals every process of a job would otherwise kill the workers mid-batch), then timm's worker init. SIGTERM
    keeps torch's worker handler: the main process ends its workers with it (a worker deaf to it hangs the exit)."""

    def __init__(self, init_fn: Optional[Callable[[int], None]], signals: Sequence[int]) -> None:
        self.init_fn, self.signals = init_fn, tuple(s for s in signals if s != signal.SIGTERM)

    def __call__(self, worker_id: int) -> None:
        for signum in self.signals:
            signal.signal(signum, signal.SIG_IGN)
        if self.init_fn is not None:
            self.init_fn(worker_id)


def _ordered_by_epoch(batch_sampler: Any, seed: int) -> Any:
    """`batch_sampler` with its global-RNG shuffle (timm's single-process loader) replaced by one seeded by
    --seed and the epoch."""
    sampler = getattr(batch_sampler, 'sampler', None)
    if not isinstance(sampler, RandomSampler):
        return batch_sampler
    ordered = DistributedSampler(sampler.data_source, num_replicas=1, rank=0, shuffle=True, seed=seed)
    if type(batch_sampler) is BatchSampler:
        return BatchSampler(ordered, batch_sampler.batch_size, batch_sampler.drop_last)
    batch_sampler.sampler = ordered  # timm's ScheduledBatchSampler draws from `sampler`
    return batch_sampler


def resumable_loader(loader: Any, seed: int, rank: int, stop_signals: Sequence[int] = ()) -> Any:
    """timm's training `loader` (maybe behind its prefetcher) rebuilt to serve the same pipeline from
    (seed, epoch, rank, position) alone; its batch sampler is a `ResumableBatchSampler`. Loader workers ignore
    `stop_signals`."""
    inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
    generator = torch.Generator()
    timm_batches = inner.batch_sampler.sampler if isinstance(inner, MultiEpochsDataLoader) else inner.batch_sampler
    batches = ResumableBatchSampler(_ordered_by_epoch(timm_batches, seed), seed, rank, generator)
    worker_init = _QuietWorker(inner.worker_init_fn, stop_signals) if stop_signals else inner.worker_init_fn
    rebuilt = type(inner)(SeededBatches(inner.dataset), batch_sampler=batches, num_workers=inner.num_workers,
                          collate_fn=inner.collate_fn, pin_memory=inner.pin_memory, worker_init_fn=worker_init,
                          persistent_workers=inner.persistent_workers, generator=generator)
    if isinstance(loader, PrefetchLoader):
        loader.loader = rebuilt
        if loader.random_erasing is not None:
            batches.erasing = loader.random_erasing = SeededErasing(loader.random_erasing, seed, rank)
        return loader
    return rebuilt
