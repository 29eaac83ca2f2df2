"""Process group and device set-up (timm's `init_distributed_device`), and the DDP wrapper for the student."""
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from timm.utils import init_distributed_device, is_primary

__all__ = ['init_device', 'wrap_ddp', 'is_primary']


def init_device(args: Any) -> torch.device:
    """Join the process group when launched by torchrun / SLURM and pick this rank's device.

    Sets args.distributed, world_size, rank, local_rank and device as timm does; --device defaults to cuda
    when available, else cpu (gloo backend).
    """
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return init_distributed_device(args)


def wrap_ddp(model: torch.nn.Module, device: torch.device, sync_bn: bool = False) -> DistributedDataParallel:
    """DDP around the student only (the teacher stays outside: frozen, never synchronised).

    With `sync_bn`, BatchNorm layers become SyncBatchNorm first (timm's --sync-bn).
    """
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
