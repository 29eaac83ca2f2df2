"""scripts/mini_table.sh --dataset cifar10: the real-data mode on a tiny folder in torchvision's CIFAR format."""
import csv
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # a whole mini table in a subprocess

SCRIPT = os.path.join(ROOT, 'scripts', 'mini_table.sh')
# torchvision checks the md5 sums of the real CIFAR files; the tiny files written here have other sums, so the
# subprocesses get this one change through sitecustomize: everything else (timm's torch/cifar10 reader, the loader,
# train.py / validate.py / mini_table.py) runs as it would on the real data.
SITECUSTOMIZE = 'import torchvision.datasets.cifar\ntorchvision.datasets.cifar.check_integrity = lambda *args: True\n'


def write_cifar10(root, train_per_batch: int, test: int) -> None:
    """torchvision's cifar-10-batches-py layout: data_batch_1..5 and test_batch (pickled dicts) and batches.meta."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name: str, n: int) -> None:
        labels = [i % 10 for i in range(n)]
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, 'wb') as f:
            pickle.dump({'data': data, 'labels': labels}, f)

    for k in range(1, 6):
        batch(f'data_batch_{k}', train_per_batch)
    batch('test_batch', test)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': [f'class{i}' for i in range(10)]}, f)


def test_cifar10_quick_table(tmp_path):
    data, out, site = tmp_path / 'cifar', tmp_path / 'mini', tmp_path / 'site'
    write_cifar10(data, train_per_batch=26, test=20)  # 130 train images: one batch of the config's 128
    site.mkdir()
    (site / 'sitecustomize.py').write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]), PYTHON=sys.executable, JOBS='2',
               ROWS='a_mixup_cutmix d_tokenmix_teacher f_tokenmix_stored_maps')  # the two rows at once
    proc = subprocess.run(['bash', SCRIPT, '--quick', '--dataset', 'cifar10', '--data-dir', str(data),
                           '--out', str(out)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'skipping f_tokenmix_stored_maps: stored maps need an image-folder dataset' in proc.stdout
    table = (out / 'table.md').read_text().splitlines()
    assert table[0] == ('| method | seeds | clean top-1 | seed sd | vs (a) | vs (b) | top-1 occl. 0.25 '
                        '| top-1 occl. 0.5 '
                        '| take-off epoch (top-1 >= 20%) | img/s |')  # CIFAR-10: twice chance is 20%
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in table[2:]]
    assert [r[0][:3] for r in rows] == ['(a)', '(d)']
    for row, name in zip(rows, ('a_mixup_cutmix', 'd_tokenmix_teacher')):
        with open(out / 'runs' / f'{name}-s0' / 'validate.csv') as f:
            measured = {float(r['occlusion']): float(r['top1']) for r in csv.DictReader(f)}
        assert len(measured) == 3 and all(v % 5 == 0 for v in measured.values())  # 20 test images: steps of 5%
        assert [row[2]] + row[6:8] == [f'{measured[r]:.1f}' for r in (0.0, 0.25, 0.5)]
        args = (out / 'runs' / f'{name}-s0' / 'args.yaml').read_text()
        assert 'dataset: torch/cifar10' in args and 'num_classes: 10' in args
    assert (out / 'top1_per_epoch.png').is_file() and not (out / 'fidelity.png').exists()


def test_cifar_flags_are_checked(tmp_path):
    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(['bash', SCRIPT, *argv], capture_output=True, text=True, cwd=tmp_path)

    proc = run('--dataset', 'imagenet', '--data-dir', str(tmp_path))
    assert proc.returncode == 2 and "--dataset must be cifar10 or cifar100, got 'imagenet'" in proc.stderr
    proc = run('--dataset', 'cifar100')
    assert proc.returncode == 2 and '--dataset cifar100 needs --data-dir DIR' in proc.stderr
    proc = run('--data-dir', str(tmp_path))
    assert proc.returncode == 2 and '--data-dir is for --dataset cifar10|cifar100' in proc.stderr
    proc = subprocess.run(['bash', SCRIPT, '--quick'], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, ROWS='z_row'))
    assert proc.returncode == 2 and "ROWS: unknown row 'z_row'" in proc.stderr
