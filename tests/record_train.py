#!/usr/bin/env python3
"""Test-only launcher: train.py's `main` with what each rank mixed and the model it ended with written to a file.

    python tests/record_train.py --record DIR [--hold-at-epoch N] -- TRAIN_ARGS
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/record_train.py --record DIR -- TRAIN_ARGS

Writes DIR/rank<R>.pt (R: this process's rank) holding `calls`, one per call of the mixer that train.py builds
(`indices`: the train dataset indices of the batch, `targets`: the targets the batch carried into the mixer,
`soft`: the soft targets it returned, `mask`: its token mask, `generator`: its generator's state before the call),
and `modules` / `state_dict`: the class name of every module of the trained student and its weights and buffers,
as this rank holds them. Indices are recorded for a stored-map train dataset read with --workers 0 (each sample is
loaded in this process, in batch order). With --hold-at-epoch N every rank writes DIR/held-rank<R> at the start of
epoch N and waits there, to be killed.
"""
import argparse
import os
import sys
import time
from collections import deque
from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from unittest import mock

import torch
from timm.utils import unwrap_model

from conftest import load_script

import tokenmix_train.engine as engine
from tokenmix_train.teacher_maps import StoredMapDataset

HOLD_SECONDS = 600  # longer than any test waits: a held run ends by being killed


class RecordingMixer:
    """A mixer that records each call (see the module docstring); other attributes are read from the wrapped mixer
    (a write stays on the wrapper: not for --mixup-off-epoch)."""

    def __init__(self, mixer: Any, indices: deque, calls: List[Dict[str, Any]]) -> None:
        self.mixer, self.indices, self.calls = mixer, indices, calls

    def __getattr__(self, name: str) -> Any:
        if name == 'mixer':
            raise AttributeError(name)
        return getattr(self.mixer, name)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        generator = getattr(self.mixer, 'generator', None)  # timm's Mixup has none
        call = dict(indices=[self.indices.popleft() for _ in range(x.shape[0])] if self.indices else [],
                    targets=target.clone(), generator=generator.get_state() if generator is not None else None)
        x, soft = self.mixer(x, target)
        mask = getattr(self.mixer, 'last_mask', None)
        self.calls.append(dict(call, soft=soft.clone(), mask=None if mask is None else mask.clone()))
        return x, soft


def record_run(record: str, train_args: Sequence[str], hold_at_epoch: Optional[int] = None) -> int:
    """Run train.py's `run_main(train_args)` with this process's record written to `record`; its exit code.

    Every patch is undone on return, so the function can run inside a test process.
    """
    rank = int(os.environ.get('RANK', 0))
    train = load_script('train.py')
    indices: deque = deque()
    calls: List[Dict[str, Any]] = []
    runs: List[Any] = []
    load_item, build_mixer, fit = StoredMapDataset.__getitem__, train.build_mixer, train.fit
    train_one_epoch = engine.train_one_epoch

    def load_recorded(dataset: StoredMapDataset, index: int) -> Tuple[Any, Any]:
        indices.append(index)
        return load_item(dataset, index)

    def build_recording_mixer(*args: Any, **kwargs: Any) -> Optional[RecordingMixer]:
        mixer = build_mixer(*args, **kwargs)
        return None if mixer is None else RecordingMixer(mixer, indices, calls)

    def fit_recorded(run: Any, *args: Any, **kwargs: Any) -> Any:
        runs.append(run)
        return fit(run, *args, **kwargs)

    def train_or_hold(run: Any, epoch: int, loader: Any, start: Any = None) -> Dict[str, float]:
        if epoch == hold_at_epoch:
            open(os.path.join(record, f'held-rank{rank}'), 'w').close()
            time.sleep(HOLD_SECONDS)
        return train_one_epoch(run, epoch, loader, start)

    patches: List[Tuple[Any, str, Callable]] = [
        (StoredMapDataset, '__getitem__', load_recorded), (train, 'build_mixer', build_recording_mixer),
        (train, 'fit', fit_recorded), (engine, 'train_one_epoch', train_or_hold)]
    with ExitStack() as stack:
        for owner, name, value in patches:
            stack.enter_context(mock.patch.object(owner, name, value))
        code = train.run_main(list(train_args))
    model = unwrap_model(runs[0].model) if runs else None  # None: the run stopped before its epoch loop
    modules = {} if model is None else {name: type(module).__name__ for name, module in model.named_modules()}
    torch.save(dict(calls=calls, modules=modules, state_dict={} if model is None else model.state_dict()),
               os.path.join(record, f'rank{rank}.pt'))
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line above; the exit code of train.py."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--record', required=True, metavar='DIR', help='folder of the per-rank records')
    parser.add_argument('--hold-at-epoch', type=int, default=None, metavar='N', help='wait at the start of epoch N')
    parser.add_argument('train_args', nargs=argparse.REMAINDER, help='-- then the arguments of train.py')
    args = parser.parse_args(argv)
    return record_run(args.record, [a for a in args.train_args if a != '--'], args.hold_at_epoch)


if __name__ == '__main__':
    sys.exit(main())
