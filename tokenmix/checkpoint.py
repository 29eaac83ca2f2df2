"""Student checkpoints: atomic writes, bounded history, and a resume that continues bit for bit.

`AtomicCheckpointSaver` is timm's `CheckpointSaver` (same files: `last`, `model_best`, `checkpoint-N`) with
every file written under a temporary name, synced, then renamed over the old one, so a run killed at any moment
leaves loadable files (timm unlinks the old file before renaming and copies the history files in place). Its
checkpoints also hold the LR scheduler and every rank's random number generator states, so `resume()` restores
model, EMA, optimiser, scheduler, loss scaler, epoch and RNG. The teacher is never saved: only the student and
its EMA are.
"""
import argparse
import logging
import os
import random
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import CheckpointSaver, get_state_dict, unwrap_model

from .errors import ConfigError

__all__ = ['AtomicCheckpointSaver', 'capture_rng_state', 'restore_rng_state', 'gather_rng_states', 'resume',
           'continue_history']

_logger = logging.getLogger(__name__)


def _fsync_file(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's `CheckpointSaver` whose every write is temp file + fsync + `os.replace`.

    `save(epoch, metric, extra)` stores `extra` (scheduler state, RNG states, ...) beside timm's entries.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._extra: Dict[str, Any] = {}

    def save(self, epoch: int, metric: Optional[float], extra: Dict[str, Any]):
        """`save_checkpoint` with extra entries; returns (best_metric, best_epoch) as timm does."""
        self._extra = extra
        try:
            return self.save_checkpoint(epoch, metric)
        finally:
            self._extra = {}

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)  # atomic on POSIX and Windows; never leaves `dst` missing

    def _duplicate(self, src: str, dst: str) -> None:
        tmp = dst + '.tmp'
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if self.can_hardlink:
            try:
                os.link(src, tmp)
            except (OSError, NotImplementedError):
                self.can_hardlink = False
        if not self.can_hardlink:
            shutil.copy2(src, tmp)
            _fsync_file(tmp)
        os.replace(tmp, dst)

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        state: Dict[str, Any] = {
            'epoch': epoch,
            'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
            'state_dict': get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,  # timm: the saved epoch is complete, resume starts at epoch + 1
        }
        if self.args is not None:
            state['args'] = self.args
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state.update(self._extra)
        state['saver'] = self.state_dict(epoch, metric)
        with open(save_path, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def capture_rng_state(generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """This process's RNG states (Python, NumPy, torch CPU/CUDA, and `generator`), storable with weights_only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=random.getstate(), numpy=(kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached), torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state['generator'] = generator.get_state()
    return state


def restore_rng_state(state: Dict[str, Any], generator: Optional[torch.Generator] = None) -> None:
    """Undo `capture_rng_state` in this process."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    if generator is not None and 'generator' in state:
        generator.set_state(state['generator'])


def gather_rng_states(generator: Optional[torch.Generator] = None) -> List[Dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective call when distributed)."""
    state = capture_rng_state(generator)
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """A training checkpoint written by this package or timm (weights_only, argparse.Namespace allowed)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--resume '{path}': no such file")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise ConfigError(f"--resume '{path}' is not a training checkpoint (no 'state_dict')")
    return checkpoint


def resume(path: str, model: torch.nn.Module, *, optimizer=None, scheduler=None, loss_scaler=None,
           model_ema=None, rank: int = 0, world_size: int = 1) -> Dict[str, Any]:
    """Load a training checkpoint into the run's objects; return where and how to continue.

    Pass `optimizer=None` to keep a fresh optimiser (--no-resume-opt). The RNG states are applied later, by
    the caller, once everything that draws random numbers while being built exists. Returns
    dict(start_epoch, rng_state, saver_state): rng_state is this rank's saved state (None when the checkpoint
    has none for this world size), saver_state the checkpoint history for `continue_history`.
    """
    checkpoint = load_training_checkpoint(path)
    try:
        unwrap_model(model).load_state_dict(checkpoint['state_dict'])
        if model_ema is not None and 'state_dict_ema' in checkpoint:
            unwrap_model(model_ema).load_state_dict(checkpoint['state_dict_ema'])
    except RuntimeError as e:
        raise ConfigError(f"--resume '{path}' does not fit --model: {str(e).splitlines()[0]}") from None
    if optimizer is not None and 'optimizer' in checkpoint:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    if scheduler is not None and 'scheduler' in checkpoint:
        scheduler.load_state_dict(checkpoint['scheduler'])
    start_epoch = checkpoint.get('epoch', -1) + (1 if checkpoint.get('version', 1) > 1 else 0)
    states = checkpoint.get('rng_states')
    rng_state = states[rank] if states is not None and len(states) == world_size else None
    if states is not None and rng_state is None:
        _logger.warning(f'checkpoint holds RNG states of {len(states)} ranks, this run has {world_size}: '
                        f'random streams are reseeded, so the resumed run differs from an uninterrupted one')
    _logger.info(f"resumed '{path}' (epoch {checkpoint.get('epoch')}), starting at epoch {start_epoch}")
    return dict(start_epoch=start_epoch, rng_state=rng_state, saver_state=checkpoint.get('saver'))


def continue_history(saver: AtomicCheckpointSaver, resume_path: str, saver_state: Optional[Dict[str, Any]]) -> None:
    """Keep ranking and evicting checkpoints as before when the resumed run writes into the same folder."""
    same_dir = os.path.abspath(os.path.dirname(resume_path)) == os.path.abspath(saver.checkpoint_dir)
    if saver_state is not None and same_dir:
        saver.load_state_dict(saver_state)
