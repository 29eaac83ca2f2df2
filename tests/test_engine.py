"""The training loop on a linear model: the log cadence in updates, the epoch metrics, skipped-epoch ends, and
(issue 23, against the survivors of its mutation run) what each setting of `Training` changes: the loss weights,
clipping and the scaler, the checks for non-finite values (on this rank and another), the positions saved by
--recovery-interval and by a stop signal, a resumed epoch, the mixer, the memory format, DDP's no_sync, autocast,
--model-dtype, and fit's EMA evaluation, checkpoints and BatchNorm averaging."""
import copy
import functools
import math
import os
import re
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import ModelEmaV3, NativeScaler
from torch.utils.data import DataLoader, TensorDataset

import tokenmix_train.engine as engine
from tokenmix_train.checkpoint import AtomicCheckpointSaver
from tokenmix_train.engine import (NonFiniteLossError, Training, _check_diverged, _check_finite, _loss_scale, fit,
                                   train_one_epoch)
from tokenmix_train.evaluate import evaluate
from tokenmix_train.logger import RunLogger, StepMeter
from tokenmix_train.preemption import Preempted
from tokenmix_train.sampling import resumable_loader


class RecordingLogger(RunLogger):
    """A RunLogger that writes nothing and keeps what it was given."""

    def __init__(self) -> None:
        super().__init__(None)
        self.steps, self.batches, self.rows = [], [], []
        self.values, self.shown, self.lrs = [], [], []  # the logged values, the images and masks shown, row lrs

    def scalars(self, step, values, prefix):
        self.steps.append((prefix, step, sorted(values)))
        self.values.append(dict(values))

    def train_batch(self, epoch, batch_idx, images, mask, *, log_step, last_step):
        self.batches.append((epoch, batch_idx, log_step, last_step))
        self.shown.append((images, mask))

    def epoch_summary(self, epoch, train, evaluation, lr):
        self.rows.append((epoch, sorted(train), evaluation))
        self.lrs.append(lr)


class RecordingScheduler:
    def __init__(self) -> None:
        self.updates, self.epochs = [], []

    def step_update(self, num_updates):
        self.updates.append(num_updates)

    def step(self, epoch, metric=None):
        self.epochs.append((epoch, metric))

    def state_dict(self):
        return dict(updates=list(self.updates))


def _data(batches: int = 7) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2 * batches, 3, 2, 2, generator=generator)
    targets = torch.randint(0, 3, (2 * batches,), generator=generator)
    return DataLoader(TensorDataset(images, targets), batch_size=2)


def _run(**kwargs) -> Training:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    return Training(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                    criterion=torch.nn.CrossEntropyLoss(), device=torch.device('cpu'), logger=RecordingLogger(),
                    scheduler=RecordingScheduler(), **kwargs)


def test_train_epoch_logs_and_steps_in_updates_and_returns_the_image_mean_loss():
    run, data = _run(grad_accum_steps=2, log_interval=2), _data()
    metrics = train_one_epoch(run, 1, data)
    # 7 batches in updates of 2 (the last one partial): 4 updates an epoch, so epoch 1 counts updates 5..8
    assert run.scheduler.updates == [5, 6, 7, 8]
    assert run.logger.steps == [('train', step, ['img_per_sec', 'loss', 'lr']) for step in (6, 8)]
    assert [(b[1], b[2], b[3]) for b in run.logger.batches if b[2] or b[3]] == [(3, True, False), (6, True, True)]
    with torch.no_grad():  # lr 0: the weights never change, so the epoch loss is the loss over all 14 images
        expected = F.cross_entropy(run.model(data.dataset.tensors[0]), data.dataset.tensors[1])
    assert metrics['loss'] == pytest.approx(expected.item(), rel=1e-6) and metrics['img_per_sec'] > 0


def test_fit_ends_skipped_and_evaluated_epochs_alike_but_saves_only_evaluated_ones():
    run, data = _run(val_interval=2), _data(3)
    ended = []
    assert fit(run, data, data, None, start_epoch=0, num_epochs=3, on_epoch_end=ended.append) is None
    assert ended == [0, 1, 2]
    epochs = run.scheduler.epochs
    assert [e for e, _ in epochs] == [1, 2, 3] and epochs[0][1] is None  # epoch 0 skipped: no metric
    rows = run.logger.rows  # no summary row for the skipped epoch
    assert [(epoch, train, sorted(evaluation)) for epoch, train, evaluation in rows] == \
        [(epoch, ['img_per_sec', 'loss'], ['loss', 'top1', 'top5']) for epoch in (1, 2)]
    assert [metric for _, metric in epochs[1:]] == [evaluation['top1'] for _, _, evaluation in rows]


# --- issue 23: what each setting of the run changes (survivors of the engine.py mutation run) --------------------

class Spy(torch.nn.Module):
    """Flatten + Linear(12, 3), noting per call: training or not, input and output dtype, whether the input is
    channels_last, whether DDP would synchronise the gradients (`no_sync` as DistributedDataParallel has it)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(12, 3)
        self.calls, self.syncing = [], True

    def forward(self, x):
        out = self.linear(x.flatten(1))
        self.calls.append(dict(training=self.training, dtype=x.dtype, out=out.dtype, synced=self.syncing,
                               channels_last=x.is_contiguous(memory_format=torch.channels_last) and
                               not x.is_contiguous()))
        return out

    @contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True


class EpochData(TensorDataset):
    """`_data`'s tensors, noting the epochs the loop announces (timm's scheduled-resolution datasets read them)."""

    def __init__(self, *tensors) -> None:
        super().__init__(*tensors)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


class RecordingEma(ModelEmaV3):
    """timm's EMA, noting the model and the step of each update (the step drives its warm-up)."""

    def __init__(self, model, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.updates = []

    def update(self, model, step=None):
        self.updates.append((model, step))
        super().update(model, step=step)


class RecordingScaler(NativeScaler):
    """timm's loss scaler on the CPU, noting what each call is given."""

    def __init__(self) -> None:
        super().__init__(device='cpu')
        self.calls = []

    def __call__(self, loss, optimizer, clip_grad=None, clip_mode='norm', parameters=None, create_graph=False,
                 need_update=True):
        parameters = None if parameters is None else list(parameters)
        self.calls.append((optimizer, clip_grad, clip_mode, parameters, need_update))
        super().__call__(loss, optimizer, clip_grad, clip_mode, parameters, create_graph, need_update)


class StopAt:
    """A stop signal that `requested` reports from its `n`-th question on (the loop asks at every step boundary)."""
    name = 'SIGUSR1'

    def __init__(self, n: int) -> None:
        self.n, self.asked = n, 0

    def requested(self) -> bool:
        self.asked += 1
        return self.asked >= self.n


def _poisoned(batches: int, *bad: int) -> DataLoader:
    """`_data(batches)` with NaN images in the batches numbered `bad` (their loss is NaN)."""
    data = _data(batches)
    for b in bad:
        data.dataset.tensors[0][2 * b:2 * b + 2] = math.nan
    return data


def _loss_sum(model, data: DataLoader, first: int = 0, last: int = None):
    """The cross-entropy summed over the images of batches first..last-1 (2 a batch) and their count."""
    images, targets = (t[2 * first:None if last is None else 2 * last] for t in data.dataset.tensors)
    with torch.no_grad():
        return F.cross_entropy(model(images), targets, reduction='sum').item(), float(len(targets))


def _with_lr(run: Training, lr: float) -> Training:
    run.optimizer.param_groups[0]['lr'] = lr
    return run


def _updated_by_hand(model, data: DataLoader, updates, weight: float, lr: float, clip_value: float = None):
    """`model` after plain SGD steps, each on the gradients of its batches (`updates`: lists of batch numbers),
    each batch's loss multiplied by `weight`, the summed gradient clipped to +-`clip_value` when given."""
    model = copy.deepcopy(model)
    batches = list(data)
    for numbers in updates:
        loss = sum(F.cross_entropy(model(batches[n][0]), batches[n][1]) * weight for n in numbers)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        if clip_value is not None:
            assert any(bool((g.abs() > clip_value).any()) for g in grads)  # the clip changes this update
            grads = [g.clamp(-clip_value, clip_value) for g in grads]
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= lr * g
    return model


def _assert_same_weights(a, b, atol=1e-6):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(x, y, rtol=0, atol=atol), name


def test_variable_batch_loss_scale_weighs_each_batch_by_its_size_against_the_average():
    run = _run(batch_loss_scale='linear', batch_size_reference=8.0)
    assert _loss_scale(run, 2) == 0.25
    run.batch_loss_scale = 'sqrt'
    assert _loss_scale(run, 2) == 0.5
    run.batch_size_reference = None  # no scheduled batch sizes: nothing to weigh against
    assert _loss_scale(run, 2) == 1.0
    run.batch_loss_scale, run.batch_size_reference = 'none', 8.0  # the default: no weighing
    assert _loss_scale(run, 2) == 1.0
    run = _with_lr(_run(batch_loss_scale='linear', batch_size_reference=8.0, grad_accum_steps=2), 1.0)
    before, data = copy.deepcopy(run.model), _data(3)
    train_one_epoch(run, 0, data)
    # batches of 2 against an average of 8 weigh 1/4, halved by the accumulation of 2 (the last update is partial)
    _assert_same_weights(run.model, _updated_by_hand(before, data, [[0, 1], [2]], 0.25 / 2, 1.0))
    assert all(p.grad is None for p in run.model.parameters())  # freed after each update, as timm does


def test_clip_grad_reaches_the_update_with_and_without_the_loss_scaler():
    def trained(**kwargs) -> Training:
        run = _with_lr(_run(grad_accum_steps=2, clip_grad=0.05, clip_mode='value', **kwargs), 1.0)
        train_one_epoch(run, 0, _data(3))
        return run

    before, data = _run().model, _data(3)
    plain = trained()
    _assert_same_weights(plain.model, _updated_by_hand(before, data, [[0, 1], [2]], 0.5, 1.0, clip_value=0.05))
    scaled = trained(loss_scaler=RecordingScaler())
    calls = scaled.loss_scaler.calls
    assert [(c[0] is scaled.optimizer, c[1], c[2], c[4]) for c in calls] == \
        [(True, 0.05, 'value', False), (True, 0.05, 'value', True), (True, 0.05, 'value', True)]
    assert all([id(p) for p in c[3]] == [id(p) for p in scaled.model.parameters()] for c in calls)
    _assert_same_weights(scaled.model, plain.model)  # the scaler unscales before clipping and stepping


def test_divergence_names_the_first_bad_tensor_of_the_weights_or_of_the_ema():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))  # 6 float tensors, 1 int
    run = Training(model=model, optimizer=None, criterion=None, device=torch.device('cpu'))
    _check_diverged(run, 2, 0.5)  # all finite: nothing to say
    with torch.no_grad():
        model[0].bias[1] = math.nan
        model[1].running_var[0] = math.inf
    with pytest.raises(NonFiniteLossError, match=re.escape(
            "the run diverged at epoch 2: non-finite weights (2 of 6 tensors, first '0.bias'); nothing of")):
        _check_diverged(run, 2, 0.5)
    run.model, run.model_ema = copy.deepcopy(run.model), ModelEmaV3(model)
    torch.nn.init.zeros_(run.model[0].bias)
    run.model[1].reset_running_stats()
    with pytest.raises(NonFiniteLossError, match=re.escape(
            "at epoch 3: non-finite eval loss nan and EMA weights (2 of 6 tensors, first '0.bias');")):
        _check_diverged(run, 3, math.nan)


@pytest.fixture
def other_rank(tmp_path, monkeypatch):
    """A one-process gloo group standing for two ranks: each all_reduce also takes in what `holds(tensor)` says the
    other rank holds for it (SUM, MIN or MAX, as asked)."""
    dist.init_process_group('gloo', store=dist.FileStore(str(tmp_path / 'store'), 1), rank=0, world_size=1)
    real = dist.all_reduce

    class OtherRank:
        holds = staticmethod(torch.zeros_like)

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        real(tensor, op=op, group=group)
        other = OtherRank.holds(tensor)
        combine = {int(dist.ReduceOp.SUM): torch.add, int(dist.ReduceOp.MIN): torch.minimum,
                   int(dist.ReduceOp.MAX): torch.maximum}[int(op)]
        tensor.copy_(combine(tensor, other))

    monkeypatch.setattr(dist, 'all_reduce', all_reduce)
    try:
        yield OtherRank
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_another_rank_stops_every_rank_at_the_first_bad_step(other_rank):
    other_rank.holds = staticmethod(lambda t: torch.full_like(t, 4.0))  # the other rank's first bad step: 4
    with pytest.raises(NonFiniteLossError, match=re.escape('at epoch 1, step 4 (batch 5 of 7)')):
        _check_finite(torch.tensor(math.inf), 1, 7)  # this rank saw none
    with pytest.raises(NonFiniteLossError, match=re.escape('at epoch 1, step 4 (batch 5 of 7)')):
        _check_finite(torch.tensor(6.0), 1, 7)  # this rank's is later
    other_rank.holds = staticmethod(lambda t: torch.full_like(t, math.inf))
    with pytest.raises(NonFiniteLossError, match=re.escape('step 2 (batch 3 of 7)')):
        _check_finite(torch.tensor(2.0), 1, 7)
    _check_finite(torch.tensor(math.inf), 1, 7)  # no rank saw one


def test_logged_and_epoch_losses_average_every_ranks_images(other_rank, monkeypatch):
    # the other rank's 4 images of each window (and of the epoch) have a summed loss of 10; min-reduced: no bad step
    other_rank.holds = staticmethod(lambda t: torch.tensor([10.0, 4.0], dtype=t.dtype) if t.shape == (2,)
                                    else torch.full_like(t, math.inf))
    ticks = iter(range(1000))  # a clock read twice a batch, 0.05 s apart: 0.1 s a step
    monkeypatch.setattr(engine, 'StepMeter', functools.partial(StepMeter, clock=lambda: 0.05 * next(ticks)))
    run, data = _run(log_interval=2, world_size=2), _data(4)
    metrics = train_one_epoch(run, 0, data)
    with torch.no_grad():  # each batch's mean loss as the loop has it (float32), times its 2 images, in float64
        sums = [F.cross_entropy(run.model(x), y).double().item() * 2 for x, y in data]
    assert [v['loss'] for v in run.logger.values] == pytest.approx(
        [(sums[0] + sums[1] + 10) / 8, (sums[2] + sums[3] + 10) / 8], rel=1e-12)  # summed in float64
    assert [v['lr'] for v in run.logger.values] == [0.0, 0.0]
    assert [v['img_per_sec'] for v in run.logger.values] == pytest.approx([40.0, 40.0])  # 4 images x 2 ranks / 0.2 s
    assert metrics['loss'] == pytest.approx((sum(sums) + 10) / 12, rel=1e-12)
    assert metrics['img_per_sec'] == pytest.approx(12 / 0.4)  # both ranks' images over the 4 steps' time


def _saver(run: Training, folder) -> AtomicCheckpointSaver:
    return AtomicCheckpointSaver(model=run.model, optimizer=run.optimizer, model_ema=run.model_ema,
                                 checkpoint_dir=str(folder), recovery_dir=str(folder))


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def test_recovery_interval_saves_the_position_after_every_nth_update(tmp_path):
    run = _run(grad_accum_steps=2, recovery_interval=3, mix_generator=torch.Generator().manual_seed(5))
    run.recovery_saver, data = _saver(run, tmp_path), _data(6)
    train_one_epoch(run, 1, data)
    # 6 batches in updates of 2: update 3 ends with batch 6; epoch 1 counts updates 4..6
    assert os.listdir(tmp_path) == ['recovery-1-6.pth.tar']
    saved = _load(tmp_path / 'recovery-1-6.pth.tar')
    assert saved['epoch'] == 0 and saved['position'] == dict(epoch=1, batch=6)
    assert saved['scheduler'] == dict(updates=[4, 5, 6])
    [rng] = saved['rng_states']
    assert torch.equal(rng['generator'], run.mix_generator.get_state())
    assert rng['totals'] == pytest.approx(list(_loss_sum(run.model, data, 0, 6)), rel=1e-6)


def test_a_stop_request_saves_the_position_at_the_next_step_boundary(tmp_path):
    run = _run(stop=StopAt(4))  # asked before batch 0 and after each update: the 4th question follows batch 3
    run.recovery_saver, data = _saver(run, tmp_path), _data()
    with pytest.raises(Preempted) as stopped:
        train_one_epoch(run, 1, data)
    path = tmp_path / 'recovery-1-3.pth.tar'
    assert str(stopped.value) == f"stopped by SIGUSR1 at epoch 1 after batch 3; position saved in '{path}'"
    assert os.listdir(tmp_path) == [path.name] and _load(path)['position'] == dict(epoch=1, batch=3)
    assert _load(path)['rng_states'][0]['totals'] == pytest.approx(list(_loss_sum(run.model, data, 0, 3)), rel=1e-6)
    # asked at once in an epoch resumed after batch 4: its position is the one it was given
    run.stop = StopAt(1)
    with pytest.raises(Preempted, match="after batch 4; position saved in '.*recovery-1-4.pth.tar'$"):
        train_one_epoch(run, 1, resumable_loader(data, seed=0, rank=0), dict(batch=4, totals=[5.0, 8.0]))
    assert _load(tmp_path / 'recovery-1-4.pth.tar')['rng_states'][0]['totals'] == [5.0, 8.0]
    run.stop = StopAt(2)  # after batch 5, totals of an epoch as long as ImageNet's: kept in float64
    with pytest.raises(Preempted, match="after batch 5; position saved in '.*recovery-1-5.pth.tar'$"):
        train_one_epoch(run, 1, resumable_loader(data, seed=0, rank=0), dict(batch=4, totals=[2.0 ** 24, 8.0]))
    loss, count = _loss_sum(run.model, data, 4, 5)
    assert _load(tmp_path / 'recovery-1-5.pth.tar')['rng_states'][0]['totals'] == \
        pytest.approx([2.0 ** 24 + loss, 8.0 + count], rel=0, abs=1e-4)
    run.recovery_saver, run.stop = None, StopAt(2)  # another rank than the first: nothing saved, nothing named
    with pytest.raises(Preempted) as stopped:
        train_one_epoch(run, 2, data)
    assert str(stopped.value) == 'stopped by SIGUSR1 at epoch 2 after batch 1'


@pytest.mark.parametrize('save', ['recovery', 'stop', 'log'])
def test_a_non_finite_loss_names_its_first_step_and_is_never_saved(tmp_path, save):
    settings = dict(recovery=dict(recovery_interval=3), stop=dict(stop=StopAt(5)), log=dict(log_interval=2))[save]
    run = _run(**dict(dict(log_interval=50), **settings))
    run.recovery_saver = _saver(run, tmp_path)
    with pytest.raises(NonFiniteLossError, match=re.escape('at epoch 1, step 2 (batch 3 of 7)')):
        train_one_epoch(run, 1, _poisoned(7, 2, 3))  # checked after 3 batches (the save, the log line) or 4 (the stop)
    assert os.listdir(tmp_path) == []


def test_a_resumed_epoch_goes_on_from_its_batch_with_its_totals():
    run, data = _run(grad_accum_steps=2, log_interval=1), _data()
    metrics = train_one_epoch(run, 1, resumable_loader(data, seed=0, rank=0), dict(batch=4, totals=[5.0, 8.0]))
    assert [b[1] for b in run.logger.batches] == [4, 5, 6]
    assert run.scheduler.updates == [7, 8]  # epoch 1 counts updates 5..8 (4 an epoch); batches 4-5 and 6 remain
    rest = _loss_sum(run.model, data, 4)
    assert metrics['loss'] == pytest.approx((5.0 + rest[0]) / (8.0 + rest[1]), rel=1e-6)
    one = _run()  # an epoch of one image: its loss, not half of it
    single = DataLoader(TensorDataset(*(t[:1] for t in data.dataset.tensors)), batch_size=1)
    with torch.no_grad():
        expected = F.cross_entropy(one.model(single.dataset.tensors[0]), single.dataset.tensors[1]).item()
    assert train_one_epoch(one, 0, single)['loss'] == pytest.approx(expected, rel=1e-6)


class SwapMixer:
    """Mixes each image half and half with the next one of its batch (soft targets over 3 classes), with a mask
    for the logger, and can be switched off as timm's Mixup can."""

    def __init__(self) -> None:
        self.mixup_enabled, self.last_mask, self.outputs = True, None, []

    def __call__(self, images, targets):
        soft = F.one_hot(targets, 3).float()
        images, targets = (images + images.roll(1, 0)) / 2, (soft + soft.roll(1, 0)) / 2
        self.last_mask = torch.rand(images.shape[0], 2, 2)
        self.outputs.append((images, targets, self.last_mask))
        return images, targets


def test_the_mixer_feeds_the_loss_and_the_logger_until_mixup_off_epoch():
    mixer = SwapMixer()
    run, data = _run(mixer=mixer, mixup_off_epoch=2), _data(3)
    metrics = train_one_epoch(run, 1, data)
    assert mixer.mixup_enabled and len(mixer.outputs) == 3
    with torch.no_grad():  # lr 0: the loss of the mixed images against the mixed targets
        expected = sum(F.cross_entropy(run.model(x), y, reduction='sum') for x, y, _ in mixer.outputs) / 6
    assert metrics['loss'] == pytest.approx(expected.item(), rel=1e-6)
    assert all(shown[0] is out[0] and shown[1] is out[2] for shown, out in zip(run.logger.shown, mixer.outputs))
    train_one_epoch(run, 2, data)
    assert not mixer.mixup_enabled  # from --mixup-off-epoch on
    always = SwapMixer()
    train_one_epoch(_run(mixer=always), 5, data)  # --mixup-off-epoch 0: never off
    assert always.mixup_enabled


def _spy_run(**kwargs) -> Training:
    torch.manual_seed(0)
    model = Spy()
    return Training(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                    criterion=torch.nn.CrossEntropyLoss(), device=torch.device('cpu'), logger=RecordingLogger(),
                    **kwargs)


def test_channels_last_no_sync_and_autocast_reach_the_forward_pass():
    run = _spy_run(distributed=True, grad_accum_steps=3, channels_last=True, amp_dtype=torch.float16)
    train_one_epoch(run, 0, _data(4))
    # 4 batches in updates of 3: the first two backward passes are not synchronised, the update's and the last are
    assert [(c['synced'], c['channels_last'], c['out']) for c in run.model.calls] == \
        [(False, True, torch.float16)] * 2 + [(True, True, torch.float16)] * 2
    run = _spy_run(grad_accum_steps=2)  # one process: no no_sync; defaults: contiguous float32
    train_one_epoch(run, 0, _data(3))
    assert [(c['synced'], c['channels_last'], c['out']) for c in run.model.calls] == \
        [(True, False, torch.float32)] * 3


def test_model_dtype_reaches_training_and_both_evaluations():
    run = _spy_run(model_dtype=torch.float64)
    run.model.double()
    run.model_ema = ModelEmaV3(run.model)
    data = _data(2)
    fit(run, data, data, None, start_epoch=0, num_epochs=1)
    assert [(c['training'], c['dtype']) for c in run.model.calls] == \
        [(True, torch.float64)] * 2 + [(False, torch.float64)] * 2  # trained, then evaluated on 2 batches
    assert [(c['training'], c['dtype']) for c in run.model_ema.module.calls] == [(False, torch.float64)] * 2


def test_fit_ranks_by_the_evaluated_ema_and_saves_each_evaluated_epoch(tmp_path):
    run = _with_lr(_spy_run(amp_dtype=torch.float16, val_interval=3, scheduler=RecordingScheduler(),
                            mix_generator=torch.Generator().manual_seed(3)), 0.5)
    run.model_ema = RecordingEma(run.model, decay=0.5)
    data = _data(3)
    best = fit(run, data, data, _saver(run, tmp_path), start_epoch=0, num_epochs=4)
    assert [(model is run.model, step) for model, step in run.model_ema.updates] == [(True, s) for s in range(1, 13)]
    for model in (run.model, run.model_ema.module):  # both evaluated under autocast
        assert {c['out'] for c in model.calls if not c['training']} == {torch.float16}
    assert [epoch for epoch, _, _ in run.logger.rows] == [2, 3] and run.logger.lrs == [0.5, 0.5]  # every 3rd, last
    raw = evaluate(run.model, data, run.device, amp_dtype=torch.float16)
    ema = evaluate(run.model_ema.module, data, run.device, amp_dtype=torch.float16)
    row = run.logger.rows[-1][2]
    assert row == dict({k: ema[k] for k in ('top1', 'top5', 'loss')}, **{f'raw_{k}': raw[k] for k in ('top1', 'top5',
                                                                                                       'loss')})
    assert raw['loss'] != ema['loss']
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-2.pth.tar', 'checkpoint-3.pth.tar', 'last.pth.tar',
                                            'model_best.pth.tar']
    last, top = _load(tmp_path / 'last.pth.tar'), _load(tmp_path / 'model_best.pth.tar')
    assert last['epoch'] == 3 and last['metric'] == row['top1'] and best == (top['metric'], top['epoch'])
    assert last['scheduler'] == dict(updates=list(range(1, 13)))
    assert torch.equal(last['rng_states'][0]['generator'], run.mix_generator.get_state())


@pytest.mark.parametrize('dist_bn, distributed, reduce', [('reduce', True, True), ('broadcast', True, False),
                                                          ('', True, None), ('reduce', False, None)])
def test_fit_averages_batchnorm_over_ranks_and_resumes_only_its_first_epoch(monkeypatch, dist_bn, distributed,
                                                                            reduce):
    calls = []
    monkeypatch.setattr(engine, 'distribute_bn', lambda model, world_size, reduce=False: calls.append(
        (model, world_size, reduce)))
    run = _run(distributed=distributed, world_size=2, dist_bn=dist_bn)
    run.model_ema = ModelEmaV3(run.model)
    plain = _data()
    data = EpochData(*plain.dataset.tensors)
    loader = resumable_loader(DataLoader(data, batch_size=2), seed=0, rank=0)
    fit(run, loader, plain, None, start_epoch=1, num_epochs=3, start=dict(batch=4, totals=[5.0, 8.0]))
    assert data.epochs == [1, 2]
    assert [(epoch, idx) for epoch, idx, _, _ in run.logger.batches] == \
        [(1, 4), (1, 5), (1, 6)] + [(2, idx) for idx in range(7)]  # only the first epoch resumes within
    # before each evaluation: the model's statistics, then the EMA's
    expected = [] if reduce is None else [(run.model, 2, reduce), (run.model_ema, 2, reduce)] * 2
    assert len(calls) == len(expected) and all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(calls, expected))
    run.ema_eval, calls[:] = False, []  # --model-ema-force-cpu: the EMA is not evaluated
    fit(run, plain, plain, None, start_epoch=0, num_epochs=1)
    assert sorted(run.logger.rows[-1][2]) == ['loss', 'top1', 'top5']
    assert [call[0] for call in calls] == ([] if reduce is None else [run.model])


def test_synchronize_step_waits_for_the_gpu_only_when_asked_and_on_cuda(monkeypatch):
    synced, waits = [], []
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: synced.append(device))
    for device, flag in (('cuda', True), ('cuda', False), ('cpu', True)):
        run = _run(synchronize_step=flag)
        run.device = torch.device(device)
        engine._after_update(run, StepMeter([], 'x', 50), torch.tensor(math.inf), torch.zeros(2), 0, 1)
        waits.append(len(synced))
    assert waits == [1, 1, 1]  # one wait, for --synchronize-step on a CUDA device


def test_the_loader_is_told_its_epoch_and_batch_and_log_lines_name_the_epoch(monkeypatch, caplog):
    """The epoch reaches the loader (its erasing is seeded by it) and the progress lines ('train epoch E [i/n]')."""
    told, real = [], engine.start_epoch_at
    monkeypatch.setattr(engine, 'start_epoch_at', lambda *args: told.append(args) or real(*args))
    run, data = _run(log_interval=3), resumable_loader(_data(), seed=0, rank=0)
    with caplog.at_level('INFO', logger='tokenmix_train'):
        train_one_epoch(run, 4, data, dict(batch=2, totals=[0.0, 0.0]))
    assert told == [(data, 4, 2)]
    assert re.findall(r'train epoch \d+ \[\d+/\d+\]', caplog.text) == ['train epoch 4 [5/7]', 'train epoch 4 [7/7]']
