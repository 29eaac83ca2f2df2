"""Token masks: which tokens of an image come from its partner.

A mask is a bool tensor B x gh x gw over the token grid (True = token taken from the partner). The block
algorithm follows METHOD.md section 1 (BEiT-style block-wise masking, as in the authors' code) but advances
all samples of a batch together, so the Python loop runs over rounds of the algorithm, never over samples.
"""
import functools
import math
import random
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._rng import host_rng

__all__ = [
    'block_token_masks', 'random_token_masks', 'block_token_masks_reference', 'num_partner_tokens',
    'token_grid', 'masks_to_pixels',
]

Grid = Tuple[int, int]
TokenCount = Union[int, torch.Tensor]

_TRIES_PER_ROUND = 10


def token_grid(height: int, width: int, patch_size: int) -> Grid:
    """Token grid (gh, gw) of an image; the image sides must be multiples of the patch size."""
    if patch_size <= 0:
        raise ValueError(f'patch_size must be positive, got {patch_size}')
    if height % patch_size or width % patch_size:
        raise ValueError(
            f'image size {height}x{width} is not divisible by patch_size {patch_size}: '
            f'TokenMix needs a whole token grid')
    return height // patch_size, width // patch_size


def num_partner_tokens(lam: torch.Tensor, num_tokens: int, min_tokens: int) -> torch.Tensor:
    """Tokens to take from the partner: min(N, int((1 - lam) * N) + min_tokens), as in the authors' code."""
    n = ((1. - lam.double()) * num_tokens).floor().long() + min_tokens
    return n.clamp(0, num_tokens)


def _counts(batch_size: int, num_tokens: TokenCount, total: int, device: torch.device) -> torch.Tensor:
    """Per-sample wanted token counts as a LongTensor (B,), validated against the grid size."""
    counts = torch.as_tensor(num_tokens, dtype=torch.long).to(device).expand(batch_size).clone()
    if counts.numel() and (counts.min() < 0 or counts.max() > total):
        raise ValueError(f'num_tokens must lie in [0, {total}] for this grid, got {num_tokens}')
    return counts


def _check_grid(batch_size: int, grid: Sequence[int]) -> Grid:
    if batch_size < 0:
        raise ValueError(f'batch_size must be >= 0, got {batch_size}')
    if len(grid) != 2 or min(grid) <= 0:
        raise ValueError(f'grid must be two positive sizes (gh, gw), got {tuple(grid)}')
    return int(grid[0]), int(grid[1])


def random_token_masks(
        batch_size: int,
        grid: Sequence[int],
        num_tokens: TokenCount,
        *,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Exactly `num_tokens` tokens per sample (an int or a (B,) tensor), chosen uniformly at random."""
    gh, gw = _check_grid(batch_size, grid)
    device = torch.device(device) if device is not None else (generator.device if generator else torch.device('cpu'))
    counts = _counts(batch_size, num_tokens, gh * gw, device)
    order = torch.rand(batch_size, gh * gw, generator=generator, device=device).argsort(dim=1)
    chosen = torch.arange(gh * gw, device=device).unsqueeze(0) < counts.unsqueeze(1)
    mask = torch.zeros(batch_size, gh * gw, dtype=torch.bool, device=device)
    return mask.scatter_(1, order, chosen).view(batch_size, gh, gw)


def block_token_masks(
        batch_size: int,
        grid: Sequence[int],
        num_tokens: TokenCount,
        *,
        min_aspect: float = 0.3,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Several separate rectangles of tokens per sample, covering at most (about) `num_tokens` tokens.

    Per sample, until the wanted count is covered: draw a target area uniform in [1, tokens still wanted], an
    aspect ratio log-uniform in [min_aspect, 1/min_aspect] and a uniform position; keep the rectangle if it adds
    between 1 and the still-wanted number of tokens (rectangles may overlap); up to ten tries a round; stop when
    a round adds nothing.

    All unfinished samples advance together, on the host: each mask is a bitset and each rectangle the AND of a
    row band and a column band, so testing the ten tries of every sample is a handful of small array operations
    (no per-sample loop, no device kernel per round); the finished masks are copied to `device` once. The draws
    come from a NumPy generator seeded from `generator`, so a torch seed reproduces the masks.
    """
    gh, gw = _check_grid(batch_size, grid)
    if not 0. < min_aspect <= 1.:
        raise ValueError(f'min_aspect must lie in (0, 1], got {min_aspect}')
    wanted = _counts(batch_size, num_tokens, gh * gw, torch.device('cpu')).numpy()
    rng = host_rng(generator)
    row_bands, col_bands = _band_bitsets(gh, gw)
    bits = np.zeros((batch_size, row_bands.shape[1]), dtype=np.uint64)
    count = np.zeros(batch_size, dtype=np.int64)
    half_log_lo, log_span = 0.5 * math.log(min_aspect), -math.log(min_aspect)
    active = np.flatnonzero(wanted > 0)
    while active.size:
        remaining = (wanted[active] - count[active])[:, None]
        u = rng.random((4, active.size, _TRIES_PER_ROUND))
        side = np.sqrt(1. + (remaining - 1) * u[0])
        root_aspect = np.exp(half_log_lo + log_span * u[1])
        h = np.rint(side * root_aspect).astype(np.int64)
        w = np.rint(side / root_aspect).astype(np.int64)
        fits = (h < gh) & (w < gw)
        np.minimum(h, gh, out=h)
        np.minimum(w, gw, out=w)
        top = (u[2] * (gh - h + 1)).astype(np.int64)
        left = (u[3] * (gw - w + 1)).astype(np.int64)
        rect = row_bands.take(top * (gh + 1) + h, axis=0)
        rect &= col_bands.take(left * (gw + 1) + w, axis=0)
        current = bits[active]
        overlap = np.bitwise_count(rect & current[:, None, :])
        new = h * w
        for word in range(overlap.shape[-1]):  # a few slice subtractions beat numpy's sum over a short axis
            new -= overlap[..., word]
        ok = fits & (new > 0) & (new <= remaining)
        took = ok.any(axis=1)
        pick = ok.argmax(axis=1)[took]
        grown = active[took]
        bits[grown] = current[took] | rect[took, pick]
        count[grown] += new[took, pick]
        active = grown[count[grown] < wanted[grown]]
    mask = np.unpackbits(bits.view(np.uint8), axis=1, count=gh * gw, bitorder='little').astype(bool)
    return torch.from_numpy(mask.reshape(batch_size, gh, gw)).to(device if device is not None else 'cpu')


@functools.lru_cache(maxsize=16)
def _band_bitsets(gh: int, gw: int) -> Tuple[np.ndarray, np.ndarray]:
    """Bitsets of the tokens in rows [s, s + l) and in columns [s, s + l), indexed by s * (side + 1) + l.

    Cached per grid, as read-only arrays: building them costs about a tenth of drawing a batch of masks.
    """
    n = gh * gw
    words = (n + 63) // 64

    def bands(side: int, coord: np.ndarray) -> np.ndarray:
        start = np.arange(side + 1).reshape(-1, 1, 1)
        length = np.arange(side + 1).reshape(1, -1, 1)
        inside = np.zeros((side + 1, side + 1, words * 64), dtype=bool)
        inside[..., :n] = (coord >= start) & (coord < start + length)
        return np.packbits(inside, axis=-1, bitorder='little').view(np.uint64).reshape(-1, words)

    tokens = np.arange(n)
    row_bands, col_bands = bands(gh, tokens // gw), bands(gw, tokens % gw)
    row_bands.flags.writeable = col_bands.flags.writeable = False
    return row_bands, col_bands


def block_token_masks_reference(
        batch_size: int,
        grid: Sequence[int],
        num_tokens: int,
        *,
        min_aspect: float = 0.3,
        rng: Optional[random.Random] = None,
) -> torch.Tensor:
    """The same block algorithm written per sample with Python loops, the way the authors' code does it.

    Kept as the yardstick for `block_token_masks`: the tests compare their statistics and the benchmark
    measures the speed-up against it.
    """
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


def masks_to_pixels(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Upsample a B x gh x gw token mask by nearest neighbour to B x 1 x (gh*p) x (gw*p) pixels."""
    b, gh, gw = mask.shape
    p = patch_size
    return mask.view(b, 1, gh, 1, gw, 1).expand(b, 1, gh, p, gw, p).reshape(b, 1, gh * p, gw * p)
