"""Run outputs besides checkpoints: log file, summary.csv and TensorBoard (scalars and mixed-image grids).

Only the primary rank writes; `RunLogger(None)` is a logger that writes nothing, used by the other ranks.
"""
import logging
import os
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.utils import setup_default_logging, update_summary
from torchvision.utils import make_grid

try:
    from torch.utils.tensorboard import SummaryWriter
    has_tensorboard = True
except ImportError:
    has_tensorboard = False

__all__ = ['setup_logging', 'add_log_file', 'RunLogger', 'mixed_image_grid']

_logger = logging.getLogger(__name__)

LOG_FILE = 'log.txt'
SUMMARY_FILE = 'summary.csv'


def setup_logging(primary: bool) -> None:
    """timm's console logging (INFO on the primary rank, warnings and errors only on the others), unless the
    process has configured logging already (a caller, pytest)."""
    level = logging.INFO if primary else logging.WARNING
    if logging.root.handlers:
        logging.root.setLevel(level)
    else:
        setup_default_logging(default_level=level)


def add_log_file(output_dir: str) -> logging.Handler:
    """Also log to `output_dir`/log.txt (appending, so a resumed run continues the same file).

    Returns the handler, for `logging.root.removeHandler` when the run ends.
    """
    handler = logging.FileHandler(os.path.join(output_dir, LOG_FILE))
    handler.setFormatter(logging.Formatter('%(asctime)s - %(name)20s: [%(levelname)8s] - %(message)s'))
    logging.root.addHandler(handler)
    return handler


def mixed_image_grid(images: torch.Tensor, mask: Optional[torch.Tensor], mean: Sequence[float],
                     std: Sequence[float], max_images: int = 16) -> torch.Tensor:
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


class RunLogger:
    """Writes summary.csv and TensorBoard events into `output_dir`; does nothing when it is None."""

    def __init__(self, output_dir: Optional[str], mean: Sequence[float] = (0.5,) * 3,
                 std: Sequence[float] = (0.5,) * 3) -> None:
        self.output_dir = output_dir
        self.mean, self.std = tuple(mean), tuple(std)
        self.writer = None
        if output_dir and has_tensorboard:
            self.writer = SummaryWriter(log_dir=os.path.join(output_dir, 'tensorboard'))
        elif output_dir:
            _logger.warning('tensorboard is not installed: no TensorBoard events are written')

    @property
    def active(self) -> bool:
        return self.output_dir is not None

    def scalars(self, step: int, values: Dict[str, float], prefix: str) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f'{prefix}/{name}', value, step)

    def mixed_images(self, epoch: int, images: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Once per epoch: a grid of mixed training images with their masks."""
        if self.writer is not None:
            self.writer.add_image('train/mixed_images', mixed_image_grid(images, mask, self.mean, self.std), epoch)

    def epoch_summary(self, epoch: int, train: Dict[str, float], evaluation: Dict[str, float], lr: float) -> None:
        """One summary.csv row (timm's columns: epoch, train_*, eval_*, lr) and the epoch's scalars."""
        if not self.active:
            return
        update_summary(epoch, train, evaluation, os.path.join(self.output_dir, SUMMARY_FILE), lr=lr)
        self.scalars(epoch, evaluation, 'eval')
        self.scalars(epoch, dict(train, lr=lr), 'epoch')
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
