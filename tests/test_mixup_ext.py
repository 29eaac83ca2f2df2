"""mixup_ext: masks, targets and TokenMix as a drop-in for timm.data.Mixup."""
import inspect
import math
import random

import numpy as np
import pytest
import timm
import torch
from scipy import ndimage
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from mixup_ext import (TokenMix, area_weights, block_token_masks, mixed_targets, normalise_weights, own_class_maps,
                       random_token_masks, teacher_weights)
from mixup_ext.masks import masks_to_pixels
from tests.mask_reference import block_token_masks_reference


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def constant_batch(batch_size: int, size: int = 32) -> torch.Tensor:
    """Image i is filled with the value i, so every mixed pixel tells where it came from."""
    return torch.arange(batch_size, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()


class OneTokenTeacher:
    """Each image's own-class map puts all its mass on token `hot[i]` of a grid x grid map."""

    def __init__(self, hot: torch.Tensor, grid: int, num_classes: int):
        self.hot, self.grid, self.num_classes = hot, grid, num_classes
        self.calls = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append((images.clone(), torch.is_grad_enabled()))
        maps = torch.zeros(images.shape[0], self.num_classes, self.grid * self.grid)
        maps[torch.arange(images.shape[0]), :, self.hot] = 3.
        return maps.view(images.shape[0], self.num_classes, self.grid, self.grid)


# ---------------------------------------------------------------- masks

def test_random_masks_have_exact_counts():
    counts = torch.tensor([0, 1, 57, 112, 196])
    masks = random_token_masks(5, (14, 14), counts, generator=gen())
    assert masks.shape == (5, 14, 14) and masks.dtype == torch.bool
    assert masks.sum((1, 2)).tolist() == counts.tolist()
    assert random_token_masks(3, (4, 8), 5, generator=gen()).sum((1, 2)).tolist() == [5, 5, 5]


def test_block_masks_match_the_reference_algorithm():
    masks = block_token_masks(400, (14, 14), 112, generator=gen(1))
    reference = block_token_masks_reference(400, (14, 14), 112, rng=random.Random(1))
    counts, ref_counts = masks.sum((1, 2)).float(), reference.sum((1, 2)).float()
    assert masks.shape == (400, 14, 14) and masks.dtype == torch.bool
    assert counts.max() <= 112 and ref_counts.max() <= 112
    assert abs(counts.mean() - 112) < 1.5 and abs(counts.mean() - ref_counts.mean()) < 1.5

    def parts(ms: torch.Tensor) -> np.ndarray:
        return np.array([ndimage.label(m.numpy())[1] for m in ms])

    # the pasted region comes in several separate parts, like the per-sample reference
    assert parts(masks).mean() > 1.2
    assert abs(parts(masks).mean() - parts(reference).mean()) < 0.35
    # with few wanted tokens the blocks stay small and count stays below the target
    small = block_token_masks(200, (14, 14), 20, generator=gen(2)).sum((1, 2))
    assert small.max() <= 20 and small.float().mean() > 18


def test_block_masks_per_sample_counts_and_non_square_grid():
    """Per-sample wanted counts on a 6 x 10 grid: each group of samples matches the per-sample loop for its count."""
    wanted = [0, 5, 30, 60]
    masks = block_token_masks(400, (6, 10), torch.tensor(wanted).repeat(100), generator=gen(3))
    counts = masks.sum((1, 2)).view(100, 4).double()
    for column, n in enumerate(wanted):
        reference = block_token_masks_reference(100, (6, 10), n, rng=random.Random(n)).sum((1, 2)).double()
        assert counts[:, column].max() <= n
        assert abs(counts[:, column].mean() - reference.mean()) < max(1., 3 * reference.std() / 10 ** 0.5)
    # exact counts where a few rectangles suffice; the full grid only by overlapping rectangles of at most 5 x 9
    assert counts[:, 0].max() == 0 and (counts[:, 1] == 5).all() and counts[:, 2].min() >= 29
    assert 50 < counts[:, 3].mean() < 58


def test_block_masks_follow_the_reference_on_thin_and_tiny_grids():
    # a rectangle must be strictly smaller than the grid on both sides, as in the per-sample loop
    assert not block_token_masks(8, (1, 1), 1, generator=gen(4)).any()
    assert block_token_masks(50, (2, 2), 4, generator=gen(4)).sum((1, 2)).max() <= 4
    for grid, wanted, min_aspect, tolerance in [((3, 40), 100, 0.05, 10.), ((14, 14), 196, 0.3, 3.)]:
        masks = block_token_masks(300, grid, wanted, min_aspect=min_aspect, generator=gen(4))
        reference = block_token_masks_reference(300, grid, wanted, min_aspect=min_aspect, rng=random.Random(4))
        counts, ref_counts = masks.sum((1, 2)).double(), reference.sum((1, 2)).double()
        assert masks.shape == (300, *grid) and counts.max() <= wanted
        assert abs(counts.mean() - ref_counts.mean()) < tolerance


def test_masks_reproduce_from_seed_and_differ_across_seeds():
    for fn in (block_token_masks, random_token_masks):
        a = fn(16, (14, 14), 100, generator=gen(7))
        b = fn(16, (14, 14), 100, generator=gen(7))
        c = fn(16, (14, 14), 100, generator=gen(8))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_argument_errors():
    with pytest.raises(ValueError, match='num_tokens'):
        block_token_masks(2, (4, 4), 17)
    with pytest.raises(ValueError, match='grid'):
        random_token_masks(2, (0, 4), 1)
    for bad in (2., 0.):
        with pytest.raises(ValueError, match='min_aspect'):
            block_token_masks(2, (4, 4), 3, min_aspect=bad)
    assert block_token_masks(2, (4, 4), 3, min_aspect=1., generator=gen()).sum((1, 2)).max() <= 3  # squares only


def test_masks_are_made_on_the_requested_device():
    # the meta device (shapes without data) tells a mask made on `device` from one made on the default CPU
    assert random_token_masks(2, (4, 4), 5, device='meta').device.type == 'meta'
    assert block_token_masks(2, (4, 4), 5, generator=gen(), device='meta').device.type == 'meta'


def test_masks_to_pixels_is_nearest_upsampling():
    mask = torch.tensor([[[True, False], [False, True]]])
    pix = masks_to_pixels(mask, 3)
    assert pix.shape == (1, 1, 6, 6)
    assert pix[0, 0, :3, :3].all() and not pix[0, 0, :3, 3:].any() and pix[0, 0, 3:, 3:].all()


# ---------------------------------------------------------------- targets

def test_mixed_targets_values_with_smoothing():
    labels = torch.tensor([0, 2])
    weights = torch.tensor([[0.7, 0.2], [0.2, 0.7]])
    token = mixed_targets(labels, weights, torch.tensor([True, True]), num_classes=4, smoothing=0.1)
    # authors: every class s/C, each true class w - s/2 + s/C
    assert torch.allclose(token[0], torch.tensor([0.7 - 0.05 + 0.025, 0.025, 0.2 - 0.05 + 0.025, 0.025]))
    mix = mixed_targets(labels, torch.tensor([[0.7, 0.3], [0.7, 0.3]]), torch.tensor([False, False]), 4, 0.1)
    assert torch.allclose(mix, mixup_target(labels, 4, lam=0.7, smoothing=0.1))
    # no value below zero when a weight is smaller than s/2
    tiny = mixed_targets(labels, torch.tensor([[0.01, 0.99], [0.99, 0.01]]), torch.tensor([True, True]), 4, 0.1)
    assert tiny.min() >= 0 and torch.isclose(tiny[0, 0], torch.tensor(0.025))


def test_normalise_weights():
    w = torch.tensor([[0.2, 0.6], [0.0, 0.0], [0.5, 0.5]])
    area = torch.tensor([[0.4, 0.6], [0.3, 0.7], [0.5, 0.5]])
    assert torch.equal(normalise_weights(w, 'none', area), w)
    assert torch.allclose(normalise_weights(w, 'sum', area), torch.tensor([[0.25, 0.75], [0.3, 0.7], [0.5, 0.5]]))
    with pytest.raises(ValueError, match='target_norm'):
        normalise_weights(w, 'softmax', area)


def test_teacher_weights_resample_and_fall_back():
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[:, 0, 0] = True                      # the top-left token comes from the partner
    maps = torch.zeros(2, 4, 4)
    maps[0, :2, :2] = 1.                      # image 0: all its object under the pasted token
    maps[1, :, 2:] = 2.                       # image 1: object on the right half
    w = teacher_weights(maps, mask)
    # image 0 keeps nothing of its object, gets none of image 1's (the right half is not pasted)
    assert torch.allclose(w[0], torch.tensor([0., 0.]))
    # image 1 keeps all of its object and receives the whole of image 0's
    assert torch.allclose(w[1], torch.tensor([1., 1.]))
    empty = teacher_weights(torch.zeros(2, 4, 4), mask)
    assert torch.allclose(empty, area_weights(mask)) and torch.allclose(empty[0], torch.tensor([0.75, 0.25]))
    nan = teacher_weights(torch.full((2, 4, 4), float('nan')), mask)
    assert torch.allclose(nan, area_weights(mask))
    # negative scores carry no mass
    neg = teacher_weights(torch.where(maps > 0, maps, torch.tensor(-5.)), mask)
    assert torch.allclose(neg, w)
    # only the maps' shape matters, not their scale, even far below a total of 1
    assert torch.allclose(teacher_weights(maps * 1e-3, mask), w)
    with pytest.raises(ValueError, match='B x h x w'):
        teacher_weights(maps[:, None], mask)
    with pytest.raises(ValueError, match='B x num_classes x h x w'):
        own_class_maps(maps, torch.tensor([0, 1]), num_classes=4)


# ---------------------------------------------------------------- TokenMix

def hand_mixed(source: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """The mixed batch written out token by token: token (r, c) of row b is the partner's where mask[b, r, c]."""
    out = source.clone()
    batch, gh, gw = mask.shape
    for b in range(batch):
        for r in range(gh):
            for c in range(gw):
                if mask[b, r, c]:
                    rows, cols = slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch)
                    out[b, :, rows, cols] = source[batch - 1 - b, :, rows, cols]
    return out


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_token_branch_pairs_i_with_b_minus_1_minus_i(mode):
    # 48 px, 8 px tokens: lam 0.5 and min_tokens 2 give int(0.5 * 36) + 2 = 20 of the 36 tokens from the partner
    tm = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=10, patch_size=8, mode=mode, min_tokens=2,
                  mask_type='random', generator=gen())
    x = constant_batch(6, 48)
    source = x.clone()
    out, target = tm(x, torch.arange(6))
    assert out is x
    assert tm.last_mask.sum((1, 2)).tolist() == [20] * 6  # part of the image stays the sample's own
    assert torch.equal(out, hand_mixed(source, tm.last_mask, 8))
    if mode == 'batch':  # one mask for the whole batch
        assert torch.equal(tm.last_mask, tm.last_mask[:1].expand_as(tm.last_mask))
    assert torch.allclose(tm.last_weights, torch.tensor([[16 / 36, 20 / 36]] * 6))
    assert target.shape == (6, 10)


def test_constant_lam_gives_authors_token_count():
    tm = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=10, mask_type='random', generator=gen())
    tm(torch.zeros(2, 3, 224, 224), torch.tensor([1, 2]))
    assert tm.last_mask.shape == (2, 14, 14) and tm.last_mask.sum((1, 2)).tolist() == [112, 112]
    assert torch.allclose(tm.last_weights, torch.tensor([[84 / 196, 112 / 196]] * 2))


def test_mixup_branch_equals_timm_mixup():
    tm = TokenMix(mixup_alpha=0.8, cutmix_alpha=0., num_classes=10, label_smoothing=0.1, generator=gen(3))
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([1, 5, 7, 9])
    out, target = tm(x.clone(), y)
    lam = float(tm.last_weights[0, 0])
    assert tm.last_mask is None and 0. < lam < 1.
    assert torch.allclose(out, x * lam + x.flip(0) * (1 - lam), atol=1e-6)
    assert torch.allclose(target, mixup_target(y, 10, lam=lam, smoothing=0.1), atol=1e-6)


def test_teacher_weight_follows_visibility_of_the_object():
    batch, grid = 8, 4
    hot = torch.tensor([0, 5, 10, 15, 3, 6, 9, 12])
    teacher = OneTokenTeacher(hot, grid, num_classes=10)
    tm = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=10, patch_size=8, mode='elem', min_tokens=2,
                  teacher=teacher, label_smoothing=0., generator=gen(4))
    x = torch.randn(batch, 3, 32, 32)
    labels = torch.arange(batch)
    _, target = tm(x.clone(), labels)
    flat = tm.last_mask.flatten(1)
    visible = ~flat[torch.arange(batch), hot]              # own object token kept
    pasted = flat[torch.arange(batch), hot.flip(0)]        # partner's object token pasted in
    assert torch.equal(tm.last_weights[:, 0], visible.float())
    assert torch.equal(tm.last_weights[:, 1], pasted.float())
    assert torch.allclose(target[torch.arange(batch), labels], visible.float())
    # called once, without gradients, on the unmixed images
    assert len(teacher.calls) == 1
    seen, grad_enabled = teacher.calls[0]
    assert torch.equal(seen, x) and not grad_enabled
    assert visible.any() and (~visible).any()


def test_teacher_own_class_maps_method_is_preferred():
    class OwnOnly:
        def __init__(self):
            self.labels = None

        def __call__(self, images):
            raise AssertionError('full maps must not be computed when own_class_maps exists')

        def own_class_maps(self, images, labels):
            self.labels = labels.clone()
            return torch.ones(images.shape[0], 2, 2)

    teacher = OwnOnly()
    tm = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=3, patch_size=8, teacher=teacher, generator=gen())
    tm(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    assert teacher.labels.tolist() == [0, 1, 2, 0]
    # uniform maps: teacher weights equal the area weights
    assert torch.allclose(tm.last_weights, area_weights(tm.last_mask))


def test_empty_teacher_maps_fall_back_to_area():
    def zero_teacher(images):
        return torch.zeros(images.shape[0], 5, 7, 7)

    tm = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=5, patch_size=8, teacher=zero_teacher,
                  min_tokens=3, generator=gen(5))
    _, target = tm(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(target).all()
    assert torch.allclose(tm.last_weights, area_weights(tm.last_mask))


def test_target_norm_sum_gives_distributions():
    tm = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=6, patch_size=8, mode='elem', min_tokens=1,
                  teacher=lambda im: torch.rand(im.shape[0], 6, 4, 4, generator=gen(9)), target_norm='sum',
                  label_smoothing=0.1, generator=gen(6))
    _, target = tm(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5]))
    assert torch.allclose(tm.last_weights.sum(1), torch.ones(6))
    assert target.min() >= 0.1 / 6 - 1e-7
    assert torch.allclose(target.sum(1), torch.ones(6), atol=1e-5)


def test_area_target_ignores_the_teacher():
    calls = []
    tm = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=4, patch_size=8, target='area',
                  teacher=lambda im: calls.append(1), generator=gen())
    tm(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert calls == [] and torch.allclose(tm.last_weights, area_weights(tm.last_mask))


def test_teacher_not_called_on_mixup_batches():
    calls = []

    def teacher(images):
        calls.append(1)
        return torch.ones(images.shape[0], 4, 2, 2)

    tm = TokenMix(mixup_alpha=1., cutmix_alpha=1., switch_prob=0.5, num_classes=4, patch_size=8, teacher=teacher,
                  generator=gen(11))
    token_batches = 0
    for _ in range(20):
        tm(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
        token_batches += tm.last_mask is not None
    assert 0 < token_batches < 20 and len(calls) == token_batches


def test_same_seed_reproduces_a_batch():
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4

    def run(seed):
        tm = TokenMix(mixup_alpha=0.8, cutmix_alpha=1., num_classes=4, patch_size=8, mode='elem', min_tokens=2,
                      generator=gen(seed))
        return [tm(x.clone(), y) for _ in range(3)]

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_elem_masks_differ_per_sample_and_pair_masks_are_shared():
    tm = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=4, patch_size=8, mode='elem', min_tokens=2,
                  generator=gen(12))
    tm(torch.randn(8, 3, 64, 64), torch.arange(8) % 4)
    masks = tm.last_mask.flatten(1)
    assert len({tuple(m.tolist()) for m in masks}) == 8
    tm = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=4, patch_size=8, mode='pair', min_tokens=2,
                  generator=gen(12))
    x = constant_batch(8, 64)
    out, _ = tm(x, torch.arange(8) % 4)
    assert torch.equal(tm.last_mask, tm.last_mask.flip(0))
    assert len({tuple(m.tolist()) for m in tm.last_mask[:4].flatten(1)}) == 4
    # rows i and B-1-i swap the same tokens: their pixels sum to i + (B-1-i) everywhere
    assert torch.equal(out + out.flip(0), torch.full_like(out, 7.))


def test_elem_mode_mixes_mixup_and_token_rows():
    tm = TokenMix(mixup_alpha=1., cutmix_alpha=1., num_classes=4, patch_size=8, mode='elem', generator=gen(13))
    x = constant_batch(16)
    out, target = tm(x, torch.arange(16) % 4)
    token_rows = tm.last_mask.flatten(1).any(1)
    assert token_rows.any() and (~token_rows).any()
    lam = tm.last_weights[~token_rows, 0]
    expected = lam * torch.arange(16.)[~token_rows] + (1 - lam) * torch.arange(16.).flip(0)[~token_rows]
    assert torch.allclose(out[~token_rows].mean((1, 2, 3)), expected, atol=1e-5)
    assert torch.allclose(target.sum(1)[~token_rows], torch.ones(int((~token_rows).sum())))


def test_disabled_mixing_gives_smoothed_one_hot():
    tm = TokenMix(mixup_alpha=0.8, cutmix_alpha=1., num_classes=5, label_smoothing=0.1, patch_size=8)
    tm.mixup_enabled = False
    x = torch.randn(4, 3, 16, 16)
    out, target = tm(x.clone(), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(out, x) and tm.last_mask is None
    assert torch.allclose(target, mixup_target(torch.tensor([0, 1, 2, 3]), 5, lam=1., smoothing=0.1))


def test_prob_zero_leaves_batch_untouched():
    tm = TokenMix(mixup_alpha=1., cutmix_alpha=1., prob=0., num_classes=5, patch_size=8, mode='elem')
    x = torch.randn(4, 3, 16, 16)
    out, _ = tm(x.clone(), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(out, x) and torch.equal(tm.last_weights, torch.tensor([[1., 0.]] * 4))


def test_fractional_prob_and_switch_prob_follow_timm():
    """timm: a row is mixed with probability `prob`, and a mixed row takes the region branch with `switch_prob`."""
    tm = TokenMix(mixup_alpha=1., cutmix_alpha=1., prob=0.3, switch_prob=0.2, num_classes=4, patch_size=8,
                  mode='elem', mask_type='random', min_tokens=0, generator=gen(16))
    tm(torch.zeros(2000, 3, 16, 16), torch.zeros(2000, dtype=torch.long))
    token_rows = tm.last_mask.flatten(1).any(1)           # 2 of the 4 tokens pasted
    mixed = token_rows | (tm.last_weights[:, 0] < 1)      # a Beta(1, 1) lam is below 1
    # binomial spreads: 0.010 and 0.016, so both bounds are four standard deviations wide
    assert abs(mixed.float().mean().item() - 0.3) < 0.04
    assert abs(token_rows.float().sum().item() / mixed.sum().item() - 0.2) < 0.065


def test_pair_mode_mirrors_lam_and_branch():
    tm = TokenMix(mixup_alpha=1., cutmix_alpha=1., num_classes=16, patch_size=8, mode='pair', min_tokens=2,
                  label_smoothing=0., generator=gen(17))
    x = constant_batch(16)
    out, target = tm(x, torch.arange(16))
    token_rows = tm.last_mask.flatten(1).any(1)
    blended = ~token_rows
    assert token_rows.any() and blended.any()
    assert torch.equal(token_rows, token_rows.flip(0))
    # rows i and 15-i use one lam: i's own share is 15-i's partner share, so the pair's pixels sum to 15
    assert torch.equal(tm.last_weights, tm.last_weights.flip(0))
    assert len(set(tm.last_weights[blended, 0].tolist())) > 1  # lam differs between pairs
    assert torch.allclose(out + out.flip(0), torch.full_like(out, 15.))
    lam = tm.last_weights[blended, 0]
    values = torch.arange(16.)
    assert torch.allclose(out[blended].mean((1, 2, 3)), lam * values[blended] + (1 - lam) * values.flip(0)[blended])
    assert torch.allclose(target[torch.arange(16), torch.arange(16)], tm.last_weights[:, 0])


def test_target_norm_sum_falls_back_to_area_for_rows_without_mass():
    batch, grid = 16, 4
    hot = torch.tensor([0, 5, 10, 15, 3, 6, 9, 12, 1, 2, 4, 7, 8, 11, 13, 14])
    tm = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=16, patch_size=8, mode='elem', min_tokens=2,
                  teacher=OneTokenTeacher(hot, grid, num_classes=16), target_norm='sum', label_smoothing=0.,
                  generator=gen(18))
    tm(torch.randn(batch, 3, 32, 32), torch.arange(batch))
    flat = tm.last_mask.flatten(1)
    visible = (~flat[torch.arange(batch), hot]).float()
    pasted = flat[torch.arange(batch), hot.flip(0)].float()
    total = visible + pasted
    pasted_share = flat.float().sum(1) / grid ** 2
    expected = torch.where((total > 0).view(-1, 1), torch.stack([visible, pasted], 1) / total.clamp(min=1).view(-1, 1),
                           torch.stack([1 - pasted_share, pasted_share], 1))
    assert (total == 0).any() and (total == 2).any()       # rows with no mass and rows split evenly
    assert torch.allclose(tm.last_weights, expected)


def test_beta_lam_and_minmax_change_the_token_count():
    counts = []
    for kwargs in ({'lam_mode': 'beta'}, {'cutmix_minmax': (0.2, 0.4), 'cutmix_alpha': 0.}):
        tm = TokenMix(mixup_alpha=0., num_classes=4, mask_type='random', min_tokens=0, mode='elem',
                      generator=gen(14), **{'cutmix_alpha': 1., **kwargs})
        tm(torch.zeros(64, 3, 224, 224), torch.zeros(64, dtype=torch.long))
        counts.append(tm.last_mask.sum((1, 2)).float())
    assert counts[0].std() > 20                               # Beta(1, 1) spreads the count
    assert counts[1].min() >= int(0.04 * 196) and counts[1].max() <= int(0.16 * 196) + 1


@pytest.mark.parametrize('loss_fn,target_norm', [(SoftTargetCrossEntropy(), 'sum'),
                                                 (BinaryCrossEntropy(target_threshold=None), 'none')])
@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_one_training_step_in_place_of_timm_mixup(loss_fn, target_norm):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=5)
    teacher = timm.create_model('resnet10t', num_classes=5).eval()

    def cam_teacher(images):
        features = teacher.forward_features(images)
        return torch.einsum('bchw,kc->bkhw', features, teacher.get_classifier().weight)

    mixer = TokenMix(mixup_alpha=0.8, cutmix_alpha=1., num_classes=5, patch_size=8, min_tokens=2, teacher=cam_teacher,
                     target_norm=target_norm, generator=gen(15))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = mixer(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    pair = torch.stack([torch.arange(4), torch.arange(4).flip(0)], 1)
    # the soft targets sit on each row's own and partner label only (smoothing 0.1 spread over 5 classes)
    others = torch.ones_like(y, dtype=torch.bool).scatter_(1, pair, False)
    assert torch.allclose(y[others], torch.full_like(y[others], 0.1 / 5))
    if target_norm == 'sum':
        assert torch.allclose(y.sum(1), torch.ones(4))
    # the loss's floor: the targets' entropy, reached by logits log(y) (softmax) or logit(y) (sigmoid)
    floor = loss_fn(y.log() if target_norm == 'sum' else torch.logit(y), y).item()
    losses = []
    for _ in range(25):  # fitting the one mixed batch closes at least half the gap to the floor
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] - floor < 0.5 * (losses[0] - floor)
    # the model now ranks each row's two labels above the three others
    assert torch.equal(model(x).topk(2, dim=1).indices.sort(1).values, pair.sort(1).values)
    assert all(p.grad is None for p in teacher.parameters())


def test_bad_inputs_name_the_argument():
    tm = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=5, patch_size=8)
    with pytest.raises(ValueError, match='even'):
        tm(torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match='B x C x H x W'):
        tm(torch.randn(4, 16, 16), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r'num_classes'):
        tm(torch.randn(2, 3, 16, 16), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match='target'):
        tm(torch.randn(2, 3, 16, 16), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match='20x16 is not divisible by patch_size 8'):
        tm(torch.randn(2, 3, 20, 16), torch.tensor([0, 1]))
    wrong = TokenMix(mixup_alpha=0., cutmix_alpha=1., num_classes=5, patch_size=8,
                     teacher=lambda im: torch.ones(im.shape[0], 7, 2, 2))
    with pytest.raises(ValueError, match='7 classes but num_classes=5'):
        wrong(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    for kwargs, name in [({'mode': 'rows'}, 'mode'), ({'mask_type': 'box'}, 'mask_type'),
                         ({'lam_mode': 'uniform'}, 'lam_mode'), ({'target': 'cam'}, 'target'),
                         ({'target_norm': 'max'}, 'target_norm'), ({'target': 'teacher'}, 'teacher'),
                         ({'cutmix_minmax': (0.5,)}, 'cutmix_minmax'), ({'multi_label': True}, 'multi_label'),
                         ({'cutmix_alpha': 0.}, 'mixup_alpha')]:
        with pytest.raises(ValueError, match=name):
            TokenMix(**{'mixup_alpha': 0., 'cutmix_alpha': 1., **kwargs})


# ---------------------------------------------------------------- constructor bounds (from the mutation run)
def test_defaults_are_timm_mixups():
    """Every argument TokenMix shares with timm.data.Mixup has timm's default, so a drop-in keeps its behaviour."""
    ours = inspect.signature(TokenMix).parameters
    timms = inspect.signature(timm.data.Mixup).parameters
    shared = [name for name in timms if name in ours]
    assert len(shared) == 10
    assert {name: ours[name].default for name in shared} == {name: timms[name].default for name in shared}


@pytest.mark.parametrize('kwargs', [
    dict(cutmix_minmax=(0.3, 0.3)), dict(cutmix_minmax=(0.5, 1.0)), dict(prob=1.0), dict(prob=0.0),
    dict(switch_prob=0.0), dict(switch_prob=1.0), dict(label_smoothing=0.0), dict(label_smoothing=0.99),
    dict(patch_size=1), dict(mixup_alpha=0.0, cutmix_alpha=0.5),
])
def test_constructor_accepts_the_bounds(kwargs):
    """Each bound is kept as given (prob as timm's `mix_prob`) and mixes: the token branch unless prob 0 (nothing)
    or switch_prob 0 (Mixup) ask otherwise."""
    mixer = TokenMix(**{**dict(cutmix_alpha=1., switch_prob=1., num_classes=10, patch_size=8), **kwargs},
                     generator=gen(0))
    stored = {name: getattr(mixer, 'mix_prob' if name == 'prob' else name) for name in kwargs}
    assert stored == kwargs
    x, y = mixer(constant_batch(4), torch.arange(4))
    assert y.shape == (4, 10) and y.min().item() == pytest.approx(mixer.label_smoothing / 10)  # classes outside a pair
    unmixed = torch.equal(x, constant_batch(4))
    if mixer.mix_prob == 0:
        assert unmixed and mixer.last_mask is None
    elif mixer.switch_prob == 0:
        assert not unmixed and mixer.last_mask is None
    else:
        assert not unmixed and mixer.last_mask.shape == (4, 32 // mixer.patch_size, 32 // mixer.patch_size)


@pytest.mark.parametrize('kwargs, message', [
    (dict(cutmix_minmax=(0.0, 0.5)), r'cutmix_minmax must be \(min, max\) with 0 < min <= max <= 1'),
    (dict(cutmix_minmax=(0.6, 0.4)), 'cutmix_minmax must be'),
    (dict(cutmix_minmax=(0.5, 1.5)), 'cutmix_minmax must be'),
    (dict(mixup_alpha=-1.0), r'mixup_alpha and cutmix_alpha must be >= 0, got -1.0 and 0.0'),
    (dict(cutmix_alpha=-1.0), 'must be >= 0'),
    (dict(prob=1.5), r'prob and switch_prob must lie in \[0, 1\], got 1.5 and 0.5'),
    (dict(switch_prob=1.5), r'got 1.0 and 1.5'),
    (dict(switch_prob=-0.5), r'got 1.0 and -0.5'),
    (dict(label_smoothing=1.0), r'label_smoothing must lie in \[0, 1\), got 1.0'),
    (dict(label_smoothing=1.5), 'label_smoothing must lie in'),
    (dict(patch_size=0), 'patch_size must be positive, got 0'),
    (dict(mode='row'), r"^mode must be one of \('batch', 'pair', 'elem'\), got 'row'$"),
    (dict(mask_type='box'), r"^mask_type must be one of"),
    (dict(lam_mode='uniform'), r"^lam_mode must be one of"),
    (dict(target='cam'), r"^target must be one of"),
    (dict(target_norm='l2'), r"^target_norm must be one of"),
])
def test_constructor_refuses_out_of_range_values_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenMix(**kwargs)


def test_minmax_switches_the_region_branch_on_and_nothing_is_mixed_before_a_call():
    mixer = TokenMix(mixup_alpha=0.0, cutmix_minmax=(0.3, 0.6))
    assert mixer.cutmix_alpha == 1.0
    assert mixer.last_mask is None and mixer.last_weights is None


def test_area_target_ignores_given_maps_and_labels_of_any_integer_dtype():
    """target='area' never uses own_maps; int32 labels give the same targets as int64."""
    x = torch.randn(6, 3, 32, 32)
    maps = torch.rand(6, 4, 4)
    kwargs = dict(mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=1.0, min_tokens=2, patch_size=8, num_classes=5,
                  target='area')
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    _, plain = TokenMix(**kwargs, generator=gen(4))(x.clone(), y)
    _, given = TokenMix(**kwargs, generator=gen(4))(x.clone(), y, maps)
    _, int32 = TokenMix(**kwargs, generator=gen(4))(x.clone(), y.int())
    assert torch.equal(given, plain) and torch.equal(int32, plain)


def test_correct_lam_false_keeps_the_drawn_lam_instead_of_the_mask_share():
    kwargs = dict(mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=1.0, min_tokens=2, patch_size=8, num_classes=5,
                  target='area', label_smoothing=0.0, mode='elem')
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    corrected, drawn = TokenMix(**kwargs, generator=gen(5)), TokenMix(**kwargs, correct_lam=False, generator=gen(5))
    corrected(x.clone(), y)
    drawn(x.clone(), y)
    assert torch.equal(corrected.last_mask, drawn.last_mask)  # same draws, same masks
    share = corrected.last_mask.float().mean((1, 2))
    torch.testing.assert_close(corrected.last_weights[:, 1], share)
    # the drawn lam is continuous, the mask share a multiple of 1/16 (plus min_tokens): they differ on every row
    assert ((drawn.last_weights[:, 1] - share).abs() > 1e-4).all()
    torch.testing.assert_close(drawn.last_weights.sum(1), torch.ones(8))


@pytest.mark.parametrize('sampler', [random_token_masks, block_token_masks])
def test_token_counts_at_the_bounds(sampler):
    """0 and all tokens are valid counts (an int or per sample); one count outside [0, h * w] is refused. (Block
    masks may fall short of a large count, as the authors' sampler does, so only random masks must fill the grid.)"""
    assert not sampler(3, (4, 4), 0, generator=gen()).any()
    full = sampler(2, (4, 4), torch.tensor([0, 16]), generator=gen()).sum((1, 2)).tolist()
    assert full[0] == 0 and (full[1] == 16 if sampler is random_token_masks else 0 < full[1] <= 16)
    for counts in (17, -1, torch.tensor([-1, 3]), torch.tensor([3, 17])):
        with pytest.raises(ValueError, match=r'num_tokens must lie in \[0, 16\] for this grid'):
            sampler(2, (4, 4), counts, generator=gen())


@pytest.mark.parametrize('box', [(2, 0, 2, 4), (0, 3, 4, 3), (3, 0, 2, 4)])
def test_crop_map_refuses_an_empty_box(box):
    from mixup_ext import crop_map
    with pytest.raises(ValueError, match=r'crop box must have x1 > x0 and y1 > y0'):
        crop_map(torch.rand(8, 8), box, (2, 2))


# ---------------------------------------------------------------- exact map resampling onto the token grid
def hand_resampled(maps: torch.Tensor, size) -> torch.Tensor:
    """Reference (float64): each token the mean of the map over its square, cell by cell, overlaps as fractions."""
    from fractions import Fraction
    (h, w), (rows, cols) = maps.shape[-2:], size

    def shared(i: int, n_out: int, j: int, n_in: int) -> Fraction:  # length of output cell i inside input cell j
        lo, hi = Fraction(i * n_in, n_out), Fraction((i + 1) * n_in, n_out)
        return max(Fraction(0), min(hi, Fraction(j + 1)) - max(lo, Fraction(j)))

    token_area = Fraction(h, rows) * Fraction(w, cols)
    row_shares = [[shared(r, rows, a, h) for a in range(h)] for r in range(rows)]
    col_shares = [[shared(c, cols, b, w) for b in range(w)] for c in range(cols)]
    weight = [[[[float(row_shares[r][a] * col_shares[c][b] / token_area) if row_shares[r][a] and col_shares[c][b]
                 else 0. for b in range(w)] for a in range(h)] for c in range(cols)] for r in range(rows)]
    return torch.einsum('rcab,...ab->...rc', torch.tensor(weight, dtype=torch.float64), maps.double())


def peaked_maps(batch_size: int, side: int, seed: int) -> torch.Tensor:
    """Narrow blobs (about half a token wide) at random places: where uneven pooling moves the most weight."""
    g = gen(seed)
    centre = torch.arange(side) + .5
    cy, cx = (torch.rand(batch_size, 1, 1, generator=g) * side for _ in range(2))
    sigma = side / 14 * .6
    return torch.exp(-((centre.view(-1, 1) - cy) ** 2 + (centre.view(1, -1) - cx) ** 2) / (2 * sigma ** 2))


def test_overlap_matrix_rows_are_area_shares():
    from mixup_ext import overlap_matrix
    ten_to_14 = overlap_matrix(10, 14)
    assert ten_to_14.shape == (14, 10)
    assert torch.allclose(ten_to_14.sum(1), torch.ones(14), atol=1e-6)
    # token 0 covers [0, 5/7) of the map: cell 0 only; token 1 covers [5/7, 10/7): 2/7 of cell 0, 3/7 of cell 1
    assert torch.equal(ten_to_14[0], torch.eye(10)[0])
    assert torch.allclose(ten_to_14[1, :3], torch.tensor([.4, .6, 0.]))
    assert torch.equal(overlap_matrix(7, 14), torch.eye(7).repeat_interleave(2, 0))
    with pytest.raises(ValueError, match='sizes must be positive'):
        overlap_matrix(0, 14)
    with pytest.raises(ValueError, match='sizes must be positive'):
        overlap_matrix(14, 0)
    # one cell on either side: every output cell is all of the one input cell, or the one output is their mean
    assert torch.equal(overlap_matrix(1, 3), torch.ones(3, 1))
    assert torch.allclose(overlap_matrix(4, 1), torch.full((1, 4), 0.25))


@pytest.mark.parametrize('shape, size', [((8, 8), (14, 14)), ((10, 10), (14, 14)), ((18, 18), (14, 14)),
                                         ((14, 14), (7, 7)), ((14, 14), (14, 14)), ((10, 18), (14, 7))])
def test_area_resample_equals_the_hand_built_overlap_means(shape, size):
    from mixup_ext import area_resample
    maps = torch.randn(3, *shape, generator=gen(1))
    out = area_resample(maps, size)
    assert out.shape == (3, *size) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), hand_resampled(maps, size), rtol=1e-5, atol=1e-6)
    # the map's mean is kept: every map cell counts by its area
    torch.testing.assert_close(out.mean((1, 2)), maps.mean((1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape, size', [((14, 14), (7, 7)), ((14, 14), (14, 14)), ((7, 7), (14, 14)),
                                         ((28, 28), (14, 14)), ((8, 4), (4, 8))])
def test_area_resample_is_adaptive_pooling_bit_for_bit_when_sides_divide(shape, size):
    from mixup_ext import area_resample
    maps = torch.randn(5, *shape, generator=gen(2))
    assert torch.equal(area_resample(maps, size), torch.nn.functional.adaptive_avg_pool2d(maps[:, None], size)[:, 0])


@pytest.mark.parametrize('side', [8, 10, 18])
def test_teacher_weights_are_the_exact_overlap_weighted_ones(side):
    """Peaked maps on a 14 x 14 grid: weights within 0.002 of the exact ones (adaptive pooling misses by ~0.1)."""
    maps = peaked_maps(16, side, seed=side)
    mask = block_token_masks(16, (14, 14), torch.full((16,), 112), generator=gen(side))
    exact = hand_resampled(maps, (14, 14)).clamp(min=0)
    dist = exact / exact.sum((1, 2), keepdim=True)
    expected = torch.stack([(dist * ~mask).sum((1, 2)), (dist.flip(0) * mask).sum((1, 2))], dim=1)
    assert (teacher_weights(maps, mask).double() - expected).abs().max() < 0.002
    pooled = torch.nn.functional.adaptive_avg_pool2d(maps[:, None], (14, 14))[:, 0]
    assert (teacher_weights(pooled, mask).double() - expected).abs().max() > 0.05


def test_online_teacher_maps_reach_the_grid_by_area():
    """A teacher whose 10 x 10 maps do not divide the 8 x 8 token grid: TokenMix's weights are the exact ones."""
    maps = peaked_maps(8, 10, seed=3)

    def teacher(images: torch.Tensor) -> torch.Tensor:
        return maps[:, None].expand(-1, 4, -1, -1)

    mixer = TokenMix(mixup_alpha=0., cutmix_alpha=1., label_smoothing=0., num_classes=4, patch_size=4, mode='elem',
                     teacher=teacher, generator=gen(3))
    mixer(constant_batch(8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    exact = teacher_weights(hand_resampled(maps, (8, 8)).float(), mixer.last_mask)
    torch.testing.assert_close(mixer.last_weights, exact, rtol=1e-5, atol=1e-6)


def test_area_resample_refuses_a_map_without_two_dims():
    from mixup_ext import area_resample
    with pytest.raises(ValueError, match=r'maps must be \.\.\. x h x w'):
        area_resample(torch.ones(4), (2, 2))
    one = torch.arange(16.).view(4, 4)  # a single h x w map is one
    assert torch.equal(area_resample(one, (2, 2)), torch.tensor([[2.5, 4.5], [10.5, 12.5]]))


def test_own_map_from_topk_refuses_values_and_indices_of_other_shapes():
    from mixup_ext import own_map_from_topk
    with pytest.raises(ValueError, match='values and indices must both be'):
        own_map_from_topk(torch.ones(2, 3, 4, 4), torch.zeros(2, 2, 4, 4, dtype=torch.long), 0)


def test_sample_maps_reads_each_map_through_its_own_affine_map_and_checks():
    """A batch with one map read as it is and one mirrored: each equals the crop_map of its own box (roi_align's
    reading); a check whose bound stops at x = 2 px zeroes the tokens beyond it, and only in its own sample."""
    from mixup_ext import crop_map, sample_maps
    maps = torch.stack([torch.arange(16.).view(4, 4), torch.arange(16.).view(4, 4) * 10])
    to_map = torch.tensor([[[1., 0., 0.], [0., 1., 0.]], [[-0.5, 0., 3.], [0., 0.5, 1.]]])  # 4 px image -> cells
    out = sample_maps(maps, to_map, (4, 4), (2, 2), 2)
    assert torch.allclose(out[0], crop_map(maps[0], (0, 0, 4, 4), (2, 2)))
    assert torch.allclose(out[1], crop_map(maps[1], (1, 1, 3, 3), (2, 2), hflip=True))
    checks = torch.tensor([[[[1., 0., 0.], [0., 1., 0.]]], [[[0., 0., 0.], [0., 0., 0.]]]])
    bounds = torch.tensor([[[2., math.inf]], [[math.inf, math.inf]]])
    checked = sample_maps(maps, to_map, (4, 4), (2, 2), 2, checks, bounds)
    assert torch.equal(checked[0, :, 0], out[0, :, 0]) and torch.equal(checked[0, :, 1], torch.zeros(2))
    assert torch.equal(checked[1], out[1])


def test_crop_map_reads_as_roi_align_inside_across_and_beyond_the_edges():
    """crop_map against torchvision's roi_align (aligned, `points` samples a cell) on 300 random boxes, many of them
    reaching past the map's edges, and two whose samples lie on the edges of what is read: clamped within half a cell
    outside (the edge itself included), zero beyond, the same means per token."""
    from torchvision.ops import roi_align

    from mixup_ext import crop_map
    generator = torch.Generator().manual_seed(0)
    own_map = torch.rand(5, 6, generator=generator)
    # first two boxes whose 4 x 4 samples fall exactly on the edges of what is read: -0.5 and 6.5 / 5.5 cells
    for trial in range(302):
        if trial < 2:
            (x0, y0, x1, y1), rows, cols, hflip = ((-1, -1, 3, 3), (3, 2, 7, 6))[trial], 1, 1, False
        else:
            x0, y0 = (torch.rand(2, generator=generator) * torch.tensor([10.0, 9.0]) - 3).tolist()
            x1, y1 = (torch.tensor([x0, y0]) + 0.3 + 5 * torch.rand(2, generator=generator)).tolist()
            rows, cols = torch.randint(1, 4, (2,), generator=generator).tolist()
            hflip = bool(torch.randint(0, 2, (1,), generator=generator))
        points = max(2, math.ceil(max((y1 - y0) / rows, (x1 - x0) / cols)))
        expected = roi_align(own_map[None, None], torch.tensor([[0.0, x0, y0, x1, y1]]), (rows, cols),
                             sampling_ratio=points, aligned=True)[0, 0]
        got = crop_map(own_map, (x0, y0, x1, y1), (rows, cols), hflip=hflip)
        assert torch.allclose(got, expected.flip(-1) if hflip else expected, atol=1e-5), (x0, y0, x1, y1)


def test_sample_maps_checks_add_to_the_maps_own_bounds_and_exclude_their_far_edge():
    """A check that passes every point keeps the zeros of reading beyond the map; a sample exactly on a check's
    width or height is outside it ([0, width) x [0, height))."""
    from mixup_ext import sample_maps
    maps = torch.ones(1, 4, 4)
    beyond = torch.tensor([[[1., 0., 3.], [0., 1., 0.]]])  # the right half of the 4 px image reads past the map
    plain = sample_maps(maps, beyond, (4, 4), (1, 2), 2)
    assert torch.equal(plain, torch.tensor([[[1.0, 0.0]]]))
    everything = torch.tensor([[[[1., 0., 0.], [0., 1., 0.]]]]), torch.tensor([[[math.inf, math.inf]]])
    assert torch.equal(sample_maps(maps, beyond, (4, 4), (1, 2), 2, *everything), plain)
    identity = torch.tensor([[[1., 0., 0.], [0., 1., 0.]]])
    for bounds in ([2.5, math.inf], [math.inf, 2.5]):  # samples at 0.5, 1.5, 2.5, 3.5 px: 2.5 and 3.5 are out
        edge = torch.tensor([[[[1., 0., 0.], [0., 1., 0.]]]]), torch.tensor([[bounds]])
        out = sample_maps(maps, identity, (4, 4), (1, 1), 4, *edge)
        assert torch.equal(out, torch.tensor([[[0.5]]])), bounds
