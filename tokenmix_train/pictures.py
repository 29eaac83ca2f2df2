"""Writing the figures of tools/show_mix.py and tools/show_cam.py (matplotlib, drawn off screen)."""
import os
import sys
from typing import Callable, Optional

import matplotlib

matplotlib.use('Agg')
from matplotlib.figure import Figure  # noqa: E402

__all__ = ['render_png']


def render_png(render: Callable[[], Figure], out: str, prog: str, dpi: int = 100) -> Optional[Figure]:
    """Build a figure and write it to `out` as a PNG (folders made as needed).

    A ValueError while rendering (bad input the tool found) is printed as one `prog: error:` line on stderr and
    gives None, so nothing is written; the caller then exits with code 2.
    """
    try:
        fig = render()
    except ValueError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return None
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return fig
