"""scripts/mini_table.sh --quick: the whole mini-reproduction pipeline end to end (about a minute and a half)."""
import csv
import os
import re
import subprocess

from conftest import ROOT, load_script


def test_mean_spread_formats_mean_and_sample_std():
    mini = load_script(os.path.join('scripts', 'mini_table.py'))
    assert mini.mean_spread([70.0], 1) == '70.0'
    assert mini.mean_spread([70.0, 72.0, 74.0], 1) == '72.0 ± 2.0'


def test_quick_table_has_every_method_and_column(tmp_path):
    out = tmp_path / 'mini'
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'mini_table.sh'), '--quick', '--out', str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / 'table.md').read_text().splitlines()
    assert table[0] == ('| method | seeds | clean top-1 | top-1 occl. 0.25 | top-1 occl. 0.5 | fidelity error |')
    rows = [line.strip('|').split('|') for line in table[2:]]
    assert [r[0].strip()[:3] for r in rows] == ['(a)', '(b)', '(c)', '(d)']
    methods = ('a_mixup_cutmix', 'b_tokenmix_area', 'c_tokenmix_teacher', 'd_tokenmix_teacher_random')
    for row, method in zip(rows, methods):
        seeds, *top1, fidelity = [c.strip() for c in row[1:]]
        assert seeds == '1'
        # each top-1 cell is that run's validate.py result at occlusion 0, 0.25, 0.5 (one seed: no spread)
        with open(out / 'runs' / f'{method}-s0' / 'validate.csv') as f:
            measured = {float(r['occlusion']): float(r['top1']) for r in csv.DictReader(f)}
        assert top1 == [f'{measured[ratio]:.1f}' for ratio in (0.0, 0.25, 0.5)]
        assert re.fullmatch(r'\d\.\d{3}', fidelity) and 0 < float(fidelity) < 1
    assert '\n'.join(table) in proc.stdout


def test_unknown_argument_exits_2():
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'mini_table.sh'), '--fast'],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
