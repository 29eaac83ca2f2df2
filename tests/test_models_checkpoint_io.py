"""models.checkpoint_io: every supported checkpoint layout loads to the same weights and the same teacher maps."""
import argparse
import re

import pytest
import safetensors.torch
import timm
import torch

import models  # noqa: F401  (registers the tiny models)
from models import (Teacher, build_teacher, check_state_dict, load_checkpoint_weights, load_state_dict_file,
                    read_checkpoint)

NAME = 'tokenmix_cnn_teacher_64'


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(NAME).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so buffers are checked too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.)
    return model


@pytest.fixture(scope='module')
def weights():
    return _model(0).state_dict(), _model(1).state_dict()


def _prefixed(state_dict, prefix):
    return {prefix + k: v for k, v in state_dict.items()}


LAYOUTS = {
    'bare.pth': lambda sd, ema: sd,
    'timm.pth.tar': lambda sd, ema: {'state_dict': sd, 'state_dict_ema': ema, 'epoch': 4,
                                      'args': argparse.Namespace(model=NAME), 'arch': NAME},
    'deit.pth': lambda sd, ema: {'model': sd, 'model_ema': ema, 'optimizer': {'state': {}}, 'epoch': 4},
    'ddp.pth': lambda sd, ema: {'state_dict': _prefixed(sd, 'module.')},
    'compiled.pth': lambda sd, ema: {'model': _prefixed(sd, '_orig_mod.')},
    'compiled_ddp.pth': lambda sd, ema: _prefixed(sd, '_orig_mod.module.'),
}


def _assert_same(loaded, expected):
    assert loaded.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(loaded[k], expected[k], rtol=0, atol=0)


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_torch_layouts_round_trip(tmp_path, weights, layout):
    plain, ema = weights
    path = tmp_path / layout
    torch.save(LAYOUTS[layout](plain, ema), path)
    _assert_same(load_state_dict_file(path), plain)
    if layout in ('timm.pth.tar', 'deit.pth'):
        _assert_same(load_state_dict_file(path, use_ema=True), ema)


def test_safetensors_round_trip(tmp_path, weights):
    plain, _ = weights
    path = tmp_path / 'model.safetensors'
    safetensors.torch.save_file(_prefixed(plain, 'module.'), str(path))
    _assert_same(load_state_dict_file(str(path)), plain)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint '{path}' has no EMA weights")):
        load_state_dict_file(path, use_ema=True)


def test_teacher_maps_identical_after_reload(tmp_path, weights):
    plain, ema = weights
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = {}
    for use_ema, sd in ((False, plain), (True, ema)):
        model = timm.create_model(NAME)
        model.load_state_dict(sd)
        expected[use_ema] = Teacher(model)(x)
    assert not torch.allclose(expected[False], expected[True])
    path = tmp_path / 'timm.pth.tar'
    torch.save(LAYOUTS['timm.pth.tar'](plain, ema), path)
    for use_ema in (False, True):
        torch.testing.assert_close(build_teacher(NAME, checkpoint=path, use_ema=use_ema)(x), expected[use_ema],
                                   rtol=0, atol=0)
    safe = tmp_path / 'ema.safetensors'
    safetensors.torch.save_file(ema, str(safe))
    torch.testing.assert_close(build_teacher(NAME, checkpoint=safe)(x), expected[True], rtol=0, atol=0)


def test_ema_requested_without_ema_weights_is_an_error(tmp_path, weights):
    path = tmp_path / 'no_ema.pth'
    torch.save({'state_dict': weights[0], 'state_dict_ema': None}, path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint '{path}' has no EMA weights")):
        load_state_dict_file(path, use_ema=True)


def test_ema_only_checkpoint_needs_use_ema(tmp_path, weights):
    path = tmp_path / 'ema_only.pth'
    torch.save({'model_ema': weights[1]}, path)
    with pytest.raises(ValueError, match="holds only EMA weights \\('model_ema'\\); load it with use_ema"):
        load_state_dict_file(path)
    _assert_same(load_state_dict_file(path, use_ema=True), weights[1])


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / 'nowhere' / 'teacher.pth'
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        build_teacher(NAME, checkpoint=path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / 'junk.pth'
    torch.save({'epoch': 3, 'metric': 0.5}, path)
    with pytest.raises(ValueError, match=r"holds no state dict of tensors.*top-level keys: 'epoch', 'metric'"):
        load_state_dict_file(path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match='holds a list, not a state dict'):
        load_state_dict_file(path)
    torch.save({}, path)  # an empty mapping holds no weights
    with pytest.raises(ValueError, match=r"holds no state dict of tensors.*top-level keys: \)$"):
        load_state_dict_file(path)
    torch.save({'weight': torch.ones(2, 3)}, path)  # one tensor is a state dict (a bias-free linear layer)
    assert torch.equal(load_state_dict_file(path)['weight'], torch.ones(2, 3))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / 'pickled.pth'
    torch.save({'state_dict': _model(0).state_dict(), 'model_obj': torch.nn.ReLU()}, path)
    with pytest.raises(ValueError, match='refuses to unpickle'):
        load_state_dict_file(path)


def test_classifier_size_mismatch_names_both_numbers(tmp_path, weights):
    path = tmp_path / 'ten_classes.pth'
    torch.save(weights[0], path)
    model = timm.create_model(NAME, num_classes=5)
    with pytest.raises(ValueError, match=r"has a classifier for 10 classes \('fc.weight'\), .*num_classes=5"):
        load_checkpoint_weights(model, path)


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_distilled_classifier_mismatch_is_found(tmp_path):
    source = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, num_classes=4)
    path = tmp_path / 'deit.pth'
    torch.save({'model': source.state_dict()}, path)
    target = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, num_classes=3)
    with pytest.raises(ValueError, match=r"classifier for 4 classes \('head.weight'\).*num_classes=3"):
        load_checkpoint_weights(target, path)


def test_other_architecture_lists_missing_unexpected_and_mismatched(tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save(timm.create_model('resnet18', num_classes=10).state_dict(), path)
    model = timm.create_model(NAME)
    with pytest.raises(ValueError) as info:
        load_checkpoint_weights(model, path)
    message = str(info.value)
    assert f"checkpoint '{path}' does not fit ResNet" in message
    assert "shape mismatches (checkpoint vs model): 'bn1.weight: (64,) vs (32,)'" in message
    assert "keys missing from the checkpoint: 'conv1.0.weight'" in message
    assert "unexpected keys in the checkpoint: 'conv1.weight'" in message


def test_non_strict_load_reports_missing_and_unexpected(tmp_path, weights):
    plain = dict(weights[0])
    plain.pop('fc.bias')
    plain['extra.weight'] = torch.zeros(1)
    path = tmp_path / 'partial.pth'
    torch.save(plain, path)
    model = timm.create_model(NAME)
    report = load_checkpoint_weights(model, path, strict=False)
    assert report.missing == ['fc.bias'] and report.unexpected == ['extra.weight'] and report.mismatched == []
    torch.testing.assert_close(model.fc.weight, plain['fc.weight'], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"1 keys missing from the checkpoint: 'fc.bias'"):
        load_checkpoint_weights(timm.create_model(NAME), path)
    assert check_state_dict(model, weights[0], source='mem') == ([], [], [])


def test_messages_list_five_keys_then_count_the_rest(tmp_path):
    path = tmp_path / 'seven.pth'
    torch.save({f'k{i}': i for i in range(7)}, path)  # no tensors: not a state dict
    with pytest.raises(ValueError, match=r"top-level keys: 'k0', 'k1', 'k2', 'k3', 'k4' and 2 more\)$"):
        load_state_dict_file(path)
    torch.save({f'k{i}': i for i in range(5)}, path)
    with pytest.raises(ValueError, match=r"top-level keys: 'k0', 'k1', 'k2', 'k3', 'k4'\)$"):
        load_state_dict_file(path)


def test_mmap_maps_the_tensors_of_a_zip_file_and_reads_a_legacy_one_whole(tmp_path, monkeypatch):
    """What --resume latest uses to look at every checkpoint of a folder without reading their weights."""
    state = dict(epoch=3, state_dict=dict(w=torch.arange(6.)))
    torch.save(state, tmp_path / 'zip.pth.tar')
    torch.save(state, tmp_path / 'legacy.pth.tar', _use_new_zipfile_serialization=False)
    real, mapped = torch.load, []

    def load(*args, **kwargs):
        mapped.append(kwargs.get('mmap', False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', load)
    for name in ('zip', 'legacy'):
        for mmap in (True, False):
            read = read_checkpoint(tmp_path / f'{name}.pth.tar', mmap=mmap)
            assert read['epoch'] == 3 and torch.equal(read['state_dict']['w'], state['state_dict']['w'])
    assert mapped == [True, False, False, False]  # a legacy file cannot be mapped: read whole
