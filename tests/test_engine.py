"""The training loop on a linear model: the log cadence in updates, the epoch metrics, skipped-epoch ends."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tokenmix_train.engine import Training, fit, train_one_epoch
from tokenmix_train.logger import RunLogger


class RecordingLogger(RunLogger):
    """A RunLogger that writes nothing and keeps what it was given."""

    def __init__(self) -> None:
        super().__init__(None)
        self.steps, self.batches, self.rows = [], [], []

    def scalars(self, step, values, prefix):
        self.steps.append((prefix, step, sorted(values)))

    def train_batch(self, epoch, batch_idx, images, mask, *, log_step, last_step):
        self.batches.append((epoch, batch_idx, log_step, last_step))

    def epoch_summary(self, epoch, train, evaluation, lr):
        self.rows.append((epoch, sorted(train), evaluation))


class RecordingScheduler:
    def __init__(self) -> None:
        self.updates, self.epochs = [], []

    def step_update(self, num_updates):
        self.updates.append(num_updates)

    def step(self, epoch, metric=None):
        self.epochs.append((epoch, metric))


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
