"""tokenmix_train/mini_stats.py: t intervals, paired differences, cells and take-off epochs on hand-computed numbers."""
import math

import pytest

from tokenmix_train.mini_stats import (difference_cell, interval_cell, paired_difference, t_interval, take_off_cell,
                                       take_off_epoch)


def test_t_interval_matches_hand_computation():
    # [1..5]: mean 3, sample sd sqrt(2.5), se sqrt(0.5); t(0.975, 4 df) = 2.776445 -> half-width 1.963243
    mean, half = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(1.963243, abs=1e-6)
    # [70, 72, 74]: sd 2, se 2/sqrt(3); t(0.975, 2 df) = 4.302653 -> 4.968275
    assert t_interval([70.0, 72.0, 74.0]) == (72.0, pytest.approx(4.968275, abs=1e-6))
    mean, half = t_interval([70.0])
    assert mean == 70.0 and math.isnan(half)


def test_paired_difference_uses_the_seeds_both_rows_have():
    row = {0: 71.0, 1: 74.0, 2: 70.0, 3: 99.0}
    base = {0: 70.0, 1: 72.0, 2: 67.0}  # seed 3 has no baseline run: left out
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t(0.975, 2) = 4.302653 -> 2.484138
    assert paired_difference(row, base) == (2.0, pytest.approx(2.484138, abs=1e-6), 3)
    assert paired_difference({5: 1.0}, base) is None


def test_take_off_is_the_first_epoch_at_twice_chance():
    assert take_off_epoch([10.0, 19.9, 20.0, 15.0, 60.0], 20.0) == 3
    assert take_off_epoch([25.0], 20.0) == 1
    assert take_off_epoch([10.0, 12.0], 20.0) is None
    assert take_off_cell([4, None, 8], 20) == '4 >20 8'


def test_cells_format_mean_and_interval():
    assert interval_cell([70.0], 1) == '70.0'
    assert interval_cell([1.0, 2.0, 3.0, 4.0, 5.0], 1) == '3.0 ± 2.0'
    assert interval_cell([0.1, 0.2, 0.3, 0.4, 0.5], 3) == '0.300 ± 0.196'
    assert difference_cell((2.0, 2.484138, 3)) == '+2.0 ± 2.5'
    assert difference_cell((-0.25, float('nan'), 1)) == '-0.2'
    assert difference_cell(None) == '—'
