"""The tiny demo models: registered with timm, data config, shapes, and a teacher whose grid matches the student's."""
import pytest
import timm
import torch
from timm.data import resolve_model_data_config

import models
from models import Teacher

VIT, CNN, CONV_STEM = 'tokenmix_vit_tiny_p8_64', 'tokenmix_cnn_teacher_64', 'tokenmix_vit_tiny_convstem_64'


def test_registered_with_timm():
    assert {VIT, CNN, CONV_STEM} <= set(timm.list_models('tokenmix_*'))
    assert models.tiny.tokenmix_vit_tiny_p8_64 is timm.models.model_entrypoint(VIT)


def test_data_config_from_pretrained_cfg():
    for name in (VIT, CNN):
        config = resolve_model_data_config(timm.create_model(name))
        assert config['input_size'] == (3, 64, 64)
        assert config['mean'] == (0.485, 0.456, 0.406) and config['std'] == (0.229, 0.224, 0.225)
        assert config['crop_pct'] == 1.0


def test_vit_student_shape_and_classes():
    torch.manual_seed(0)
    model = timm.create_model(VIT)
    assert model.num_classes == 10 and model.patch_embed.grid_size == (8, 8)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (96, 4, 3)
    assert model.forward_features(torch.randn(2, 3, 64, 64)).shape == (2, 1 + 64, 96)
    small = timm.create_model(VIT, num_classes=5, img_size=32)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 5) and small.patch_embed.grid_size == (4, 4)


def test_cnn_teacher_output_stride_8_and_exact_maps():
    torch.manual_seed(0)
    model = timm.create_model(CNN, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_features(x).shape == (2, 256, 8, 8)
    teacher = Teacher(model)
    maps = teacher(x)
    assert teacher.exact and maps.shape == (2, 4, 8, 8)
    torch.testing.assert_close(maps.mean((2, 3)), model(x), rtol=1e-4, atol=1e-6)


def test_teacher_maps_line_up_with_student_tokens():
    """Both tiny models give an 8 x 8 grid at 64 px, and so does a ViT teacher built from the student."""
    x = torch.randn(2, 3, 64, 64)
    student = timm.create_model(VIT)
    own = Teacher(timm.create_model(CNN)).own_class_maps(x, torch.tensor([1, 9]))
    assert own.shape == (2,) + student.patch_embed.grid_size
    assert Teacher(timm.create_model(VIT))(x).shape == (2, 10, 8, 8)


def test_conv_stem_student_keeps_the_token_grid():
    """patch 4 at 32 px: two stride-2 3 x 3 convolutions (24, 48 channels) then 1 x 1 to 96, an 8 x 8 grid."""
    model = timm.create_model(CONV_STEM, img_size=32, patch_size=4)
    stem = model.patch_embed.proj
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 24, (3, 3), (2, 2)), (24, 48, (3, 3), (2, 2)), (48, 96, (1, 1), (1, 1))]
    assert model.patch_embed.patch_size == (4, 4) and model.patch_embed.grid_size == (8, 8)
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 64, 96)
    assert len([m for m in timm.create_model(CONV_STEM).patch_embed.proj if isinstance(m, torch.nn.Conv2d)]) == 4


def test_conv_stem_token_sees_its_patch_and_three_pixels_up_and_left():
    """Changing the pixels of patch (r, c) changes tokens (r..r+1, c..c+1) only: token j reads pixels 4j-3 .. 4j+3."""
    torch.manual_seed(0)
    embed = timm.create_model(CONV_STEM, img_size=32, patch_size=4).patch_embed.eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[:, :, 12:16, 8:12] += 1.0  # patch (3, 2)
    changed = (embed(y) - embed(x)).abs().amax(-1).view(8, 8) > 1e-6
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[3:5, 2:4] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize('patch_size', [3, 6, 1])
def test_conv_stem_refuses_other_patch_sizes(patch_size):
    with pytest.raises(ValueError, match=f'square power-of-two patch size of at least 2, got {patch_size}'):
        timm.create_model(CONV_STEM, img_size=48, patch_size=patch_size)


def test_conv_stem_new_image_size_but_not_a_new_patch_size():
    embed = timm.create_model(CONV_STEM, img_size=32, patch_size=4).patch_embed
    embed.set_input_size(img_size=64)
    assert embed.grid_size == (16, 16)
    with pytest.raises(ValueError, match='cannot change its patch size'):
        embed.set_input_size(patch_size=8)
