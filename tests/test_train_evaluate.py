"""tokenmix.evaluate: shards cover every image once, counts and accuracies are exact, the input hook is used."""
import pytest
import torch
from torch.utils.data import Dataset

from tokenmix.evaluate import ShardedDataset, build_eval_loader, evaluate


class Labelled(Dataset):
    """Image i is filled with the value i; its label is i % 4. `transform` is set by timm's create_loader."""

    def __init__(self, n: int):
        self.n, self.transform = n, None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from PIL import Image
        img = Image.new('RGB', (8, 8), (i % 256, 0, 0))
        return (self.transform(img) if self.transform else img), i % 4


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


class RedIsClass(torch.nn.Module):
    """Predicts class (red value % 4) exactly for images 0..k-1 of `Labelled`, class 0 otherwise."""

    def __init__(self, correct_below: int):
        super().__init__()
        self.correct_below = correct_below
        self.seen = 0

    def forward(self, x):
        red = torch.round(x[:, 0, 0, 0] * 255).long()
        self.seen += x.shape[0]
        cls = torch.where(red < self.correct_below, red % 4, torch.zeros_like(red))
        return torch.nn.functional.one_hot(cls, 4).float() * 10


def _config():
    return dict(input_size=(3, 8, 8), interpolation='bilinear', mean=(0., 0., 0.), std=(1., 1., 1.), crop_pct=1.0,
                crop_mode='center')


def test_evaluate_counts_and_accuracy():
    loader = build_eval_loader(Labelled(10), _config(), batch_size=3, workers=0, distributed=False)
    model = RedIsClass(correct_below=6)
    metrics = evaluate(model, loader, torch.device('cpu'))
    # images 0-5 right; of 6-9 (labels 2, 3, 0, 1) only image 8 (label 0) is right by luck
    assert metrics['count'] == 10 and model.seen == 10
    assert metrics['top1'] == pytest.approx(70.0)
    assert metrics['top5'] == pytest.approx(100.0)  # 4 classes: top-5 is every class
    assert metrics['seconds'] > 0


def test_input_transform_hook_changes_what_the_model_sees():
    loader = build_eval_loader(Labelled(8), _config(), batch_size=4, workers=0, distributed=False)
    black = evaluate(RedIsClass(correct_below=8), loader, torch.device('cpu'),
                     input_transform=lambda images, targets: torch.zeros_like(images))
    # every image now reads as red 0 -> class 0: right only for labels 0 (images 0 and 4)
    assert black['top1'] == pytest.approx(25.0) and black['count'] == 8
