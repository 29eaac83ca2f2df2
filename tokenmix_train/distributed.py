"""Process group and device set-up (timm's `init_distributed_device`), the DDP wrapper for the student, and
`run_cli`, which runs an entry point and tears the process group down however it ends."""
import importlib
import sys
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from timm.layers import convert_sync_batchnorm
from timm.utils import init_distributed_device, is_primary

from .errors import OUTPUT_EXIT_CODE, ConfigError, OutputError, first_output_error, user_message

__all__ = ['init_device', 'wrap_ddp', 'sync_batchnorm', 'is_primary', 'process_group_active', 'run_cli']


def process_group_active() -> bool:
    """Whether this process has joined a torch.distributed process group, so collectives reach the other ranks."""
    return dist.is_available() and dist.is_initialized()


def init_device(args: Any) -> torch.device:
    """Join the process group when launched by torchrun / SLURM and pick this rank's device.

    Sets args.distributed, world_size, rank, local_rank and device as timm does; --device defaults to cuda
    when available, else cpu (gloo backend). --device-modules are imported first (a device backend's package).
    """
    for module in getattr(args, 'device_modules', None) or ():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f'--device-modules {module}: {e}') from None
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        kind = torch.device(args.device).type
    except RuntimeError as e:
        raise ConfigError(f'--device {args.device}: {e}') from None
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'--device {args.device}: no CUDA device here (use --device cpu)')
    device = init_distributed_device(args)
    if args.distributed and getattr(args, 'sync_bn', False) and device.type != 'cuda':
        raise ConfigError(f'--sync-bn: synchronised BatchNorm runs on CUDA devices only, not on {device.type} '
                          f'(leave it out here: --dist-bn reduces the statistics at each epoch end)')
    return device


def wrap_ddp(model: torch.nn.Module, device: torch.device, broadcast_buffers: bool = True) -> DistributedDataParallel:
    """DDP around the student only (the teacher stays outside: frozen, never synchronised)."""
    return DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None,
                                   broadcast_buffers=broadcast_buffers)


def sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """timm's --sync-bn: BatchNorm layers (timm's fused BN + activation layers included, activation kept) become
    synchronised ones. timm converts before the optimizer and EMA are made, so they see the new layers."""
    return convert_sync_batchnorm(model)


def run_cli(main: Callable[[Optional[Sequence[str]]], int], prog: str, argv: Optional[Sequence[str]] = None) -> int:
    """Run an entry point's `main(argv)`: bad input is one line on stderr and exit code 2; a file of the run that
    could not be written (a full disk) is one line naming the first such file and exit code `OUTPUT_EXIT_CODE`.

    The process group is torn down however `main` ends, so a torchrun worker never exits with it still open.
    """
    try:
        return main(argv)
    except ConfigError as e:
        print(f'{prog}: error: {user_message(e)}', file=sys.stderr)
        return 2
    except OutputError as e:
        print(f'{prog}: error: {user_message(first_output_error(e))}', file=sys.stderr)
        return OUTPUT_EXIT_CODE
    finally:
        if process_group_active():
            dist.destroy_process_group()
