"""The block-mask algorithm written per sample with Python loops, the way the authors' code does it.

A yardstick, not library code: tests/test_mixup_ext.py compares the batched `mixup_ext.block_token_masks` with its
statistics, and benchmarks/bench_mixup.py measures the speed-up against it.
"""
import math
import random
from typing import Optional, Sequence

import torch

from mixup_ext.masks import _TRIES_PER_ROUND, _check_grid


def block_token_masks_reference(
        batch_size: int,
        grid: Sequence[int],
        num_tokens: int,
        *,
        min_aspect: float = 0.3,
        rng: Optional[random.Random] = None,
) -> torch.Tensor:
    """`batch_size` masks of `num_tokens` tokens on `grid`, drawn one sample at a time from `rng`."""
    gh, gw = _check_grid(batch_size, grid)
    rng = rng or random.Random()
    log_range = (math.log(min_aspect), math.log(1. / min_aspect))
    out = torch.zeros(batch_size, gh, gw, dtype=torch.bool)
    for b in range(batch_size):
        mask = [[False] * gw for _ in range(gh)]
        count = 0
        while count < num_tokens:
            still = num_tokens - count
            added = 0
            for _ in range(_TRIES_PER_ROUND):
                area = rng.uniform(1, still)
                aspect = math.exp(rng.uniform(*log_range))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if h < gh and w < gw:
                    top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
                    cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w)]
                    fresh = [c for c in cells if not mask[c[0]][c[1]]]
                    if 0 < len(fresh) <= still:
                        for i, j in fresh:
                            mask[i][j] = True
                        added = len(fresh)
                        break
            if added == 0:
                break
            count += added
        out[b] = torch.tensor(mask)
    return out
