"""Stop signals and the exact mid-epoch resume: a run signalled at any step saves its position and exits 3, and the
same command with --resume latest ends bit for bit where the uninterrupted run ends, each epoch once in the summary.

The one-process trials run train.py's main in this process and signal it (a real os.kill) right after a chosen
update; two-rank trials are in tests/test_preemption_distributed.py.
"""
import csv
import os
import random
import signal

import numpy as np
import pytest
import torch

import tokenmix_train.engine as engine
from tokenmix_train.preemption import PREEMPTED_EXIT_CODE, StopSignals, signal_numbers
from tokenmix_train.sampling import ResumableBatchSampler, SeededBatch, SeededBatches, batch_seed, sample_seed

BATCHES = 7  # 60 tiny train images, -b 8, drop_last
RECIPE = ('--mixup', '0.8', '--cutmix', '1.0', '--model-ema', '--model-ema-decay', '0.9', '--drop-path', '0.1',
          '--color-jitter', '0.4', '--reprob', '0.25', '--aa', 'rand-m9-mstd0.5', '--epochs', '2')


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _summary_epochs(folder):
    with open(os.path.join(folder, 'summary.csv')) as f:
        return [int(row['epoch']) for row in csv.DictReader(f)]


def _assert_same_end(straight, resumed):
    """The two runs' last checkpoints hold the same weights, EMA, optimiser state and RNG streams."""
    a, b = _load(os.path.join(straight, 'last.pth.tar')), _load(os.path.join(resumed, 'last.pth.tar'))
    assert a['epoch'] == b['epoch']
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f'{key}.{name} differs'
    for index, state in a['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b['optimizer']['state'][index][name])), name
    assert torch.equal(a['rng_states'][0]['torch'], b['rng_states'][0]['torch'])
    assert torch.equal(a['rng_states'][0]['generator'], b['rng_states'][0]['generator'])
    assert _summary_epochs(resumed) == _summary_epochs(straight)


def _signal_after_update(monkeypatch, update: int, signum: int = signal.SIGTERM) -> None:
    """Send this process `signum` right after its `update`-th optimiser step."""
    real, count = engine._after_update, [0]

    def after_update(*args, **kwargs):
        real(*args, **kwargs)
        count[0] += 1
        if count[0] == update:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(engine, '_after_update', after_update)


# the trials: (workers, --grad-accum-steps, the update after which the signal comes), drawn once from a fixed seed
_DRAW = random.Random(24)
TRIALS = [(workers, accum, _DRAW.randint(1, 2 * -(-BATCHES // accum))) for workers, accum in
          [(0, 1)] * 3 + [(2, 1)] * 2 + [(0, 2)] * 2]


def _position(update: int, accum: int):
    """(epoch, batches done) after the `update`-th optimiser step (the epoch's last update takes what is left)."""
    epoch, index = divmod(update - 1, -(-BATCHES // accum))
    return epoch, min((index + 1) * accum, BATCHES)


@pytest.mark.slow
@pytest.mark.parametrize('workers,accum', sorted({(w, a) for w, a, _ in TRIALS}))
def test_signal_at_random_steps_resumes_bit_identical(train_script, train_argv, tmp_path, monkeypatch, caplog,
                                                      workers, accum):
    """Every trial: SIGTERM after a random update, exit 3 with the position saved, then `--resume latest` (with
    the other worker count: the draws no longer depend on it) ends bit-identical to the uninterrupted run."""
    def argv(experiment, workers_now, *extra):
        return train_argv(*RECIPE, '--workers', str(workers_now), '--grad-accum-steps', str(accum), *extra,
                          experiment=experiment)

    assert train_script.run_main(argv('straight', workers)) == 0
    straight = str(tmp_path / 'out' / 'straight')
    updates = [u for w, a, u in TRIALS if (w, a) == (workers, accum)]
    for trial, update in enumerate(updates):
        name = f'trial{trial}'
        with monkeypatch.context() as patch:
            _signal_after_update(patch, update)
            assert train_script.run_main(argv(name, workers)) == PREEMPTED_EXIT_CODE
        folder = tmp_path / 'out' / name
        epoch, batch = _position(update, accum)
        position = _load(folder / f'recovery-{epoch}-{batch}.pth.tar')['position']
        assert position == dict(epoch=epoch, batch=batch)
        assert f'stopped by SIGTERM at epoch {epoch} after batch {batch}' in caplog.text
        caplog.clear()
        assert train_script.run_main(argv(name, 2 - workers, '--resume', 'latest')) == 0
        assert f'starting at epoch {epoch} after batch {batch}' in caplog.text
        assert 'will not continue bit for bit' not in caplog.text
        _assert_same_end(straight, str(folder))
        assert not [f for f in os.listdir(folder) if f.startswith('recovery-')]  # superseded by the epoch saves


def test_stop_signals_note_the_first_signal_and_restore_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals(signal_numbers(['TERM', 'USR1'])) as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert stop.requested() and stop.name == 'SIGUSR1'
    assert signal.getsignal(signal.SIGUSR1) is before
    assert signal_numbers(['none']) == [] and not StopSignals([]).requested()


def test_batches_are_seeded_by_position_and_skipped_without_reading():
    sampler = torch.utils.data.BatchSampler(range(10), batch_size=3, drop_last=True)
    batches = ResumableBatchSampler(sampler, seed=5, rank=1, generator=torch.Generator())
    batches.set_epoch(2)
    full = list(batches)
    assert [list(b) for b in full] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [b.seeds for b in full] == [[sample_seed(batch_seed(5, 2, 1, 0), 3 * b + i) for i in range(3)]
                                       for b in range(3)]
    assert len({s for b in full for s in b.seeds}) == 9
    batches.set_epoch(3)
    assert list(batches)[0].seeds != full[0].seeds  # epochs differ
    batches.set_epoch(2)
    batches.skip_to(2)
    assert len(batches) == 1
    tail = list(batches)
    assert [list(b) for b in tail] == [[6, 7, 8]] and tail[0].seeds == full[2].seeds
    assert len(batches) == 1 and len(list(batches)) == 1  # the epoch starts there ...
    batches.set_epoch(3)
    assert len(batches) == 3  # ... until the next one


def test_seeded_batches_draw_from_the_batch_seed_and_leave_the_process_streams():
    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return index, random.random(), float(np.random.rand()), float(torch.rand(()))

    dataset = SeededBatches(Draw())
    torch.manual_seed(0)
    random.seed(0)
    before = torch.get_rng_state(), random.getstate()
    first = dataset.__getitems__(SeededBatch([0, 1], seeds=[7, 9]))
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    again = dataset.__getitems__(SeededBatch([1], seeds=[9]))
    other = dataset.__getitems__(SeededBatch([0, 1], seeds=[8, 9]))
    assert again[0] == first[1]  # a sample's draws do not depend on the batch it is in
    assert first != other and first[0][1:] != first[1][1:]


@pytest.mark.slow
@pytest.mark.parametrize('during', ['evaluation', 'save'])
def test_a_signal_during_evaluation_or_a_save_stops_at_the_next_step(train_script, train_argv, tmp_path,
                                                                     monkeypatch, caplog, during):
    """The evaluation and the epoch's save finish; the run stops before the next epoch's first step, and a second
    signal meanwhile changes nothing."""
    import tokenmix_train.checkpoint as checkpoint
    owner, name = (engine, 'evaluate') if during == 'evaluation' else (checkpoint.AtomicCheckpointSaver, 'save')
    real = getattr(owner, name)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)

    argv = train_argv(*RECIPE, experiment='run')
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, signalled)
        assert train_script.run_main(argv) == PREEMPTED_EXIT_CODE
    folder = tmp_path / 'out' / 'run'
    assert 'stopped by SIGTERM at epoch 1 after batch 0' in caplog.text
    assert _load(folder / 'last.pth.tar')['epoch'] == 0 and _summary_epochs(folder) == [0]
    assert _load(folder / 'recovery-1-0.pth.tar')['position'] == dict(epoch=1, batch=0)
    assert train_script.run_main(argv + ['--resume', 'latest']) == 0
    assert train_script.run_main(train_argv(*RECIPE, experiment='straight')) == 0
    _assert_same_end(str(tmp_path / 'out' / 'straight'), str(folder))


@pytest.mark.slow
def test_preempt_signal_none_leaves_the_signal_alone_and_usr2_can_be_chosen(train_script, train_argv,
                                                                             monkeypatch):
    """--preempt-signal names the signals that stop the run; others keep their default action."""
    with monkeypatch.context() as patch:
        _signal_after_update(patch, 3, signal.SIGUSR2)
        assert train_script.run_main(train_argv('--preempt-signal', 'USR2', experiment='usr2')) == \
            PREEMPTED_EXIT_CODE
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with monkeypatch.context() as patch:
            _signal_after_update(patch, 3, signal.SIGTERM)
            assert train_script.run_main(train_argv('--preempt-signal', 'none', experiment='none')) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]  # the handler in place before the run got it, not the run


@pytest.mark.slow
def test_timms_repeating_loader_resumes_within_the_epoch_too(train_script, train_argv, tmp_path, monkeypatch):
    """--use-multi-epochs-loader keeps one loader iterator over all epochs; its first pass starts at the batch
    reached all the same."""
    def argv(experiment, *extra):
        return train_argv(*RECIPE, '--workers', '2', '--use-multi-epochs-loader', *extra, experiment=experiment)

    assert train_script.run_main(argv('straight')) == 0
    with monkeypatch.context() as patch:
        _signal_after_update(patch, 10)
        assert train_script.run_main(argv('stopped')) == PREEMPTED_EXIT_CODE
    assert _load(tmp_path / 'out' / 'stopped' / 'recovery-1-3.pth.tar')['position'] == dict(epoch=1, batch=3)
    assert train_script.run_main(argv('stopped', '--resume', 'latest')) == 0
    _assert_same_end(str(tmp_path / 'out' / 'straight'), str(tmp_path / 'out' / 'stopped'))


def test_position_files_say_where_the_epoch_stands_and_replace_each_other(tmp_path):
    from tokenmix_train.checkpoint import AtomicCheckpointSaver, latest_checkpoint, progress, resume
    model = torch.nn.Linear(3, 2)
    saver = AtomicCheckpointSaver(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save(0, 1.0, {})
    states = [dict(torch=torch.get_rng_state(), totals=[6.5, 4.0])]
    first = saver.save_position(1, 2, dict(rng_states=states, position=dict(epoch=1, batch=2)))
    second = saver.save_position(1, 4, dict(rng_states=states, position=dict(epoch=1, batch=4)))
    assert os.path.basename(second) == 'recovery-1-4.pth.tar' and not os.path.exists(first)
    saved = _load(second)
    assert saved['epoch'] == 0 and progress(saved, second) == (1, 4)  # timm's own resume redoes epoch 1
    assert latest_checkpoint(str(tmp_path)) == (second, (1, 4))
    out = resume(second, torch.nn.Linear(3, 2))
    assert (out['start_epoch'], out['start']) == (1, dict(batch=4, totals=[6.5, 4.0]))
    assert not any(f.startswith('.') for f in os.listdir(tmp_path))  # no temporary file left
    saver.save(1, 2.0, {})
    saver.drop_positions()
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'last.pth.tar',
                                            'model_best.pth.tar']


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_a_crash_resumes_from_the_recovery_position_bit_identical(train_script, train_argv, tmp_path, monkeypatch,
                                                                  caplog):
    """--recovery-interval 3: a run that dies after update 11 (no signal, no save) continues from recovery-1-4, the
    newest position, and ends as the uninterrupted run does."""
    def argv(experiment, *extra):
        return train_argv(*RECIPE, '--recovery-interval', '3', *extra, experiment=experiment)

    assert train_script.run_main(argv('straight')) == 0
    real, count = engine._after_update, [0]

    def crash_after_11(*args, **kwargs):
        real(*args, **kwargs)
        count[0] += 1
        if count[0] == 11:
            raise _Crash()

    with monkeypatch.context() as patch:
        patch.setattr(engine, '_after_update', crash_after_11)
        with pytest.raises(_Crash):
            train_script.run_main(argv('crashed'))
    folder = tmp_path / 'out' / 'crashed'
    assert sorted(f for f in os.listdir(folder) if f.startswith('recovery-')) == ['recovery-1-3.pth.tar']
    assert train_script.run_main(argv('crashed', '--resume', 'latest')) == 0
    assert 'starting at epoch 1 after batch 3' in caplog.text
    _assert_same_end(str(tmp_path / 'out' / 'straight'), str(folder))


def test_signal_names_become_numbers_and_none_adds_no_signal():
    assert signal_numbers(['TERM', 'none', 'USR1', 'USR2', 'HUP', 'INT']) == [
        signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT]
    assert all(type(n) is int for n in signal_numbers(['TERM']))


def test_the_handlers_stay_after_preempted_and_come_back_after_any_other_exit():
    """After `Preempted` the process is about to exit and keeps noting signals; any other exit puts the previous
    handler back, once."""
    from tokenmix_train.preemption import Preempted
    before = signal.getsignal(signal.SIGUSR2)
    stop = StopSignals([signal.SIGUSR2])
    try:
        with pytest.raises(Preempted):
            with stop:
                raise Preempted('stopped')
        assert signal.getsignal(signal.SIGUSR2) == stop._note
        assert stop.name == 'a signal on another rank'  # nothing received here
        with pytest.raises(KeyError):
            with StopSignals([signal.SIGUSR2]) as inner:
                raise KeyError('another error')
        assert signal.getsignal(signal.SIGUSR2) == stop._note and inner._previous == {}
        stop.__exit__(None, None, None)
        assert signal.getsignal(signal.SIGUSR2) is before and stop._previous == {}
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        stop.__exit__(None, None, None)  # a second exit restores nothing again
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_ranks_agree_over_a_gloo_group(tmp_path, monkeypatch):
    """In a one-process gloo world: no extra group over gloo itself, a gloo group asked for by name under another
    backend (the default group stands for NCCL, which cannot reduce CPU tensors), and `requested` answers through a
    MAX all-reduce over that group (a signal noted on any rank is seen)."""
    import torch.distributed as dist
    from tokenmix_train.preemption import stop_group
    assert stop_group() is None  # not distributed
    dist.init_process_group('gloo', store=dist.FileStore(str(tmp_path / 'store'), 1), rank=0, world_size=1)
    try:
        assert stop_group() is None
        backend, new_group, all_reduce, calls = dist.get_backend, dist.new_group, dist.all_reduce, []
        monkeypatch.setattr(dist, 'get_backend', lambda group=None: 'nccl' if group is None else backend(group))
        monkeypatch.setattr(dist, 'new_group', lambda **kw: calls.append(kw) or new_group(**kw))
        group = stop_group()
        assert group is not None and backend(group) == 'gloo' and calls == [dict(backend='gloo')]
        monkeypatch.setattr(dist, 'all_reduce', lambda t, op, group: calls.append((op, group)) or all_reduce(
            t, op=op, group=group))
        with StopSignals([signal.SIGUSR2], group) as stop:
            assert stop.group is group and not stop.requested()
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested() and stop.received == signal.SIGUSR2
        assert calls[1:] == [(dist.ReduceOp.MAX, group)] * 2
        assert not StopSignals([], group='not a group').requested()  # --preempt-signal none: no collective at all
    finally:
        dist.destroy_process_group()
