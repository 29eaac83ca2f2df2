"""Speed of mixup_ext against baselines measured in the same run (CPU).

(a) per-sample block masks, B=256 on a 14x14 grid: the batched `block_token_masks` against the same algorithm
    written per sample with Python loops (the authors' style, `block_token_masks_reference`).
(b) a whole `TokenMix.__call__` (teacher maps given) against `timm.data.Mixup.__call__` on the same
    128 x 3 x 224 x 224 batch, for the region branch (TokenMix tokens vs timm CutMix) and the Mixup branch.

Usage: python benchmarks/bench_mixup.py [--repeats N] [--threads N]
"""
import argparse
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable, List

import torch
from timm.data import Mixup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file from a checkout that was not pip-installed
    sys.path.insert(0, ROOT)

from mixup_ext import TokenMix, block_token_masks  # noqa: E402
from tests.mask_reference import block_token_masks_reference  # noqa: E402


def median_seconds(*fns: Callable[[], object], repeats: int, burst: int = 5) -> List[float]:
    """Median wall time of each of `fns` over `repeats` runs, after one warm-up run each.

    The functions take turns in bursts of `burst` runs, so a change in the machine's speed during the run
    (frequent on a shared VM) hits the candidate and its baseline alike, while most runs still find their
    caches warm, as in a training loop that calls the same code every step.
    """
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    while len(times[0]) < repeats:
        for fn, spent in zip(fns, times):
            for _ in range(burst):
                start = time.perf_counter()
                fn()
                spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


class GivenMaps:
    """A teacher whose own-class maps were computed beforehand, so only TokenMix's own work is timed."""

    def __init__(self, maps: torch.Tensor):
        self.maps = maps

    def own_class_maps(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.maps


def bench_masks(repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    fast, slow = median_seconds(lambda: block_token_masks(256, (14, 14), 112, generator=gen),
                                lambda: block_token_masks_reference(256, (14, 14), 112, rng=rng), repeats=repeats)
    print('(a) block masks, B=256, 14x14, 112 tokens, one mask per sample')
    print(f'    per-sample Python loop : {slow * 1e3:8.2f} ms')
    print(f'    batched (mixup_ext)    : {fast * 1e3:8.2f} ms   speed-up {slow / fast:5.1f}x')


def bench_call(repeats: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(128, 3, 224, 224)
    y = torch.randint(0, 1000, (128,))
    teacher = GivenMaps(torch.rand(128, 14, 14))
    print('(b) full __call__ on 128 x 3 x 224 x 224 (in place; a fresh copy of the batch each run, copy timed too)')
    copy_only, = median_seconds(lambda: x.clone(), repeats=repeats)
    cases = [
        ('region branch, batch', Mixup(mixup_alpha=0., cutmix_alpha=1.),
         TokenMix(mixup_alpha=0., cutmix_alpha=1., teacher=teacher)),
        ('region branch, elem ', Mixup(mixup_alpha=0., cutmix_alpha=1., mode='elem'),
         TokenMix(mixup_alpha=0., cutmix_alpha=1., teacher=teacher, mode='elem')),
        ('mixup branch, batch ', Mixup(mixup_alpha=0.8, cutmix_alpha=0.),
         TokenMix(mixup_alpha=0.8, cutmix_alpha=0.)),
    ]
    print(f'    batch copy alone: {copy_only * 1e3:.1f} ms')
    for name, timm_mix, token_mix in cases:
        base, ours = median_seconds(lambda: timm_mix(x.clone(), y), lambda: token_mix(x.clone(), y), repeats=repeats)
        print(f'    {name}: timm {base * 1e3:7.1f} ms   TokenMix {ours * 1e3:7.1f} ms   ratio {ours / base:4.2f}x')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}')
    bench_masks(args.repeats)
    bench_call(args.repeats)


if __name__ == '__main__':
    main()
