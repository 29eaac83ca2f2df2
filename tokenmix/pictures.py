"""Writing the PNG grids of tools/show_mix.py and tools/show_cam.py."""
import os
import sys
from typing import Callable, Optional

import torch
from PIL import Image

__all__ = ['render_png']


def render_png(render: Callable[[], torch.Tensor], out: str, prog: str) -> Optional[torch.Tensor]:
    """Render a 3 x H x W grid with values in [0, 1] and write it to `out` as a PNG (folders made as needed).

    A ValueError while rendering (bad input the tool found) is printed as one `prog: error:` line on stderr and
    gives None, so nothing is written; the caller then exits with code 2.
    """
    try:
        grid = render()
    except ValueError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return None
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(out)
    return grid
