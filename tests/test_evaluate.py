"""tokenmix_train.evaluate: shards cover every image once, counts, accuracies and loss are exact (float64 sums),
the input hook and autocast are used, the eval loader gets every setting, and --retry steps the batch size down."""
import math
import time
from functools import partial

import pytest
import torch
from torch.utils.data import Dataset

from tokenmix_train.evaluate import ShardedDataset, build_eval_loader, evaluate, evaluate_with_retry


class Labelled(Dataset):
    """Image i is filled with the red value i; its label is i % 8. `transform` is set by timm's create_loader."""

    def __init__(self, n: int):
        self.n, self.transform = n, None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from PIL import Image
        img = Image.new('RGB', (8, 8), (i % 256, 0, 0))
        return (self.transform(img) if self.transform else img), i % 8


@pytest.mark.parametrize('n, world', [(10, 1), (10, 3), (7, 4), (2, 4)])
def test_shards_cover_each_index_once(n, world):
    seen = [i for r in range(world) for i in ShardedDataset(list(range(n)), r, world)]
    assert sorted(seen) == list(range(n))
    assert [len(ShardedDataset(list(range(n)), r, world)) for r in range(world)] == \
        [len(range(r, n, world)) for r in range(world)]


def test_shard_forwards_transform():
    base = Labelled(5)
    shard = ShardedDataset(base, 1, 2)
    shard.transform = 'set by create_loader'
    assert base.transform == 'set by create_loader'


OTHERS = (7.5, 6.5, 6.4, 6.3, 6.8, 6.9, 6.6, 7.0)


class RedIsClass(torch.nn.Module):
    """Ranks class (red % 8) first for images 0..k-1 of `Labelled`, class 0 first otherwise.

    Logits: 10 for the predicted class, OTHERS[c] for every other class c: after class 0 come 7, 5, 4, 6, 1, 2, 3.
    """

    def __init__(self, correct_below: int):
        super().__init__()
        self.correct_below = correct_below
        self.seen = 0
        self.modes = []

    def forward(self, x):
        time.sleep(0.01)
        self.modes.append(self.training)
        red = torch.round(x[:, 0, 0, 0] * 255).long()
        self.seen += x.shape[0]
        cls = torch.where(red < self.correct_below, red % 8, torch.zeros_like(red))
        rest = torch.tensor(OTHERS).expand(x.shape[0], 8)
        return torch.where(torch.nn.functional.one_hot(cls, 8).bool(), torch.tensor(10.), rest)


def _config():
    return dict(input_size=(3, 8, 8), interpolation='bilinear', mean=(0., 0., 0.), std=(1., 1., 1.), crop_pct=1.0,
                crop_mode='center')


def test_evaluate_counts_accuracy_and_loss():
    loader = build_eval_loader(Labelled(10), _config(), batch_size=3, workers=0, distributed=False)
    model = RedIsClass(correct_below=6).train()
    metrics = evaluate(model, loader, torch.device('cpu'))
    assert metrics['count'] == 10 and model.seen == 10
    # images 0-5 right; images 6-9 (labels 6, 7, 0, 1) all read as class 0, so only image 8 is right
    assert metrics['top1'] == pytest.approx(70.0)
    # images 6-9 rank 0, 7, 5, 4, 6 first: labels 6 (5th), 7 and 0 are in the top 5, label 1 is not
    assert metrics['top5'] == pytest.approx(90.0)
    # cross-entropy by hand: the true class has logit 10, or OTHERS[label] when the prediction is wrong

    def ce(label: int, predicted: int) -> float:
        logits = [10. if c == predicted else OTHERS[c] for c in range(8)]
        return math.log(sum(math.exp(v) for v in logits)) - logits[label]

    expected = [ce(i % 8, i % 8) for i in range(6)] + [ce(label, 0) for label in (6, 7, 0, 1)]
    assert metrics['loss'] == pytest.approx(sum(expected) / 10, rel=1e-5)
    # the model ran in eval mode and is handed back in the mode it came in; 4 batches took >= 4 x 10 ms
    assert model.modes == [False] * 4 and model.training
    assert evaluate(model.eval(), loader, torch.device('cpu'))['count'] == 10 and not model.training
    assert 0.04 <= metrics['seconds'] < 10


def test_input_transform_hook_changes_what_the_model_sees():
    loader = build_eval_loader(Labelled(8), _config(), batch_size=4, workers=0, distributed=False)
    black = evaluate(RedIsClass(correct_below=8), loader, torch.device('cpu'),
                     input_transform=lambda images, targets: torch.zeros_like(images))
    # every image now reads as red 0 -> class 0: right only for label 0 (image 0)
    assert black['top1'] == pytest.approx(12.5) and black['count'] == 8


class FixedLogits(torch.nn.Module):
    """Returns logits[b] for the image whose every pixel is b; records autocast's state at each call."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.autocast = torch.tensor(logits), []

    def forward(self, x):
        self.autocast.append((torch.is_autocast_enabled('cpu'), torch.get_autocast_dtype('cpu')))
        return self.logits[x[:, 0, 0, 0].long()]


def _batches(*labels):
    """One image a batch: image b is filled with b, its label labels[b]."""
    return [(torch.full((1, 3, 2, 2), float(b)), torch.tensor([label])) for b, label in enumerate(labels)]


def test_amp_dtype_autocasts_the_forward_pass_only_when_given():
    model = FixedLogits([[0.0, 1.0]])
    evaluate(model, _batches(1), torch.device('cpu'), amp_dtype=torch.float16)
    evaluate(model, _batches(1), torch.device('cpu'))
    assert model.autocast[0] == (True, torch.float16) and model.autocast[1][0] is False


def test_the_input_transform_gets_each_batchs_targets():
    seen = []
    evaluate(FixedLogits([[0.0, 1.0], [1.0, 0.0]]), _batches(1, 0), torch.device('cpu'),
             input_transform=lambda images, targets: seen.append(targets.tolist()) or images)
    assert seen == [[1], [0]]


def test_one_image_is_its_own_mean_and_sums_are_float64():
    """The loss of one image is that image's; a 1e8 loss beside log 2 keeps the log 2 (float32 sums would not)."""
    one = evaluate(FixedLogits([[0.0, 0.0]]), _batches(1), torch.device('cpu'))
    assert one['loss'] == pytest.approx(math.log(2), rel=1e-6) and one['count'] == 1
    two = evaluate(FixedLogits([[1e8, 0.0], [0.0, 0.0]]), _batches(1, 1), torch.device('cpu'))
    assert two['loss'] == pytest.approx((1e8 + math.log(2)) / 2, abs=1e-3) and two['count'] == 2


def test_eval_loader_passes_each_setting_to_timms_loader(monkeypatch):
    """What build_eval_loader asks timm's create_loader for (validate.py's -j, --pin-mem, --crop-border-pixels,
    --tf-preprocessing, --no-prefetcher, --device reach it only here); workers are never persistent, so every pass
    draws its worker seed from the main RNG alike (a resumed run's evaluation draws as an uninterrupted one)."""
    import tokenmix_train.evaluate as evaluate_module
    asked = []
    monkeypatch.setattr(evaluate_module, 'create_loader', lambda dataset, **kwargs: asked.append(kwargs))
    config = dict(_config(), crop_pct=0.9)
    build_eval_loader(Labelled(4), config, batch_size=3, workers=5, distributed=False)
    build_eval_loader(Labelled(4), config, batch_size=3, workers=5, distributed=False, device=torch.device('meta'),
                      use_prefetcher=False, pin_memory=True, crop_border_pixels=2, tf_preprocessing=True)
    common = dict(input_size=(3, 8, 8), batch_size=3, is_training=False, interpolation='bilinear', mean=(0., 0., 0.),
                  std=(1., 1., 1.), num_workers=5, crop_pct=0.9, crop_mode='center', persistent_workers=False)
    assert asked[0] == dict(common, crop_border_pixels=None, tf_preprocessing=False, pin_memory=False,
                            device=torch.device('cpu'), use_prefetcher=True)
    assert asked[1] == dict(common, crop_border_pixels=2, tf_preprocessing=True, pin_memory=True,
                            device=torch.device('meta'), use_prefetcher=False)
    assert all(kwargs['persistent_workers'] is False for kwargs in asked)


def test_shard_rank_must_lie_below_world_size():
    with pytest.raises(ValueError, match=r'rank must lie in \[0, 3\)'):
        ShardedDataset(list(range(5)), 3, 3)


def test_distributed_loader_reads_this_ranks_shard(tmp_path):
    """One gloo process in a world of one: the loader wraps the dataset in this rank's shard."""
    store = torch.distributed.FileStore(str(tmp_path / 'store'), 1)
    torch.distributed.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        loader = build_eval_loader(Labelled(5), _config(), batch_size=2, workers=0, distributed=True)
        assert isinstance(loader.dataset, ShardedDataset) and list(loader.dataset.indices) == [0, 1, 2, 3, 4]
        assert evaluate(RedIsClass(correct_below=5), loader, torch.device('cpu'))['top1'] == pytest.approx(100.0)
    finally:
        torch.distributed.destroy_process_group()


def test_retry_steps_the_batch_size_down_until_it_fits_or_is_one(caplog):
    sizes = []

    def run(batch_size):
        sizes.append(batch_size)
        if batch_size > 3:
            raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return dict(top1=1.0, batch_size=batch_size)
    assert evaluate_with_retry(run, 8, retry=True) == dict(top1=1.0, batch_size=3)
    assert sizes == [8, 6, 4, 3]  # timm's decay_batch_step
    assert caplog.messages[-1] == '"CUDA out of memory. Tried to allocate 2.00 GiB" while validating; retrying with ' \
                                  'batch size 3'
    with pytest.raises(RuntimeError, match='out of memory'):
        evaluate_with_retry(run, 8, retry=False)

    def broken(message, batch_size):
        sizes.append(batch_size)
        raise RuntimeError(message)
    sizes.clear()
    with pytest.raises(RuntimeError, match='illegal memory access'):  # timm: the process is unusable, no retry
        evaluate_with_retry(partial(broken, 'CUDA error: an illegal memory access was encountered'), 8, retry=True)
    assert sizes == [8]
    sizes.clear()
    with pytest.raises(RuntimeError, match='out of memory'):
        evaluate_with_retry(partial(broken, 'CUDA out of memory'), 8, retry=True)
    assert sizes == [8, 6, 4, 3, 2, 1]
