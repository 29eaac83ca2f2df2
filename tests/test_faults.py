"""Fault injection: kills inside saves and at random moments, corrupt files on every load path, diverging runs.

Each case asserts the exact outcome: the exit code, a one-line message naming the culprit, and what is on disk
(every `*.pth.tar` a reader would pick up loads with a plain `torch.load`, no best epoch and no kept history
file is lost, and a resumed run ends with the very files of an uninterrupted one).
"""
import csv
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

import tokenmix_train.engine as engine
from tokenmix_train.checkpoint import AtomicCheckpointSaver, continue_history

from conftest import ROOT, TINY_STUDENT, load_script

# --- kills inside a save: a failure injected before each file operation ---------------------------------------

METRICS = [1.0, 3.0, 2.0, 5.0, 4.0, 0.5]  # with 2 kept: epoch 3 is a new best that evicts a kept epoch (2)
HISTORY = 2
FILE_OPS = [(os, 'replace'), (os, 'rename'), (os, 'remove'), (os, 'unlink'), (os, 'link'), (os, 'fsync'),
            (shutil, 'copy2'), (torch, 'save')]


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not an Exception, so no handler catches it)."""


def _inject(monkeypatch, fail_at: float) -> list:
    """Make file operation number `fail_at` (0-based) die before it acts; returns the log of operations done.

    A dying `torch.save` or `shutil.copy2` first writes the start of an archive, as a process killed while
    writing would.
    """
    done = []

    def wrap(owner, name):
        real = getattr(owner, name)

        def op(*args, **kwargs):
            if len(done) == fail_at:
                if name == 'save':
                    args[1].write(b'PK\x03\x04 the first bytes of a checkpoint')
                if name == 'copy2':
                    with open(args[1], 'wb') as f:
                        f.write(b'PK\x03\x04 the first bytes of a copy')
                raise Killed(name)
            done.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, op)

    for owner, name in FILE_OPS:
        wrap(owner, name)
    return done


def _saver(folder, hardlink: bool = True) -> AtomicCheckpointSaver:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = AtomicCheckpointSaver(model=model, optimizer=optimizer, checkpoint_dir=str(folder),
                                  recovery_dir=str(folder), max_history=HISTORY)
    saver.can_hardlink = hardlink  # False: copies, as on a file system without hard links
    return saver


def _kept_after(epoch: int) -> set:
    """Epochs timm's ranking keeps after saving `epoch` (the best HISTORY so far; ties keep the earlier)."""
    ranked = sorted(range(epoch + 1), key=lambda e: (-METRICS[e], e))
    return set(ranked[:HISTORY])


def _on_disk(folder) -> dict:
    """Every file a reader globs (`*.pth.tar`), loaded with a plain torch.load: name -> (epoch, metric)."""
    files = {}
    for path in glob.glob(os.path.join(folder, '*.pth.tar')):
        checkpoint = torch.load(path)
        files[os.path.basename(path)] = (checkpoint['epoch'], checkpoint['metric'])
    return files


def _expected_after(epoch: int) -> dict:
    best = max(range(epoch + 1), key=lambda e: (METRICS[e], -e))
    files = {f'checkpoint-{e}.pth.tar': (e, METRICS[e]) for e in _kept_after(epoch)}
    files.update({'last.pth.tar': (epoch, METRICS[epoch]), 'model_best.pth.tar': (best, METRICS[best])})
    return files


def _count_ops(tmp_path, monkeypatch, epoch: int, hardlink: bool) -> int:
    saver = _saver(tmp_path, hardlink)
    for e in range(epoch):
        saver.save(e, METRICS[e], {})
    with monkeypatch.context() as m:
        done = _inject(m, float('inf'))
        saver.save(epoch, METRICS[epoch], {})
    shutil.rmtree(tmp_path)
    os.makedirs(tmp_path)
    return len(done)


@pytest.mark.parametrize('hardlink', [True, False])
@pytest.mark.parametrize('epoch', range(len(METRICS)))
def test_a_kill_before_any_file_operation_of_a_save_loses_nothing(tmp_path, monkeypatch, epoch, hardlink):
    num_ops = _count_ops(tmp_path, monkeypatch, epoch, hardlink)
    assert num_ops >= 3  # at least: write, fsync, rename over last
    for fail_at in range(num_ops):
        folder = tmp_path / f'kill{fail_at}'
        folder.mkdir()
        saver = _saver(folder, hardlink)
        for e in range(epoch):
            saver.save(e, METRICS[e], {})
        with monkeypatch.context() as m:
            _inject(m, fail_at)
            with pytest.raises(Killed):
                saver.save(epoch, METRICS[epoch], {})
        files = _on_disk(folder)
        # `last` is the previous complete save until the new one is renamed over it, never missing or partial
        last_epoch = files['last.pth.tar'][0] if 'last.pth.tar' in files else None
        assert last_epoch in ({None} if epoch == 0 else {epoch - 1}) | {epoch}, (fail_at, files)
        if last_epoch is not None:
            expected = _expected_after(last_epoch)
            for name, value in expected.items():
                if name == 'model_best.pth.tar' and METRICS[epoch] > expected[name][1]:
                    assert files[name] in (value, (epoch, METRICS[epoch])), (fail_at, files)
                else:  # the history kept after `last`'s epoch, and `last`, are all there
                    assert files.get(name) == value, (fail_at, name, files)
        assert set(files) <= set(_expected_after(epoch)) | set(_expected_after(max(epoch - 1, 0))), files

        # the next start removes the temporary files, resumes from `last` and ends as if never killed
        resumed = _saver(folder)
        assert not [f for f in os.listdir(folder) if f.endswith('.tmp')]
        if last_epoch is not None:
            continue_history(resumed, str(folder / 'last.pth.tar'), torch.load(folder / 'last.pth.tar')['saver'])
        for e in range((last_epoch if last_epoch is not None else -1) + 1, len(METRICS)):
            resumed.save(e, METRICS[e], {})
        assert _on_disk(folder) == _expected_after(len(METRICS) - 1), fail_at
        assert sorted(os.listdir(folder)) == sorted(_expected_after(len(METRICS) - 1)), fail_at


def test_a_resume_keeps_a_better_model_best_found_on_disk(tmp_path):
    """Resumed from before its best epoch, a run whose rerun of that epoch scores lower keeps the better file."""
    saver = _saver(tmp_path)
    for epoch, metric in enumerate([1.0, 5.0]):
        saver.save(epoch, metric, {})
    resumed = _saver(tmp_path)
    earlier = tmp_path / 'checkpoint-0.pth.tar'
    continue_history(resumed, str(earlier), torch.load(earlier)['saver'])
    assert resumed.save(1, 3.0, {}) == (5.0, 1)
    assert (torch.load(tmp_path / 'model_best.pth.tar')['metric'], torch.load(tmp_path / 'last.pth.tar')['metric']) \
        == (5.0, 3.0)


# --- corrupt files on every load path ----------------------------------------------------------------------------

def _corrupt(kind: str, good: str, folder) -> tuple:
    """A bad checkpoint of `kind` and the words the error must use for it."""
    path = os.path.join(folder, f'{kind}.pth.tar')
    if kind == 'truncated':
        with open(good, 'rb') as f:
            data = f.read()
        with open(path, 'wb') as f:
            f.write(data[:len(data) // 2])
        return path, 'is truncated or damaged (an incomplete torch zip archive)'
    if kind == 'random':
        with open(path, 'wb') as f:
            f.write(random.Random(0).randbytes(4096))
        return path, 'is not a torch checkpoint ('
    if kind == 'text':
        with open(path, 'w') as f:
            f.write('epoch: 3\nthis is not a checkpoint\n')
        return path, 'is a text file, not a torch checkpoint'
    if kind == 'empty':
        open(path, 'wb').close()
        return path, 'is empty (0 bytes)'
    if kind == 'folder':
        os.makedirs(path)
        return path, 'is a folder, not a file'
    torch.save({'epoch': 3, 'note': 'no weights'}, path)  # readable, but holds no weights
    return path, None


KINDS = ['truncated', 'random', 'text', 'empty', 'folder', 'no weights']
WRONG_CONTENT = {
    '--resume': "is not a training checkpoint (no 'state_dict' of tensors; it holds 'epoch', 'note')",
    '--initial-checkpoint': "holds no state dict of tensors",
    '--teacher-checkpoint': "holds no state dict of tensors",
    '--checkpoint': "holds no state dict of tensors",
}


@pytest.fixture(scope='module')
def validate_script():
    return load_script('validate.py')


@pytest.mark.parametrize('flag', sorted(WRONG_CONTENT))
def test_every_kind_of_bad_file_on_every_load_path_is_one_line_and_exit_2(
        flag, train_script, validate_script, train_argv, teacher_checkpoint, tiny_data, tmp_path, capsys):
    for kind in KINDS:
        path, words = _corrupt(kind, teacher_checkpoint, tmp_path)
        expected = f"{flag}: checkpoint '{path}' {words or WRONG_CONTENT[flag]}"
        if flag == '--checkpoint':
            code = validate_script.run_main(['--data-dir', tiny_data, '--split', 'val', *TINY_STUDENT, '-j', '0',
                                             '--checkpoint', path])
            expected = 'validate.py: error: ' + (expected if kind != 'folder' else  # a folder of checkpoints
                                                 f"--checkpoint '{path}': the folder holds no *.pth.tar / *.pth / "
                                                 f"*.safetensors files")
        else:
            extra = ['--tokenmix', '--cutmix', '1', '--teacher-model', 'tokenmix_cnn_teacher_64'] \
                if flag == '--teacher-checkpoint' else []
            code = train_script.run_main(train_argv(*extra, flag, path))
            expected = 'train.py: error: ' + expected
        err = capsys.readouterr().err.strip()
        assert code == 2, (kind, err)
        assert len(err.splitlines()) == 1 and err.startswith(expected), (kind, err)
        assert not (tmp_path / 'out').exists(), kind  # nothing written


def test_a_folder_with_broken_checkpoints_validates_the_others_then_exits_2(validate_script, tiny_data, tmp_path,
                                                                              capsys):
    torch.manual_seed(0)
    student = timm.create_model(TINY_STUDENT[1], img_size=32, num_classes=10, embed_dim=32, depth=1, num_heads=2)
    folder = tmp_path / 'run'
    folder.mkdir()
    torch.save({'state_dict': student.state_dict(), 'epoch': 1}, folder / 'last.pth.tar')
    truncated, words = _corrupt('truncated', str(folder / 'last.pth.tar'), folder)
    shutil.copy(folder / 'last.pth.tar', folder / '.model_best.pth.tar.tmp')  # a save in progress: never read
    (folder / 'tmp.pth.tar').write_bytes(b'PK\x03\x04 half')  # timm's temporary name: never read
    results = tmp_path / 'results.csv'
    code = validate_script.run_main(['--data-dir', tiny_data, '--split', 'val', *TINY_STUDENT, '-j', '0',
                                     '--checkpoint', str(folder), '--results-file', str(results)])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.strip() == (f"validate.py: error: --checkpoint '{folder}': 1 of 2 checkpoint files could not be "
                           f"validated (truncated.pth.tar); see the error column")
    with open(results) as f:
        rows = {os.path.basename(r['checkpoint']): r for r in csv.DictReader(f)}
    assert sorted(rows) == ['last.pth.tar', 'truncated.pth.tar']
    assert rows['last.pth.tar']['error'] == '' and rows['last.pth.tar']['images'] == '30'
    single = tmp_path / 'single.csv'  # the same file validated alone gives the same numbers
    assert validate_script.run_main(['--data-dir', tiny_data, '--split', 'val', *TINY_STUDENT, '-j', '0',
                                     '--checkpoint', str(folder / 'last.pth.tar'), '--results-file', str(single)]) == 0
    with open(single) as f:
        [alone] = list(csv.DictReader(f))
    assert (rows['last.pth.tar']['top1'], rows['last.pth.tar']['top5']) == (alone['top1'], alone['top5'])
    assert rows['truncated.pth.tar']['error'] == f"--checkpoint: checkpoint '{truncated}' {words}"
    assert rows['truncated.pth.tar']['top1'] == '' and rows['truncated.pth.tar']['images'] == '0'
    assert 'truncated.pth.tar' in out and 'is truncated or damaged' in out  # the table shows the error too


def test_an_unwritable_results_file_is_named_before_any_evaluation(validate_script, tiny_data, tmp_path, capsys,
                                                                    monkeypatch):
    torch.manual_seed(0)
    student = timm.create_model(TINY_STUDENT[1], img_size=32, num_classes=10, embed_dim=32, depth=1, num_heads=2)
    checkpoint = tmp_path / 'model.pth.tar'
    torch.save({'state_dict': student.state_dict()}, checkpoint)
    common = ['--data-dir', tiny_data, '--split', 'val', *TINY_STUDENT, '-j', '0', '--checkpoint', str(checkpoint)]
    (tmp_path / 'a_file').write_text('x')
    read_only = tmp_path / 'read_only'
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda path, mode: path != str(read_only) and real_access(path, mode))
    for target, why in ((tmp_path / 'a_file' / 'r.csv', f"'{tmp_path / 'a_file'}' is a file, not a folder"),
                        (read_only / 'r.csv', f"cannot write in '{read_only}' (no permission or a read-only file "
                                              f"system)"),
                        (tmp_path, 'is a folder')):
        assert validate_script.run_main([*common, '--results-file', str(target)]) == 2
        out, err = capsys.readouterr()
        assert err.strip().startswith(f"validate.py: error: --results-file '{target}'") and err.strip().endswith(why)
        assert out == ''  # no table: nothing was evaluated


# --- diverging runs -------------------------------------------------------------------------------------------

def _on_disk_epochs(folder) -> list:
    return [(os.path.basename(p), torch.load(p)['epoch']) for p in glob.glob(os.path.join(folder, '*.pth.tar'))]


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_a_nan_eval_loss_is_divergence_and_nothing_of_that_epoch_is_saved(train_script, train_argv, tmp_path,
                                                                          monkeypatch, caplog):
    real = engine.evaluate
    calls = []

    def nan_at_epoch_1(model, loader, device, **kwargs):
        calls.append(1)
        result = real(model, loader, device, **kwargs)
        return dict(result, loss=float('nan')) if len(calls) == 2 else result

    monkeypatch.setattr(engine, 'evaluate', nan_at_epoch_1)
    assert train_script.run_main(train_argv('--epochs', '3')) == 1
    out = tmp_path / 'out' / 'run'
    assert ('the run diverged at epoch 1: non-finite eval loss nan; nothing of this epoch is saved' in caplog.text)
    assert f"last good checkpoint kept: {out / 'last.pth.tar'}" in caplog.text
    assert sorted(_on_disk_epochs(out)) == [('checkpoint-0.pth.tar', 0), ('last.pth.tar', 0),
                                            ('model_best.pth.tar', 0)]
    with open(out / 'summary.csv') as f:
        assert len(f.read().splitlines()) == 2  # header + epoch 0


def test_non_finite_weights_are_divergence_even_with_a_finite_loss(train_script, train_argv, tmp_path, monkeypatch,
                                                                   caplog):
    real = engine.train_one_epoch

    def poison_ema(run, epoch, loader, start=None):
        result = real(run, epoch, loader, start)
        with torch.no_grad():
            run.model_ema.module.head.bias[3] = float('inf')  # the EMA only: the model's eval loss stays finite
        return result

    monkeypatch.setattr(engine, 'train_one_epoch', poison_ema)
    assert train_script.run_main(train_argv('--model-ema', '--epochs', '2')) == 1
    assert ("the run diverged at epoch 0: non-finite EMA weights (1 of 20 tensors, first 'head.bias'); nothing of "
            "this epoch is saved" in caplog.text)
    assert 'no checkpoint saved' in caplog.text
    out = tmp_path / 'out' / 'run'
    assert not glob.glob(str(out / '*.pth.tar')) and not glob.glob(str(out / '.*'))


# --- kills at random moments of a real run ------------------------------------------------------------------------

def _saved_since(path, inode) -> bool:
    """Whether `path` exists as another file than `inode` (every save renames a new file over it)."""
    try:
        return os.stat(path).st_ino != inode
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_kills_at_random_moments_leave_loadable_files_and_resume_to_the_same_result(train_script, train_argv,
                                                                                   tmp_path):
    """Two runs are killed at a random moment after their first save (in the next epoch or save), then resumed.

    An epoch of this run takes a few tenths of a second, so a kill within 0.1 s of a save always lands before the
    run's end (6 epochs: at least 3 are left when the second run is killed).
    """
    extra = ('--epochs', '6', '--checkpoint-hist', '2', '--log-interval', '50')
    assert train_script.run_main(train_argv(*extra, experiment='straight')) == 0
    run = tmp_path / 'out' / 'killed'
    last = run / 'last.pth.tar'
    env = dict(os.environ, PYTHONPATH=ROOT)
    rng = random.Random(0)
    kills = 0
    while True:
        resume = ('--resume', str(last)) if last.exists() else ()
        inode = os.stat(last).st_ino if last.exists() else None
        proc = subprocess.Popen([sys.executable, 'train.py', *train_argv(*extra, *resume, experiment='killed')],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while kills < 2 and proc.poll() is None and not _saved_since(last, inode):
                time.sleep(0.01)
            if kills < 2 and proc.poll() is None:
                time.sleep(rng.uniform(0., 0.1))
                proc.send_signal(signal.SIGKILL)
                kills += 1
            assert proc.wait(timeout=120) in (0, -signal.SIGKILL)
        finally:
            proc.kill()
        for path in glob.glob(str(run / '*.pth.tar')):
            torch.load(path)  # every file a reader would pick up loads
        if proc.returncode == 0:
            break
    assert kills == 2
    straight, killed = (torch.load(tmp_path / 'out' / name / 'last.pth.tar') for name in ('straight', 'killed'))
    assert straight['epoch'] == killed['epoch'] == 5
    for name, tensor in straight['state_dict'].items():
        assert torch.equal(tensor, killed['state_dict'][name]), name
    # the same files, no temporary file left over, the same best
    assert sorted(os.listdir(run)) == sorted(os.listdir(tmp_path / 'out' / 'straight'))
    best = (torch.load(tmp_path / 'out' / name / 'model_best.pth.tar') for name in ('straight', 'killed'))
    assert len({(b['epoch'], b['metric']) for b in best}) == 1
