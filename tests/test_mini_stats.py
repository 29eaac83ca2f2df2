"""scripts/mini_table.py's statistics (t intervals, paired differences) on hand-computed numbers, and the paired
seeds the table relies on: rows with the same --seed start from the same weights and see the same batches."""
import math
import os
import re
import shutil

import pytest
import torch

from conftest import ROOT, load_script


@pytest.fixture(scope='module')
def mini():
    return load_script(os.path.join('scripts', 'mini_table.py'))


def test_t_interval_matches_hand_computation(mini):
    # [1..5]: mean 3, sample sd sqrt(2.5), se sqrt(0.5); t(0.975, 4 df) = 2.776445 -> half-width 1.963243
    mean, half = mini.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(1.963243, abs=1e-6)
    # [70, 72, 74]: sd 2, se 2/sqrt(3); t(0.975, 2 df) = 4.302653 -> 4.968275
    assert mini.t_interval([70.0, 72.0, 74.0]) == (72.0, pytest.approx(4.968275, abs=1e-6))
    mean, half = mini.t_interval([70.0])
    assert mean == 70.0 and math.isnan(half)


def test_paired_difference_uses_the_seeds_both_rows_have(mini):
    row = {0: 71.0, 1: 74.0, 2: 70.0, 3: 99.0}
    base = {0: 70.0, 1: 72.0, 2: 67.0}  # seed 3 has no baseline run: left out
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t(0.975, 2) = 4.302653 -> 2.484138
    assert mini.paired_difference(row, base) == (2.0, pytest.approx(2.484138, abs=1e-6), 3)
    assert mini.paired_difference({5: 1.0}, base) is None


def test_fidelity_is_measured_once_per_run_and_setting(mini, tmp_path):
    calls = []

    def measure(value):
        return lambda: calls.append(value) or value

    assert mini.cached_fidelity(str(tmp_path), 1000, 50, measure(0.25)) == 0.25
    assert mini.cached_fidelity(str(tmp_path), 1000, 50, measure(0.75)) == 0.25  # stored: not measured again
    assert mini.cached_fidelity(str(tmp_path), 500, 50, measure(0.5)) == 0.5  # another setting: measured
    assert mini.cached_fidelity(str(tmp_path), 500, 20, measure(0.125)) == 0.125
    assert calls == [0.25, 0.5, 0.125]
    assert sorted(os.listdir(tmp_path)) == ['fidelity.json']


def test_runs_are_found_per_row_in_seed_order(mini, tmp_path):
    for name in ('c_tokenmix_area-s10', 'c_tokenmix_area-s2', 'a_mixup_cutmix-s1', 'a_mixup_cutmix-s3', 'other-s0'):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'validate.csv').write_text('')
    (tmp_path / 'a_mixup_cutmix-s0').mkdir()  # unfinished: no validate.csv
    runs = mini.find_runs(str(tmp_path))
    assert list(runs) == ['a_mixup_cutmix', 'c_tokenmix_area']
    assert list(runs['a_mixup_cutmix']) == [1, 3] and list(runs['c_tokenmix_area']) == [2, 10]


def test_take_off_is_the_first_epoch_at_twice_chance(mini):
    assert mini.take_off_epoch([10.0, 19.9, 20.0, 15.0, 60.0], 20.0) == 3
    assert mini.take_off_epoch([25.0], 20.0) == 1
    assert mini.take_off_epoch([10.0, 12.0], 20.0) is None
    assert mini.take_off_cell([4, None, 8], 20) == '4 >20 8'


def _row(mini, clean, curves):
    res = object.__new__(mini.RowResults)  # the table's inputs without run folders
    res.top1 = {seed: {0.0: top1, 0.5: top1 / 2} for seed, top1 in clean.items()}
    res.curves, res.fidelity = curves, {}
    res.img_per_sec = {seed: 100.0 for seed in clean}
    return res


def test_table_rows_give_seed_sd_paired_difference_and_take_off(mini):
    base = _row(mini, {0: 70.0, 1: 72.0, 2: 74.0}, {0: [10, 30], 1: [10, 25], 2: [30, 40]})
    row = _row(mini, {0: 71.0, 1: 74.0, 2: 77.0}, {0: [10, 10], 1: [21, 22], 2: [19, 20]})
    bce = _row(mini, {0: 71.0, 1: 71.0, 2: 71.0}, {0: [30, 40], 1: [30, 40], 2: [30, 40]})
    table = mini.build_table({'a_mixup_cutmix': base, 'b_mixup_cutmix_bce': bce, 'c_tokenmix_area': row}, [0.5],
                             10).splitlines()
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
    assert 'top-1 >= 2%' in mini.build_table({'a_mixup_cutmix': base}, [0.5], 100)


def test_cells_format_mean_and_interval(mini):
    assert mini.interval_cell([70.0], 1) == '70.0'
    assert mini.interval_cell([1.0, 2.0, 3.0, 4.0, 5.0], 1) == '3.0 ± 2.0'
    assert mini.interval_cell([0.1, 0.2, 0.3, 0.4, 0.5], 3) == '0.300 ± 0.196'
    assert mini.difference_cell((2.0, 2.484138, 3)) == '+2.0 ± 2.5'
    assert mini.difference_cell((-0.25, float('nan'), 1)) == '-0.2'
    assert mini.difference_cell(None) == '—'


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


@pytest.mark.parametrize('config, expected', [
    ('vit_student.yaml', ['--model', 'tokenmix_vit_tiny_convstem_64', '--img-size', '32', '--model-kwargs',
                          'patch_size=4', 'qk_norm=True', '--patch-size', '4']),
    ('candidates/gentle.yaml', ['--model', 'tokenmix_vit_tiny_p8_64', '--img-size', '32', '--model-kwargs',
                                'patch_size=4', '--gp', 'avg', '--patch-size', '4']),
])
def test_validate_flags_give_the_architecture_as_trained(mini, tmp_path, config, expected):
    """validate.py gets each run's model, size, kwargs, pooling and token size from the run's args.yaml."""
    shutil.copy(os.path.join(ROOT, 'configs', 'mini', config), tmp_path / 'args.yaml')
    assert mini.validate_flags(str(tmp_path)) == expected
    text = (tmp_path / 'args.yaml').read_text()  # an 8 px token grid; each kwarg stays one item, strings quoted
    kwargs = "model_kwargs: {patch_size: 8, mlp_ratio: 2.0, act_layer: 'gelu_tanh'}"
    (tmp_path / 'args.yaml').write_text(re.sub(r'model_kwargs: \{.*\}', kwargs, text))
    flags = mini.validate_flags(str(tmp_path))
    assert flags[flags.index('--model-kwargs') + 1:flags.index('--model-kwargs') + 4] == [
        'patch_size=8', 'mlp_ratio=2.0', "act_layer='gelu_tanh'"]
    assert flags[-2:] == ['--patch-size', '8']
