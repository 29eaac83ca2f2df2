"""Student checkpoints: saves that a kill cannot spoil, bounded history, and a resume that continues bit for bit.

`AtomicCheckpointSaver` writes timm's files (`last`, `model_best`, `checkpoint-N`, same contents and history
bookkeeping as timm's `CheckpointSaver`) in an order that a kill at any instant cannot spoil: the new state goes
to a hidden temporary file (`.last.pth.tar.tmp`, which no `*.pth.tar` glob matches), then becomes the new
history file and, when it is a new best, `model_best` (each by link or copy to a hidden temporary name and an
atomic rename), then `last`; only then is the history file it displaced deleted. So at every instant the
newest complete `last`, the best so far and the kept history are on disk. Leftover temporary files (and timm's
`PARTIAL_FILES`) are removed when the next saver starts in that folder. `args` is stored as plain data, so a file
loads with a plain `torch.load(path)`. Checkpoints also hold the LR scheduler and every rank's random number
generator states, so `resume()` restores model, EMA, optimiser, scheduler, loss scaler, epoch and RNG. The
teacher is never saved. `checkpoint_files` and `load_model_weights` serve validate.py (and --initial-checkpoint):
which files a folder holds, and weights into a model with every fault a ConfigError naming the flag.
`latest_checkpoint` picks what `--resume latest` continues: the run folder's checkpoint that got furthest and loads;
`python -m tokenmix_train.checkpoint FOLDER` prints how many epochs it finished (scripts/lib.sh asks it).
"""
import glob
import logging
import os
import random
import re
import shutil
import sys
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import CheckpointSaver, get_state_dict, unwrap_model

from models import CheckpointError, load_checkpoint_weights, read_checkpoint

from .distributed import process_group_active
from .errors import ConfigError
from .run_folder import discard, writing

__all__ = ['AtomicCheckpointSaver', 'plain_data', 'numerics', 'capture_rng_state', 'restore_rng_state',
           'gather_rng_states', 'load_training_checkpoint', 'resume', 'continue_history', 'CHECKPOINT_PATTERNS',
           'PARTIAL_FILES', 'checkpoint_files', 'load_model_weights', 'LATEST', 'run_checkpoints', 'progress',
           'latest_checkpoint']

_logger = logging.getLogger(__name__)

TEMP_SUFFIX = '.tmp'
CHECKPOINT_PATTERNS = ('*.pth.tar', '*.pth', '*.safetensors')
# timm's names for a save in progress (`save_checkpoint`, `save_recovery`; this project's earlier one too), which
# `*.pth.tar` matches
PARTIAL_FILES = ('tmp.pth.tar', 'recovery_tmp.pth.tar')
LATEST = ('latest', 'auto')  # --resume values that mean the newest checkpoint of the run folder
RUN_PATTERN = '*.pth.tar'  # the saver's files: last, model_best, checkpoint-N, timm's recovery-E-B
TIE_RANK = {'last.pth.tar': 2, 'model_best.pth.tar': 0}  # which of equally far files `latest` takes (else 1)
RECOVERY_NAME = re.compile(r'recovery-(\d+)-(\d+)\.pth\.tar')  # timm's save_recovery(epoch, batch_idx)


def temp_path(path: str) -> str:
    """The hidden temporary name `path` is written under before its rename: `DIR/.NAME.tmp`."""
    folder, name = os.path.split(path)
    return os.path.join(folder, '.' + name + TEMP_SUFFIX)


def target_of(path: str) -> str:
    """The file a temporary name (`temp_path`) is written for, the one an error names; any other path itself."""
    folder, name = os.path.split(path)
    if name.startswith('.') and name.endswith(TEMP_SUFFIX):
        return os.path.join(folder, name[1:-len(TEMP_SUFFIX)])
    return path


def plain_data(value: Any) -> Any:
    """`value` with every object that is not a builtin (dict, list, tuple, str, number, bool, None) as a string.

    What `torch.load(weights_only=True)` reads without an allowlist; used for the run's `args`.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_data(v) for v in value)
    return str(value)


def numerics(model: torch.nn.Module) -> Dict[str, Any]:
    """What sets the last bits of results besides the seeds: the device type, and on CPU the thread count and
    the vector kernels torch picked for this CPU (measured: either one changed alone gives other weights)."""
    device = next(model.parameters()).device.type
    if device != 'cpu':
        return dict(device=device)
    return dict(device=device, threads=torch.get_num_threads(), cpu_kernels=torch.backends.cpu.get_cpu_capability())


def _fsync_file(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


class _ByteCount:
    """A file that counts the bytes written to it: how large a checkpoint is, without room on any disk."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += memoryview(data).nbytes
        return len(data)

    def flush(self) -> None:
        pass


def _saved_size(state: Dict[str, Any]) -> int:
    """The bytes `torch.save(state)` writes (what a failed save reports it needs)."""
    count = _ByteCount()
    torch.save(state, count)
    return count.size


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's `CheckpointSaver` whose saves keep `last`, the best and the history loadable at every instant.

    `save(epoch, metric, extra)` stores `extra` (scheduler state, RNG states, ...) beside timm's entries.
    Constructing it removes the temporary files an interrupted save left in `checkpoint_dir`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        leftovers = glob.glob(os.path.join(glob.escape(self.checkpoint_dir), '.*' + self.extension + TEMP_SUFFIX))
        partial = [os.path.join(self.checkpoint_dir, name) for name in PARTIAL_FILES]
        for path in leftovers + [p for p in partial if os.path.isfile(p)]:
            os.remove(path)
            _logger.warning(f"removed '{path}', the temporary file of an interrupted save")

    def _named(self, name: str) -> str:
        return os.path.join(self.checkpoint_dir, name + self.extension)

    def save(self, epoch: int, metric: Optional[float], extra: Dict[str, Any]) -> Tuple[Any, Any]:
        """Save this epoch as `last`, in the history when it earns a place, as `model_best` when it is the best.

        Same ranking and eviction as timm's `save_checkpoint`; returns (best_metric, best_epoch) as timm does.
        A failed write (a full disk) is an `OutputError` naming the file, after its temporary files are removed:
        the folder holds what a kill at that instant would leave, and no partial file.
        """
        last = self._named('last')
        new = temp_path(last)
        self._write(new, epoch, metric, extra)
        worst = self.checkpoint_files[-1] if self.checkpoint_files else None
        kept = (len(self.checkpoint_files) < self.max_history or worst[1] is None
                or (metric is not None and self.cmp(metric, worst[1])))
        history_path = self._checkpoint_path(epoch)
        evicted = [f for f, _ in self.checkpoint_files[self.max_history - 1:] if f != history_path] if kept else []
        with writing(last, undo=lambda: discard(new)):
            if kept:
                self._publish(new, history_path)
            if metric is not None and (self.best_metric is None or self.cmp(metric, self.best_metric)):
                self._publish(new, self._named('model_best'))
            os.replace(new, last)  # atomic: `last` is the old file or the new one, never missing
        for path in evicted:
            os.remove(path)
        if kept:
            self.checkpoint_files = [c for c in self.checkpoint_files[:self.max_history - 1]
                                     if c[0] != history_path]
            self._track_checkpoint(history_path, epoch, metric, update_best_file=False)
        return (None, None) if self.best_metric is None else (self.best_metric, self.best_epoch)

    def _publish(self, src: str, dst: str) -> None:
        """Make `dst` a complete copy of `src` in one atomic step (hard link, else copy, to a temporary name); a
        failed copy is an `OutputError` naming `dst` and the size of `src`, with no temporary file left."""
        tmp = temp_path(dst)
        with writing(dst, needed=lambda: os.path.getsize(src), undo=lambda: discard(tmp)):
            if os.path.lexists(tmp):
                os.remove(tmp)
            if self.can_hardlink:
                try:
                    os.link(src, tmp)
                except (OSError, NotImplementedError):
                    self.can_hardlink = False
            if not self.can_hardlink:
                shutil.copy2(src, tmp)
                _fsync_file(tmp)
            os.replace(tmp, dst)

    def _write(self, path: str, epoch: int, metric: Optional[float], extra: Dict[str, Any]) -> None:
        """Write the checkpoint of `epoch` to `path` (a temporary name) and sync it to disk; a failed write is an
        `OutputError` naming the file `path` is written for and the checkpoint's size, `path` removed."""
        state: Dict[str, Any] = {
            'epoch': epoch,
            'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
            'state_dict': get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,  # timm: the saved epoch is complete, resume starts at epoch + 1
        }
        if self.args is not None:
            state['args'] = plain_data(vars(self.args))
        state['numerics'] = numerics(self.model)
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state.update(extra)
        state['saver'] = self.state_dict(epoch, metric)  # timm's format: the history before this save + pending
        with writing(target_of(path), needed=lambda: _saved_size(state), undo=lambda: discard(path)):
            with open(path, 'wb') as f:  # a file object: torch.save's failed write comes with its OSError
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())


    def save_position(self, epoch: int, batches: int, extra: Dict[str, Any]) -> str:
        """Save the run after `batches` batches of `epoch` as `recovery-{epoch}-{batches}` (timm's recovery name),
        atomically, and remove the position files before it; returns the file.

        Its 'epoch' is the last finished epoch (`epoch - 1`), so a plain timm resume redoes the epoch; `extra`
        holds the 'position' that `resume` continues from.
        """
        path = os.path.join(self.recovery_dir, f'{self.recovery_prefix}-{epoch}-{batches}{self.extension}')
        tmp = temp_path(path)
        self._write(tmp, epoch - 1, None, extra)
        os.replace(tmp, path)
        self.drop_positions(keep=path)
        return path

    def drop_positions(self, keep: Optional[str] = None) -> None:
        """Remove the position (recovery) files of the run folder but `keep`: an epoch saved after them, or a
        newer position, supersedes them."""
        pattern = os.path.join(glob.escape(self.recovery_dir), f'{self.recovery_prefix}-*{self.extension}')
        for path in glob.glob(pattern):
            if path != keep and RECOVERY_NAME.fullmatch(os.path.basename(path)):
                os.remove(path)


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


def gather_rng_states(generator: Optional[torch.Generator] = None, **extra: Any) -> List[Dict[str, Any]]:
    """Every rank's RNG states (plus this rank's `extra` entries), in rank order (a collective call when
    distributed)."""
    state = dict(capture_rng_state(generator), **extra)
    if not process_group_active():
        return [state]
    states: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def load_training_checkpoint(path: str, flag: str = '--resume', mmap: bool = False) -> Dict[str, Any]:
    """A training checkpoint written by this package or timm; any unreadable file is a ConfigError naming `flag`.

    `mmap=True`: its tensors mapped, not read (`models.read_checkpoint`), for a look at how far a run got."""
    try:
        checkpoint = read_checkpoint(path, mmap=mmap)
    except FileNotFoundError:
        raise ConfigError(f"{flag} '{path}': no such file") from None
    except CheckpointError as e:
        raise ConfigError(f'{flag}: {e}') from None
    state_dict = checkpoint.get('state_dict') if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        keys = ', '.join(repr(k) for k in list(checkpoint)[:5]) if isinstance(checkpoint, Mapping) \
            else f'a {type(checkpoint).__name__}'
        raise ConfigError(f"{flag}: checkpoint '{path}' is not a training checkpoint (no 'state_dict' of tensors; "
                          f"it holds {keys or 'nothing'})")
    if not isinstance(checkpoint.get('epoch', 0), int):
        raise ConfigError(f"{flag}: checkpoint '{path}' has no integer 'epoch' ({checkpoint['epoch']!r})")
    return checkpoint


def _inexact_reasons(checkpoint: Dict[str, Any], model: torch.nn.Module, world_size: int) -> List[str]:
    """Why a run resumed from `checkpoint` cannot continue bit for bit like the uninterrupted run (the loader's
    worker count is not a reason: `sampling.resumable_loader` draws nothing from it)."""
    states = checkpoint.get('rng_states')
    reasons = []
    if not isinstance(states, list):
        reasons.append('the checkpoint holds no RNG states, so random streams are reseeded')
    elif len(states) != world_size:
        reasons.append(f'it holds the RNG states of {len(states)} processes, this run has {world_size}, so '
                       f'random streams are reseeded')
    saved, now = checkpoint.get('numerics'), numerics(model)
    saved = saved if isinstance(saved, Mapping) else {}
    for key, what in (('device', 'device'), ('threads', 'CPU threads'), ('cpu_kernels', 'CPU kernels')):
        if key in saved and key in now and saved[key] != now[key]:
            reasons.append(f'{what} {now[key]}, the checkpoint was written with {saved[key]}')
    return reasons


def _epochs_done(checkpoint: Dict[str, Any]) -> int:
    """The epochs a training checkpoint finished, where its resume starts."""
    # timm: 'epoch' is the last finished epoch in version 2 files, the next one before; none: start at 0
    return checkpoint['epoch'] + (1 if checkpoint.get('version', 1) > 1 else 0) if 'epoch' in checkpoint else 0


def resume(path: str, model: torch.nn.Module, *, optimizer=None, scheduler=None, loss_scaler=None,
           model_ema=None, rank: int = 0, world_size: int = 1) -> Dict[str, Any]:
    """Load a training checkpoint into the run's objects; return where and how to continue.

    A resume that cannot continue bit for bit like the uninterrupted run (other process count,
    thread count, CPU kernels, or no saved RNG states) is logged as a warning that says why.
    Pass `optimizer=None` to keep a fresh optimiser (--no-resume-opt). The RNG states are applied later, by
    the caller, once everything that draws random numbers while being built exists. Returns
    dict(start_epoch, start, rng_state, saver_state): start is None, or for a position file (`save_position`)
    dict(batch, totals), the batches of the start epoch done and this rank's running loss totals; rng_state is this
    rank's saved state (None when the checkpoint has none for this world size), saver_state the checkpoint history
    for `continue_history`.
    """
    checkpoint = load_training_checkpoint(path)
    parts = [('--model', lambda: unwrap_model(model).load_state_dict(checkpoint['state_dict']))]
    if model_ema is not None and 'state_dict_ema' in checkpoint:
        parts.append(('EMA (--model-ema)',
                      lambda: unwrap_model(model_ema).load_state_dict(checkpoint['state_dict_ema'])))
    if optimizer is not None and 'optimizer' in checkpoint:
        parts.append(('optimizer (--opt)', lambda: optimizer.load_state_dict(checkpoint['optimizer'])))
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        parts.append(('loss scaler', lambda: loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])))
    if scheduler is not None and 'scheduler' in checkpoint:
        parts.append(('scheduler (--sched)', lambda: scheduler.load_state_dict(checkpoint['scheduler'])))
    for part, load in parts:
        try:
            load()
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            detail = ' '.join(str(e).split())[:300] or type(e).__name__
            raise ConfigError(f"--resume: checkpoint '{path}' does not fit this run's {part}: {detail}") from None
    start_epoch, first_batch = progress(checkpoint, path)
    states = checkpoint.get('rng_states')
    rng_state = states[rank] if isinstance(states, list) and len(states) == world_size else None
    reasons = _inexact_reasons(checkpoint, model, world_size)
    if reasons:
        _logger.warning(f"resuming '{path}' will not continue bit for bit like an uninterrupted run: "
                        + '; '.join(reasons))
    start = None
    if first_batch:
        totals = rng_state.get('totals') if rng_state is not None else None
        start = dict(batch=first_batch, totals=totals if totals is not None else [0.0, 0.0])
    where = f'epoch {start_epoch}' + (f' after batch {first_batch}' if first_batch else '')
    _logger.info(f"resumed '{path}' (epoch {checkpoint.get('epoch')}), starting at {where}")
    return dict(start_epoch=start_epoch, start=start, rng_state=rng_state, saver_state=checkpoint.get('saver'))


def continue_history(saver: AtomicCheckpointSaver, resume_path: str, saver_state: Optional[Dict[str, Any]]) -> None:
    """Keep ranking and evicting checkpoints as before when the resumed run writes into the same folder.

    The history is trimmed to `max_history` (a kill between a save's rename and its delete leaves one file too
    many), and a `model_best` on disk that beats the recorded best (saved by a run killed before its `last`
    was renamed, or a later epoch than the resumed one) stays the best.
    """
    same_dir = os.path.abspath(os.path.dirname(resume_path)) == os.path.abspath(saver.checkpoint_dir)
    if saver_state is None or not same_dir:
        return
    saver.load_state_dict(saver_state)
    saver._cleanup_checkpoints(0)
    best_path = os.path.join(saver.checkpoint_dir, 'model_best' + saver.extension)
    try:
        best = read_checkpoint(best_path) if os.path.isfile(best_path) else {}
    except CheckpointError as e:
        _logger.warning(f'{e}; it is replaced at the next best epoch')
        return
    metric = best.get('metric') if isinstance(best, Mapping) else None
    if isinstance(metric, (int, float)) and (saver.best_metric is None or saver.cmp(metric, saver.best_metric)):
        saver.best_metric, saver.best_epoch = metric, best.get('epoch')


def progress(checkpoint: Dict[str, Any], path: str) -> Tuple[int, int]:
    """How far the run of a training checkpoint got: (epochs finished, batches of the next epoch done).

    An epoch checkpoint is (epoch + 1, 0); a position file (`save_position`) says where it stands; timm's own
    recovery file `recovery-E-B` (saved after batch B of epoch E, whose 'epoch' is E) is (E, B + 1).
    """
    position = checkpoint.get('position')
    if isinstance(position, Mapping):
        return int(position['epoch']), int(position['batch'])
    recovery = RECOVERY_NAME.fullmatch(os.path.basename(path))
    if recovery:
        return int(recovery.group(1)), int(recovery.group(2)) + 1
    return _epochs_done(checkpoint), 0


def _folder_files(folder: str, patterns: Tuple[str, ...]) -> List[str]:
    """The files of `folder` matching `patterns`, sorted, without `PARTIAL_FILES` (hidden temporary files never
    match)."""
    return sorted({f for pattern in patterns for f in glob.glob(os.path.join(glob.escape(folder), pattern))
                   if os.path.basename(f) not in PARTIAL_FILES})


def run_checkpoints(folder: str) -> List[str]:
    """The checkpoint files a run left in its folder (none when the folder does not exist)."""
    return _folder_files(folder, (RUN_PATTERN,))


def latest_checkpoint(folder: str) -> Optional[Tuple[str, Tuple[int, int]]]:
    """What `--resume latest` continues: (path, `progress`) of the run folder's checkpoint that got furthest and
    loads (the file's content decides, not its time), among equals `last` first and `model_best` after the history
    files; None when the folder holds no checkpoint. Each file that does not load is a warning naming it; a folder
    of only such files is a ConfigError, so a run never restarts from zero over them.
    """
    found = []
    files = run_checkpoints(folder)
    for path in files:
        try:
            checkpoint = load_training_checkpoint(path, '--resume latest', mmap=True)
        except ConfigError as e:
            _logger.warning(f'{e}; skipped, the newest checkpoint that loads is used')
            continue
        found.append((progress(checkpoint, path), TIE_RANK.get(os.path.basename(path), 1), path))
    if files and not found:
        raise ConfigError(f"--resume latest: none of the {len(files)} checkpoints in '{folder}' loads (see the "
                          f"warnings): move them away, or give another --experiment to start afresh")
    if not found:
        return None
    done, _, path = max(found)
    return path, done


def checkpoint_files(path: str) -> List[str]:
    """--checkpoint `path` itself, or every checkpoint file in the folder `path` (sorted; `PARTIAL_FILES` and
    hidden temporary files left out)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise ConfigError(f"--checkpoint '{path}': no such file or folder")
        return [path]
    files = _folder_files(path, CHECKPOINT_PATTERNS)
    if not files:
        raise ConfigError(f"--checkpoint '{path}': the folder holds no {' / '.join(CHECKPOINT_PATTERNS)} files")
    return files


def load_model_weights(model: torch.nn.Module, path: str, flag: str, use_ema: bool = False) -> None:
    """Fill `model` from `path` (`models.load_checkpoint_weights`); anything that does not fit is a ConfigError
    naming `flag` and the file (and --use-ema when the EMA weights are what is missing)."""
    try:
        load_checkpoint_weights(model, path, use_ema=use_ema)
    except FileNotFoundError:
        raise ConfigError(f"{flag} '{path}': no such file") from None
    except ValueError as e:
        raise ConfigError(f'{flag}: {e}' + (' (--use-ema)' if use_ema and 'EMA' in str(e) else '')) from None


def main(argv: List[str]) -> int:
    """`python -m tokenmix_train.checkpoint FOLDER`: print the epochs the run in FOLDER finished (0: none)."""
    if len(argv) != 1:
        print('usage: python -m tokenmix_train.checkpoint RUN_FOLDER', file=sys.stderr)
        return 2
    try:
        latest = latest_checkpoint(argv[0])
    except ConfigError as e:
        print(f'tokenmix_train.checkpoint: error: {e}', file=sys.stderr)
        return 2
    print(latest[1][0] if latest else 0)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
