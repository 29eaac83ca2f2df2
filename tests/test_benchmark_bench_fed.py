"""benchmarks/bench_fed.py: train steps fed by the real loader from JPEG files, beside synthetic and loader-alone
rates, run on the CPU with the tiny models; the verdict rule, the loader's passes, the linked data and bad input."""
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_STUDENT, TINY_TEACHER, load_script

bench = load_script('benchmarks/bench_fed.py')
TINY = [*TINY_STUDENT, '-b', '4', '--num-classes', '10', '--no-amp', '--no-pin-mem', '--device', 'cpu']
MIXERS = {'timm-mixup-cutmix': 'timm Mixup/CutMix', 'tokenmix-area': 'TokenMix, area',
          'tokenmix-stored': 'TokenMix, stored maps', 'tokenmix-teacher': 'TokenMix, teacher ResNet'}


@pytest.fixture(scope='module')
def small_jpegs(tmp_path_factory) -> str:
    """An ImageFolder of 24 small JPEG files (48 x 40 px, 3 classes): decoded in microseconds."""
    root = tmp_path_factory.mktemp('jpeg') / 'data'
    rng = np.random.default_rng(0)
    for index in range(24):
        folder = root / 'train' / f'class{index % 3}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f'{index:03d}.JPEG')
    return str(root)


def _rows(text: str) -> list:
    lines = text[text.index('| configuration |'):].splitlines()
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[2:] if line.startswith('|')]


@pytest.mark.parametrize('workers', [0, 1])
@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_every_configuration_runs_its_own_mixer_fed_by_the_loader(workers, small_jpegs, teacher_checkpoint, tmp_path,
                                                                   capsys, monkeypatch):
    seen = {}  # mixer of each train_one_epoch call -> the dimensions of the targets its loader served
    train_one_epoch = bench.train_one_epoch

    def spy(run, epoch, loader):
        def peek():
            for images, targets in loader:
                seen.setdefault(bench.describe_mixer(run.mixer), set()).add(targets.ndim)
                yield images, targets
        steps = bench.Steps(peek(), len(loader))
        out = train_one_epoch(run, epoch, steps)
        loader.images += steps.images
        return out

    order = []  # (configuration, measurement) as measured
    measure = bench.measure
    monkeypatch.setattr(bench, 'train_one_epoch', spy)
    monkeypatch.setattr(bench, 'measure', lambda config, kind, *a: order.append((config.name, kind)) or
                        measure(config, kind, *a))
    assert bench.main(['--data-dir', small_jpegs, '--out', str(tmp_path), '--teacher-model', TINY_TEACHER,
                       '--teacher-checkpoint', teacher_checkpoint, '--rounds', '2', '--steps', '2',
                       '--warmup-steps', '1', '--synthetic-batches', '2', '--threads', '1', '--',
                       *TINY, '--workers', str(workers)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert [r[0] for r in rows] == list(bench.CONFIGS)
    assert {r[0]: r[1] for r in rows} == MIXERS
    # the stored row's loader carries each crop's record (label + map), the others the labels alone
    assert seen == {'timm Mixup/CutMix': {1}, 'TokenMix, area': {1}, 'TokenMix, stored maps': {2},
                    'TokenMix, teacher ResNet': {1}}
    assert os.path.exists(os.path.join(tmp_path, f'store-{TINY_TEACHER}-data', 'manifest.json'))
    one_round = [(name, kind) for name in bench.CONFIGS for kind in bench.KINDS]
    assert order == one_round + one_round[::-1]  # interleaved, every other round backwards
    for name, mixer, fed, synthetic, loader, ratio, pairs, verdict in rows:
        fed, synthetic, loader = float(fed), float(synthetic), float(loader)
        assert min(fed, synthetic, loader) > 0
        assert float(ratio) == pytest.approx(fed / synthetic, rel=2e-3, abs=2e-3)
        low, high = (float(p) for p in pairs.split('-'))
        assert low <= high and verdict == bench.verdict(fed, synthetic, loader)
    assert re.search(rf'batch 4, workers {workers}; 6 batches a pass from {re.escape(small_jpegs)}; 2 rounds of 1 warm-up '
                     rf'\+ 2 timed steps', out)


def test_generated_jpegs_are_linked_to_fill_a_pass_and_the_teacher_made(tmp_path, capsys):
    assert bench.main(['--out', str(tmp_path), '--images', '3', '--teacher-model', TINY_TEACHER,
                       '--configs', 'tokenmix-teacher', '--rounds', '1', '--steps', '2', '--warmup-steps', '0',
                       '--synthetic-batches', '1', '--threads', '1', '--', *TINY, '--workers', '0']) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r[:2] for r in rows] == [['tokenmix-teacher', 'TokenMix, teacher ResNet']]
    data = tmp_path / 'jpeg-3-seed0-x3'  # 2 steps of 4 images from 3 files: each linked 3 times
    files = sorted(os.path.relpath(os.path.join(d, f), data) for d, _, fs in os.walk(data) for f in fs)
    assert files == [f'train/class{i:04d}/img{i:06d}_{c:03d}.JPEG' for i in range(3) for c in range(3)]
    assert os.path.realpath(data / 'train/class0001/img000001_002.JPEG') == \
        str(tmp_path / 'jpeg-3-seed0' / 'train' / 'class0001' / 'img000001.JPEG')
    assert (tmp_path / f'teacher-{TINY_TEACHER}-10.pth.tar').exists()


def test_measure_feeds_each_kind_from_its_source(monkeypatch):
    cached = [(torch.full((2, 1), -1.0), torch.zeros(2)), (torch.full((2, 1), -2.0), torch.zeros(2))]
    loader = torch.utils.data.DataLoader([(float(i), 0) for i in range(12)], batch_size=2)
    config = bench.Config('c', SimpleNamespace(device=torch.device('cpu')), bench.Feed(loader), 'm', cached)
    trained = []  # the first images of each batch a train_one_epoch call got
    monkeypatch.setattr(bench, 'train_one_epoch', lambda run, epoch, steps: trained.append(
        [float(images.flatten()[0]) for images, _ in steps]))
    assert bench.measure(config, 'synthetic', 1, 2) > 0
    assert trained == [[-1.0], [-2.0, -1.0]] and config.feed.epoch == -1  # the kept batches, the loader left alone
    assert bench.measure(config, 'fed', 1, 2) > 0
    assert trained[2:] == [[0.0], [2.0, 4.0]]  # warm-up, then the timed steps, from the loader
    assert bench.measure(config, 'loader', 1, 2) > 0
    assert len(trained) == 4 and config.feed.left == 0  # no training; the loader's next three batches
    assert bench.measure(config, 'fed', 0, 3) > 0
    assert trained[4] == [0.0, 2.0, 4.0] and config.feed.epoch == 1  # three more would not fit: a new pass


def test_verdict_rule():
    assert bench.verdict(95, 100, 300) == 'GPU-bound'  # within 10% of synthetic
    assert bench.verdict(110, 100, 300) == 'GPU-bound'
    assert bench.verdict(60, 100, 62) == 'loader-bound'  # within 10% of the loader, below 90% of synthetic
    assert bench.verdict(60, 100, 54.6) == 'loader-bound'
    assert bench.verdict(60, 100, 80) == 'mixed'  # neither
    assert bench.verdict(89, 100, 200) == 'mixed'
    assert bench.verdict(91, 100, 91) == 'GPU-bound'  # both within 10%: the step sets the pace
    assert bench.verdict(120, 100, 115) == 'mixed'  # near the loader, but above 90% of synthetic


def test_a_feed_goes_on_with_its_pass_and_starts_a_new_one_only_when_short():
    feed = bench.Feed(torch.utils.data.DataLoader([(i, i % 2) for i in range(10)], batch_size=2))
    feed.reserve(3)
    steps = feed.steps(3)
    assert [b[0].tolist() for b in steps] == [[0, 1], [2, 3], [4, 5]] and steps.images == 6 and len(steps) == 3
    feed.reserve(2)  # two batches left: the same pass goes on
    assert [b[0].tolist() for b in feed.steps(2)] == [[6, 7], [8, 9]] and feed.epoch == 0
    feed.reserve(1)
    assert [b[0].tolist() for b in feed.steps(1)] == [[0, 1]] and feed.epoch == 1


def test_linked_copies_and_bad_input(tmp_path, small_jpegs, capsys):
    out = bench.link_copies(small_jpegs, str(tmp_path / 'x2'), 2)
    files = [f for _, _, fs in os.walk(out) for f in fs]
    assert len(files) == 48 and '005_001.JPEG' in files and not os.path.exists(out + '.partial')
    assert bench.run_cli(bench.main, 'bench_fed.py', [
        '--data-dir', small_jpegs, '--out', str(tmp_path), '--configs', 'tokenmix-area', '--steps', '6',
        '--warmup-steps', '1', '--', *TINY, '--workers', '0']) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"bench_fed.py: error: --data-dir '{small_jpegs}': a pass of its train split makes 6 batches of "
                   f"-b 4, fewer than --warmup-steps + --steps = 7")
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(['--configs', 'tokenmix-nope'])
    assert stop.value.code == 2 and '--configs' in capsys.readouterr().err
