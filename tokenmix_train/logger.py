"""Run outputs besides checkpoints: log file, summary.csv, TensorBoard (scalars and mixed-image grids), wandb.

Only the primary rank writes; `RunLogger(None)` is a logger that writes nothing, used by the other ranks.
wandb is optional (timm's --log-wandb): `import_wandb()` names the missing package before anything is written.
"""
import importlib
import logging
import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.utils import setup_default_logging, update_summary
from torchvision.utils import make_grid, save_image

from .errors import ConfigError

try:
    from torch.utils.tensorboard import SummaryWriter
    has_tensorboard = True
except ImportError:
    has_tensorboard = False

__all__ = ['setup_logging', 'add_log_file', 'RunLogger', 'mixed_image_grid', 'import_wandb', 'start_wandb']

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


class RunLogger:
    """Writes summary.csv and TensorBoard events into `output_dir` (and rows to a wandb run when given); does
    nothing when `output_dir` is None."""

    def __init__(self, output_dir: Optional[str], mean: Sequence[float] = (0.5,) * 3,
                 std: Sequence[float] = (0.5,) * 3, wandb_run: Any = None) -> None:
        self.output_dir = output_dir
        self.mean, self.std = tuple(mean), tuple(std)
        self.wandb_run = wandb_run
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

    def save_batch(self, images: torch.Tensor, batch_idx: int) -> None:
        """timm's --save-images: the (mixed) input batch as train-batch-N.jpg."""
        if self.active:
            save_image(images.detach().float(), os.path.join(self.output_dir, f'train-batch-{batch_idx}.jpg'),
                       padding=0, normalize=True)

    def epoch_summary(self, epoch: int, train: Dict[str, float], evaluation: Dict[str, float], lr: float) -> None:
        """One summary.csv row (timm's columns: epoch, train_*, eval_*, lr) and the epoch's scalars."""
        if not self.active:
            return
        update_summary(epoch, train, evaluation, os.path.join(self.output_dir, SUMMARY_FILE), lr=lr,
                       log_wandb=self.wandb_run is not None)
        self.scalars(epoch, evaluation, 'eval')
        self.scalars(epoch, dict(train, lr=lr), 'epoch')
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
