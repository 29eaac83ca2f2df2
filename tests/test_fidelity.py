"""Target fidelity (tokenmix_train/fidelity.py): true visible shares of mixed objects and the error of label weights."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup

from mixup_ext import TokenMix, area_weights
from tokenmix_train.fidelity import (fidelity_error, indicator_batch, load_demo_objects, normalise_shares,
                               paste_masks_from_indicator, token_paste_masks, visible_shares,
                               weights_from_indicator_targets)


def test_visible_shares_by_hand():
    objects = torch.zeros(2, 4, 4, dtype=torch.bool)
    objects[0, :2, :] = True          # image 0: top half (8 px)
    objects[1, :, :1] = True          # image 1: left column (4 px)
    paste = torch.zeros(2, 4, 4, dtype=torch.bool)
    paste[0, 0, :] = True             # mixed 0 shows image 1 on its top row
    paste[1, :, :2] = True            # mixed 1 shows image 0 on its two left columns
    shares = visible_shares(objects, paste)
    # mixed 0 keeps 4 of image 0's 8 px, shows 1 of image 1's 4 px; mixed 1 keeps 0 of 4, shows 4 of 8
    assert shares.tolist() == [[0.5, 0.25], [0.0, 0.5]]
    assert torch.allclose(normalise_shares(shares), torch.tensor([[2 / 3, 1 / 3], [0.0, 1.0]]))
    assert visible_shares(objects, paste[:, None]).tolist() == shares.tolist()  # B x 1 x H x W accepted


def test_visible_shares_soft_objects_and_empty_object():
    objects = torch.tensor([[[1.0, 0.5]], [[0.0, 0.0]]])
    paste = torch.tensor([[[False, True]], [[True, False]]])
    shares = visible_shares(objects, paste)
    assert shares[0, 0].item() == pytest.approx(1 / 1.5)
    assert math.isnan(shares[0, 1].item())      # partner (image 1) has no object
    assert math.isnan(shares[1, 0].item()) and shares[1, 1].item() == pytest.approx(1 / 1.5)
    assert fidelity_error(torch.tensor([[0.5, 0.5], [0.5, 0.5]]), shares) == pytest.approx(
        (abs(0.5 - 1 / 1.5) * 2) / 2)


def test_fidelity_error_value_and_bad_input():
    weights = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    shares = torch.tensor([[1.0, 0.5], [0.25, 0.25]])
    assert fidelity_error(weights, shares) == pytest.approx((0.5 + 0 + 0 + 0.5) / 4)
    with pytest.raises(ValueError, match='B x 2'):
        fidelity_error(weights, shares[:1])
    with pytest.raises(ValueError, match='no finite shares'):
        fidelity_error(weights, torch.full((2, 2), float('nan')))
    with pytest.raises(ValueError, match='same size|one size'):
        visible_shares(torch.ones(2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match='bool'):
        visible_shares(torch.ones(2, 4, 4), torch.zeros(2, 4, 4))


def test_indicator_probe_reads_timm_cutmix():
    mixer = Mixup(mixup_alpha=0., cutmix_alpha=1., label_smoothing=0., num_classes=8)
    torch.manual_seed(0)
    x, target = mixer(indicator_batch(8, 16, 16), torch.arange(8))
    paste = paste_masks_from_indicator(x)
    weights = weights_from_indicator_targets(target)
    assert indicator_batch(2, 4, 6).shape == (2, 3, 4, 6)  # RGB images, as a mixer expects
    assert paste.shape == (8, 16, 16) and paste.any()
    # timm's corrected lam is the box area: the weights are exactly the area of the paste mask
    assert torch.allclose(weights, area_weights(paste), atol=1e-6)
    # objects filling the whole image: area weights are the true shares
    assert fidelity_error(weights, visible_shares(torch.ones(8, 16, 16), paste)) == pytest.approx(0, abs=1e-6)


def test_indicator_probe_rejects_blends():
    mixer = Mixup(mixup_alpha=1., cutmix_alpha=0., label_smoothing=0., num_classes=4)
    x, _ = mixer(indicator_batch(4, 8, 8), torch.arange(4))
    with pytest.raises(ValueError, match='blend'):
        paste_masks_from_indicator(x)
    with pytest.raises(ValueError, match='B x B'):
        weights_from_indicator_targets(torch.zeros(4, 10))


def test_teacher_weights_beat_area_when_the_teacher_sees_the_objects():
    """A teacher whose maps are the object masks gives the true shares; area weights do not."""
    gen = torch.Generator().manual_seed(0)
    objects = torch.zeros(8, 16, 16)
    for b in range(8):  # one 8 x 8 object per image, in a random 4 px cell-aligned place
        y, x = (torch.randint(0, 3, (2,), generator=gen) * 4).tolist()
        objects[b, y:y + 8, x:x + 8] = 1
    images = torch.randn(8, 3, 16, 16, generator=gen)
    labels = torch.arange(8) % 4

    def teacher(_images):
        return objects[:, None].expand(-1, 4, -1, -1)  # B x num_classes x h x w, same map for every class

    common = dict(mixup_alpha=0., cutmix_alpha=1., label_smoothing=0., num_classes=4, min_tokens=2, patch_size=4)
    with_teacher = TokenMix(**common, teacher=teacher, target='teacher', generator=torch.Generator().manual_seed(1))
    with_area = TokenMix(**common, target='area', generator=torch.Generator().manual_seed(1))
    with_teacher(images.clone(), labels)
    with_area(images.clone(), labels)
    assert torch.equal(with_teacher.last_mask, with_area.last_mask)
    shares = visible_shares(objects, token_paste_masks(with_teacher.last_mask, 4))
    assert fidelity_error(with_teacher.last_weights, shares) == pytest.approx(0, abs=1e-6)
    assert fidelity_error(with_area.last_weights, shares) > 0.05


def test_load_demo_objects_reads_images_labels_and_masks_class_by_class(tiny_data, tmp_path):
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    images, labels, objects = load_demo_objects(tiny_data, 'val', 12, mean, std)
    assert images.shape == (12, 3, 32, 32) and objects.shape == (12, 32, 32) and objects.dtype == torch.bool
    assert labels.tolist() == list(range(10)) + [0, 1]  # classes interleaved: a prefix covers all of them
    with open(os.path.join(tiny_data, 'objects.json')) as f:
        records = json.load(f)['val']
    stored = np.load(os.path.join(tiny_data, 'object_masks.npz'))['val']
    for i, label in ((0, 0), (9, 9), (11, 1)):  # image i is the (i // 10)-th image of its class
        record = [r for r in records if r['label'] == label][i // 10]
        pixels = torch.from_numpy(np.array(Image.open(os.path.join(tiny_data, record['file'])).convert('RGB')))
        expected = (pixels.permute(2, 0, 1) / 255. - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        assert torch.allclose(images[i], expected, atol=1e-6)
        assert torch.equal(objects[i], torch.from_numpy(stored[record['mask_index']]))
        assert 0 < objects[i].float().mean() < 1
    with pytest.raises(ValueError, match='objects.json not found'):
        load_demo_objects(str(tmp_path), 'val', 2, mean, std)
    with pytest.raises(ValueError, match="has no split 'test'"):
        load_demo_objects(tiny_data, 'test', 2, mean, std)
