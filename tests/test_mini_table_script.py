"""scripts/mini_table.sh: the whole mini benchmark end to end (--quick: table and plots; a few minutes), its argument
checks, benchmarks/gpu_mini_table.sh's, and the paired seeds its rows rely on."""
import csv
import os
import re
import subprocess

import matplotlib.pyplot as plt
import pytest
import torch

from conftest import ROOT
from tokenmix_train.mini_table import ROWS

pytestmark = pytest.mark.slow  # the whole mini table script


def test_quick_table_has_every_method_and_column(tmp_path):
    out = tmp_path / 'mini'
    # two runs at a time, one thread each (JOBS=2), as the full table is run on the 2-core machine
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'mini_table.sh'), '--quick', '--out', str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600, env={**os.environ, 'JOBS': '2'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / 'table.md').read_text().splitlines()
    assert table[0] == ('| method | seeds | clean top-1 | seed sd | vs (a) | vs (b) | top-1 occl. 0.25 '
                        '| top-1 occl. 0.5 '
                        '| fidelity error | take-off epoch (top-1 >= 20%) | img/s |')
    rows = [line.strip('|').split('|') for line in table[2:]]
    assert [r[0].strip()[:3] for r in rows] == ['(a)', '(b)', '(c)', '(d)', '(e)', '(f)', '(g)']
    for row, method in zip(rows, ROWS):
        seeds, clean, sd, diff, diff_b, *top1, fidelity, take_off, speed = [c.strip() for c in row[1:]]
        assert seeds == '1' and sd == '—'
        # one epoch on 300 images stays at chance (10 classes): never reaches 20%
        assert take_off == '>1'
        # each top-1 cell is that run's validate.py result at occlusion 0, 0.25, 0.5 (one seed: no spread)
        with open(out / 'runs' / f'{method}-s0' / 'validate.csv') as f:
            measured = {float(r['occlusion']): float(r['top1']) for r in csv.DictReader(f)}
        assert [clean] + top1 == [f'{measured[ratio]:.1f}' for ratio in (0.0, 0.25, 0.5)]
        assert diff == '—' if row is rows[0] else re.fullmatch(r'[+-]\d+\.\d', diff)
        assert diff_b == '—' if row is rows[1] else re.fullmatch(r'[+-]\d+\.\d', diff_b)
        assert re.fullmatch(r'\d\.\d{3}', fidelity) and 0 < float(fidelity) < 1
        assert re.fullmatch(r'\d+', speed) and int(speed) > 0
    assert '\n'.join(table) in proc.stdout
    for method in ROWS:
        assert (out / 'runs' / f'{method}-s0' / 'validate.csv').is_file()
        log = (out / 'logs' / f'{method}-s0.log').read_text()
        assert 'eval epoch 0: top-1' in log and 'occlusion' in log
        assert f'finished {method} seed 0' in proc.stdout
    # the plots: 8 x 5 in and 8 x (0.5 x 7 rows + 1.5) in at 110 dpi
    assert plt.imread(out / 'top1_per_epoch.png').shape[:2] == (550, 880)
    assert plt.imread(out / 'fidelity.png').shape[:2] == (550, 880)


def test_bad_jobs_exits_2():
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'mini_table.sh'), '--quick'], capture_output=True,
                          text=True, env={**os.environ, 'JOBS': '0'})
    assert proc.returncode == 2 and "JOBS must be a positive whole number, got '0'" in proc.stderr


def test_missing_student_config_exits_2(tmp_path):
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'mini_table.sh'), '--student-config',
                           str(tmp_path / 'none.yaml')], capture_output=True, text=True)
    assert proc.returncode == 2 and f"--student-config: no file '{tmp_path / 'none.yaml'}'" in proc.stderr


def test_gpu_driver_refuses_a_folder_without_data_or_teacher(tmp_path):
    driver = os.path.join(ROOT, 'benchmarks', 'gpu_mini_table.sh')
    cfg = os.path.join(ROOT, 'configs', 'mini', 'vit_student.yaml')
    proc = subprocess.run(['bash', driver, str(tmp_path), str(tmp_path / 'out'), cfg], capture_output=True, text=True)
    assert proc.returncode == 2 and f'PREP: no demo data in {tmp_path}/data' in proc.stderr
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'objects.json').write_text('{}')
    proc = subprocess.run(['bash', driver, str(tmp_path), str(tmp_path / 'out'), cfg], capture_output=True, text=True)
    assert proc.returncode == 2 and f'PREP: no teacher in {tmp_path}/teacher/model_best.pth.tar' in proc.stderr
    assert not (tmp_path / 'out').exists()


def test_unknown_argument_exits_2():
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'mini_table.sh'), '--fast'],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr


def test_rows_with_one_seed_share_initial_weights_and_batches(train_script, train_argv, teacher_checkpoint,
                                                             monkeypatch):
    """A teacher row builds a CNN after the student; that must not move the data order of the run."""
    seen = []

    def first_batch_only(run, train_loader, *args, **kwargs):
        images, targets = next(iter(train_loader))
        seen.append(({k: v.clone() for k, v in run.model.state_dict().items()}, images, targets))
        return None

    monkeypatch.setattr(train_script, 'fit', first_batch_only)
    rows = [('--mixup', '0.8', '--cutmix', '1.0'),
            ('--tokenmix', '--cutmix', '1.0', '--teacher-model', 'tokenmix_cnn_teacher_64',
             '--teacher-checkpoint', teacher_checkpoint, '--bce-loss')]
    for i, flags in enumerate(rows):
        assert train_script.run_main(train_argv(*flags, experiment=f'row{i}')) == 0
    (weights_a, images_a, targets_a), (weights_b, images_b, targets_b) = seen
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert torch.equal(targets_a, targets_b) and torch.equal(images_a, images_b)
    assert len(set(targets_a.tolist())) > 1  # a real shuffled batch, not one class
