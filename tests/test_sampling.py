"""tokenmix_train.sampling, one piece at a time (the whole resumed runs are in tests/test_preemption.py): the batch
seeds, the loader rebuilt around timm's, the order of an epoch without the global RNG, the prefetcher's erasing
drawn from the batch position, and the loader workers that ignore the stop signals."""
import copy
import pickle
import random
import signal

import numpy as np
import pytest
import torch
from timm.data.loader import MultiEpochsDataLoader, PrefetchLoader
from timm.data.random_erasing import RandomErasing
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from tokenmix_train.data import loader_batches
from tokenmix_train.sampling import (ERASING, LOADER, ResumableBatchSampler, SeededBatch, SeededBatches,
                                     _QuietWorker, batch_seed, resumable_loader, sample_seed, start_epoch_at)


class Draws(torch.utils.data.Dataset):
    """Sample i is (i, a draw of Python's, NumPy's and torch's global streams), as an augmentation draws."""

    def __init__(self, size: int = 10) -> None:
        self.size, self.epochs = size, []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return index, random.random(), float(np.random.rand()), float(torch.rand(()))

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def _indices(loader) -> list:
    return [batch[0].tolist() for batch in loader]


def test_batch_and_sample_seeds_are_fixed_by_their_keys():
    """The seeds are part of a checkpoint's meaning (a resumed run must draw what the saved run would have drawn):
    pinned values, each key changing the seed, and all of them valid torch seeds (below 2**63), also from an
    epoch seed at the top of the 64-bit range."""
    assert batch_seed(5, 2, 1, 3) == batch_seed(5, 2, 1, 3, 1) == 5064504558392827510
    assert batch_seed(5, 2, 1, 3, LOADER) == 4614500142564507620 and batch_seed(5, 2, 1, 3, ERASING) == \
        2421319758277712163
    keys = [(5, 2, 1, 3, 1), (6, 2, 1, 3, 1), (5, 3, 1, 3, 1), (5, 2, 0, 3, 1), (5, 2, 1, 4, 1), (5, 2, 1, 3, 0)]
    seeds = [batch_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= s < 2 ** 63 for s in seeds)
    assert [sample_seed(5064504558392827510, p) for p in (0, 7)] == [8809750117018282964, 8633951421266193876]
    assert sample_seed(2 ** 64 - 1, 2 ** 40) == 3775176030075466783
    samples = [sample_seed(s, p) for s in seeds for p in range(50)]
    assert len(set(samples)) == len(samples) and all(0 <= s < 2 ** 63 for s in samples)


def test_seeded_batches_seed_each_stream_and_pass_the_rest_through():
    """Each sample of a seeded batch draws Python's and torch's streams from its seed and NumPy's from the seed mod
    2**32 (the seeds are wider than NumPy takes); an unseeded batch draws the process streams on; the epoch reaches
    the dataset when it takes one."""
    base = Draws(4)
    dataset = SeededBatches(base)
    assert len(dataset) == 4 and dataset[2][0] == 2
    seeds = [batch_seed(0, 0, 0, 0), 2 ** 32 + 5]
    expected = []
    for index, seed in zip([0, 3], seeds):
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        expected.append(base[index])
    random.seed(1)
    np_before = np.random.get_state()[1].copy()
    assert dataset.__getitems__(SeededBatch([0, 3], seeds)) == expected
    assert np.array_equal(np.random.get_state()[1], np_before) and random.random() == random.Random(1).random()
    random.seed(2)
    plain = dataset.__getitems__([1, 2])
    random.seed(2)
    assert [p[:2] for p in plain] == [(1, random.random()), (2, random.random())]
    dataset.set_epoch(4)
    assert base.epochs == [4]
    SeededBatches(list(range(3))).set_epoch(4)  # a dataset without set_epoch: nothing to pass on


class EpochBatches(BatchSampler):
    """A batch sampler with its own set_epoch (as timm's scheduled one has)."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def test_batch_sampler_reseeds_the_loader_stream_and_sets_the_inner_epoch():
    shuffled = DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=0)
    generator = torch.Generator()
    batches = ResumableBatchSampler(BatchSampler(shuffled, 3, drop_last=False), seed=5, rank=1, generator=generator)
    assert generator.initial_seed() == batch_seed(5, 0, 1, 0, LOADER)
    batches.set_epoch(2)
    assert generator.initial_seed() == batch_seed(5, 2, 1, 0, LOADER) and shuffled.epoch == 2
    assert batches.batch_size == 3 and batches.drop_last is False  # the wrapped sampler's attributes read through
    assert not hasattr(batches, 'sampler')  # timm's repeating loader must not go round this one
    twin = copy.deepcopy(batches)  # a copy is built without __init__: reading through must not recurse
    assert len(twin) == len(batches) and twin.batch_sampler is not batches.batch_sampler
    batches.skip_to(2)
    batches.set_epoch(2)  # set again as a pass of the same epoch starts: the skip holds
    epoch_seed = batch_seed(5, 2, 1, 0)
    assert len(batches) == 2 and [b.seeds for b in batches] == [  # positions count the skipped samples too
        [sample_seed(epoch_seed, p) for p in (6, 7, 8)], [sample_seed(epoch_seed, 9)]]
    batches.skip_to(9)
    assert len(batches) == 0 and list(batches) == []
    own = EpochBatches(SequentialSampler(range(4)), 2, drop_last=False)
    ResumableBatchSampler(own, seed=5, rank=0, generator=torch.Generator()).set_epoch(3)
    assert own.epoch == 3


def test_an_epochs_order_comes_from_the_seed_and_the_epoch_alone():
    """A shuffling loader: the order of an epoch is DistributedSampler's with --seed and that epoch, whatever the
    global RNG; a sequential one keeps its order and its batch sampler."""
    def init(worker_id):
        pass

    def collate(samples):
        return [torch.tensor([s[0] for s in samples])]

    base = Draws(10)
    loader = DataLoader(base, batch_size=3, shuffle=True, drop_last=True, collate_fn=collate, worker_init_fn=init)
    rebuilt = resumable_loader(loader, seed=5, rank=0)
    assert type(rebuilt) is DataLoader and isinstance(rebuilt.dataset, SeededBatches) and rebuilt.dataset.dataset \
        is base
    assert rebuilt.collate_fn is collate and rebuilt.worker_init_fn is init
    batches = rebuilt.batch_sampler
    assert isinstance(batches, ResumableBatchSampler) and rebuilt.generator is batches.generator
    orders = {}
    for epoch in (1, 2):
        sampler = DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=5)
        sampler.set_epoch(epoch)
        reference = list(sampler)
        batches.set_epoch(epoch)
        torch.manual_seed(epoch * 100)
        orders[epoch] = _indices(rebuilt)
        assert orders[epoch] == [reference[0:3], reference[3:6], reference[6:9]]  # drop_last kept
    assert orders[1] != orders[2]
    in_order = resumable_loader(DataLoader(base, batch_size=4, collate_fn=collate), seed=5, rank=0)
    assert _indices(in_order) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert type(in_order.batch_sampler.batch_sampler) is BatchSampler
    listed = resumable_loader(DataLoader(base, batch_sampler=[[0, 1], [5]], collate_fn=collate), seed=5, rank=0)
    assert _indices(listed) == [[0, 1], [5]]  # a batch sampler without a `sampler` attribute


def test_a_batch_sampler_subclass_keeps_itself_and_gets_the_seeded_order():
    sub = EpochBatches(RandomSampler(range(6)), 2, drop_last=False)
    batches = resumable_loader(DataLoader(Draws(6), batch_sampler=sub), seed=7, rank=0).batch_sampler
    assert batches.batch_sampler is sub and isinstance(sub.sampler, DistributedSampler) and sub.sampler.seed == 7
    assert sub.sampler.num_replicas == 1 and sub.sampler.shuffle


def test_worker_settings_carry_over_and_workers_ignore_the_stop_signals():
    """Nothing is iterated here: the workers' settings are read off the rebuilt loader."""
    def init(worker_id):
        pass

    loader = MultiEpochsDataLoader(Draws(6), batch_size=2, num_workers=2, pin_memory=True, persistent_workers=True,
                                   worker_init_fn=init)
    rebuilt = resumable_loader(loader, seed=1, rank=0, stop_signals=[signal.SIGUSR2])
    assert type(rebuilt) is MultiEpochsDataLoader and isinstance(loader_batches(rebuilt), ResumableBatchSampler)
    assert loader_batches(rebuilt).batch_sampler is loader.batch_sampler.sampler
    assert (rebuilt.num_workers, rebuilt.pin_memory, rebuilt.persistent_workers) == (2, True, True)
    worker_init = rebuilt.worker_init_fn
    assert isinstance(worker_init, _QuietWorker) and worker_init.init_fn is init
    assert worker_init.signals == (signal.SIGUSR2,)
    calls = []
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        _QuietWorker(calls.append, [signal.SIGUSR2])(3)
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN and calls == [3]
        _QuietWorker(None, [])(0)
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _erase(seed: int, images: torch.Tensor, erasing) -> torch.Tensor:
    """What `erasing` does to `images` with Python's and torch's streams seeded by `seed`."""
    random.seed(seed)
    torch.manual_seed(seed)
    return erasing(images.clone())


def test_the_prefetchers_erasing_draws_from_the_batch_position():
    """Each call erases as timm would from the seed of (epoch, position) and moves to the next position; the
    process streams are left as they were; start_epoch_at sets where the erasing restarts."""
    images = torch.zeros(2, 3, 8, 8)
    prefetcher = PrefetchLoader(DataLoader(Draws(6), batch_size=2), device=torch.device('cpu'), re_prob=1.0,
                                re_mode='pixel')
    timm_erasing = prefetcher.random_erasing
    assert resumable_loader(prefetcher, seed=5, rank=1) is prefetcher
    batches = loader_batches(prefetcher.loader)
    erasing = prefetcher.random_erasing
    assert isinstance(batches, ResumableBatchSampler) and batches.erasing is erasing and erasing.erasing is \
        timm_erasing
    assert erasing.probability == 1.0 and erasing.mode == 'pixel'  # timm's settings read through
    random.seed(0)
    torch.manual_seed(0)
    assert torch.equal(erasing(images.clone()), _erase(batch_seed(5, 0, 1, 0, ERASING), images, timm_erasing))
    assert pickle.loads(pickle.dumps(erasing)).mode == 'pixel'  # unpickled without __init__: no recursion
    start_epoch_at(prefetcher, 3, 4)
    assert len(batches) == 0 and (erasing.epoch, erasing.position) == (3, 4)
    random.seed(0)
    torch.manual_seed(0)
    before = random.getstate(), torch.get_rng_state()
    first, second = erasing(images.clone()), erasing(images.clone())
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])
    assert erasing.position == 6
    assert torch.equal(first, _erase(batch_seed(5, 3, 1, 4, ERASING), images, timm_erasing))
    assert torch.equal(second, _erase(batch_seed(5, 3, 1, 5, ERASING), images, timm_erasing))
    assert not torch.equal(first, second) and first.abs().sum() > 0
    plain = PrefetchLoader(DataLoader(Draws(6), batch_size=2), device=torch.device('cpu'))
    assert loader_batches(resumable_loader(plain, seed=5, rank=1).loader).erasing is None
    start_epoch_at(plain, 1, 1)  # no erasing to restart


def test_only_a_resumable_loader_starts_inside_an_epoch():
    loader = DataLoader(Draws(6), batch_size=2)
    start_epoch_at(loader, 2)
    with pytest.raises(ValueError, match='needs the loader of sampling.resumable_loader'):
        start_epoch_at(loader, 2, 1)
