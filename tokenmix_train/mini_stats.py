"""The mini table's statistics and cells: t intervals over seeds, paired differences between rows, take-off epochs.

Seeds are paired: seed s gives every row the same initial weights and data order (train.py), so the difference of
two rows at one seed is the method's effect plus the mixing draws, and the interval of the mean difference over
seeds is what says whether two rows differ. Pure functions on numbers, shared by the table
(:mod:`tokenmix_train.mini_table`) and the benchmarks that report over the same seeds.
"""
import math
import statistics
from typing import Dict, Optional, Sequence, Tuple

__all__ = ['Interval', 'Difference', 't_interval', 'paired_difference', 'interval_cell', 'difference_cell',
           'take_off_epoch', 'take_off_cell']

Interval = Tuple[float, float]  # mean, half-width of the 95% interval (nan for one value)
Difference = Tuple[float, float, int]  # mean paired difference, its half-width, number of pairs


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and half-width of the two-sided t confidence interval of the mean (half-width nan for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    from scipy import stats  # here: a second of import for every run of the table's module, most of which need none
    return mean, float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * sem


def paired_difference(row: Dict[int, float], base: Dict[int, float]) -> Optional[Difference]:
    """row - base over the seeds both have, as (mean, 95% half-width, pairs); None without a common seed."""
    seeds = sorted(set(row) & set(base))
    if not seeds:
        return None
    return (*t_interval([row[s] - base[s] for s in seeds]), len(seeds))


def interval_cell(values: Sequence[float], digits: int) -> str:
    """'mean ± 95% half-width' (just the mean for one seed)."""
    mean, half = t_interval(values)
    return f'{mean:.{digits}f}' if math.isnan(half) else f'{mean:.{digits}f} ± {half:.{digits}f}'


def difference_cell(diff: Optional[Difference], digits: int = 1) -> str:
    """'+mean ± half-width' of a paired difference (top-1 points by default); '—' when there is none."""
    if diff is None:
        return '—'
    mean, half, _ = diff
    return f'{mean:+.{digits}f}' if math.isnan(half) else f'{mean:+.{digits}f} ± {half:.{digits}f}'


def take_off_epoch(curve: Sequence[float], threshold: float) -> Optional[int]:
    """The first epoch (1-based) whose val top-1 reaches `threshold`, None if none does: when a run left chance."""
    return next((epoch for epoch, top1 in enumerate(curve, 1) if top1 >= threshold), None)


def take_off_cell(epochs: Sequence[Optional[int]], last: int) -> str:
    """Each seed's take-off epoch in seed order, '>last' for a run that never took off."""
    return ' '.join(str(e) if e is not None else f'>{last}' for e in epochs)
