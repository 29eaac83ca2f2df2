"""A progress line (done/total batches, images/s) for long loops over a loader."""
import logging
import time
from typing import Iterable, Iterator

_logger = logging.getLogger(__name__)


class Progress:
    """Iterates `loader` and logs every `interval` batches: done/total and images/s of this process x `world`."""

    def __init__(self, loader: Iterable, label: str, interval: int, world: int = 1) -> None:
        self.loader, self.label, self.interval, self.world = loader, label, interval, world

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        start, images = time.perf_counter(), 0
        total = len(self.loader)
        for step, batch in enumerate(self.loader, 1):
            images += len(batch[0])
            yield batch
            if step % self.interval == 0 or step == total:
                rate = images * self.world / max(time.perf_counter() - start, 1e-9)
                _logger.info(f'{self.label}: {step}/{total} batches, {rate:.1f} images/s')
