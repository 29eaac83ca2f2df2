"""The tiny demo models: registered with timm, data config, shapes, and a teacher whose grid matches the student's."""
import timm
import torch
from timm.data import resolve_model_data_config

import models
from models import Teacher

VIT, CNN = 'tokenmix_vit_tiny_p8_64', 'tokenmix_cnn_teacher_64'


def test_registered_with_timm():
    assert {VIT, CNN} <= set(timm.list_models('tokenmix_*'))
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
