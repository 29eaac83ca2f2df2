"""A full disk: every write into the run folder that fails stops the run with one line naming the file, its folder
and the space it needs, exit code `OUTPUT_EXIT_CODE`, and loses nothing written before.

The runs write into a real full disk: a small tmpfs mounted for the test (root only: skipped where mount is not
permitted), filled by a file of its own. The unit tests of the writers fill it too; `tests/test_checkpoint.py` makes
`torch.save`, `os.link` and `shutil.copy2` fail without a mount.
"""
import errno
import hashlib
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tokenmix_train.engine as engine
from tokenmix_train.distributed import run_cli
from tokenmix_train.errors import OUTPUT_EXIT_CODE, OutputError
from tokenmix_train.logger import LogFile, RunLogger
from tokenmix_train.run_folder import replace_file, size_text, write_error

from conftest import ROOT

PAGE = 4096  # tmpfs hands out whole pages
SIZE_UNITS = {'bytes': 1, 'KiB': 2 ** 10, 'MiB': 2 ** 20, 'GiB': 2 ** 30}


def _mount_tmpfs(folder, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which('mount') is None:
        pytest.skip('no mount command here')
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here (root only): {done.stderr.strip()}')


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/out, the folder `train_argv` writes its runs into."""
    folder = tmp_path / 'out'
    _mount_tmpfs(folder, '16m')
    yield folder
    subprocess.run(['umount', '-l', str(folder)], check=True)


@pytest.fixture(autouse=True)
def no_log_file_left():
    """A run that stops must take its log file off the root logger, or later tests would log into it."""
    yield
    left = [h for h in logging.root.handlers if isinstance(h, LogFile)]
    for handler in left:
        logging.root.removeHandler(handler)
        handler.close()
    assert not left


def fill(disk, leave: int = 0) -> None:
    """Fill `disk` with the file `filler` until `leave` bytes (whole pages) are free."""
    with open(disk / 'filler', 'ab', buffering=0) as f:
        while shutil.disk_usage(disk).free > leave:
            try:
                f.write(b'\0' * min(PAGE * 64, shutil.disk_usage(disk).free - leave))
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return


def _bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * SIZE_UNITS[unit]


def _epochs(run) -> list:
    with open(run / 'summary.csv') as f:
        return [line.split(',')[0] for line in f.read().splitlines()[1:]]


def _temporary_files(folder) -> list:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith('.tmp')]


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_a_disk_that_fills_mid_training_stops_with_one_line_and_loses_nothing(train_script, train_argv, small_disk,
                                                                               monkeypatch, capsys):
    """As epoch 1 starts the disk is filled up to half a checkpoint: the epoch trains and logs its metrics, its
    save fails. Then space is freed and `--resume latest` ends the run as if nothing had happened."""
    run = small_disk / 'run'
    real = engine.train_one_epoch

    def fill_at_epoch_1(training, epoch, *args, **kwargs):
        if epoch == 1:
            fill(small_disk, leave=os.path.getsize(run / 'last.pth.tar') // 2)
        return real(training, epoch, *args, **kwargs)

    monkeypatch.setattr(engine, 'train_one_epoch', fill_at_epoch_1)
    assert train_script.run_main(train_argv()) == OUTPUT_EXIT_CODE
    err = capsys.readouterr().err
    match = re.fullmatch(rf"train\.py: error: cannot write 'last\.pth\.tar' in '{re.escape(str(run))}': No space "
                         rf"left on device \(needs (.+), (.+) free\); the files written before are intact: free "
                         rf"space, then continue with --resume latest\n", err)
    assert match, err
    needed, free = _bytes(match.group(1)), _bytes(match.group(2))
    size = os.path.getsize(run / 'last.pth.tar')
    assert abs(needed - size) <= 0.01 * size  # the checkpoint's size
    assert needed / 4 < free < needed  # more than is free once the part written is removed again
    assert {name: torch.load(run / name)['epoch'] for name in os.listdir(run) if name.endswith('.pth.tar')} == {
        'last.pth.tar': 0, 'checkpoint-0.pth.tar': 0, 'model_best.pth.tar': 0}
    assert not _temporary_files(small_disk)
    assert _epochs(run) == ['0']  # no row for the epoch without a checkpoint
    with open(run / 'log.txt') as f:
        assert re.search(r'eval epoch 1: top-1 [\d.]+ top-5', f.read())  # its metrics are in the log all the same

    monkeypatch.setattr(engine, 'train_one_epoch', real)
    os.remove(small_disk / 'filler')
    assert train_script.run_main(train_argv('--resume', 'latest')) == 0
    assert torch.load(run / 'last.pth.tar')['epoch'] == 1 and _epochs(run) == ['0', '1']


def _hashes(folder) -> dict:
    """Every file under `folder` but run.lock (a run stopped while opening the folder may leave it) by content."""
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(pathlib.Path(d, f).read_bytes()).digest()
            for d, _, files in os.walk(folder) for f in files if f != 'run.lock'}


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_a_relaunch_removes_a_killed_saves_leftover_before_it_writes_anything(train_script, train_argv, small_disk,
                                                                             capsys, caplog):
    """A save killed while writing left `.last.pth.tar.tmp`, which fills the disk: the relaunch removes it first,
    so the lock, the log, args.yaml and TensorBoard have room."""
    run = small_disk / 'run'
    argv = train_argv('--epochs', '1', '--resume', 'latest')
    assert train_script.run_main(argv) == 0
    with open(run / '.last.pth.tar.tmp', 'ab', buffering=0) as f:
        with pytest.raises(OSError, match='No space left on device'):
            while True:
                f.write(b'PK\x03\x04' * PAGE)
    assert shutil.disk_usage(small_disk).free == 0
    caplog.clear()
    assert train_script.run_main(argv) == 0
    assert capsys.readouterr().err == '' and not _temporary_files(small_disk)
    assert f"removed '{run / '.last.pth.tar.tmp'}', the temporary file of an interrupted save" in caplog.text
    with open(run / 'log.txt') as f:
        assert f'output folder {run}; 10 classes, 60 train / 30 val images, lr 0.001, epochs 1..0' in f.read()
    assert len(os.listdir(run / 'tensorboard')) == 2


@pytest.mark.slow
def test_a_relaunch_on_a_disk_still_full_is_one_line_on_stderr_and_changes_nothing(train_script, train_argv,
                                                                                  small_disk):
    """The real process: no traceback, of the main thread or any other, and the line last."""
    run = small_disk / 'run'
    argv = train_argv('--epochs', '1', '--resume', 'latest')
    assert train_script.run_main(argv) == 0
    before = _hashes(run)
    fill(small_disk)
    done = subprocess.run([sys.executable, 'train.py', *argv], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    lines = done.stderr.splitlines()
    assert done.returncode == OUTPUT_EXIT_CODE, done.stderr
    assert 'Traceback' not in done.stderr and [line for line in lines if 'No space left' in line] == lines[-1:]
    assert lines[-1].startswith(f"train.py: error: cannot write 'args.yaml' in '{run}': No space left on device "
                                f"(needs {size_text(os.path.getsize(run / 'args.yaml'))}, 0 bytes free)")
    assert _hashes(run) == before and not _temporary_files(small_disk)


def test_a_run_folder_that_cannot_be_made_is_one_line(train_script, train_argv, tmp_path, capsys):
    """A file system out of inodes refuses the new run folder itself (timm's get_outdir): one line, exit 74."""
    folder = tmp_path / 'out'
    folder.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m,nr_inodes=8', 'tmpfs', str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here (root only): {done.stderr.strip()}')
    try:
        for i in range(8):
            try:
                (folder / f'f{i}').touch()
            except OSError:
                break
        assert train_script.run_main(train_argv(experiment='new')) == OUTPUT_EXIT_CODE
    finally:
        subprocess.run(['umount', '-l', str(folder)], check=True)
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"train.py: error: cannot write 'new' in '{folder}': No space left on device")


def _no_space(path, needed: str = '') -> str:
    """The line for `path` on a disk with no room left (`needed`: what it says the file needs)."""
    folder, name = os.path.split(path)
    space = f'needs {needed}, 0 bytes free' if needed else '0 bytes free'
    return (f"cannot write '{name}' in '{folder}': No space left on device ({space}); the files written before are "
            f"intact: free space, then continue with --resume latest")


def test_a_log_line_that_does_not_fit_leaves_the_log_as_it_was_and_stops_the_run_once(small_disk):
    """The kernel writes the part that fits in the file's last page, then refuses the rest: that part is cut off."""
    path = small_disk / 'log.txt'
    handler = LogFile(str(path))
    logger = logging.getLogger('test_disk_full')
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning('x' * 4000)
        fill(small_disk)
        with pytest.raises(OutputError) as error:
            logger.warning('y' * 200)
        assert str(error.value) == _no_space(path, '201 bytes')
        logger.warning('z')  # the run is stopping: later records are left out, without another error
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert path.read_text() == 'x' * 4000 + '\n'


def test_a_summary_row_or_events_that_do_not_fit_leave_their_files_as_they_were(small_disk):
    run_logger = RunLogger(str(small_disk))
    run_logger.epoch_summary(0, dict(loss=2.0), dict(top1=50.0), 0.1)
    summary, events = small_disk / 'summary.csv', pathlib.Path(run_logger.writer.path)
    before = summary.read_bytes(), events.read_bytes()
    fill(small_disk)
    wide = {f'metric{i}': 1 / 3 for i in range(300)}  # a row longer than the room left in its file's last page
    with pytest.raises(OutputError) as error:
        run_logger.epoch_summary(1, wide, dict(top1=60.0), 0.1)
    assert str(error.value) == _no_space(summary)
    with pytest.raises(OutputError) as error:
        run_logger.scalars(7, wide, 'train')
    assert re.fullmatch(re.escape(_no_space(events, 'NEEDED')).replace('NEEDED', r'([\d.]+) KiB'), str(error.value))
    run_logger.close()
    assert (summary.read_bytes(), events.read_bytes()) == before
    accumulator = EventAccumulator(str(small_disk / 'tensorboard'))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars('eval/top1')] == [(0, 50.0)]
    assert 'train/metric0' not in accumulator.Tags()['scalars']


def test_replace_file_that_does_not_fit_keeps_the_old_file_and_no_temporary_one(small_disk):
    path = small_disk / 'args.yaml'
    path.write_text('old: 1\n')
    fill(small_disk)
    with pytest.raises(OutputError) as error:
        replace_file(str(path), b'new: 2\n' * 1000)
    assert str(error.value) == _no_space(path, size_text(7000))
    assert path.read_text() == 'old: 1\n' and sorted(os.listdir(small_disk)) == ['args.yaml', 'filler']


def test_run_cli_prints_the_first_failed_write_in_one_line_with_its_own_exit_code(capsys):
    """Closing the files on the way out fails on the same full disk: the line names the write that failed first.
    The cause decides the advice; a folder that cannot be asked for its free space still gets its line."""
    def main(argv):
        try:
            raise write_error('/no/such/run/last.pth.tar', OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 3 << 20)
        finally:
            raise write_error('/no/such/run/log.txt', OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    assert run_cli(main, 'train.py', []) == OUTPUT_EXIT_CODE == 74
    assert capsys.readouterr().err == ("train.py: error: cannot write 'last.pth.tar' in '/no/such/run': No space left "
                                       "on device (needs 3.0 MiB, free space unknown); the files written before are "
                                       "intact: free space, then continue with --resume latest\n")
    denied = write_error('/no/such/run/summary.csv', OSError(errno.EACCES, os.strerror(errno.EACCES)))
    assert str(denied).endswith(": Permission denied (free space unknown); the files written before are intact: fix "
                                "that, then continue with --resume latest")
