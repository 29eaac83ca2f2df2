"""Host-side random numbers driven by a torch generator, so one torch seed reproduces every draw."""
from typing import Optional

import numpy as np
import torch


def host_rng(generator: Optional[torch.Generator]) -> np.random.Generator:
    """A NumPy generator seeded by one draw from `generator` (torch's default generator when None)."""
    where = generator.device if generator is not None else 'cpu'
    seed = int(torch.randint(0, 2 ** 63 - 1, (1,), generator=generator, device=where).item())
    return np.random.default_rng(seed)
