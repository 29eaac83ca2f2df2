"""Run outputs besides checkpoints: log file, progress lines, summary.csv, TensorBoard (scalars and mixed-image
grids), wandb.

Only the primary rank writes; `RunLogger(None)` is a logger that writes nothing, used by the other ranks. Every
write into the run folder is whole or not at all, and a failed one (a full disk) is an `OutputError` naming the
file (`run_folder.writing`): the log file, summary.csv and the TensorBoard event file are written in the calling
thread for that (torch's SummaryWriter writes from a thread of its own, whose failure prints a traceback).
wandb is optional (timm's --log-wandb): `import_wandb()` names the missing package before anything is written.
`StepMeter` times the steps of a loop (train and validate alike) and writes its progress lines.
"""
import csv
import datetime
import glob
import importlib
import io
import itertools
import logging
import math
import os
import socket
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.utils import AverageMeter, setup_default_logging, update_summary
from torchvision.utils import make_grid, save_image

from .errors import ConfigError, OutputError
from .run_folder import append_whole, discard, replace_file, writing

try:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter
    from torch.utils.tensorboard.summary import image, scalar
    has_tensorboard = True
except ImportError:
    has_tensorboard = False

__all__ = ['setup_logging', 'LogFile', 'add_log_file', 'StepMeter', 'EventFile', 'RunLogger', 'mixed_image_grid',
           'import_wandb', 'start_wandb', 'drop_summary_rows', 'drop_tensorboard_events']

_logger = logging.getLogger(__name__)

LOG_FILE = 'log.txt'
SUMMARY_FILE = 'summary.csv'
GRID_IMAGES = 16  # images in a TensorBoard grid of mixed images
EPOCH_TAGS = ('eval/', 'epoch/', 'train/mixed_images')  # TensorBoard tags whose step is the epoch, not the update
_EVENT_FILE_IDS = itertools.count()  # tells apart the event files one process opens within a second


def setup_logging(primary: bool) -> None:
    """timm's console logging (INFO on the primary rank, warnings and errors only on the others), unless the
    process has configured logging already (a caller, pytest)."""
    level = logging.INFO if primary else logging.WARNING
    if logging.root.handlers:
        logging.root.setLevel(level)
    else:
        setup_default_logging(default_level=level)


class LogFile(logging.Handler):
    """A run's log file: each record appended whole (`append_whole`) in the thread that logs it.

    The first failed write (a full disk) raises its `OutputError` from that logging call, which stops the run with
    that one line; the records after it are not written (the console still shows them).
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path, self.failed = path, False
        with writing(path):
            self.fd: Optional[int] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed or self.fd is None:
            return
        try:
            line = (self.format(record) + '\n').encode(errors='backslashreplace')
        except Exception:  # a record that does not format is reported as logging does, never stops the run
            self.handleError(record)
            return
        try:
            append_whole(self.fd, self.path, line)
        except OutputError:
            self.failed = True
            raise

    def close(self) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
        super().close()


def add_log_file(output_dir: str) -> LogFile:
    """Also log to `output_dir`/log.txt (appending, so a resumed run continues the same file).

    Returns the handler, for `logging.root.removeHandler` when the run ends.
    """
    handler = LogFile(os.path.join(output_dir, LOG_FILE))
    handler.setFormatter(logging.Formatter('%(asctime)s - %(name)20s: [%(levelname)8s] - %(message)s'))
    logging.root.addHandler(handler)
    return handler


class StepMeter:
    """Iterates `loader` (batches whose first item is the images), timing each step, and logs progress lines.

    Data time is the wait for a batch (worker start-up included); step time runs from the end of the previous
    step to the caller's request for the next batch (data plus compute). A line follows each step counted
    `log_interval` and the loop's last: `header [done/total]`, the metrics given to `update` in that step,
    images/s since the previous line (this process's times `world_size`), data and step time (this step's, the
    loop's average) and the ETA. Steps count `batches_per_step` batches (updates under gradient accumulation)
    after `steps_before`, so the cadence runs on over epochs as timm's does (a loop resumed in the middle of an
    epoch starts at batch `first_batch`, `loader` holding the rest); `step` is that count and `due` tells
    the caller during a step that it logs, so metrics that need a collective or a host sync are made only then.
    `on_log(step, values)` gets each line's metrics and img_per_sec; `clock` is injectable for tests.
    """

    def __init__(self, loader: Iterable, header: str, log_interval: int, *, world_size: int = 1,
                 steps_before: int = 0, batches_per_step: int = 1, first_batch: int = 0,
                 on_log: Optional[Callable[[int, Dict[str, float]], None]] = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.loader, self.header, self.log_interval, self.world_size = loader, header, log_interval, world_size
        self.steps_before, self.batches_per_step, self.first_batch = steps_before, batches_per_step, first_batch
        self.on_log, self.clock = on_log, clock
        self.data_time, self.step_time = AverageMeter(), AverageMeter()
        self.index, self.step, self.due = -1, steps_before, False
        self.metrics: Dict[str, float] = {}

    def update(self, **metrics: float) -> None:
        """Metrics of the current step for its progress line (call when `due`)."""
        self.metrics.update(metrics)

    @property
    def elapsed(self) -> float:
        """Seconds from the start of the loop to the end of the last finished step."""
        return self.step_time.sum

    def __iter__(self) -> Iterator:
        total = self.first_batch + len(self.loader)
        window_images, window_time = 0, 0.0
        end = self.clock()
        for index, batch in enumerate(self.loader, self.first_batch):
            self.data_time.update(self.clock() - end)
            self.index, self.step = index, self.steps_before + math.ceil((index + 1) / self.batches_per_step)
            step_ends = (index + 1) % self.batches_per_step == 0
            self.due = index == total - 1 or (step_ends and self.step % self.log_interval == 0)
            window_images += len(batch[0]) * self.world_size
            yield batch
            now = self.clock()
            self.step_time.update(now - end)
            window_time += now - end
            end = now
            if self.due:
                self._log(total, window_images / max(window_time, 1e-9))
                window_images, window_time = 0, 0.0

    def _log(self, total: int, rate: float) -> None:
        eta = datetime.timedelta(seconds=round((total - self.index - 1) * self.step_time.avg))
        metrics = ''.join(f' {name} {value:.4g}' for name, value in self.metrics.items())
        data, step = self.data_time, self.step_time
        _logger.info(f'{self.header} [{self.index + 1:>{len(str(total))}d}/{total}]{metrics} {rate:.1f} img/s '
                     f'data {data.val:.3f} ({data.avg:.3f}) s step {step.val:.3f} ({step.avg:.3f}) s eta {eta}')
        if self.on_log is not None:
            self.on_log(self.step, dict(self.metrics, img_per_sec=rate))
        self.metrics = {}


def mixed_image_grid(images: torch.Tensor, mask: Optional[torch.Tensor], mean: Sequence[float],
                     std: Sequence[float], max_images: int = GRID_IMAGES) -> torch.Tensor:
    """A 3 x H x W grid: the (de-normalised) mixed images, and under them their token masks (white = pasted)."""
    images = images[:max_images].detach().float().cpu()
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    rows = [(images * std_t + mean_t).clamp(0, 1)]
    if mask is not None:
        masks = F.interpolate(mask[:max_images].detach().float().cpu().unsqueeze(1), size=images.shape[-2:],
                              mode='nearest')
        rows.append(masks.expand(-1, images.shape[1], -1, -1))
    return make_grid(torch.cat(rows), nrow=images.shape[0], padding=2, pad_value=0.5)


def import_wandb() -> Any:
    """The wandb module, or a ConfigError naming --log-wandb when it is not installed."""
    try:
        return importlib.import_module('wandb')
    except ImportError:
        raise ConfigError('--log-wandb: wandb is not installed (pip install wandb)') from None


def start_wandb(args: Any, output_dir: str, name: str) -> Any:
    """timm's wandb run: named like the output folder, the flags as its config, --wandb-project/-tags/-resume-id.

    Its files go under `output_dir` (timm: the working directory); WANDB_MODE=offline runs without a network.
    """
    wandb = import_wandb()
    return wandb.init(project=args.wandb_project, name=name, config=vars(args), tags=args.wandb_tags,
                      resume='must' if args.wandb_resume_id else None, id=args.wandb_resume_id or None,
                      dir=output_dir)


def drop_summary_rows(output_dir: str, start_epoch: int) -> None:
    """Remove the summary.csv rows of epochs >= `start_epoch`, which a run starting there writes again, so no epoch
    is listed twice. timm's `trim_summary` rewrites the file in place; here the new file replaces it atomically."""
    path = os.path.join(output_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    body = [row for row in rows[1:] if row and int(float(row[0])) < start_epoch]
    if len(body) == len(rows) - 1:
        return
    kept = rows[:1] + body if body else []  # none kept: the next row writes its own header
    text = io.StringIO()
    csv.writer(text).writerows(kept)
    replace_file(path, text.getvalue().encode())
    _logger.info(f'{path}: dropped the rows of epochs {start_epoch} and later, which this run writes again')


def _runs_again(record: bytes, start_epoch: int, start_update: int) -> bool:
    """Whether a TensorBoard event is of an epoch >= `start_epoch` (or an update after `start_update`)."""
    event = Event.FromString(record)
    tags = [value.tag for value in event.summary.value]
    if not tags:
        return False
    return event.step >= start_epoch if tags[0].startswith(EPOCH_TAGS) else event.step > start_update


def drop_tensorboard_events(log_dir: str, start_epoch: int, start_update: int) -> None:
    """Remove the TensorBoard events of the epochs from `start_epoch` on (per-update scalars: the updates after
    `start_update`) from the event files in `log_dir`, each file replaced atomically, so a resumed run that writes
    them again lists each step once (TensorBoard itself shows both)."""
    for path in sorted(glob.glob(os.path.join(glob.escape(log_dir), '*tfevents*'))):
        records = list(RawEventFileLoader(path).Load())
        kept = [record for record in records if not _runs_again(record, start_epoch, start_update)]
        if len(kept) == len(records):
            continue
        data = io.BytesIO()
        for record in kept:
            RecordWriter(data).write(record)
        replace_file(path, data.getvalue())


class EventFile:
    """A TensorBoard event file in `log_dir` (SummaryWriter's name, which TensorBoard lists), written in the caller's
    thread: `add_scalar` and `add_image` collect events, `flush` appends them whole (`append_whole`), so a failed
    write is an `OutputError` from that call and leaves no partial record."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.path = os.path.join(log_dir, f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
                                          f'{os.getpid()}.{next(_EVENT_FILE_IDS)}')
        with writing(self.path):
            os.makedirs(log_dir, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pending = io.BytesIO()
        self._add(Event(file_version='brain.Event:2'))
        self.flush()

    def _add(self, event: 'Event') -> None:
        event.wall_time = time.time()
        RecordWriter(self._pending).write(event.SerializeToString())

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._add(Event(step=step, summary=scalar(tag, value)))

    def add_image(self, tag: str, picture: torch.Tensor, step: int) -> None:
        """`picture`: C x H x W, values in [0, 1]."""
        self._add(Event(step=step, summary=image(tag, picture, dataformats='CHW')))

    def flush(self) -> None:
        """Append the events added since the last flush (dropped when the write fails: the run stops)."""
        data, self._pending = self._pending.getvalue(), io.BytesIO()
        if data:
            append_whole(self.fd, self.path, data)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self.fd)


class RunLogger:
    """Writes summary.csv, TensorBoard events and (timm's --save-images) training batches into `output_dir` (and
    rows to a wandb run when given); does nothing when `output_dir` is None."""

    def __init__(self, output_dir: Optional[str], mean: Sequence[float] = (0.5,) * 3,
                 std: Sequence[float] = (0.5,) * 3, wandb_run: Any = None, save_images: bool = False) -> None:
        self.output_dir = output_dir
        self.mean, self.std = tuple(mean), tuple(std)
        self.wandb_run = wandb_run
        self.save_images = save_images
        self._grid_epoch: Optional[int] = None  # the last epoch whose grid is written
        self._unmasked: Optional[Tuple[int, torch.Tensor]] = None  # (epoch, its first images) for a grid without masks
        self.writer = None
        if output_dir and has_tensorboard:
            self.writer = EventFile(os.path.join(output_dir, 'tensorboard'))
        elif output_dir:
            _logger.warning('tensorboard is not installed: no TensorBoard events are written')

    def drop_rerun(self, start_epoch: int, start_update: int) -> None:
        """Forget what earlier runs logged for the epochs from `start_epoch` on (summary.csv rows, TensorBoard
        events; per-update ones after update `start_update`), which this run logs again."""
        if not self.active:
            return
        drop_summary_rows(self.output_dir, start_epoch)
        if self.writer is not None:
            drop_tensorboard_events(self.writer.log_dir, start_epoch, start_update)

    @property
    def active(self) -> bool:
        return self.output_dir is not None

    def scalars(self, step: int, values: Dict[str, float], prefix: str) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f'{prefix}/{name}', value, step)
            self.writer.flush()

    def train_batch(self, epoch: int, batch_idx: int, images: torch.Tensor, mask: Optional[torch.Tensor], *,
                    log_step: bool, last_step: bool) -> None:
        """The (mixed) input batch of every training step, with its token mask (None: not token-mixed).

        Once per epoch a TensorBoard grid of mixed images: the first batch with a mask, with its masks under it,
        else (written at the epoch's last step) the epoch's first batch. With --save-images, at each log step the
        batch as train-batch-N.jpg (timm's file).
        """
        if self.save_images and log_step and self.active:
            path = os.path.join(self.output_dir, f'train-batch-{batch_idx}.jpg')
            with writing(path, undo=lambda: discard(path)):
                save_image(images.detach().float(), path, padding=0, normalize=True)
        if self.writer is None or self._grid_epoch == epoch:
            return
        if mask is None and (self._unmasked is None or self._unmasked[0] != epoch):
            self._unmasked = (epoch, images[:GRID_IMAGES].detach().cpu())
        if mask is not None or last_step:
            shown = images if mask is not None else self._unmasked[1]
            self.writer.add_image('train/mixed_images', mixed_image_grid(shown, mask, self.mean, self.std), epoch)
            self.writer.flush()
            self._grid_epoch = epoch

    def epoch_summary(self, epoch: int, train: Dict[str, float], evaluation: Dict[str, float], lr: float) -> None:
        """One summary.csv row (timm's columns: epoch, train_*, eval_*, lr; whole or not at all) and the epoch's
        scalars."""
        if not self.active:
            return
        path = os.path.join(self.output_dir, SUMMARY_FILE)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        with writing(path, undo=lambda: os.truncate(path, size) if os.path.exists(path) else None):
            update_summary(epoch, train, evaluation, path, lr=lr, log_wandb=self.wandb_run is not None)
        self.scalars(epoch, evaluation, 'eval')
        self.scalars(epoch, dict(train, lr=lr), 'epoch')

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
