"""Label weights of a mixed pair and the soft targets built from them (docs/method.md section 2).

Weights are B x 2: column 0 is the share of sample i's own label, column 1 the share of its partner's
(sample B-1-i). Masks are bool B x gh x gw, True where the token comes from the partner.
"""
import torch

from .maps import area_resample

__all__ = ['area_weights', 'teacher_weights', 'normalise_weights', 'mixed_targets', 'own_class_maps',
           'check_label_range']

TARGET_NORMS = ('none', 'sum')


def check_label_range(labels: torch.Tensor, num_classes: int, what: str) -> None:
    """Raise a ValueError naming `what` when a label falls outside [0, num_classes).

    Checked on the host before any gather, where a bad index would be a device-side assert on GPU.
    """
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f'{what} must lie in [0, {num_classes}) (num_classes), got [{int(labels.min())}, {int(labels.max())}]')


def area_weights(mask: torch.Tensor) -> torch.Tensor:
    """Token-count weights, what CutMix would give: (share of tokens kept, share pasted from the partner)."""
    pasted = mask.flatten(1).float().mean(1)
    return torch.stack([1. - pasted, pasted], dim=1)


def own_class_maps(teacher_maps: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each image's own-class channel (B x h x w) of full teacher maps (B x num_classes x h x w)."""
    if teacher_maps.ndim != 4 or teacher_maps.shape[0] != labels.shape[0]:
        raise ValueError(
            f'teacher must return class activation maps of shape B x num_classes x h x w with B={labels.shape[0]}, '
            f'got {tuple(teacher_maps.shape)}')
    if teacher_maps.shape[1] != num_classes:
        raise ValueError(
            f'teacher maps have {teacher_maps.shape[1]} classes but num_classes={num_classes}')
    return teacher_maps[torch.arange(labels.shape[0], device=teacher_maps.device), labels.to(teacher_maps.device)]


def teacher_weights(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Content-based weights: the mass of each image's object map on the tokens it contributes.

    `maps` are the own-class activation maps (B x h x w, any h, w) of the unmixed images. Each is resampled onto
    the token grid by area (``area_resample``), made non-negative and divided by its sum; sample i keeps the mass
    of its map outside its mask, and gets the mass of its partner's map inside the mask. A map with no mass (or a
    non-finite one) falls back to the area weight of that image, so a weight is never NaN.
    """
    if maps.ndim != 3 or maps.shape[0] != mask.shape[0]:
        raise ValueError(
            f'own-class maps must be B x h x w with B={mask.shape[0]}, got {tuple(maps.shape)}')
    grid_maps = area_resample(maps, mask.shape[-2:]).clamp_(min=0)
    total = grid_maps.flatten(1).sum(1)
    has_mass = torch.isfinite(total) & (total > 0)
    dist = torch.where(has_mass.view(-1, 1, 1), grid_maps / total.clamp(min=1e-12).view(-1, 1, 1), 0.)
    partner_dist = dist.flip(0)
    kept = (dist * ~mask).flatten(1).sum(1)
    pasted = (partner_dist * mask).flatten(1).sum(1)
    weights = torch.stack([kept, pasted], dim=1)
    usable = torch.stack([has_mass, has_mass.flip(0)], dim=1)
    return torch.where(usable, weights, area_weights(mask))


def normalise_weights(weights: torch.Tensor, target_norm: str, fallback: torch.Tensor) -> torch.Tensor:
    """'none' keeps the authors' raw weights (for BCE); 'sum' rescales each row to sum 1 (for softmax CE).

    A row whose weights sum to zero takes `fallback` (the area weights) under 'sum'.
    """
    if target_norm == 'none':
        return weights
    if target_norm != 'sum':
        raise ValueError(f"target_norm must be one of {TARGET_NORMS}, got '{target_norm}'")
    total = weights.sum(1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp(min=1e-12), fallback)


def mixed_targets(labels: torch.Tensor, weights: torch.Tensor, token_rows: torch.Tensor, num_classes: int,
                  smoothing: float) -> torch.Tensor:
    """Soft targets B x num_classes for sample i and its partner B-1-i.

    Every class starts at smoothing / num_classes. Mixup (and unmixed) rows then add w * (1 - smoothing) to each
    label, exactly timm's `mixup_target`. TokenMix rows add w - smoothing / 2 clamped at zero, so no target value is
    negative: the authors' formula is not clamped (docs/method.md section 2: w = 0.02, smoothing 0.1 and 1000 classes
    give -0.0299 there, 0.0001 here).
    """
    amounts = torch.where(token_rows.view(-1, 1), (weights - smoothing / 2).clamp(min=0), weights * (1 - smoothing))
    pair_labels = torch.stack([labels, labels.flip(0)], dim=1)
    target = torch.full((labels.shape[0], num_classes), smoothing / num_classes, device=labels.device,
                        dtype=amounts.dtype)
    return target.scatter_add_(1, pair_labels, amounts)
