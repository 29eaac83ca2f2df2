"""tokenmix_train/mini_table.py: the run readers, the fidelity cache and measurement, the table and the CLI."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_STUDENT, TINY_TEACHER
from tokenmix_train import mini_table
from tokenmix_train.args import parse_train_args
from tokenmix_train.errors import ConfigError


def test_fidelity_is_measured_once_per_run_and_setting(tmp_path):
    calls = []

    def measure(value):
        return lambda: calls.append(value) or value

    assert mini_table.cached_fidelity(str(tmp_path), 1000, 50, measure(0.25)) == 0.25
    assert mini_table.cached_fidelity(str(tmp_path), 1000, 50, measure(0.75)) == 0.25  # stored: not measured again
    assert mini_table.cached_fidelity(str(tmp_path), 500, 50, measure(0.5)) == 0.5  # another setting: measured
    assert mini_table.cached_fidelity(str(tmp_path), 500, 20, measure(0.125)) == 0.125
    assert calls == [0.25, 0.5, 0.125]
    assert sorted(os.listdir(tmp_path)) == ['fidelity.json']


def test_runs_are_found_per_row_in_seed_order(tmp_path):
    for name in ('c_tokenmix_area-s10', 'c_tokenmix_area-s2', 'a_mixup_cutmix-s1', 'a_mixup_cutmix-s3', 'other-s0'):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'validate.csv').write_text('')
    (tmp_path / 'a_mixup_cutmix-s0').mkdir()  # unfinished: no validate.csv
    runs = mini_table.find_runs(str(tmp_path))
    assert list(runs) == ['a_mixup_cutmix', 'c_tokenmix_area']
    assert list(runs['a_mixup_cutmix']) == [1, 3] and list(runs['c_tokenmix_area']) == [2, 10]


def _row(clean, curves):
    res = object.__new__(mini_table.RowResults)  # the table's inputs without run folders
    res.top1 = {seed: {0.0: top1, 0.5: top1 / 2} for seed, top1 in clean.items()}
    res.curves, res.fidelity = curves, {}
    res.img_per_sec = {seed: 100.0 for seed in clean}
    return res


def test_table_rows_give_seed_sd_paired_difference_and_take_off():
    base = _row({0: 70.0, 1: 72.0, 2: 74.0}, {0: [10, 30], 1: [10, 25], 2: [30, 40]})
    row = _row({0: 71.0, 1: 74.0, 2: 77.0}, {0: [10, 10], 1: [21, 22], 2: [19, 20]})
    bce = _row({0: 71.0, 1: 71.0, 2: 71.0}, {0: [30, 40], 1: [30, 40], 2: [30, 40]})
    table = mini_table.build_table({'a_mixup_cutmix': base, 'b_mixup_cutmix_bce': bce, 'c_tokenmix_area': row},
                                   [0.5], 10).splitlines()
    assert table[0] == ('| method | seeds | clean top-1 | seed sd | vs (a) | vs (b) | top-1 occl. 0.5 '
                        '| take-off epoch (top-1 >= 20%) | img/s |')
    # (a): mean 72, sd 2, t(0.975, 2) * 2 / sqrt(3) = 4.97; (c): differences 1, 2, 3 -> +2.0 ± 2.5, sd 3
    # vs (b): (a) - (b) = -1, 1, 3 -> +1.0 ± 5.0; (c) - (b) = 0, 3, 6 -> +3.0 ± 7.5
    assert table[2] == ('| (a) Mixup + CutMix, soft-target CE | 3 | 72.0 ± 5.0 | 2.0 | — | +1.0 ± 5.0 '
                        '| 36.0 ± 2.5 | 2 2 1 | 100 ± 0 |')
    assert table[3] == ('| (b) Mixup + CutMix, BCE | 3 | 71.0 ± 0.0 | 0.0 | -1.0 ± 5.0 | — | 35.5 ± 0.0 '
                        '| 1 1 1 | 100 ± 0 |')
    assert table[4] == ('| (c) TokenMix, area targets | 3 | 74.0 ± 7.5 | 3.0 | +2.0 ± 2.5 | +3.0 ± 7.5 '
                        '| 37.0 ± 3.7 | >2 1 2 | 100 ± 0 |')
    # 100 classes: twice chance is 2%
    assert 'top-1 >= 2%' in mini_table.build_table({'a_mixup_cutmix': base}, [0.5], 100)


@pytest.mark.parametrize('config, expected', [
    ('vit_student.yaml', ['--model', 'tokenmix_vit_tiny_convstem_64', '--img-size', '32', '--model-kwargs',
                          'patch_size=4', 'qk_norm=True', '--patch-size', '4']),
    ('candidates/gentle.yaml', ['--model', 'tokenmix_vit_tiny_p8_64', '--img-size', '32', '--model-kwargs',
                                'patch_size=4', '--gp', 'avg', '--patch-size', '4']),
])
def test_validate_flags_give_the_architecture_as_trained(tmp_path, config, expected):
    """validate.py gets each run's model, size, kwargs, pooling and token size from the run's args.yaml."""
    shutil.copy(os.path.join(ROOT, 'configs', 'mini', config), tmp_path / 'args.yaml')
    assert mini_table.validate_flags(str(tmp_path)) == expected
    text = (tmp_path / 'args.yaml').read_text()  # an 8 px token grid; each kwarg stays one item, strings quoted
    kwargs = "model_kwargs: {patch_size: 8, mlp_ratio: 2.0, act_layer: 'gelu_tanh'}"
    (tmp_path / 'args.yaml').write_text(re.sub(r'model_kwargs: \{.*\}', kwargs, text))
    flags = mini_table.validate_flags(str(tmp_path))
    assert flags[flags.index('--model-kwargs') + 1:flags.index('--model-kwargs') + 4] == [
        'patch_size=8', 'mlp_ratio=2.0', "act_layer='gelu_tanh'"]
    assert flags[-2:] == ['--patch-size', '8']


@pytest.mark.slow
def test_cli_prints_validate_flags_without_the_editable_install(tmp_path):
    """As scripts/mini_table.sh calls it where the packages are not pip-installed: the checkout on PYTHONPATH and no
    site .pth files (so no editable-install hook), one flag or value a line."""
    shutil.copy(os.path.join(ROOT, 'configs', 'mini', 'vit_student.yaml'), tmp_path / 'args.yaml')
    site_dir = next(p for p in sys.path if p.endswith('site-packages'))
    proc = subprocess.run([sys.executable, '-S', '-m', 'tokenmix_train.mini_table', '--validate-flags', str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, 'PYTHONPATH': os.pathsep.join([ROOT, site_dir])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == mini_table.validate_flags(str(tmp_path))


def test_cli_needs_out_and_data_dir_without_validate_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        mini_table.main(['--data-dir', 'data'])
    assert exit_info.value.code == 2
    assert 'error: the following arguments are required: --out' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mini_table.main([])
    assert 'required: --out, --data-dir' in capsys.readouterr().err


@pytest.fixture
def four_class_run(tiny_data, easy_teacher_checkpoint, tmp_path):
    """A finished TokenMix teacher-row run (row d, seed 0) on the demo digits 0-3 with a 4-class teacher: its
    args.yaml as train.py writes it, a one-epoch summary.csv and validate.csv; returns (table folder, data)."""
    data = tmp_path / 'four'
    shutil.copytree(tiny_data, data)
    with open(data / 'objects.json') as f:
        meta = json.load(f)
    for split in ('train', 'val'):
        meta[split] = [r for r in meta[split] if r['label'] < 4]
    (data / 'objects.json').write_text(json.dumps(meta))
    run = tmp_path / 'table' / 'runs' / 'd_tokenmix_teacher-s0'
    run.mkdir(parents=True)
    _, text, _ = parse_train_args(['--data-dir', str(data), *TINY_STUDENT, '--num-classes', '4', '--seed', '0',
                                   '--cutmix', '1.0', '--tokenmix', '--bce-loss', '--teacher-model', TINY_TEACHER,
                                   '--teacher-checkpoint', easy_teacher_checkpoint])
    (run / 'args.yaml').write_text(text)
    for name, rows in (('summary.csv', [{'epoch': 0, 'eval_top1': 40.0, 'train_img_per_sec': 90.0}]),
                       ('validate.csv', [{'occlusion': 0.0, 'top1': 50.0}, {'occlusion': 0.5, 'top1': 25.0}])):
        with open(run / name, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return tmp_path / 'table', data


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_fidelity_of_a_four_class_run_uses_the_class_count(four_class_run, capsys):
    """--num-classes reaches the student, the teacher (a 4-class checkpoint does not load into 10 classes) and the
    mixer: the 12 val images of digits 0-3 in 3 batches of 4."""
    out, data = four_class_run
    run = str(out / 'runs' / 'd_tokenmix_teacher-s0')
    error = mini_table.run_fidelity(run, str(data), 4, 12, 4, '')
    assert 0 < error < 1
    assert mini_table.main(['--out', str(out), '--data-dir', str(data), '--num-classes', '4', '--occlusion', '0.5',
                            '--fidelity-images', '12', '--fidelity-batch', '4']) == 0
    table = (out / 'table.md').read_text().splitlines()
    assert table[0] == ('| method | seeds | clean top-1 | seed sd | vs (a) | vs (b) | top-1 occl. 0.5 '
                        '| fidelity error | take-off epoch (top-1 >= 50%) | img/s |')
    assert table[2] == ('| (d) TokenMix, teacher, online full maps | 1 | 50.0 | — | — | — | 25.0 '
                        f'| {error:.3f} | >1 | 90 |')
    with open(os.path.join(run, 'fidelity.json')) as f:
        assert json.load(f) == {'images': 12, 'batch_size': 4, 'error': error}
    assert '\n'.join(table) in capsys.readouterr().out


def test_fidelity_images_below_one_batch_is_a_config_error(four_class_run):
    out, data = four_class_run
    with pytest.raises(ConfigError, match='--fidelity-images 3 is less than one batch of 4'):
        mini_table.run_fidelity(str(out / 'runs' / 'd_tokenmix_teacher-s0'), str(data), 4, 3, 4, '')
