"""scripts/mini_table.sh --quick: the whole mini benchmark end to end (table and plots; a few minutes)."""
import csv
import os
import re
import subprocess

import matplotlib.pyplot as plt

from conftest import ROOT, load_script

mini = load_script(os.path.join('scripts', 'mini_table.py'))


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
    for row, method in zip(rows, mini.ROWS):
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
    for method in mini.ROWS:
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
