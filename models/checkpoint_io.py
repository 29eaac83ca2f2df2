"""Read model weights from a checkpoint file: the one loader shared by the teacher, train.py and validate.py.

Accepted files: ``.pth`` / ``.pth.tar`` written by ``torch.save`` (timm's and DeiT's training checkpoints, or a
bare state dict) and ``.safetensors``. A torch checkpoint may keep its weights under ``state_dict`` /
``state_dict_ema`` (timm) or ``model`` / ``model_ema`` (DeiT, torchvision); the ``module.`` (DDP) and
``_orig_mod.`` (``torch.compile``) prefixes are removed with timm's ``clean_state_dict``.

:func:`read_checkpoint` is the one place a checkpoint file is opened (resume, initial weights, the teacher,
validation): whatever is wrong with a file (missing, a folder, empty, truncated, text, random bytes, pickled
objects) comes out as one exception whose message names the file and the fault.
"""
import argparse
import errno
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple, Union

import torch
from torch import nn
from timm.models import clean_state_dict

__all__ = ['CheckpointError', 'read_checkpoint', 'load_state_dict_file', 'check_state_dict', 'load_checkpoint_weights',
           'LoadReport']

PathLike = Union[str, os.PathLike]

_MODEL_KEYS = ('state_dict', 'model')
_EMA_KEYS = ('state_dict_ema', 'model_ema')
_MAX_LISTED = 5


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or holds nothing usable; the message names the file and the fault."""


_ZIP_MAGIC = b'PK\x03\x04'  # torch.save writes a zip archive since torch 1.6


def _what_is_wrong(path: str, error: Exception) -> str:
    """Why torch.load failed on `path`, in words: refused objects, a damaged archive, text, or other bytes."""
    cause = error.__context__ if isinstance(error, pickle.UnpicklingError) and error.__context__ else error
    detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    refused = re.search(r'Unsupported global: GLOBAL (\S+)', detail)
    if refused:
        return (f'holds Python objects ({refused.group(1)}) that torch.load(weights_only=True) refuses to '
                f'unpickle; re-save its weights as a plain state dict or .safetensors')
    with open(path, 'rb') as f:
        head = f.read(512)
    if head.startswith(_ZIP_MAGIC):
        return 'is truncated or damaged (an incomplete torch zip archive)'
    try:
        head.decode('utf-8')
        return 'is a text file, not a torch checkpoint'
    except UnicodeDecodeError:
        return f'is not a torch checkpoint ({detail})'


def read_checkpoint(path: PathLike, mmap: bool = False) -> Any:
    """Everything stored in a checkpoint file, read on the CPU without running pickled code.

    `mmap=True` maps the tensors of a file in torch's zip format instead of reading them (cheap for a look at a
    file's epoch or metric; the tensors are read when touched); other files are read whole.

    ``.safetensors`` files are read with safetensors, anything else with ``torch.load(weights_only=True)``,
    allowing the ``argparse.Namespace`` that timm, DeiT and older files of this project store as ``args``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: ``path`` is a folder, empty, or not a readable checkpoint (truncated, text, other bytes,
            pickled objects that weights_only refuses); the message names the file and the fault.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, 'checkpoint file not found', path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint '{path}' is a folder, not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes)")
    if path.endswith('.safetensors'):
        import safetensors.torch  # a timm dependency
        try:
            return safetensors.torch.load_file(path, device='cpu')
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on bad bytes
            raise CheckpointError(f"checkpoint '{path}' is not a readable .safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # on bad bytes torch.load raises OSError, EOFError, KeyError, UnpicklingError, ...
        raise CheckpointError(f"checkpoint '{path}' {_what_is_wrong(path, e)}") from None


def load_state_dict_file(path: PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its model weights as a clean state dict.

    Args:
        path: a ``.pth`` / ``.pth.tar`` / ``.safetensors`` file.
        use_ema: return the EMA weights (``state_dict_ema`` or ``model_ema``). A file without EMA weights is an
            error, never a silent fallback to the plain weights.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: an unreadable file (see :func:`read_checkpoint`), no recognisable state dict, or no EMA
            weights when ``use_ema`` is set.
    """
    path = os.fspath(path)
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a state dict")

    ema_key = next((k for k in _EMA_KEYS if checkpoint.get(k) is not None), None)
    if use_ema:
        if ema_key is None:
            raise CheckpointError(
                f"checkpoint '{path}' has no EMA weights (looked for {', '.join(_EMA_KEYS)}; "
                f"top-level keys: {_list(checkpoint)}); load it without use_ema")
        state_dict = checkpoint[ema_key]
    else:
        model_key = next((k for k in _MODEL_KEYS if checkpoint.get(k) is not None), None)
        if model_key is not None:
            state_dict = checkpoint[model_key]
        elif ema_key is not None and not _is_state_dict(checkpoint):
            raise CheckpointError(f"checkpoint '{path}' holds only EMA weights ('{ema_key}'); load it with use_ema")
        else:
            state_dict = checkpoint
    if not _is_state_dict(state_dict):
        raise CheckpointError(
            f"checkpoint '{path}' holds no state dict of tensors (expected one of "
            f"{', '.join(_MODEL_KEYS + _EMA_KEYS)} or a bare state dict; top-level keys: {_list(checkpoint)})")
    return clean_state_dict(dict(state_dict))


def _list(keys) -> str:
    keys = list(keys)
    shown = ', '.join(repr(k) for k in keys[:_MAX_LISTED])
    return shown + (f' and {len(keys) - _MAX_LISTED} more' if len(keys) > _MAX_LISTED else '')


def _classifier_weight_names(model: nn.Module) -> list[str]:
    """State-dict names of the classifier weight(s) found through timm's ``get_classifier()``."""
    if not hasattr(model, 'get_classifier'):
        return []
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(h.weight)] for h in heads if isinstance(getattr(h, 'weight', None), nn.Parameter)]


class LoadReport(NamedTuple):
    """Keys that did not line up between a model and a state dict."""
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]  # 'name: checkpoint shape vs model shape'


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> LoadReport:
    """Compare ``state_dict`` with ``model``'s own and return what does not match.

    A classifier whose class count differs from the model's is always an error naming both numbers,
    because loading the rest would silently leave a random classifier.

    Args:
        model: the model the weights are meant for.
        state_dict: weights, e.g. from :func:`load_state_dict_file`.
        source: where the weights come from (a file name), used in messages.

    Raises:
        CheckpointError: the classifier size differs from the model's ``num_classes``.
    """
    own = model.state_dict()
    for name in _classifier_weight_names(model):
        if name in state_dict and state_dict[name].shape[0] != own[name].shape[0]:
            raise CheckpointError(
                f"checkpoint '{source}' has a classifier for {state_dict[name].shape[0]} classes ('{name}'), "
                f"but the model was built with num_classes={own[name].shape[0]}")
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f'{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}'
        for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    return LoadReport(missing, unexpected, mismatched)


def load_checkpoint_weights(
        model: nn.Module,
        path: PathLike,
        *,
        use_ema: bool = False,
        strict: bool = True,
) -> LoadReport:
    """Load a checkpoint file's weights into ``model`` (see :func:`load_state_dict_file`).

    Args:
        model: the model to fill, built with the same architecture and ``num_classes``.
        path: the checkpoint file.
        use_ema: load the EMA weights.
        strict: any missing or unexpected key is an error; otherwise they are returned in the report.
            Shape mismatches are always an error.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: unreadable file, no EMA weights when asked, classifier size differs from the model's
            (naming both numbers), shape mismatches, or (``strict``) missing / unexpected keys.
    """
    path = os.fspath(path)
    state_dict = load_state_dict_file(path, use_ema=use_ema)
    report = check_state_dict(model, state_dict, source=path)
    problems = []
    if report.mismatched:
        problems.append(f'shape mismatches (checkpoint vs model): {_list(report.mismatched)}')
    if strict and report.missing:
        problems.append(f'{len(report.missing)} keys missing from the checkpoint: {_list(report.missing)}')
    if strict and report.unexpected:
        problems.append(f'{len(report.unexpected)} unexpected keys in the checkpoint: {_list(report.unexpected)}')
    if problems:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit {type(model).__name__}: " + '; '.join(problems)
            + ' (is it for another architecture?)')
    model.load_state_dict(state_dict, strict=strict)
    return report
