"""tokenmix_train.model: the token size default, --model-dtype, placement and compilation."""
from types import SimpleNamespace

import pytest
import timm
import torch

from tokenmix_train.args import parse_train_args
from tokenmix_train.errors import ConfigError
from tokenmix_train.model import (build_student, check_input_size, compile_model, model_dtype_of, patch_size_of,
                                  place_model, token_size_of)


class Patches(torch.nn.Module):
    """A model that embeds patches of `size` pixels (None: no patch embedding)."""

    def __init__(self, size=None):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        if size is not None:
            self.patch_embed = SimpleNamespace(patch_size=size)


def test_token_size_is_the_flag_else_the_patch_else_16():
    assert token_size_of(Patches((8, 8)), 4) == 4
    assert token_size_of(Patches((8, 8))) == 8 and token_size_of(Patches(14), None) == 14
    assert token_size_of(Patches()) == 16 and patch_size_of(Patches()) is None
    with pytest.raises(ValueError, match=r'^--model Patches has non-square patches \(8, 4\); TokenMix needs square '
                                         r'tokens$'):
        token_size_of(Patches((8, 4)))


def test_model_dtype_and_placement_follow_the_flags():
    args = SimpleNamespace(model_dtype='bfloat16', channels_last=False)
    assert model_dtype_of(args) == torch.bfloat16 and model_dtype_of(SimpleNamespace(model_dtype=None)) is None
    model = place_model(Patches(), args, torch.device('cpu'))
    assert model.linear.weight.dtype == torch.bfloat16
    conv = place_model(torch.nn.Conv2d(3, 4, 3), SimpleNamespace(model_dtype=None, channels_last=True),
                       torch.device('cpu'))
    assert conv.weight.dtype == torch.float32 and conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_follows_the_flags():
    model = Patches()
    plain = SimpleNamespace(torchscript=False, torchcompile=None, torchcompile_mode=None)
    assert compile_model(model, plain) is model  # train.py's args: no --aot-autograd flag at all
    assert compile_model(model, SimpleNamespace(**vars(plain), aot_autograd=False)) is model
    compiled = compile_model(model, SimpleNamespace(**dict(vars(plain), torchcompile='eager')))
    assert compiled is not model and compiled._orig_mod is model
    scripted = compile_model(torch.nn.Linear(2, 2), SimpleNamespace(**dict(vars(plain), torchscript=True)))
    assert isinstance(scripted, torch.jit.ScriptModule)


def test_input_size_must_tile_into_whole_patches_and_tokens():
    """check_input_size refuses a side that is not a multiple of the patch (or the TokenMix token), either side
    alone, naming the flag; without patch embedding or token size any size passes."""
    check_input_size(Patches((8, 8)), (3, 32, 48), 16)
    check_input_size(Patches(), (3, 36, 30), None)
    for size in ((3, 32, 36), (3, 36, 32)):
        with pytest.raises(ConfigError, match=rf'^--img-size {size[1]}x{size[2]} is not a multiple of the patch size '
                                              r'8 of --model$'):
            check_input_size(Patches((8, 8)), size, None)
    for size in ((48, 40), (40, 48)):
        with pytest.raises(ConfigError, match=rf'^--img-size {size[0]}x{size[1]} is not a multiple of the TokenMix '
                                              r'token size 12 \(--tokenmix-patch-size\)$'):
            check_input_size(Patches(), size, 12)


def test_the_model_goes_to_the_device_and_the_compile_backend_is_the_flags():
    """place_model moves the weights to the run's device (`meta` stands for an accelerator: on a CPU-only machine a
    model left on the CPU looks placed); --torchcompile names torch.compile's backend (an unknown name is refused)."""
    placed = place_model(Patches(), SimpleNamespace(model_dtype=None, channels_last=False), torch.device('meta'))
    assert placed.linear.weight.device.type == 'meta'
    args = SimpleNamespace(torchscript=False, torchcompile='no_such_backend', torchcompile_mode=None)
    with pytest.raises(RuntimeError, match="^Invalid backend: 'no_such_backend'"):
        compile_model(Patches(), args)


def test_input_size_gives_the_channel_count_unless_in_chans_does():
    """timm's rule: --input-size C H W sets the student's input channels when --in-chans is not given."""
    base = ['--data-dir', 'd', '--model', 'tokenmix_vit_tiny_p8_64', '--input-size', '1', '32', '32']
    assert build_student(parse_train_args(base)[0], 10).patch_embed.proj.in_channels == 1
    assert build_student(parse_train_args(base + ['--in-chans', '2'])[0], 10).patch_embed.proj.in_channels == 2


def test_pretrained_path_loads_the_body_and_always_gives_a_new_head(tmp_path):
    """--pretrained-path adapts the head even when the file's class count is the student's (timm keeps a head only
    for the count its pretrained config names, 10 for the tiny ViT): the body is the file's, the head is not."""
    torch.manual_seed(0)
    source = timm.create_model('tokenmix_vit_tiny_p8_64', num_classes=10)
    path = str(tmp_path / 'weights.pth')
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    student = build_student(parse_train_args(['--data-dir', 'd', '--model', 'tokenmix_vit_tiny_p8_64', '--pretrained',
                                              '--pretrained-path', path])[0], 10)
    assert torch.equal(student.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert not torch.equal(student.head.weight, source.head.weight)


def test_an_unknown_model_names_the_flag():
    with pytest.raises(ConfigError, match='^--model no_such_model: unknown timm model$'):
        build_student(parse_train_args(['--data-dir', 'd', '--model', 'no_such_model'])[0], 10)


def test_a_missing_initial_checkpoint_names_the_flag_and_the_file(tmp_path):
    path = str(tmp_path / 'missing.pth')
    with pytest.raises(ConfigError, match=f"^--initial-checkpoint '{path}': no such file$"):
        build_student(parse_train_args(['--data-dir', 'd', '--model', 'tokenmix_vit_tiny_p8_64',
                                        '--initial-checkpoint', path])[0], 10)


def test_initial_checkpoint_gives_every_weight_head_included(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model('tokenmix_vit_tiny_p8_64', num_classes=10)
    path = str(tmp_path / 'start.pth.tar')
    torch.save({'state_dict': source.state_dict()}, path)
    torch.manual_seed(1)
    student = build_student(parse_train_args(['--data-dir', 'd', '--model', 'tokenmix_vit_tiny_p8_64',
                                              '--initial-checkpoint', path])[0], 10)
    loaded = student.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


def test_split_bn_makes_one_batchnorm_per_augmentation_split():
    args = parse_train_args(['--data-dir', 'd', '--model', 'resnet10t', '--split-bn', '--aug-splits', '2'])[0]
    norms = [m for m in build_student(args, 10).modules() if type(m).__name__ == 'SplitBatchNorm2d']
    assert norms and {m.num_splits for m in norms} == {2}
