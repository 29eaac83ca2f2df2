"""What a real train.py run did inside `main`, seen without a handle on the objects it builds there: every forward
of the modules a test picks (torch's global module hooks) and every call of the mixer (TokenMix, timm's Mixup)."""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from timm.data import Mixup
from timm.models.vision_transformer import VisionTransformer

from mixup_ext import TokenMix


@dataclass
class Forward:
    """One forward call: the module, whether it was in training mode, its first input and its output (detached)."""
    module: torch.nn.Module
    training: bool
    input: Optional[torch.Tensor]
    output: Optional[torch.Tensor]


class ForwardSpy:
    """The forwards recorded so far, and the state dict a picked module had when it ran for the first time."""

    def __init__(self) -> None:
        self.calls: List[Forward] = []
        self.first_state: Optional[Dict[str, torch.Tensor]] = None

    def images(self, training: bool) -> int:
        """Images that went through the picked modules in training (or eval) mode."""
        return sum(call.input.shape[0] for call in self.calls if call.training == training)

    def changed(self, state: Dict[str, torch.Tensor]) -> List[str]:
        """The names of the tensors of `state` that differ from `first_state`."""
        return [name for name, tensor in self.first_state.items() if not torch.equal(tensor, state[name])]


def is_vit(module: torch.nn.Module) -> bool:
    """Picks the tiny ViT student (and its EMA copy); the tests' teacher is a CNN."""
    return isinstance(module, VisionTransformer)


def _detached(value: Any) -> Optional[torch.Tensor]:
    return value.detach().clone() if isinstance(value, torch.Tensor) else None


@contextmanager
def spy_forwards(pick: Callable[[torch.nn.Module], bool]) -> Iterator[ForwardSpy]:
    """Record every forward of a module for which `pick(module)` is true while the block runs.

    `first_state` is taken before the first picked forward, so for the student it holds its weights as
    training started (before any optimiser step).
    """
    spy = ForwardSpy()

    def before(module, inputs):
        if spy.first_state is None and pick(module):
            spy.first_state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def after(module, inputs, output):
        if pick(module):
            spy.calls.append(Forward(module, module.training, _detached(inputs[0]) if inputs else None,
                                     _detached(output)))

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(before),
               torch.nn.modules.module.register_module_forward_hook(after)]
    try:
        yield spy
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Mix:
    """One mixer call: the mixer and whether mixing was on, the batch and its labels, the mixed batch, the soft
    targets and the token mask."""
    mixer: Any
    enabled: bool
    images: torch.Tensor
    labels: torch.Tensor
    mixed: torch.Tensor
    targets: torch.Tensor
    mask: Optional[torch.Tensor]


def spy_mixers(monkeypatch) -> List[Mix]:
    """Record every call of a TokenMix or timm Mixup (the mixers train.py builds) until the test ends."""
    mixes: List[Mix] = []
    for cls in (TokenMix, Mixup):
        def call(self, x: torch.Tensor, target: torch.Tensor, *args: Any, _call=cls.__call__, **kwargs: Any):
            images, labels = x.clone(), target.clone()  # both mix in place
            mixed, targets = _call(self, x, target, *args, **kwargs)
            mask = getattr(self, 'last_mask', None)
            mixes.append(Mix(self, self.mixup_enabled, images, labels, mixed.clone(), targets.clone(),
                             None if mask is None else mask.clone()))
            return mixed, targets
        monkeypatch.setattr(cls, '__call__', call)
    return mixes
