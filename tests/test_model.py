"""tokenmix_train.model: the token size default, --model-dtype, placement and compilation."""
from types import SimpleNamespace

import pytest
import torch

from tokenmix_train.model import compile_model, model_dtype_of, patch_size_of, place_model, token_size_of


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
