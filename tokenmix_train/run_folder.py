"""The run folder: one run per folder, and writes into it that a full disk cannot spoil.

`RunLock` holds `run.lock` in the run folder while a run writes there. The lock is `fcntl.flock` on an open
descriptor of `run.lock`, which also holds the owner's pid and host for the message a second run gets. The kernel
releases a flock when its process dies however it dies (kill -9 included), so the file a killed run leaves behind
never blocks the resume: only a live holder does. Taken by the primary rank only, before it writes anything into
the folder.

`writing(path)` wraps a write into the folder: when it fails (a full disk, a quota, no permission) it undoes what
the write left incomplete and raises an `OutputError` whose one line names the file, its folder, the cause,
the bytes the file needs and the free space there. `replace_file` writes a whole file atomically under it,
`append_whole` appends to a file whole or not at all.
"""
import errno
import fcntl
import logging
import os
import shutil
import socket
from contextlib import contextmanager, suppress
from typing import Callable, Iterator, Optional

from .errors import ConfigError, OutputError

__all__ = ['LOCK_FILE', 'RunLock', 'check_free', 'DISK_FULL', 'os_error_of', 'size_text', 'write_error', 'writing',
           'discard', 'replace_file', 'append_whole']

_logger = logging.getLogger(__name__)

LOCK_FILE = 'run.lock'
_HELD = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)  # what flock(LOCK_NB) raises when another holds it
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, quota exceeded: freeing space lets the run continue


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
        try:
            os.write(self.fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode())
        except OSError as e:
            # on a full disk the lock holds all the same (a second run is told 'unknown pid') and the clean-up that
            # follows may free the space; where it does not, the next write stops the run with its one line
            if e.errno not in DISK_FULL:
                raise write_error(self.path, e) from e

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


def os_error_of(error: BaseException) -> Optional[OSError]:
    """`error` when it is an OSError, else the OSError it was raised from or while handling, else None.

    torch.save reports a failed write as a RuntimeError ('unexpected pos') raised while handling the OSError.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def size_text(num_bytes: int) -> str:
    """`num_bytes` for a person: '812 bytes', '3.9 KiB', '1.3 MiB'."""
    if num_bytes < 1024:
        return f'{num_bytes} bytes'
    value, unit = num_bytes / 1024, 'KiB'
    for larger in ('MiB', 'GiB', 'TiB'):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f'{value:.1f} {unit}'


def write_error(path: str, error: OSError, needed: Optional[int] = None) -> OutputError:
    """The one line for `error`, raised writing `path`: the file, its folder, the cause, the bytes the file needs
    (when known) beside the free space there now, and what to do."""
    folder, name = os.path.split(path)
    folder = folder or '.'
    try:
        free = f'{size_text(shutil.disk_usage(folder).free)} free'
    except OSError:
        free = 'free space unknown'
    space = free if needed is None else f'needs {size_text(needed)}, {free}'
    fix = 'free space' if error.errno in DISK_FULL else 'fix that'
    return OutputError(f"cannot write '{name}' in '{folder}': {error.strerror or error} ({space}); the files "
                       f"written before are intact: {fix}, then continue with --resume latest")


@contextmanager
def writing(path: str, needed: Optional[Callable[[], int]] = None,
            undo: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Run a block that writes `path`. When it fails, `undo()` puts back what the block left incomplete (removes a
    temporary file, cuts an appended file back), and an OSError (or an error raised while handling one) becomes
    `write_error` (`needed()`: the bytes `path` needs); an `OutputError` of an inner block passes unchanged."""
    try:
        yield
    except Exception as e:
        cause = None if isinstance(e, OutputError) else os_error_of(e)
        size = needed() if cause is not None and needed is not None else None
        if undo is not None:
            undo()
        if cause is None:
            raise
        raise write_error(path, cause, size) from e


def discard(path: str) -> None:
    """Remove `path` if it is there (the undo of a failed write of a new or temporary file)."""
    with suppress(FileNotFoundError):
        os.remove(path)


def replace_file(path: str, data: bytes) -> None:
    """Write `data` as the new `path`: to a hidden temporary name (no 'tfevents' in it, so TensorBoard never reads
    it), then renamed over `path`, so a kill at any instant leaves the old file or the new one, and a failed write
    the old one and no temporary file."""
    tmp = os.path.join(os.path.dirname(path), '.' + os.path.basename(path).replace('tfevents', 'rewrite') + '.tmp')
    with writing(path, needed=lambda: len(data), undo=lambda: discard(tmp)):
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def append_whole(fd: int, path: str, data: bytes) -> None:
    """Append `data` to `path`, open as `fd` (O_APPEND), whole or not at all: a failed write (`writing`) cuts the
    file back to its length before, so no partial line or record stays in it."""
    size = os.fstat(fd).st_size
    with writing(path, needed=lambda: len(data), undo=lambda: os.ftruncate(fd, size)):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
