"""TokenMix: a drop-in replacement for `timm.data.Mixup` whose region branch mixes at token level."""
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from ._rng import host_rng
from .maps import truncate_to_topk
from .masks import block_token_masks, masks_to_pixels, num_partner_tokens, random_token_masks, token_grid
from .targets import (TARGET_NORMS, area_weights, check_label_range, mixed_targets, normalise_weights, own_class_maps,
                      teacher_weights)

__all__ = ['TokenMix']

MODES = ('batch', 'pair', 'elem')
MASK_TYPES = {'block': block_token_masks, 'random': random_token_masks}
LAM_MODES = ('constant', 'beta')
TARGETS = ('auto', 'teacher', 'area')
CONSTANT_LAM = 0.5


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got '{value}'")
    return value


class TokenMix:
    """Mixup / TokenMix with timm `Mixup`'s constructor and call.

    The keywords timm's `Mixup` takes keep their meaning; `cutmix_alpha > 0` (or `cutmix_minmax`) turns on the
    region branch, which here pastes a token mask from the partner (sample B-1-i) instead of one box, and
    `switch_prob` picks between it and plain Mixup as in timm. The keyword-only arguments choose the mask
    (`mask_type`, `min_tokens`, `lam_mode`, `patch_size`) and the target: 'teacher' weights each label by the
    mass of its image's own-class activation map that stays visible (`teacher` is any callable
    images -> B x num_classes x h x w; one offering `own_class_maps(images, labels) -> B x h x w` is asked
    for just those channels), 'area' by token counts; 'auto' is 'teacher' when a teacher is given.
    `teacher_topk = K > 0` zeroes the own-class map wherever that class is outside the teacher's top K there
    (the authors' top-5 maps); 0 keeps the whole channel. Maps computed elsewhere (a map store cut to each crop)
    can be passed per call as `own_maps`; they then replace the teacher unless the target is 'area'.
    With `cutmix_minmax`, the pasted share of a token batch is drawn like timm's min-max box area instead of
    from `lam_mode`. `correct_lam=False` keeps the drawn lam for area weights instead of the mask's token share.

    After each call `last_mask` (bool B x gh x gw, True = token from the partner; None when no sample took the
    token branch) and `last_weights` (B x 2: own label, partner label) describe what was done.
    """

    def __init__(
            self,
            mixup_alpha: float = 1.,
            cutmix_alpha: float = 0.,
            cutmix_minmax: Optional[Sequence[float]] = None,
            prob: float = 1.0,
            switch_prob: float = 0.5,
            mode: str = 'batch',
            correct_lam: bool = True,
            label_smoothing: float = 0.1,
            num_classes: int = 1000,
            multi_label: bool = False,
            *,
            mask_type: str = 'block',
            min_tokens: int = 14,
            lam_mode: str = 'constant',
            patch_size: int = 16,
            teacher: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
            target: str = 'auto',
            target_norm: str = 'none',
            teacher_topk: int = 0,
            generator: Optional[torch.Generator] = None,
    ) -> None:
        if multi_label:
            raise ValueError('multi_label: TokenMix mixes single-label targets only')
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2 or not 0. < cutmix_minmax[0] <= cutmix_minmax[1] <= 1.:
                raise ValueError(f'cutmix_minmax must be (min, max) with 0 < min <= max <= 1, got {cutmix_minmax}')
            cutmix_alpha = 1.0  # as timm: min-max sizes switch the region branch on
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f'mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}')
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError('one of mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax is needed')
        if not 0. <= prob <= 1. or not 0. <= switch_prob <= 1.:
            raise ValueError(f'prob and switch_prob must lie in [0, 1], got {prob} and {switch_prob}')
        if not 0. <= label_smoothing < 1.:
            raise ValueError(f'label_smoothing must lie in [0, 1), got {label_smoothing}')
        if num_classes < 2:
            raise ValueError(f'num_classes must be >= 2, got {num_classes}')
        if min_tokens < 0:
            raise ValueError(f'min_tokens must be >= 0, got {min_tokens}')
        if teacher_topk < 0:
            raise ValueError(f'teacher_topk must be >= 0 (0 = whole own-class map), got {teacher_topk}')
        if patch_size <= 0:
            raise ValueError(f'patch_size must be positive, got {patch_size}')
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.cutmix_minmax = cutmix_minmax
        self.mix_prob = prob
        self.switch_prob = switch_prob
        self.mode = _choice('mode', mode, MODES)
        self.correct_lam = correct_lam
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.mask_type = _choice('mask_type', mask_type, tuple(MASK_TYPES))
        self.min_tokens = min_tokens
        self.lam_mode = _choice('lam_mode', lam_mode, LAM_MODES)
        self.patch_size = patch_size
        self.teacher = teacher
        self.target = _choice('target', target, TARGETS)
        if self.target == 'teacher' and teacher is None:
            raise ValueError("target='teacher' needs a teacher")
        self.target_norm = _choice('target_norm', target_norm, TARGET_NORMS)
        self.teacher_topk = teacher_topk
        self.generator = generator
        self.mixup_enabled = True
        self.last_mask: Optional[torch.Tensor] = None
        self.last_weights: Optional[torch.Tensor] = None

    @property
    def uses_teacher(self) -> bool:
        """Whether token batches take their weights from the teacher."""
        return self.target == 'teacher' or (self.target == 'auto' and self.teacher is not None)

    def _draw_params(self, count: int) -> Tuple[np.ndarray, np.ndarray]:
        """lam and token-branch flag for `count` draws (one per batch, pair or element), as timm draws them."""
        rng = host_rng(self.generator)
        lam = np.ones(count)
        use_token = np.zeros(count, dtype=bool)
        if not self.mixup_enabled:
            return lam, use_token
        apply = rng.random(count) < self.mix_prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_token = rng.random(count) < self.switch_prob
        elif self.cutmix_alpha > 0:
            use_token[:] = True
        lam_mix = rng.beta(self.mixup_alpha, self.mixup_alpha, count) if self.mixup_alpha > 0 else lam
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            lam_token = 1. - rng.uniform(lo, hi, count) * rng.uniform(lo, hi, count)
        elif self.lam_mode == 'beta':
            lam_token = rng.beta(self.cutmix_alpha, self.cutmix_alpha, count)
        else:
            lam_token = np.full(count, CONSTANT_LAM)
        use_token &= apply
        lam = np.where(apply, np.where(use_token, lam_token, lam_mix), 1.)
        return lam, use_token

    def _row_params(self, batch_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-row lam and token flag, plus the index of each row's mask among the drawn masks."""
        if self.mode == 'batch':
            lam, use_token = self._draw_params(1)
            return lam.repeat(batch_size), use_token.repeat(batch_size), np.zeros(batch_size, dtype=np.int64)
        if self.mode == 'pair':
            lam, use_token = self._draw_params(batch_size // 2)
            half = np.arange(batch_size // 2)
            return (np.concatenate([lam, lam[::-1]]), np.concatenate([use_token, use_token[::-1]]),
                    np.concatenate([half, half[::-1]]))
        lam, use_token = self._draw_params(batch_size)
        return lam, use_token, np.arange(batch_size)

    def _check_inputs(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[int, int]:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f'x must be a float tensor B x C x H x W, got {x.dtype} of shape {tuple(x.shape)}')
        if x.shape[0] % 2:
            raise ValueError(f'batch size must be even for mixing (partner of i is B-1-i), got {x.shape[0]}')
        if target.ndim != 1 or target.shape[0] != x.shape[0] or target.is_floating_point():
            raise ValueError(
                f'target must be integer class labels of shape ({x.shape[0]},), got {target.dtype} '
                f'of shape {tuple(target.shape)}')
        check_label_range(target, self.num_classes, 'target labels')
        return token_grid(x.shape[2], x.shape[3], self.patch_size)

    def _teacher_own_maps(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Own-class activation maps (B x h x w) of the unmixed batch, without gradients."""
        with torch.no_grad():
            own = getattr(self.teacher, 'own_class_maps', None)
            if own is not None and not self.teacher_topk:
                return own(x, labels)
            maps = self.teacher(x)
            return truncate_to_topk(own_class_maps(maps, labels, self.num_classes), maps, self.teacher_topk)

    def __call__(self, x: torch.Tensor, target: torch.Tensor,
                 own_maps: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix `x` in place with its flipped batch and return (x, soft targets B x num_classes on x's device).

        `own_maps` (B x h x w): each image's own-class map for this very crop, used instead of the teacher's.
        """
        grid = self._check_inputs(x, target)
        batch_size, device = x.shape[0], x.device
        labels = target.to(device=device, dtype=torch.long)
        lam, use_token, mask_index = self._row_params(batch_size)
        token_rows = torch.from_numpy(use_token).to(device)
        lam_rows = torch.from_numpy(lam).float().to(device)
        weights = torch.stack([lam_rows, 1. - lam_rows], dim=1)
        self.last_mask = None
        if use_token.any():
            mask = self._masks(lam, use_token, mask_index, grid).to(device)
            if own_maps is not None and self.target != 'area':
                maps = own_maps
            else:
                maps = self._teacher_own_maps(x, labels) if self.uses_teacher else None
            self._mix_pixels(x, lam_rows, token_rows, mask)
            area = area_weights(mask) if self.correct_lam else weights
            token_weights = area if maps is None else teacher_weights(maps.to(device), mask)
            token_weights = normalise_weights(token_weights, self.target_norm, area)
            weights = torch.where(token_rows.view(-1, 1), token_weights, weights)
            self.last_mask = mask
        elif (lam != 1.).any():
            self._mix_pixels(x, lam_rows, token_rows, None)
        self.last_weights = weights
        return x, mixed_targets(labels, weights, token_rows, self.num_classes, self.label_smoothing)

    def _masks(self, lam: np.ndarray, use_token: np.ndarray, mask_index: np.ndarray,
               grid: Tuple[int, int]) -> torch.Tensor:
        """Token masks for every row (all False on Mixup rows); one draw per batch, pair or element."""
        draws = int(mask_index.max()) + 1
        drawn_lam = np.ones(draws)
        drawn_lam[mask_index[use_token]] = lam[use_token]
        wanted = num_partner_tokens(torch.from_numpy(drawn_lam), grid[0] * grid[1], self.min_tokens)
        wanted[torch.from_numpy(drawn_lam == 1.)] = 0
        drawn = MASK_TYPES[self.mask_type](draws, grid, wanted, generator=self.generator)
        rows = drawn.index_select(0, torch.from_numpy(mask_index).to(drawn.device))
        return rows & torch.from_numpy(use_token).to(drawn.device).view(-1, 1, 1)

    def _mix_pixels(self, x: torch.Tensor, lam_rows: torch.Tensor, token_rows: torch.Tensor,
                    mask: Optional[torch.Tensor]) -> None:
        """x <- x + a * (flip(x) - x), a = partner share per pixel: the token mask, or 1 - lam for Mixup rows."""
        partner_share = (1. - lam_rows).view(-1, 1, 1, 1)
        if mask is not None:
            token_share = masks_to_pixels(mask, self.patch_size)
            if self.mode == 'batch':
                partner_share = token_share[:1]
            else:
                partner_share = torch.where(token_rows.view(-1, 1, 1, 1), token_share, partner_share)
        elif self.mode == 'batch':
            partner_share = partner_share[:1]
        x.lerp_(x.flip(0), partner_share.to(x.dtype))
