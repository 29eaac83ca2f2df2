"""models.Teacher / build_teacher: class activation maps per timm family, freezing, input handling, errors."""
import numpy as np
import pytest
import timm
import torch
from torch import nn

import models
from models import Teacher, build_teacher

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=kwargs.pop('num_classes', 7), **kwargs).eval()


def _images(batch: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('name', [
    'resnet18',          # ResNet
    'resnet10t',         # ResNet-D style (tiered stem, avg-pool downsample)
    'resnet18d',         # ResNet-D
    'resnext50_32x4d',   # ResNeXt
    'regnetx_002',       # RegNet
    'efficientnet_b0',   # EfficientNet (conv_head + bn2 inside forward_features)
    'dm_nfnet_f0',       # NFNet
    'convnext_atto',     # ConvNeXt with head_norm_first: plain pool + linear head
])
@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_maps_average_exactly_to_logits(name):
    kwargs = dict(head_norm_first=True) if name.startswith('convnext') else {}
    model = _model(name, **kwargs)
    teacher = Teacher(model)
    x = _images()
    maps = teacher(x)
    logits = model(x)
    assert teacher.exact
    assert maps.shape == (2, 7, 2, 2) and maps.dtype == torch.float32
    torch.testing.assert_close(maps.mean((2, 3)), logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item())
    # the maps vary over space: they are not the logits broadcast
    assert (maps - maps.mean((2, 3), keepdim=True)).abs().max() > 1e-3 * logits.abs().max()


@pytest.mark.parametrize('name', ['convnext_atto', 'mobilenetv3_small_050'])
def test_approximate_families_apply_head_layers_per_position(name):
    """Features constant over space: each position's map must then be the model's logits exactly."""
    model = _model(name)
    teacher = Teacher(model)
    assert not teacher.exact
    x = _images()
    real = model.forward_features(x)
    constant = real.mean((2, 3), keepdim=True).expand_as(real).contiguous()
    model.forward_features = lambda _: constant
    maps = teacher(x)
    logits = model.forward_head(constant)
    torch.testing.assert_close(maps, logits[:, :, None, None].expand_as(maps), rtol=1e-4, atol=1e-5)


def test_convnext_pre_logits_mlp_is_applied_per_position():
    model = _model('convnext_atto', head_hidden_size=16)
    x = _images()
    real = model.forward_features(x)
    constant = real[:, :, :1, :1].expand_as(real).contiguous()
    model.forward_features = lambda _: constant
    maps = Teacher(model)(x)
    torch.testing.assert_close(maps[:, :, 1, 0], model.forward_head(constant), rtol=1e-4, atol=1e-5)


def test_approximate_family_maps_are_close_to_logits():
    model = _model('mobilenetv3_small_050')
    x = _images(size=32)  # 1 x 1 feature map: pooling is the identity, so the approximation is exact
    torch.testing.assert_close(Teacher(model)(x)[:, :, 0, 0], model(x), rtol=1e-4, atol=1e-5)


def _planted_tokens(model, batch: int, grid: tuple[int, int], seed: int = 3) -> torch.Tensor:
    """Token features whose prefix tokens are huge, so any leak of them into the maps is visible."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, model.num_prefix_tokens + grid[0] * grid[1], model.embed_dim, generator=gen)
    tokens[:, :model.num_prefix_tokens] *= 1000.
    return tokens


@pytest.mark.parametrize('name, heads', [
    ('deit_tiny_patch16_224', ('head',)),
    ('deit_tiny_distilled_patch16_224', ('head', 'head_dist')),
])
def test_vit_maps_are_head_of_each_patch_token(name, heads):
    model = _model(name, img_size=64)
    teacher = Teacher(model)
    x = _images()
    assert teacher(x).shape == (2, 7, 4, 4)
    tokens = _planted_tokens(model, 2, (4, 4))
    model.forward_features = lambda _: tokens
    maps = teacher(x)
    patches = tokens[:, model.num_prefix_tokens:]  # forward_features already applied the final norm
    expected = sum(getattr(model, h)(patches) for h in heads) / len(heads)  # B x 16 x C, row-major grid
    torch.testing.assert_close(maps, expected.transpose(1, 2).reshape(2, 7, 4, 4), rtol=1e-5, atol=1e-5)
    assert not teacher.exact


def test_vit_average_pool_with_register_tokens_is_exact():
    model = _model('vit_tiny_patch16_224', img_size=64, global_pool='avg', fc_norm=False, reg_tokens=2)
    teacher = Teacher(model)
    x = _images()
    maps = teacher(x)
    assert model.num_prefix_tokens == 3 and maps.shape == (2, 7, 4, 4) and teacher.exact
    torch.testing.assert_close(maps.mean((2, 3)), model(x), rtol=1e-4, atol=1e-5)


def test_vit_average_pool_over_prefix_tokens_is_not_exact():
    model = _model('vit_tiny_patch16_224', img_size=32, global_pool='avg', fc_norm=False, pool_include_prefix=True)
    assert not Teacher(model).exact  # the pooled logits also average the class token, which has no map


def test_teacher_rejects_a_batch_that_is_not_b_x_3_x_h_x_w():
    teacher = Teacher(_model('resnet10t'))
    for bad in (torch.zeros(3, 32, 32), torch.zeros(2, 1, 32, 32)):
        with pytest.raises(ValueError, match='B x 3 x H x W'):
            teacher(bad)


def test_vit_average_pool_with_fc_norm_applies_it_per_token():
    model = _model('vit_tiny_patch16_224', img_size=32, global_pool='avg', class_token=False)
    x = _images(size=32)
    tokens = _planted_tokens(model, 2, (2, 2))
    model.forward_features = lambda _: tokens
    maps = Teacher(model)(x)
    expected = model.head(model.fc_norm(tokens))
    torch.testing.assert_close(maps, expected.transpose(1, 2).reshape(2, 7, 2, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_own_class_maps_equal_slices_of_full_maps():
    labels = torch.tensor([3, 0, 6])
    for model, size in ((_model('resnet10t'), 64), (_model('deit_tiny_distilled_patch16_224', img_size=32), 32)):
        teacher = Teacher(model)
        x = _images(3, size)
        full = teacher(x)
        own = teacher.own_class_maps(x, labels)
        assert own.shape == (3,) + full.shape[2:]
        torch.testing.assert_close(own, full[torch.arange(3), labels], rtol=1e-5, atol=1e-5)


def test_own_class_maps_rejects_soft_labels():
    """Labels are one integer index per image: soft targets, float indices, a column or a wrong count are refused."""
    teacher = Teacher(_model('resnet10t'))
    for labels in (torch.rand(2, 7), torch.tensor([1.0, 2.0]), torch.tensor([[1], [2]]), torch.tensor([1, 2, 3])):
        with pytest.raises(ValueError, match='labels must be 2 integer class indices'):
            teacher.own_class_maps(_images(), labels)


def test_own_class_maps_rejects_labels_out_of_range():
    teacher = Teacher(_model('resnet10t'))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\).*got \[0, 7\]"):
        teacher.own_class_maps(_images(), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"got \[-1, 1\]"):
        teacher.own_class_maps(_images(), torch.tensor([-1, 1]))


def test_renormalises_student_batch_to_teacher_statistics():
    model = _model('resnet10t')
    student_mean, student_std = (0.5, 0.5, 0.5), (0.25, 0.3, 0.35)
    teacher = Teacher(model, student_mean=student_mean, student_std=student_std)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    as_student = (pixels - torch.tensor(student_mean)[:, None, None]) / torch.tensor(student_std)[:, None, None]
    as_teacher = (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert teacher.renormalizes
    torch.testing.assert_close(teacher(as_student), Teacher(model)(as_teacher), rtol=1e-4, atol=1e-5)
    same = Teacher(model, student_mean=IMAGENET_MEAN, student_std=IMAGENET_STD)
    assert not same.renormalizes
    torch.testing.assert_close(same(as_teacher), Teacher(model)(as_teacher), rtol=0, atol=0)
    # the teacher's mean with another std still needs the affine map (either statistic differing is enough)
    other_std = (0.2, 0.2, 0.2)
    half = Teacher(model, student_mean=IMAGENET_MEAN, student_std=other_std)
    as_half = (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(other_std)[:, None, None]
    assert half.renormalizes
    torch.testing.assert_close(half(as_half), Teacher(model)(as_teacher), rtol=1e-4, atol=1e-5)
    # the affine map is not part of the teacher's weights: its state dict is the network's
    assert set(teacher.state_dict()) == {f'model.{key}' for key in model.state_dict()}


def _pil_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """PIL's bilinear resize (antialiased when shrinking), one float channel at a time: an independent resampler."""
    from PIL import Image
    return torch.stack([torch.stack([
        torch.from_numpy(np.array(Image.fromarray(channel.numpy()).resize((size, size), Image.BILINEAR)))
        for channel in image]) for image in images])


def test_lower_resolution_teacher_resizes_the_batch():
    model = _model('tokenmix_cnn_teacher_64')
    x = _images(size=64)
    low = Teacher(model, img_size=32)
    maps = low(x)
    assert maps.shape == (2, 7, 4, 4)
    reference = Teacher(model)(_pil_resize(x, 32))
    torch.testing.assert_close(maps, reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item())
    torch.testing.assert_close(low.own_class_maps(x, torch.tensor([1, 2])), maps[[0, 1], [1, 2]])


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_vit_teacher_at_other_size_needs_img_size():
    model = _model('deit_tiny_patch16_224', img_size=32)
    with pytest.raises(ValueError, match=r'takes 32x32 inputs, got 64x64.*img_size=32'):
        Teacher(model)(_images(size=64))
    assert Teacher(model, img_size=32)(_images(size=64)).shape == (2, 7, 2, 2)
    with pytest.raises(ValueError, match=r'takes 32x32 inputs, got 48x48'):
        Teacher(model, img_size=48)


def test_teacher_is_frozen_and_no_gradient_reaches_it():
    teacher = Teacher(_model('resnet10t'))
    stats = teacher.model.bn1.running_mean.clone()
    teacher.train()
    assert not teacher.training and not teacher.model.training and not teacher.model.bn1.training
    assert all(not p.requires_grad for p in teacher.parameters())

    student = nn.Conv2d(3, 7, 32, stride=32)  # a B x 7 x 2 x 2 output, like the maps
    x = _images().requires_grad_(True)
    maps = teacher(x)
    assert not maps.requires_grad
    weights = maps.flatten(2).softmax(-1)  # a target built from the maps, used in the student's loss
    loss = -(weights * student(x).flatten(2).log_softmax(-1)).sum()
    loss.backward()
    assert student.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    torch.testing.assert_close(teacher.model.bn1.running_mean, stats, rtol=0, atol=0)


def test_float16_autocast_runs_the_network_in_float16():
    """The autocast dtype is the one asked for, not the device's default (bfloat16 on the CPU)."""
    model = _model('resnet10t')
    seen = []
    model.layer4.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    maps = Teacher(model, amp_dtype='float16')(_images())
    assert seen == [torch.float16] and maps.dtype == torch.float32


def test_channels_last_only_when_asked():
    model = _model('resnet10t')
    assert not Teacher(model).channels_last and model.conv1[0].weight.is_contiguous()
    Teacher(model, channels_last=True)
    assert model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1[0].weight.is_contiguous()


def test_classifier_without_bias_or_as_a_1x1_convolution():
    """A bias-free linear head gives exact maps with a zero bias; a 1 x 1 convolution is a linear classifier too,
    a larger kernel is not."""
    model = _model('resnet10t')
    model.fc = nn.Linear(model.fc.in_features, 7, bias=False)
    x = _images()
    torch.testing.assert_close(Teacher(model)(x).mean((2, 3)), model(x), rtol=1e-4, atol=1e-5)
    assert models.teacher._classifiers(model) == (model.fc,)
    width = model.fc.in_features
    for kernel, accepted in ((1, True), (3, False), ((1, 3), False)):
        model.fc = nn.Conv2d(width, 7, kernel)
        if accepted:
            assert models.teacher._classifiers(model) == (model.fc,)
        else:
            with pytest.raises(ValueError, match='has no linear classifier \\(Conv2d\\)'):
                models.teacher._classifiers(model)


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_bfloat16_autocast_and_channels_last_keep_the_maps():
    model = _model('resnet10t')
    x = _images()
    seen = []
    model.layer4.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    reference = Teacher(model)(x)
    torch.testing.assert_close(Teacher(model, channels_last=True)(x), reference, rtol=1e-4, atol=1e-4)
    amp_teacher = Teacher(model, amp_dtype='bfloat16')
    amp = amp_teacher(x)
    own = amp_teacher.own_class_maps(x, torch.tensor([1, 4]))
    # the network itself ran in bfloat16 (both calls), the maps come back as float32
    assert seen == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    assert amp.dtype == own.dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: close to the float32 maps, but not equal to them
    scale = reference.abs().max().item()
    torch.testing.assert_close(amp, reference, rtol=0.05, atol=0.05 * scale)
    assert (amp - reference).abs().max() > 1e-4 * scale
    torch.testing.assert_close(own, amp[[0, 1], [1, 4]], rtol=0.05, atol=0.05 * scale)


@pytest.mark.parametrize('make, message', [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3)), r'Sequential is not a supported teacher architecture.*NFNet'),
    (lambda: _model('mobilevit_xxs'), r'ByobNet is not a supported teacher.*ViT / DeiT'),
    (lambda: _model('resnet18', global_pool='max'), r"global_pool='max'.*average pooling"),
    (lambda: _model('resnet18', num_classes=0), r'no linear classifier.*num_classes=0'),
    (lambda: _model('vit_tiny_patch16_224', img_size=32, global_pool='map'), r'attention pooling'),
    (lambda: _model('vit_tiny_patch16_224', img_size=32, global_pool='max'), r"global_pool='max'.*'token'"),
])
def test_unsupported_models_give_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        Teacher(make())


@pytest.mark.parametrize('kwargs, message', [
    (dict(student_mean=(0.5, 0.5, 0.5)), 'both student_mean and student_std'),
    (dict(student_mean=(0.5,), student_std=(0.5,)), 'student_mean needs 3'),
    (dict(amp_dtype='float64'), 'amp_dtype must be float16 or bfloat16'),
    (dict(amp_dtype='bf16'), "amp_dtype must be float16 or bfloat16 \\(or None\\), got 'bf16'"),
    (dict(student_mean=(0.5,) * 3, student_std=(0.5, 0.5)), 'student_std needs 3'),
])
def test_bad_teacher_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Teacher(_model('resnet10t'), **kwargs)


@pytest.mark.parametrize('dtype', ['bfloat16', torch.bfloat16, 'float16', torch.float16])
def test_amp_dtype_by_name_or_as_a_torch_dtype(dtype):
    assert Teacher(_model('resnet10t'), amp_dtype=dtype).amp_dtype == getattr(torch, str(dtype).split('.')[-1])
    with pytest.raises(ValueError, match='amp_dtype must be float16 or bfloat16'):
        Teacher(_model('resnet10t'), amp_dtype=torch.float32)


def test_fixed_size_vit_teacher_refuses_another_input_size():
    """A ViT built for 64 px cannot be fed 32 px (its position embedding is fixed): one clear error at build time;
    built with dynamic_img_size=True it takes 32 px and gives a 4 x 4 map of 8 px tokens."""
    torch.manual_seed(0)
    vit = timm.create_model('tokenmix_vit_tiny_p8_64').eval()
    with pytest.raises(ValueError, match=r'the ViT teacher takes 64x64 inputs, got 32x32: resize with img_size=64 '
                                         r'\(--teacher-img-size\) or build the teacher with dynamic_img_size=True'):
        Teacher(vit, img_size=32)
    assert Teacher(vit, img_size=64)(torch.randn(1, 3, 32, 32)).shape == (1, 10, 8, 8)
    dynamic = timm.create_model('tokenmix_vit_tiny_p8_64', dynamic_img_size=True).eval()
    assert Teacher(dynamic, img_size=32)(torch.randn(1, 3, 32, 32)).shape == (1, 10, 4, 4)


def test_build_teacher_needs_exactly_one_weight_source(tmp_path):
    with pytest.raises(ValueError, match='needs weights.*--teacher-checkpoint'):
        build_teacher('resnet18')
    with pytest.raises(ValueError, match='not both'):
        build_teacher('resnet18', checkpoint=tmp_path / 'x.pth', pretrained=True)
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        build_teacher('no_such_net', checkpoint=tmp_path / 'x.pth')


def test_build_teacher_pretrained_asks_timm_for_its_weights(monkeypatch):
    calls, built = [], [_model('resnet10t', num_classes=1000), _model('resnet10t', num_classes=1000)]

    def fake_create_model(name, **kwargs):  # stands in for the download
        calls.append((name, kwargs))
        return built.pop()
    monkeypatch.setattr(models.teacher.timm, 'create_model', fake_create_model)
    teacher = build_teacher('resnet18', pretrained=True, num_classes=1000, amp_dtype='bfloat16', channels_last=True,
                            drop_rate=0.1)
    assert calls == [('resnet18', dict(pretrained=True, num_classes=1000, drop_rate=0.1))]
    assert teacher.amp_dtype == torch.bfloat16 and teacher.channels_last and teacher.num_classes == 1000
    assert not build_teacher('resnet18', pretrained=True).channels_last


def test_build_teacher_pretrained_errors(monkeypatch):
    with pytest.raises(ValueError, match='1000 classes, but num_classes=10'):
        build_teacher('resnet18', pretrained=True, num_classes=10)

    def offline(*args, **kwargs):
        raise OSError('We could not connect to the hub')
    monkeypatch.setattr(models.teacher.timm, 'create_model', offline)
    with pytest.raises(RuntimeError, match=r"pretrained weights for teacher 'resnet18'.*--teacher-checkpoint"):
        build_teacher('resnet18', pretrained=True)


def test_build_teacher_from_checkpoint(tmp_path):
    model = _model('tokenmix_cnn_teacher_64', num_classes=10)
    path = tmp_path / 'teacher.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'epoch': 3}, path)
    teacher = build_teacher(
        'tokenmix_cnn_teacher_64', checkpoint=path, num_classes=10, student_mean=(0.5,) * 3, student_std=(0.5,) * 3,
        img_size=48)
    x = _images()
    expected = Teacher(model, student_mean=(0.5,) * 3, student_std=(0.5,) * 3, img_size=48)(x)
    torch.testing.assert_close(teacher(x), expected, rtol=0, atol=0)
    assert teacher.num_classes == 10 and teacher.renormalizes and teacher.img_size == (48, 48)
    with pytest.raises(ValueError, match=r'classifier for 10 classes.*num_classes=1000'):
        build_teacher('tokenmix_cnn_teacher_64', checkpoint=path, num_classes=1000)
