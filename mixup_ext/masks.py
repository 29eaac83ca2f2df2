"""Token masks: which tokens of an image come from its partner.

A mask is a bool tensor B x gh x gw over the token grid (True = token taken from the partner). The block
algorithm follows docs/method.md section 1 (BEiT-style block-wise masking, as in the authors' code) but advances
all samples of a batch together, so the Python loop runs over steps of the algorithm, never over samples.
"""
import functools
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._rng import host_rng

__all__ = [
    'block_token_masks', 'random_token_masks', 'num_partner_tokens',
    'token_grid', 'masks_to_pixels',
]

Grid = Tuple[int, int]
TokenCount = Union[int, torch.Tensor]

_TRIES_PER_ROUND = 10
_STEP_TRIES = 2  # tries tested per step while many samples are unfinished; divides _TRIES_PER_ROUND
_FEW_SAMPLES = 32  # at or below this many unfinished samples a step tests a whole round


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
    if isinstance(num_tokens, int):  # the common case, checked without tensor ops
        if not 0 <= num_tokens <= total:
            raise ValueError(f'num_tokens must lie in [0, {total}] for this grid, got {num_tokens}')
        return torch.full((batch_size,), num_tokens, dtype=torch.long, device=device)
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

    All unfinished samples advance together on the host, so the Python loop runs over steps, never over
    samples. Each mask is a bitset and each rectangle the AND of a row band and a column band, looked up in
    tables cached per grid. A step tests the next few tries of every sample's current round (two while many
    samples are left, where data dominates; all ten once few are, where the step count dominates); the first
    try that fits is kept, as in the per-sample loop, so the algorithm and its statistics are unchanged. The
    draws come from a NumPy generator seeded from `generator`, so a torch seed reproduces the masks; the
    finished masks are copied to `device` once.
    """
    gh, gw = _check_grid(batch_size, grid)
    if not 0. < min_aspect <= 1.:
        raise ValueError(f'min_aspect must lie in (0, 1], got {min_aspect}')
    wanted = _counts(batch_size, num_tokens, gh * gw, torch.device('cpu')).numpy()
    rng = host_rng(generator)
    band_bits, placement, max_side = _block_tables(gh, gw, min_aspect)
    words = band_bits.shape[0]
    log_scale = np.array([1., -1.]).reshape(2, 1, 1) * -math.log(min_aspect)
    log_shift = np.array([1., -1.]).reshape(2, 1, 1) * 0.5 * math.log(min_aspect)
    round_off = np.array([0.5, max_side + 0.5]).reshape(2, 1, 1)  # rounds (h, w) and offsets w to its table half
    done = np.zeros((words, batch_size), dtype=np.uint64)
    rows = np.flatnonzero(wanted)
    remaining = wanted[rows]
    free = np.full((words, rows.size), np.iinfo(np.uint64).max, dtype=np.uint64)  # tokens not taken yet
    tries_left = np.full(rows.size, _TRIES_PER_ROUND)
    tries = _STEP_TRIES
    resized = True
    while rows.size:
        if resized:  # buffers whose last try row adds nothing: argmax lands there when no try fits
            n = rows.size
            samples, try_no = np.arange(n), np.arange(tries)[:, None]
            gain = np.zeros((words, tries + 1, n), dtype=np.uint64)
            fits = np.ones((n, tries + 1), dtype=bool)
            fresh_m1 = np.full((tries + 1, n), -1)
            resized = False
        u = rng.random((4, tries, n))
        side = np.sqrt(u[0] * (remaining - 1.) + 1.)
        hw = (side * np.exp(log_shift + log_scale * u[1]) + round_off).astype(np.intp)
        slots = placement.take(hw, axis=1)
        band = band_bits.take((u[2:] * slots[0] + slots[1]).astype(np.intp), axis=1)
        np.bitwise_and(band[:, 0], band[:, 1], out=gain[:, :tries])
        gain[:, :tries] &= free[:, None, :]
        np.add.reduce(np.bitwise_count(gain[:, :tries]), axis=0, dtype=np.intp, initial=-1, out=fresh_m1[:tries])
        # a try fits if 1 <= fresh <= allowed (one unsigned comparison); steps of _STEP_TRIES never pass a round's
        # end, so only whole-round steps, which may start mid-round, mask the tries beyond it
        allowed = remaining if tries == _STEP_TRIES else remaining * (try_no < tries_left)
        np.less(fresh_m1[:tries].view(np.uint64), allowed.view(np.uint64), out=fits[:, :tries].T)
        chosen = fits.argmax(axis=1) * n + samples  # flat index of each sample's first fitting try
        free ^= gain.reshape(words, -1).take(chosen, axis=1)
        remaining -= fresh_m1.take(chosen) + 1
        tries_left = np.where(chosen < tries * n, _TRIES_PER_ROUND, tries_left - tries)
        remaining *= tries_left > 0  # a round in which no try fits ends the sample
        live = remaining > 0
        if 2 * np.count_nonzero(live) <= n:
            done[:, rows] = ~free
            rows, free, remaining, tries_left = rows[live], free[:, live], remaining[live], tries_left[live]
            resized = True
            if rows.size <= _FEW_SAMPLES:
                tries = _TRIES_PER_ROUND
    done[:, rows] = ~free
    mask = np.unpackbits(done.T.copy().view(np.uint8), axis=1, count=gh * gw, bitorder='little').view(bool)
    return torch.from_numpy(mask.reshape(batch_size, gh, gw)).to(device if device is not None else 'cpu')


@functools.lru_cache(maxsize=16)
def _block_tables(gh: int, gw: int, min_aspect: float) -> Tuple[np.ndarray, np.ndarray, int]:
    """Lookup tables for `block_token_masks`, cached per grid as read-only arrays.

    band_bits (words x bands): bitsets of the tokens in rows [s, s + l), at l * (gh + 1) + s, then of the tokens
    in columns [s, s + l), at (gh + 1)**2 + l * (gw + 1) + s.
    placement (2 x 2 * max_side): for a rectangle height h (at h) or width w (at max_side + w), the number of
    start positions and the first band of that length; a side that does not fit the grid gets the empty band,
    so its rectangle adds no token and is rejected like an oversized try of the per-sample loop.
    """
    n = gh * gw
    words = (n + 63) // 64
    tokens = np.arange(n)

    def bands(side: int, coord: np.ndarray) -> np.ndarray:
        length = np.arange(side + 1).reshape(-1, 1, 1)
        start = np.arange(side + 1).reshape(1, -1, 1)
        inside = np.zeros((side + 1, side + 1, words * 64), dtype=bool)
        inside[..., :n] = (coord >= start) & (coord < start + length)
        return np.packbits(inside, axis=-1, bitorder='little').view(np.uint64).reshape(-1, words)

    max_side = int(math.sqrt(n / min_aspect) + 0.5) + 2  # above any rounded side the draws can give
    length = np.arange(max_side)

    def place(side: int, first: int) -> np.ndarray:
        fits = length < side
        return np.stack([np.where(fits, side + 1 - length, 1), np.where(fits, first + length * (side + 1), first)])

    band_bits = np.ascontiguousarray(np.concatenate([bands(gh, tokens // gw), bands(gw, tokens % gw)]).T)
    placement = np.concatenate([place(gh, 0), place(gw, (gh + 1) ** 2)], axis=1).astype(float)
    band_bits.flags.writeable = placement.flags.writeable = False
    return band_bits, placement, max_side


def masks_to_pixels(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Upsample a B x gh x gw token mask by nearest neighbour to B x 1 x (gh*p) x (gw*p) pixels."""
    b, gh, gw = mask.shape
    p = patch_size
    return mask.view(b, 1, gh, 1, gw, 1).expand(b, 1, gh, p, gw, p).reshape(b, 1, gh * p, gw * p)
