"""The table and plots of scripts/mini_table.sh: per row, top-1 (clean, occluded), target fidelity and images/s over
paired seeds, each as mean ± 95% t interval, with the paired differences to the two Mixup + CutMix rows.

    python -m tokenmix_train.mini_table --out OUT --data-dir DATA [--num-classes N] ...   # the table and plots
    python -m tokenmix_train.mini_table --validate-flags OUT/runs/<row>-s<seed>          # validate.py's flags

Reads OUT/runs/<row>-s<seed>/ (train.py's args.yaml and summary.csv, validate.py's validate.csv) and writes
OUT/table.md, OUT/top1_per_epoch.png and OUT/fidelity.png. The statistics over paired seeds (t intervals, paired
differences, cells) are :mod:`tokenmix_train.mini_stats`.

Target fidelity is measured on the region branch (CutMix boxes for timm Mixup, token masks for TokenMix; a Mixup
blend has no paste mask): label weights, as the run's mixer computes them without label smoothing, against the
true visible shares of the two digits from the saved pixel masks, both normalised to sum 1. Lower is better. It
needs the demo data's object masks, so a CIFAR table has no fidelity column. A stored-maps run is measured with
the online teacher the store was made from (--teacher-checkpoint): on uncropped val images its stored maps are
that teacher's maps.
"""
import argparse
import copy
import csv
import json
import math
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import matplotlib
import numpy as np
import torch
from timm.data import resolve_data_config

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from tokenmix_train.args import parse_train_args  # noqa: E402
from tokenmix_train.distributed import run_cli  # noqa: E402
from tokenmix_train.errors import ConfigError  # noqa: E402
from tokenmix_train.fidelity import (fidelity_error, indicator_batch, load_demo_objects, normalise_shares,  # noqa: E402
                                     paste_masks_from_indicator, token_paste_masks, visible_shares,
                                     weights_from_indicator_targets)
from tokenmix_train.mini_stats import (difference_cell, interval_cell, paired_difference, t_interval,  # noqa: E402
                                       take_off_cell, take_off_epoch)
from tokenmix_train.mixing import build_mixer, build_teacher_from_args, mixer_generator  # noqa: E402
from tokenmix_train.model import build_student, patch_size_of, token_size_of  # noqa: E402
from tokenmix_train.teacher_maps import MapStore, write_json_atomic  # noqa: E402

__all__ = ['ROWS', 'BASELINES', 'find_runs', 'read_run_args', 'read_top1', 'read_summary', 'validate_flags',
           'run_fidelity', 'cached_fidelity', 'RowResults', 'build_table', 'plot_curves', 'plot_fidelity', 'main']

ROWS = {
    'a_mixup_cutmix': '(a) Mixup + CutMix, soft-target CE',
    'b_mixup_cutmix_bce': '(b) Mixup + CutMix, BCE',
    'c_tokenmix_area': '(c) TokenMix, area targets',
    'd_tokenmix_teacher': '(d) TokenMix, teacher, online full maps',
    'e_tokenmix_teacher_top5': '(e) TokenMix, teacher, top-5 maps',
    'f_tokenmix_stored_maps': '(f) TokenMix, teacher, stored top-5 maps',
    'g_tokenmix_random': '(g) TokenMix, random masks, teacher full maps',
}
# paired differences are given to both Mixup + CutMix rows: (a) is DeiT's baseline, (b) the TokenMix rows' like for like
BASELINES = {'a_mixup_cutmix': 'vs (a)', 'b_mixup_cutmix_bce': 'vs (b)'}
PROG = 'python -m tokenmix_train.mini_table'


def find_runs(runs_dir: str) -> Dict[str, Dict[int, str]]:
    """Finished runs (validate.csv present) per row and seed, rows in table order, seeds in increasing order."""
    found: Dict[str, Dict[int, str]] = {}
    for name in sorted(os.listdir(runs_dir)):
        row, _, seed = name.rpartition('-s')
        path = os.path.join(runs_dir, name)
        if row in ROWS and seed.isdigit() and os.path.isfile(os.path.join(path, 'validate.csv')):
            found.setdefault(row, {})[int(seed)] = path
    return {row: dict(sorted(found[row].items())) for row in ROWS if row in found}


def read_top1(run_dir: str) -> Dict[float, float]:
    """validate.py's top-1 per occlusion ratio."""
    with open(os.path.join(run_dir, 'validate.csv')) as f:
        return {float(r['occlusion']): float(r['top1']) for r in csv.DictReader(f)}


def read_summary(run_dir: str) -> Tuple[List[float], float]:
    """summary.csv's eval top-1 per epoch and the mean training images/s over epochs."""
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    return [float(r['eval_top1']) for r in rows], statistics.fmean(float(r['train_img_per_sec']) for r in rows)


def read_run_args(run_dir: str, data_dir: str) -> argparse.Namespace:
    """train.py's arguments of one run as it was trained (its args.yaml), with `data_dir` as --data-dir."""
    return parse_train_args(['-c', os.path.join(run_dir, 'args.yaml'), '--data-dir', data_dir])[0]


def validate_flags(run_dir: str) -> List[str]:
    """validate.py's flags for one run, read from the run's args.yaml: the architecture as trained (model, image
    size, model_kwargs, global pool) and its token size for the occlusion patches (one flag or value an item)."""
    args = read_run_args(run_dir, run_dir)
    flags = ['--model', args.model, '--img-size', str(args.img_size)]
    if args.model_kwargs:
        flags += ['--model-kwargs', *(f'{key}={value!r}' for key, value in args.model_kwargs.items())]
    if args.gp:
        flags += ['--gp', args.gp]
    token_size = args.tokenmix_patch_size or patch_size_of(build_student(args, args.num_classes))
    if token_size:
        flags += ['--patch-size', str(token_size)]
    return flags


def run_fidelity(run_dir: str, data_dir: str, num_classes: int, images: int, batch_size: int,
                 teacher_checkpoint: str) -> float:
    """Target fidelity error of one run's mixer on `images` demo val images (mean over batches) of a dataset of
    `num_classes` classes (the student's head, the teacher's and TokenMix's targets)."""
    args = read_run_args(run_dir, data_dir)
    model = build_student(args, num_classes)
    config = resolve_data_config(vars(args), model=model)
    token_size = token_size_of(model, args.tokenmix_patch_size)
    x_all, y_all, obj_all = load_demo_objects(data_dir, 'val', images, config['mean'], config['std'])
    probe = copy.copy(args)  # the region branch on every batch, weights without smoothing
    probe.mixup, probe.mixup_prob, probe.smoothing = 0.0, 1.0, 0.0
    if args.teacher_maps:  # the store's own teacher, online
        manifest = MapStore.read_manifest(args.teacher_maps)
        probe.teacher_maps, probe.teacher_model = '', manifest['teacher']
        probe.teacher_checkpoint, probe.teacher_img_size = teacher_checkpoint, manifest['img_size']
    teacher = build_teacher_from_args(probe, num_classes, config['mean'], config['std'], torch.device('cpu'))
    np.random.seed(args.seed)  # timm's Mixup draws from numpy's global generator
    errors = []
    for start in range(0, len(x_all) - batch_size + 1, batch_size):
        x, y, objects = (t[start:start + batch_size] for t in (x_all, y_all, obj_all))
        if args.tokenmix:
            mixer = build_mixer(probe, num_classes, token_size, teacher, mixer_generator(args.seed, start))
            mixer(x.clone(), y)
            paste, weights = token_paste_masks(mixer.last_mask, token_size), mixer.last_weights
        else:
            mixer = build_mixer(probe, len(x), token_size, None, mixer_generator(args.seed, start))
            mixed, targets = mixer(indicator_batch(len(x), x.shape[-2], x.shape[-1]), torch.arange(len(x)))
            paste, weights = paste_masks_from_indicator(mixed), weights_from_indicator_targets(targets)
        # both sides to sum 1: BCE rows keep raw teacher weights (target_norm none), whose scale is not the split
        errors.append(fidelity_error(normalise_shares(weights), normalise_shares(visible_shares(objects, paste))))
    if not errors:
        raise ConfigError(f'--fidelity-images {images} is less than one batch of {batch_size}')
    return float(np.mean(errors))


def cached_fidelity(run_dir: str, images: int, batch_size: int, measure: Callable[[], float]) -> float:
    """A run's fidelity error from run_dir/fidelity.json when it was measured with the same images and batch size,
    else measured now and stored there: re-making the table after more runs finish measures only the new ones."""
    path = os.path.join(run_dir, 'fidelity.json')
    setting = {'images': images, 'batch_size': batch_size}
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if {k: stored.get(k) for k in setting} == setting:
            return float(stored['error'])
    error = measure()
    write_json_atomic(path, {**setting, 'error': error})
    return error


class RowResults:
    """One row's measurements, each a dict seed -> value (curves: seed -> eval top-1 per epoch)."""

    def __init__(self, runs: Dict[int, str], fidelity: Optional[Callable[[str], float]]) -> None:
        self.top1 = {seed: read_top1(path) for seed, path in runs.items()}
        summaries = {seed: read_summary(path) for seed, path in runs.items()}
        self.curves = {seed: s[0] for seed, s in summaries.items()}
        self.img_per_sec = {seed: s[1] for seed, s in summaries.items()}
        self.fidelity = {seed: fidelity(path) for seed, path in runs.items()} if fidelity else {}

    def clean(self) -> Dict[int, float]:
        return {seed: t[0.0] for seed, t in self.top1.items()}


def build_table(results: Dict[str, RowResults], occlusions: Sequence[float], num_classes: int) -> str:
    """The Markdown table: one line per row, cells 'mean ± 95% half-width' over seeds, the seeds' standard
    deviation of clean top-1, and each seed's take-off epoch (first epoch at twice chance top-1)."""
    with_fidelity = any(r.fidelity for r in results.values())
    chance2 = 200.0 / num_classes
    header = (['method', 'seeds', 'clean top-1', 'seed sd', *BASELINES.values()]
              + [f'top-1 occl. {r:g}' for r in occlusions]
              + (['fidelity error'] if with_fidelity else []) + [f'take-off epoch (top-1 >= {chance2:g}%)', 'img/s'])
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    bases = {name: results[name].clean() if name in results else {} for name in BASELINES}
    for key, res in results.items():
        clean = res.clean()
        sd = f'{statistics.stdev(clean.values()):.1f}' if len(clean) > 1 else '—'
        cells = [ROWS[key], str(len(clean)), interval_cell(list(clean.values()), 1), sd]
        cells += ['—' if key == name else difference_cell(paired_difference(clean, base))
                  for name, base in bases.items()]
        cells += [interval_cell([t[r] for t in res.top1.values()], 1) for r in occlusions]
        if with_fidelity:
            cells.append(interval_cell(list(res.fidelity.values()), 3) if res.fidelity else '—')
        cells.append(take_off_cell([take_off_epoch(c, chance2) for c in res.curves.values()],
                                   max(len(c) for c in res.curves.values())))
        cells.append(interval_cell(list(res.img_per_sec.values()), 0))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot_curves(results: Dict[str, RowResults], path: str) -> None:
    """Val top-1 per epoch per row: the mean over seeds as a line, lowest to highest seed as a band."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, res in results.items():
        epochs = min(len(c) for c in res.curves.values())
        curves = np.array([c[:epochs] for c in res.curves.values()])
        x = np.arange(1, epochs + 1)
        seeds = f'{len(curves)} seed' + ('s' if len(curves) > 1 else '')
        line, = ax.plot(x, curves.mean(0), marker='.', label=f'{ROWS[key]} ({seeds})')
        ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel('epoch')
    ax.set_xlim(0.5, max(len(c) for r in results.values() for c in r.curves.values()) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel('val top-1 (%)')
    ax.set_title('Val top-1 per epoch: mean over seeds, band = lowest to highest seed')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fidelity(results: Dict[str, RowResults], path: str) -> None:
    """Target fidelity error per row: one dot per seed, the mean with its 95% interval as a bar."""
    rows = [k for k, r in results.items() if r.fidelity]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    for i, key in enumerate(rows):
        values = list(results[key].fidelity.values())
        mean, half = t_interval(values)
        ax.barh(i, mean, xerr=None if math.isnan(half) else half, color='tab:blue', alpha=0.5, capsize=4)
        ax.plot(values, [i] * len(values), 'k.', label='one seed' if i == 0 else None)
    ax.set_yticks(range(len(rows)), [ROWS[k] for k in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel('target fidelity error (lower: label weights closer to the true visible shares)')
    ax.set_title('Target fidelity per row: mean (bar), 95% interval, seeds (dots)')
    ax.legend(fontsize=8, loc='lower right')
    ax.grid(axis='x', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The table and plots of a mini-table folder, or with --validate-flags the validate.py flags of one run."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument('--validate-flags', default='', metavar='RUN_DIR',
                        help="print validate.py's flags for one run (one flag or value a line) and exit")
    parser.add_argument('--out', help='the mini-table folder (holds runs/); required without --validate-flags')
    parser.add_argument('--data-dir', help='the demo data the runs used; required without --validate-flags')
    parser.add_argument('--fidelity-images', type=int, default=1000,
                        help='val images for target fidelity (0: no fidelity column, e.g. CIFAR)')
    parser.add_argument('--fidelity-batch', type=int, default=50, help='images per mixed batch (even)')
    parser.add_argument('--teacher-checkpoint', default='', help='the teacher a stored-maps row was made from')
    parser.add_argument('--occlusion', type=float, nargs='+', default=[0.25, 0.5], help='occlusion columns')
    parser.add_argument('--num-classes', type=int, default=10, help='classes of the data (chance = 1 / this)')
    args = parser.parse_args(argv)
    if args.validate_flags:
        print('\n'.join(validate_flags(args.validate_flags)))
        return 0
    missing = [flag for flag, value in (('--out', args.out), ('--data-dir', args.data_dir)) if not value]
    if missing:
        parser.error('the following arguments are required: ' + ', '.join(missing))
    if args.fidelity_batch < 2 or args.fidelity_batch % 2:
        parser.error(f'--fidelity-batch must be even and >= 2, got {args.fidelity_batch}')
    runs_dir = os.path.join(args.out, 'runs')
    if not os.path.isdir(runs_dir):
        parser.error(f'--out {args.out} has no runs/ folder')
    runs = find_runs(runs_dir)
    if not runs:
        parser.error(f'--out {args.out} has no finished runs (runs/<row>-s<seed>/validate.csv)')

    def fidelity(run_dir: str) -> float:
        return cached_fidelity(run_dir, args.fidelity_images, args.fidelity_batch, lambda: run_fidelity(
            run_dir, args.data_dir, args.num_classes, args.fidelity_images, args.fidelity_batch,
            args.teacher_checkpoint))

    results = {row: RowResults(seeds, fidelity if args.fidelity_images else None)
               for row, seeds in runs.items()}
    table = build_table(results, args.occlusion, args.num_classes)
    with open(os.path.join(args.out, 'table.md'), 'w') as f:
        f.write(table + '\n')
    plot_curves(results, os.path.join(args.out, 'top1_per_epoch.png'))
    if args.fidelity_images:
        plot_fidelity(results, os.path.join(args.out, 'fidelity.png'))
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main, PROG))
