"""Relaunches into a run folder: `--resume latest` continues the newest loadable checkpoint bit for bit, each epoch
once in summary.csv; without --resume a folder holding a run is refused; one run per folder (run.lock)."""
import errno
import fcntl
import hashlib
import os
import subprocess
import sys
from typing import Tuple

import pytest
import torch

from conftest import ROOT, run_until_epoch
from tokenmix_train.checkpoint import AtomicCheckpointSaver, latest_checkpoint, main as checkpoint_cli
from tokenmix_train.run_folder import RunLock


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _epochs(folder) -> list:
    with open(folder / 'summary.csv') as f:
        return [line.split(',')[0] for line in f.read().splitlines()[1:]]


def _steps(folder) -> dict:
    """The steps of each TensorBoard scalar tag in the run folder, in the order the event files list them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder / 'tensorboard'))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def _hashes(folder) -> dict:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))
            if (folder / name).is_file()}


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.slow
def test_resume_latest_continues_the_newest_checkpoint_that_loads(train_script, train_argv, tmp_path, monkeypatch,
                                                                  caplog):
    """Stopped after epoch 1, relaunched with --resume latest: the same weights as the uninterrupted run, each
    epoch once. With every file of epoch 1 truncated, epoch 0's checkpoint is used (a warning names the file) and
    epoch 1's summary row and TensorBoard scalars are written again, not twice."""
    extra = ('--epochs', '3', '--log-interval', '50')
    assert train_script.run_main(train_argv(*extra, experiment='straight')) == 0
    straight = _load(tmp_path / 'out' / 'straight' / 'last.pth.tar')
    for corrupt in (False, True):
        name = f'stopped_corrupt_{corrupt}'
        run = tmp_path / 'out' / name
        run_until_epoch(train_script, monkeypatch, train_argv(*extra, experiment=name), 2)
        assert _epochs(run) == ['0', '1']
        broken = [run / f for f in os.listdir(run) if f.endswith('.pth.tar') and _load(run / f)['epoch'] == 1]
        if corrupt:
            for path in broken:
                _truncate(path)
        caplog.clear()
        assert train_script.run_main(train_argv(*extra, '--resume', 'latest', experiment=name)) == 0
        used = 'checkpoint-0.pth.tar' if corrupt else 'last.pth.tar'
        assert f"resumed '{run / used}' (epoch {0 if corrupt else 1}), starting at epoch {1 if corrupt else 2}" \
            in caplog.text
        skipped = [line for line in caplog.text.splitlines() if 'skipped, the newest checkpoint that loads' in line]
        assert len(skipped) == (len(broken) if corrupt else 0)
        if corrupt:
            assert f"--resume latest: checkpoint '{run / 'last.pth.tar'}' is truncated or damaged" in caplog.text
        assert _epochs(run) == ['0', '1', '2']
        steps = _steps(run)  # 7 updates an epoch, logged at each epoch's last (--log-interval 50)
        assert steps['eval/top1'] == steps['epoch/loss'] == [0, 1, 2] and steps['train/loss'] == [7, 14, 21]
        resumed = _load(run / 'last.pth.tar')
        assert resumed['epoch'] == 2
        for key, tensor in straight['state_dict'].items():
            assert torch.equal(tensor, resumed['state_dict'][key]), (corrupt, key)


def test_a_relaunch_keeps_a_better_model_best(train_script, train_argv, tmp_path, monkeypatch):
    """A model_best better than the resumed checkpoint's record (saved by a run killed before its `last` was
    renamed) is not replaced by the relaunch's epochs."""
    run = tmp_path / 'out' / 'run'
    run_until_epoch(train_script, monkeypatch, train_argv('--epochs', '3'), 2)
    best = _load(run / 'model_best.pth.tar')
    torch.save(dict(best, metric=101.0), run / 'model_best.pth.tar')
    last = _load(run / 'last.pth.tar')
    torch.save(dict(last, saver=dict(last['saver'], best_metric=-1.0)), run / 'last.pth.tar')  # any epoch beats it
    assert train_script.run_main(train_argv('--epochs', '3', '--resume', 'latest')) == 0
    assert _load(run / 'last.pth.tar')['epoch'] == 2
    kept = _load(run / 'model_best.pth.tar')
    assert (kept['epoch'], kept['metric']) == (best['epoch'], 101.0)


def test_resume_auto_starts_afresh_in_a_folder_without_checkpoints_and_a_stale_lock(train_script, train_argv,
                                                                                       tmp_path, caplog):
    """`auto` is `latest`; a run.lock whose process is gone (no live holder) does not block the run."""
    run = tmp_path / 'out' / 'run'
    os.makedirs(run)
    (run / 'run.lock').write_text('pid 999999999 on a-host-long-gone\n')
    assert train_script.run_main(train_argv('--epochs', '1', '--resume', 'auto')) == 0
    assert f"--resume auto: no checkpoint in '{run}', starting afresh" in caplog.text
    assert _load(run / 'last.pth.tar')['epoch'] == 0 and _epochs(run) == ['0']
    assert not (run / 'run.lock').exists()


@pytest.mark.parametrize('finished', [True, False])
@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_a_relaunch_without_resume_is_refused_and_changes_nothing(train_script, train_argv, tmp_path, monkeypatch,
                                                                  capsys, finished):
    run = tmp_path / 'out' / 'run'
    if finished:
        assert train_script.run_main(train_argv('--epochs', '1')) == 0
    else:
        run_until_epoch(train_script, monkeypatch, train_argv(), 1)
    before = _hashes(run)
    capsys.readouterr()
    assert train_script.run_main(train_argv()) == 2
    assert capsys.readouterr().err == (f"train.py: error: --output/--experiment '{run}' holds the checkpoints of a "
                                       f"run: --resume latest continues it, another --experiment starts afresh\n")
    assert _hashes(run) == before


LOCK_HOLDER = ("import sys, time; from tokenmix_train.run_folder import RunLock; RunLock(sys.argv[1]); "
               "print('locked', flush=True); time.sleep(600)")


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_folder_exits_2_naming_it(train_script, train_argv, tmp_path, capsys):
    """A live holder of run.lock refuses a second run (that message first, nothing changed); once the holder is
    killed (kill -9) the lock it leaves is stale and the relaunch proceeds."""
    run = tmp_path / 'out' / 'run'
    assert train_script.run_main(train_argv('--epochs', '1')) == 0
    holder = subprocess.Popen([sys.executable, '-c', LOCK_HOLDER, str(run)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline() == 'locked\n'
        before = _hashes(run)
        capsys.readouterr()
        assert train_script.run_main(train_argv('--epochs', '2')) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith(f"train.py: error: '{run}' is in use by another run (pid "
                                                       f"{holder.pid} on ")
        assert _hashes(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert train_script.run_main(train_argv('--epochs', '2', '--resume', 'latest')) == 0
    assert _load(run / 'last.pth.tar')['epoch'] == 1 and not (run / 'run.lock').exists()


def test_a_file_system_without_locks_is_a_warning(tmp_path, monkeypatch, caplog):
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, 'No locks available')

    monkeypatch.setattr(fcntl, 'flock', refuse)
    lock = RunLock(str(tmp_path))
    assert (f"'{tmp_path}': the file system refuses locks (No locks available), so a second run into this folder "
            f"is not detected") in caplog.text
    lock.release()
    assert lock.fd is None


def _saver(folder) -> AtomicCheckpointSaver:
    model = torch.nn.Linear(3, 2)
    return AtomicCheckpointSaver(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 checkpoint_dir=str(folder), recovery_dir=str(folder))


def _finished_epochs(folder, capsys) -> Tuple[int, str, str]:
    """What scripts/lib.sh asks (`python -m tokenmix_train.checkpoint FOLDER`), in-process: exit code, out, err."""
    code = checkpoint_cli([str(folder)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_newest_checkpoint_is_the_one_that_got_furthest_not_the_newest_file(tmp_path, capsys):
    assert latest_checkpoint(str(tmp_path / 'none')) is None
    assert _finished_epochs(tmp_path / 'none', capsys) == (0, '0\n', '')
    saver = _saver(tmp_path)
    for epoch in range(3):
        saver.save(epoch, float(epoch), {})
    assert latest_checkpoint(str(tmp_path)) == (str(tmp_path / 'last.pth.tar'), (3, 0))
    saver.save_recovery(3, batch_idx=4)  # timm's recovery file, after step 4 of epoch 3
    for age, name in enumerate(['last.pth.tar', 'checkpoint-2.pth.tar', 'recovery-3-4.pth.tar']):
        os.utime(tmp_path / name, (1e9 - age, 1e9 - age))  # the recovery file is the oldest by time
    assert latest_checkpoint(str(tmp_path)) == (str(tmp_path / 'recovery-3-4.pth.tar'), (3, 5))
    assert _finished_epochs(tmp_path, capsys) == (0, '3\n', '')
    saver.save(3, 0.5, {})
    assert latest_checkpoint(str(tmp_path)) == (str(tmp_path / 'last.pth.tar'), (4, 0))


def test_a_position_file_says_where_it_stands_and_an_epoch_save_supersedes_it(tmp_path, capsys):
    """A stop signal's position file (after 4 batches of epoch 3) is read by its 'position', not its name (timm's
    recovery-3-4 would be batch 5), and is what `--resume latest` continues until the epoch is saved."""
    saver = _saver(tmp_path)
    for epoch in range(3):
        saver.save(epoch, float(epoch), {})
    path = saver.save_position(3, 4, dict(position=dict(epoch=3, batch=4)))
    assert path == str(tmp_path / 'recovery-3-4.pth.tar')
    assert latest_checkpoint(str(tmp_path)) == (path, (3, 4))
    assert _finished_epochs(tmp_path, capsys) == (0, '3\n', '')
    saver.save(3, 0.5, {})
    assert latest_checkpoint(str(tmp_path)) == (str(tmp_path / 'last.pth.tar'), (4, 0))


def test_the_finished_epochs_cli_refuses_a_folder_of_broken_files_and_extra_arguments(tmp_path, capsys):
    (tmp_path / 'last.pth.tar').write_bytes(b'not a checkpoint')
    code, out, err = _finished_epochs(tmp_path, capsys)
    assert (code, out) == (2, '') and err.startswith('tokenmix_train.checkpoint: error: --resume latest: none of the 1 ')
    assert checkpoint_cli([str(tmp_path), 'x']) == 2
    assert capsys.readouterr().err == 'usage: python -m tokenmix_train.checkpoint RUN_FOLDER\n'


def test_latest_needs_experiment_and_a_checkpoint_that_loads(train_script, train_argv, tmp_path, capsys):
    """Never a fresh start over checkpoints that do not load, nor into a new timestamped folder."""
    argv = train_argv('--resume', 'latest')
    i = argv.index('--experiment')
    assert train_script.run_main(argv[:i] + argv[i + 2:]) == 2
    assert capsys.readouterr().err == ('train.py: error: --resume latest needs --experiment: it continues the run '
                                       'folder --output/--experiment\n')
    run = tmp_path / 'out' / 'run'
    os.makedirs(run)
    (run / 'last.pth.tar').write_bytes(b'PK\x03\x04 the first bytes of a checkpoint')
    assert train_script.run_main(argv) == 2
    assert capsys.readouterr().err == (f"train.py: error: --resume latest: none of the 1 checkpoints in '{run}' "
                                       f"loads (see the warnings): move them away, or give another --experiment to "
                                       f"start afresh\n")
    assert sorted(os.listdir(run)) == ['last.pth.tar']


@pytest.mark.slow
def test_lib_sh_decides_finished_from_the_checkpoint_epoch(tmp_path):
    """A row whose newest checkpoint finished every epoch (400 + 10 cooldown) is validated, not trained; one
    epoch short, it is trained again with --resume latest, however many summary rows there are."""
    name = 'deit_small_tokenmix_400ep'
    os.makedirs(tmp_path / name)
    (tmp_path / name / 'summary.csv').write_text('epoch\n' + ''.join(f'{e}\n' for e in range(999)))
    saver = _saver(tmp_path / name)

    def train_line() -> list:
        out = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'deit_small_400ep.sh'), '8', '/data',
                              str(tmp_path)], capture_output=True, text=True, check=True,
                             env=dict(os.environ, DRY_RUN='1', PYTHON=sys.executable)).stdout
        return [line for line in out.splitlines() if f'--experiment {name} ' in line or
                line.startswith(f'{name}: ')]

    saver.save(408, 1.0, {})
    [line] = train_line()
    assert 'distributed_train.sh 8' in line and f'--experiment {name} --resume latest ' in line
    saver.save(409, 1.0, {})
    assert train_line() == [f'{name}: the newest checkpoint in {tmp_path / name} finished all 410 epochs, '
                            f'not training again']
