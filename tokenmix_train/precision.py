"""Mixed precision: native torch AMP (default) or NVIDIA apex when asked for and installed."""
from typing import Any, Optional, Tuple

import torch
from timm.utils import ApexScaler, NativeScaler

from .errors import ConfigError

try:
    from apex import amp as apex_amp
    has_apex = True
except ImportError:
    apex_amp = None
    has_apex = False

__all__ = ['amp_dtype_of', 'setup_precision']


def amp_dtype_of(args: Any) -> Optional[torch.dtype]:
    """The native autocast dtype of --amp / --amp-dtype (train.py and validate.py alike), None without --amp."""
    if not args.amp:
        return None
    return torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16


def setup_precision(args: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> Tuple[torch.nn.Module, torch.optim.Optimizer, Optional[torch.dtype], Any]:
    """(model, optimizer, autocast dtype or None, loss scaler or None) for --amp / --amp-dtype / --apex-amp.

    Native AMP scales the loss for float16 only; bfloat16 needs no scaler. apex (O1) patches the model and
    optimiser itself, so no autocast dtype is returned for it.
    """
    if args.apex_amp:
        if not has_apex:
            raise ConfigError('--apex-amp: NVIDIA apex is not installed (see README); use --amp for native AMP')
        if device.type != 'cuda':
            raise ConfigError('--apex-amp needs a CUDA device')
        model, optimizer = apex_amp.initialize(model, optimizer, opt_level='O1')
        return model, optimizer, None, ApexScaler()
    amp_dtype = amp_dtype_of(args)
    if amp_dtype is None:
        return model, optimizer, None, None
    scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    return model, optimizer, amp_dtype, scaler
