"""tokenmix_train/checkpoint.py function by function, on a 3 -> 2 linear model and files in tmp_path (each test well
under a second): what a resume restores and returns, the reasons it gives for not continuing bit for bit, the RNG
state round trip, how `continue_history` treats the best file it finds on disk, and validate.py's checkpoint
listing and loading.

Two mutants of the module are equivalent and have no test here: storing NumPy's uint32 RNG keys as float64 instead
of int64 (`astype(None)`: float64 holds every uint32 exactly, and `np.random.set_state` casts its keys to uint32
itself), and `_fsync_file` opening the file in text mode (nothing is read; `fsync` acts on the descriptor).
"""
import errno
import logging
import os
import pathlib
import random
import shutil

import numpy as np
import pytest
import timm
import torch

from tokenmix_train.checkpoint import (AtomicCheckpointSaver, capture_rng_state, checkpoint_files, continue_history,
                                       gather_rng_states, load_model_weights, load_training_checkpoint, numerics,
                                       plain_data, restore_rng_state, resume)
from tokenmix_train.errors import ConfigError, OutputError
from tokenmix_train.run_folder import size_text


class Stateful:
    """Stands for the LR scheduler or the loss scaler: hands out `state`, records what it is asked to load."""

    state_dict_key = 'amp_scaler'  # the key timm's loss scalers are saved under

    def __init__(self, state=None, error: Exception = None):
        self.state, self.error, self.loaded = state, error, []

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        if self.error is not None:
            raise self.error
        self.loaded.append(state)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _save(folder, metrics=(1.0, 5.0, 3.0)) -> str:
    """Three epochs saved the way `fit` saves them (scheduler and RNG states in `extra`); returns `last`'s path."""
    model, ema = _model(0), _model(1)
    optimizer = _optimizer(model)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()  # momentum buffers: an optimiser state to restore
    saver = AtomicCheckpointSaver(model=model, optimizer=optimizer, model_ema=ema, amp_scaler=Stateful(dict(scale=8.0)),
                                  checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=2)
    for epoch, metric in enumerate(metrics):
        saver.save(epoch, metric, dict(scheduler=dict(last_epoch=epoch), rng_states=[dict(rank=0, epoch=epoch)]))
    return str(folder / 'last.pth.tar')


def _warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_plain_data_keeps_builtins_and_turns_other_objects_into_strings():
    value = {'path': pathlib.PurePosixPath('/data/x'), 'sizes': (1, [2.5, None, 'a']), 3: True, 'none': None}
    out = plain_data(value)
    assert out == {'path': '/data/x', 'sizes': (1, [2.5, None, 'a']), '3': True, 'none': None}
    assert type(out['sizes']) is tuple and plain_data(None) is None


def test_numerics_names_the_device_and_on_cpu_the_threads_and_kernels():
    assert numerics(torch.nn.Linear(3, 2, device='meta')) == {'device': 'meta'}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        found = numerics(torch.nn.Linear(3, 2))
    finally:
        torch.set_num_threads(threads)
    assert found == {'device': 'cpu', 'threads': 1, 'cpu_kernels': torch.backends.cpu.get_cpu_capability()}


def _draws(generator: torch.Generator) -> tuple:
    return random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item()


def test_rng_states_round_trip_and_a_saved_generator_state_needs_a_generator():
    generator = torch.Generator().manual_seed(5)
    state = capture_rng_state(generator)
    first = _draws(generator)
    restore_rng_state(state, generator)
    assert _draws(generator) == first
    restore_rng_state(state)  # the global streams only: the saved generator state has nowhere to go
    again = _draws(generator)
    assert again[:3] == first[:3] and again[3] != first[3]


def test_cuda_states_are_saved_once_cuda_is_initialised_and_restored_when_saved(monkeypatch):
    """Faked CUDA on this CPU-only machine: a CUDA that is available but not yet initialised is left alone."""
    saved, restored = [torch.tensor([7], dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: False)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: pytest.fail('CUDA initialised by a capture'))
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', restored.append)
    state = capture_rng_state()
    assert 'cuda' not in state
    restore_rng_state(state)
    assert restored == []
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: saved)
    state = capture_rng_state()
    assert state['cuda'] is saved
    restore_rng_state(state)
    assert restored == [saved]


def test_gather_rng_states_in_a_one_process_group(tmp_path):
    store = torch.distributed.FileStore(str(tmp_path / 'store'), 1)
    torch.distributed.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(11)
        states = gather_rng_states()
    finally:
        torch.distributed.destroy_process_group()
    assert len(states) == 1 and torch.equal(states[0]['torch'], torch.manual_seed(11).get_state())


def test_a_file_that_is_no_training_checkpoint_is_named_with_what_it_holds(tmp_path):
    torch.save([1, 2], tmp_path / 'list.pth')
    with pytest.raises(ConfigError, match=r"--resume: checkpoint '.*list\.pth' is not a training checkpoint .*"
                                          r"it holds a list\)$"):
        load_training_checkpoint(str(tmp_path / 'list.pth'))
    torch.save({k: 0 for k in 'abcdefg'}, tmp_path / 'dict.pth')
    with pytest.raises(ConfigError, match=r"it holds 'a', 'b', 'c', 'd', 'e'\)$"):  # the first five keys
        load_training_checkpoint(str(tmp_path / 'dict.pth'))


def test_resume_restores_every_part_and_returns_where_to_continue(tmp_path, caplog):
    path = _save(tmp_path)
    saved = torch.load(path)
    model, ema, scheduler, scaler = _model(2), _model(3), Stateful(), Stateful()
    optimizer = _optimizer(model)
    with caplog.at_level(logging.WARNING):
        out = resume(path, model, optimizer=optimizer, scheduler=scheduler, loss_scaler=scaler, model_ema=ema)
    assert _warnings(caplog) == []  # one process, same machine, RNG states saved: an exact resume
    assert out == dict(start_epoch=3, start=None, rng_state=dict(rank=0, epoch=2), saver_state=saved['saver'])
    assert torch.equal(model.weight, saved['state_dict']['weight']) and torch.equal(ema.weight, _model(1).weight)
    assert not torch.equal(model.weight, _model(2).weight)
    momentum = optimizer.state_dict()['state'][0]['momentum_buffer']
    assert torch.equal(momentum, saved['optimizer']['state'][0]['momentum_buffer']) and momentum.abs().sum() > 0
    assert scheduler.loaded == [dict(last_epoch=2)] and scaler.loaded == [dict(scale=8.0)]


def test_resume_leaves_the_parts_it_is_not_given_or_that_the_file_lacks(tmp_path):
    path = _save(tmp_path)
    model = _model(2)
    out = resume(path, model)  # --no-resume-opt, no EMA, no scheduler, no loss scaler
    assert out['start_epoch'] == 3 and torch.equal(model.weight, torch.load(path)['state_dict']['weight'])
    bare = tmp_path / 'bare.pth'
    torch.save(dict(state_dict=_model(0).state_dict(), epoch=0, version=2), bare)
    scheduler, scaler, ema = Stateful(), Stateful(), _model(3)
    resume(str(bare), _model(2), scheduler=scheduler, loss_scaler=scaler, model_ema=ema)
    assert scheduler.loaded == scaler.loaded == [] and torch.equal(ema.weight, _model(3).weight)


@pytest.mark.parametrize('part', ['--model', 'EMA (--model-ema)', 'optimizer (--opt)', 'loss scaler',
                                  'scheduler (--sched)'])
def test_resume_names_the_part_that_does_not_fit(tmp_path, part):
    path = _save(tmp_path)
    model = torch.nn.Linear(3, 3) if part == '--model' else _model(2)
    ema = torch.nn.Linear(4, 2) if part.startswith('EMA') else _model(3)
    optimizer = torch.optim.SGD([{'params': [model.weight]}, {'params': [model.bias]}], lr=0.1) \
        if part.startswith('optimizer') else _optimizer(model)
    scaler = Stateful(error=KeyError('scale')) if part == 'loss scaler' else Stateful()
    scheduler = Stateful(error=ValueError('no t_initial')) if part.startswith('scheduler') else Stateful()
    with pytest.raises(ConfigError, match=rf"^--resume: checkpoint '.*last\.pth\.tar' does not fit this run's "
                                          rf"{part.replace('(', '[(]').replace(')', '[)]')}: \S"):
        resume(path, model, optimizer=optimizer, scheduler=scheduler, loss_scaler=scaler, model_ema=ema)


@pytest.mark.parametrize('error, detail', [(RuntimeError('size mismatch\n\tfor  weight'), 'size mismatch for weight'),
                                           (ValueError('x' * 400), 'x' * 300), (KeyError(), 'KeyError')])
def test_a_part_that_does_not_fit_is_shown_on_one_line_of_at_most_300_characters(tmp_path, error, detail):
    path = _save(tmp_path)
    with pytest.raises(ConfigError) as info:
        resume(path, _model(2), scheduler=Stateful(error=error))
    assert str(info.value).endswith("does not fit this run's scheduler (--sched): " + detail)


@pytest.mark.parametrize('stored', [dict(epoch=3), dict(epoch=3, version=1), dict(epoch=3, version=2),
                                    dict(version=2), dict(), dict(version=1)])
def test_resume_starts_where_timm_resumes(tmp_path, stored):
    """timm's `resume_checkpoint` is the reference: version 2 files hold a finished epoch, older ones the next."""
    path = tmp_path / 'x.pth'
    torch.save(dict(state_dict=_model(0).state_dict(), **stored), path)
    timm_epoch = timm.models.resume_checkpoint(_model(2), str(path), log_info=False)
    assert resume(str(path), _model(2))['start_epoch'] == (0 if timm_epoch is None else timm_epoch)


def test_resume_says_why_it_will_not_continue_bit_for_bit(tmp_path, caplog):
    path = tmp_path / 'other.pth'
    torch.save(dict(state_dict=_model(0).state_dict(), epoch=1, version=2, args=dict(workers=4),
                    rng_states=[{}, {}], numerics=dict(device='cuda', threads=torch.get_num_threads() + 1,
                                                       cpu_kernels='OTHER')), path)
    with caplog.at_level(logging.WARNING):
        out = resume(str(path), _model(2))
    assert out['rng_state'] is None
    now = torch.backends.cpu.get_cpu_capability()
    assert _warnings(caplog) == [
        f"resuming '{path}' will not continue bit for bit like an uninterrupted run: it holds the RNG states of 2 "
        f"processes, this run has 1, so random streams are reseeded; "
        f"device cpu, the checkpoint was written with cuda; CPU threads {torch.get_num_threads()}, the checkpoint was "
        f"written with {torch.get_num_threads() + 1}; CPU kernels {now}, the checkpoint was written with OTHER"]


def test_a_checkpoint_without_args_or_numerics_only_lacks_rng_states(tmp_path, caplog):
    path = tmp_path / 'timm.pth'
    torch.save(dict(state_dict=_model(0).state_dict(), epoch=1, version=2), path)
    with caplog.at_level(logging.WARNING):
        resume(str(path), _model(2))
    assert _warnings(caplog) == [f"resuming '{path}' will not continue bit for bit like an uninterrupted run: the "
                                 f"checkpoint holds no RNG states, so random streams are reseeded"]


def _resumed_saver(folder) -> AtomicCheckpointSaver:
    model = _model(2)
    return AtomicCheckpointSaver(model=model, optimizer=_optimizer(model), checkpoint_dir=str(folder),
                                 recovery_dir=str(folder), max_history=2)


def test_continue_history_ignores_a_checkpoint_from_another_folder(tmp_path):
    (tmp_path / 'a').mkdir()
    path = _save(tmp_path / 'a')
    saver = _resumed_saver(tmp_path)
    continue_history(saver, path, torch.load(path)['saver'])
    assert (saver.checkpoint_files, saver.best_metric) == ([], None)


@pytest.mark.parametrize('best_file', ['missing', 'a list', 'no metric', 'a lower metric'])
def test_continue_history_keeps_the_recorded_best_over_a_worse_or_odd_best_file(tmp_path, best_file):
    path = _save(tmp_path)  # metrics 1, 5, 3: the best is epoch 1
    best = tmp_path / 'model_best.pth.tar'
    if best_file == 'missing':
        best.unlink()
    else:
        torch.save({'a list': [1], 'no metric': dict(epoch=0), 'a lower metric': dict(epoch=0, metric=2.0)}[best_file],
                   best)
    saver = _resumed_saver(tmp_path)
    continue_history(saver, path, torch.load(path)['saver'])
    assert (saver.best_metric, saver.best_epoch) == (5.0, 1)
    assert [(p.rsplit('/', 1)[-1], m) for p, m in saver.checkpoint_files] == [('checkpoint-1.pth.tar', 5.0),
                                                                            ('checkpoint-2.pth.tar', 3.0)]


def test_temporary_files_sit_hidden_beside_their_target_and_old_ones_go_at_start(tmp_path):
    """A killed writer leaves `.NAME.tmp` (or timm's `tmp.pth.tar`, `recovery_tmp.pth.tar`) in the checkpoint folder:
    the next saver removes them, and nothing else."""
    from tokenmix_train.checkpoint import temp_path
    assert temp_path(str(tmp_path / 'last.pth.tar')) == str(tmp_path / '.last.pth.tar.tmp')
    for name in ('.last.pth.tar.tmp', '.checkpoint-3.pth.tar.tmp', 'tmp.pth.tar', 'recovery_tmp.pth.tar',
                 'checkpoint-2.pth.tar', 'notes.tmp'):
        (tmp_path / name).write_bytes(b'x')
    model = _model(0)
    AtomicCheckpointSaver(model=model, optimizer=_optimizer(model), checkpoint_dir=str(tmp_path),
                          recovery_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-2.pth.tar', 'notes.tmp']


def test_a_saved_checkpoint_carries_timms_keys(tmp_path):
    """arch (the --model name, else the model's class), version 2 (timm: the saved epoch is complete), and the
    weights as the unwrap function gives them."""
    model = _model(0)
    saver = AtomicCheckpointSaver(model=model, optimizer=_optimizer(model), checkpoint_dir=str(tmp_path),
                                  recovery_dir=str(tmp_path), unwrap_fn=lambda m: torch.nn.Sequential(m))
    saver.save(0, 1.0, {})
    state = torch.load(tmp_path / 'last.pth.tar', weights_only=False)
    assert (state['arch'], state['version'], state['epoch']) == ('linear', 2, 0)
    assert sorted(state['state_dict']) == ['0.bias', '0.weight']


def test_checkpoint_files_of_a_folder_leave_out_saves_in_progress(tmp_path):
    for name in ('b.pth', 'a.pth.tar', 'c.safetensors', 'tmp.pth.tar', 'recovery_tmp.pth.tar', '.last.pth.tar.tmp',
                 'notes.txt'):
        (tmp_path / name).write_bytes(b'x')
    assert [os.path.basename(f) for f in checkpoint_files(str(tmp_path))] == ['a.pth.tar', 'b.pth', 'c.safetensors']
    assert checkpoint_files(str(tmp_path / 'notes.txt')) == [str(tmp_path / 'notes.txt')]  # a file is taken as given
    with pytest.raises(ConfigError, match=f"^--checkpoint '{tmp_path / 'x'}': no such file or folder$"):
        checkpoint_files(str(tmp_path / 'x'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ConfigError, match=r"the folder holds no \*.pth.tar / \*.pth / \*.safetensors files$"):
        checkpoint_files(str(tmp_path / 'empty'))


def test_load_model_weights_names_the_flag_and_the_file(tmp_path):
    path = tmp_path / 'w.pth'
    torch.save(_model(1).state_dict(), path)
    model = _model(0)
    load_model_weights(model, str(path), '--initial-checkpoint')
    assert torch.equal(model.weight, _model(1).weight)
    with pytest.raises(ConfigError, match=f"^--initial-checkpoint '{tmp_path / 'x.pth'}': no such file$"):
        load_model_weights(model, str(tmp_path / 'x.pth'), '--initial-checkpoint')
    with pytest.raises(ConfigError, match=f"^--checkpoint: checkpoint '{path}' has no EMA weights .*"
                                          r"load it without use_ema \(--use-ema\)$"):
        load_model_weights(model, str(path), '--checkpoint', use_ema=True)
    torch.save(dict(state_dict=_model(1).state_dict(), state_dict_ema=_model(1).state_dict()), path)
    with pytest.raises(ConfigError, match=f"^--checkpoint: checkpoint '{path}' does not fit Linear: shape "
                                          r"mismatches .*\(is it for another architecture\?\)$"):
        load_model_weights(torch.nn.Linear(3, 4), str(path), '--checkpoint', use_ema=True)


def _disk_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _saver_after_epoch_0(folder, monkeypatch) -> AtomicCheckpointSaver:
    """A saver that has saved epoch 0, in a folder whose free space reads 1000 bytes."""
    model = _model(0)
    saver = AtomicCheckpointSaver(model=model, optimizer=_optimizer(model), checkpoint_dir=str(folder),
                                  recovery_dir=str(folder), max_history=2)
    saver.save(0, 1.0, {})
    usage = shutil.disk_usage(folder)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=1000) if path == str(folder) else 0)
    return saver


def _contents(folder) -> dict:
    return {p.name: p.read_bytes() for p in pathlib.Path(folder).iterdir()}


def test_a_save_onto_a_full_disk_is_one_line_and_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """torch.save's write fails as on a full disk: part of the file written, then a RuntimeError 'unexpected pos'
    raised while handling the OSError. The error names the file, the folder, the checkpoint's size (as the next
    save that fits writes it) and the free space; the temporary file is gone, the saver's records unchanged."""
    saver = _saver_after_epoch_0(tmp_path, monkeypatch)
    before = _contents(tmp_path)
    real_save = torch.save

    def full_disk(state, f, *args, **kwargs):
        if not hasattr(f, 'fileno'):  # not a file: the count of the checkpoint's size
            return real_save(state, f, *args, **kwargs)
        f.write(b'PK\x03\x04 the first bytes of a checkpoint')
        try:
            raise _disk_error(errno.ENOSPC)
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')

    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(OutputError) as error:
        saver.save(1, 2.0, {})
    monkeypatch.setattr(torch, 'save', real_save)
    assert _contents(tmp_path) == before
    assert saver.save(1, 2.0, {}) == (2.0, 1)  # space freed: the same save again
    size = size_text(os.path.getsize(tmp_path / 'last.pth.tar'))
    assert str(error.value) == (f"cannot write 'last.pth.tar' in '{tmp_path}': No space left on device (needs {size}, "
                                f"1000 bytes free); the files written before are intact: free space, then continue "
                                f"with --resume latest")


def test_a_save_error_that_is_not_a_write_passes_unchanged_without_a_temporary_file(tmp_path, monkeypatch):
    saver = _saver_after_epoch_0(tmp_path, monkeypatch)
    before = _contents(tmp_path)

    def cannot_pickle(state, f, *args, **kwargs):
        f.write(b'PK\x03\x04')
        raise RuntimeError('cannot pickle a lock')

    monkeypatch.setattr(torch, 'save', cannot_pickle)
    with pytest.raises(RuntimeError, match='^cannot pickle a lock$'):
        saver.save(1, 2.0, {})
    assert _contents(tmp_path) == before


def test_a_new_best_whose_copy_exceeds_the_quota_keeps_every_complete_file_and_no_temporary_one(tmp_path,
                                                                                                monkeypatch):
    """No hard links (the link fails too), the history copy fits, the copy to model_best does not: the error names
    model_best and the checkpoint's size; what stays is what a kill at that instant leaves, without its temporary
    files: `last` and the best of epoch 0, and the complete history file of epoch 1."""
    saver = _saver_after_epoch_0(tmp_path, monkeypatch)
    before = _contents(tmp_path)
    real_copy = shutil.copy2

    def quota(src, dst, *args, **kwargs):
        if os.path.basename(dst) != '.model_best.pth.tar.tmp':
            return real_copy(src, dst, *args, **kwargs)
        with open(dst, 'wb') as f:
            f.write(b'PK\x03\x04 the first bytes of a copy')
        raise _disk_error(errno.EDQUOT)

    def no_link(src, dst):
        raise _disk_error(errno.ENOSPC)

    monkeypatch.setattr(os, 'link', no_link)
    monkeypatch.setattr(shutil, 'copy2', quota)
    with pytest.raises(OutputError) as error:
        saver.save(1, 2.0, {})
    size = size_text(os.path.getsize(tmp_path / 'checkpoint-1.pth.tar'))
    assert str(error.value) == (f"cannot write 'model_best.pth.tar' in '{tmp_path}': Disk quota exceeded (needs "
                                f"{size}, 1000 bytes free); the files written before are intact: free space, then "
                                f"continue with --resume latest")
    after = _contents(tmp_path)
    assert sorted(after) == sorted([*before, 'checkpoint-1.pth.tar'])
    assert {name: after[name] for name in before} == before
    assert torch.load(tmp_path / 'checkpoint-1.pth.tar', weights_only=False)['epoch'] == 1
