"""One run per folder: `RunLock` holds `run.lock` in the run folder while a run writes there.

The lock is `fcntl.flock` on an open descriptor of `run.lock`, which also holds the owner's pid and host for the
message a second run gets. The kernel releases a flock when its process dies however it dies (kill -9 included),
so the file a killed run leaves behind never blocks the resume: only a live holder does. Taken by the primary
rank only, before it writes anything into the folder.
"""
import errno
import fcntl
import logging
import os
import socket
from typing import Optional

from .errors import ConfigError

__all__ = ['LOCK_FILE', 'RunLock', 'check_free']

_logger = logging.getLogger(__name__)

LOCK_FILE = 'run.lock'
_HELD = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)  # what flock(LOCK_NB) raises when another holds it


def _in_use(folder: str, path: str, holder: str) -> ConfigError:
    return ConfigError(f"'{folder}' is in use by another run ({holder or 'unknown pid'}, {path}): wait for it to end, "
                       f"or give another --output/--experiment")


def check_free(folder: str) -> None:
    """A ConfigError when a live run holds `folder` (read-only: every rank can ask before anything is written)."""
    path = os.path.join(folder, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _HELD:
            raise _in_use(folder, path, os.read(fd, 200).decode(errors='replace').strip()) from None
    finally:
        os.close(fd)


class RunLock:
    """The run folder `folder` for this process alone, until `release()` (or the process ends).

    A folder held by a live run is a ConfigError naming the folder and the holder's pid and host. On a file
    system without locks (flock unsupported) the run goes on with a warning that a second run is not detected.
    """

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd: Optional[int] = None
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 200).decode(errors='replace').strip()
                os.close(fd)
                if e.errno in _HELD:
                    raise _in_use(folder, self.path, holder) from None
                _logger.warning(f"'{folder}': the file system refuses locks ({e.strerror}), so a second run into "
                                f"this folder is not detected")
                return
            if self._still_named(fd):
                self.fd = fd
            else:  # the holder removed the file between our open and our lock: lock the new one
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode())

    def _still_named(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove `run.lock` and let go of it (the file goes first, so no one locks a removed file)."""
        if self.fd is None:
            return
        os.remove(self.path)
        os.close(self.fd)
        self.fd = None
