#!/usr/bin/env python3
"""Training steps fed by the real loader from JPEG files, beside the same steps on batches already on the device.

For each configuration the run is built as train.py builds it, with train.py's and tokenmix_train's own builders
(parse_train_args on a recipe `-c`, build_dataset, build_model_and_teacher, wrap_train_dataset, build_train_loader
behind resumable_loader, build_optimizer and setup_precision, build_mixer, build_criterion, the EMA as train.py makes
it; no LR schedule, whose per-step call costs nothing measurable), and `engine.train_one_epoch` runs its steps:

  timm-mixup-cutmix   the recipe with timm's Mixup/CutMix (--no-tokenmix), the same loss and augmentation
  tokenmix-area       TokenMix with area targets (--tokenmix-target area)
  tokenmix-stored     TokenMix with stored maps (--teacher-maps STORE; the loader carries each crop's record)
  tokenmix-teacher    TokenMix with the online teacher (--teacher-model, --teacher-checkpoint)

Three rates per configuration, each after untimed warm-up steps:
  fed          train steps fed by the loader (`--workers W` processes) from the ImageFolder of JPEG files;
  synthetic    the same steps on a few of that loader's batches kept on the device (no loading);
  loader alone the same loader iterated with no model.
Verdict: GPU-bound when fed is within 10% of synthetic; loader-bound when fed is within 10% of loader alone and
below 90% of synthetic; else mixed. (On a CPU run, "GPU" is the step's own compute.)

Configurations and the three measurements take turns in interleaved rounds (every other round backwards); the
median over rounds is printed. Each configuration keeps its loader's pass going from one measurement to the next
and starts a new pass (its workers starting) only before a measurement the pass could not finish, so no timed
window holds a pass's start or end; the warm-up (default 2 x workers + 2 steps) drains what a paused loader had
prefetched.

Without --data-dir, --images JPEG files are generated (tools/make_jpeg_data.py) under --out and linked as often as
a pass of warm-up + timed steps needs (decode work is the same for a linked file; the OS keeps them all in its page
cache, as it would not keep ImageNet). Without --teacher-checkpoint the teacher gets random weights (saved under
--out: the maps' values do not change the timing); without --teacher-maps the store is precomputed with that
teacher (tools/precompute_teacher_maps.py) under --out.

Usage: python benchmarks/bench_fed.py [-c RECIPE] [--data-dir DIR | --images N] [--teacher-model NAME]
           [--teacher-checkpoint FILE] [--teacher-maps STORE] [--rounds R] [--steps N] [-- extra train.py flags,
           e.g. --workers 14 --amp-dtype bfloat16]
"""
import argparse
import itertools
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import timm
import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3, random_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, 'tools')):  # run as a file from a checkout that was not pip-installed
    if path not in sys.path:
        sys.path.insert(0, path)

import precompute_teacher_maps  # noqa: E402
from make_jpeg_data import ensure_image_folder  # noqa: E402
from mixup_ext import TokenMix  # noqa: E402
from tokenmix_train.args import parse_train_args, resolve_lr  # noqa: E402
from tokenmix_train.data import build_dataset, build_train_loader, resolve_num_classes, set_loader_epoch  # noqa: E402
from tokenmix_train.distributed import init_device, run_cli  # noqa: E402
from tokenmix_train.engine import Training, train_one_epoch  # noqa: E402
from tokenmix_train.errors import ConfigError  # noqa: E402
from tokenmix_train.mixing import build_criterion, build_mixer, mixer_generator  # noqa: E402
from tokenmix_train.model import compile_model, model_dtype_of  # noqa: E402
from tokenmix_train.precision import setup_precision  # noqa: E402
from tokenmix_train.sampling import resumable_loader, start_epoch_at  # noqa: E402
from tokenmix_train.teacher_maps import StoredMapsMixer, wrap_train_dataset  # noqa: E402
from train import build_model_and_teacher, build_optimizer  # noqa: E402

DEFAULT_RECIPE = 'configs/imagenet/deit_small_tokenmix_stored_maps_300ep.yaml'
CONFIGS = ('timm-mixup-cutmix', 'tokenmix-area', 'tokenmix-stored', 'tokenmix-teacher')
KINDS = ('fed', 'synthetic', 'loader')


class Steps:
    """`count` batches of `batches` as a loader `train_one_epoch` takes (no batch sampler: nothing to restart);
    counts the images it served."""
    batch_sampler = None

    def __init__(self, batches: Iterator, count: int) -> None:
        self.batches, self.count, self.images = batches, count, 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator:
        for batch in itertools.islice(self.batches, self.count):
            self.images += len(batch[0])
            yield batch


class Feed:
    """A train loader drawn across measurements: its pass goes on where the last measurement left it."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.epoch, self.left = loader, -1, 0
        self.batches: Iterator = iter(())

    def reserve(self, count: int) -> None:
        """Start a new pass (an epoch, as `fit` and `train_one_epoch` start it) unless `count` batches are left."""
        if self.left >= count:
            return
        self.epoch += 1
        set_loader_epoch(self.loader, self.epoch)
        start_epoch_at(self.loader, self.epoch, 0)
        self.batches, self.left = iter(self.loader), len(self.loader)

    def steps(self, count: int) -> Steps:
        self.left -= count
        return Steps(self.batches, count)


@dataclass
class Config:
    """One configuration's run (as train.py builds it), its loader and the batches kept on its device."""
    name: str
    run: Training
    feed: Feed
    mixer: str
    cached: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def config_flags(name: str, teacher: str, checkpoint: str, store: str, teacher_amp: bool) -> List[str]:
    """train.py flags that turn the recipe into configuration `name` (each row sets every mixing flag it needs)."""
    no_teacher = ['--teacher-model', '', '--teacher-topk', '0', '--teacher-maps', '']
    return {
        'timm-mixup-cutmix': ['--no-tokenmix', '--tokenmix-target', 'auto', *no_teacher],
        'tokenmix-area': ['--tokenmix', '--tokenmix-target', 'area', *no_teacher],
        'tokenmix-stored': ['--tokenmix', '--tokenmix-target', 'teacher', '--teacher-model', teacher,
                            '--teacher-maps', store],
        'tokenmix-teacher': ['--tokenmix', '--tokenmix-target', 'teacher', '--teacher-model', teacher,
                             '--teacher-checkpoint', checkpoint, '--teacher-maps', '',
                             *(['--teacher-amp'] if teacher_amp else [])],
    }[name]


def describe_mixer(mixer: Any) -> str:
    """What the run mixes with, read off the mixer object itself."""
    if isinstance(mixer, StoredMapsMixer):
        return 'TokenMix, stored maps'
    if isinstance(mixer, TokenMix):
        return f'TokenMix, teacher {type(mixer.teacher.model).__name__}' if mixer.uses_teacher else 'TokenMix, area'
    if isinstance(mixer, Mixup):
        return 'timm Mixup/CutMix'
    return type(mixer).__name__


def build_config(name: str, argv: List[str]) -> Config:
    """Configuration `name`'s training run, built from train.py flags `argv` as train.py's main builds it."""
    args, _, _ = parse_train_args(argv)
    device = init_device(args)
    random_seed(args.seed, args.rank)
    dataset = build_dataset(args, args.train_split, '--train-split', is_training=True)
    num_classes = resolve_num_classes(args.num_classes, dataset, 'the train split')
    model, data_config, token_size, teacher = build_model_and_teacher(args, num_classes, device)
    dataset = wrap_train_dataset(args, dataset, data_config['input_size'], token_size)
    loader = resumable_loader(build_train_loader(dataset, args, data_config, device), args.seed, args.rank)
    model, optimizer, amp_dtype, loss_scaler = setup_precision(
        args, model, build_optimizer(args, model, resolve_lr(args, args.world_size)), device)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                           device='cpu' if args.model_ema_force_cpu else None) if args.model_ema else None
    mixer = build_mixer(args, num_classes, token_size, teacher, mixer_generator(args.seed, args.rank))
    run = Training(model=compile_model(model, args), optimizer=optimizer,
                   criterion=build_criterion(args).to(device), device=device, mixer=mixer, model_ema=model_ema,
                   loss_scaler=loss_scaler, amp_dtype=amp_dtype, grad_accum_steps=args.grad_accum_steps,
                   clip_grad=args.clip_grad, clip_mode=args.clip_mode, channels_last=args.channels_last,
                   log_interval=10 ** 9, model_dtype=model_dtype_of(args))
    return Config(name, run, Feed(loader), describe_mixer(mixer))


@contextmanager
def quiet_steps() -> Iterator[None]:
    """The progress line `train_one_epoch` logs at each loop's last step left out (the level restored after)."""
    step_logger = logging.getLogger('tokenmix_train.logger')
    level = step_logger.level
    step_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        step_logger.setLevel(level)


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(config: Config, kind: str, warmup: int, steps: int) -> float:
    """Images per second of `kind` ('fed', 'synthetic' or 'loader') for `config`, after `warmup` untimed steps."""
    run, feed = config.run, config.feed
    if kind == 'synthetic':
        batches = itertools.cycle(config.cached)
        warm, timed = Steps(batches, warmup), Steps(batches, steps)
    else:
        feed.reserve(warmup + steps)
        warm, timed = feed.steps(warmup), feed.steps(steps)

    def work(loader: Steps) -> None:
        if kind == 'loader':
            deque(loader, maxlen=0)  # each batch dropped as it comes
        else:
            train_one_epoch(run, 0, loader)

    if warmup:
        work(warm)
    synchronize(run.device)
    start = time.perf_counter()
    work(timed)
    synchronize(run.device)
    return timed.images / (time.perf_counter() - start)


def keep_batches(config: Config, count: int) -> None:
    """Keep `count` of the configuration's loader batches on its device for the synthetic rate."""
    config.feed.reserve(count)
    device = config.run.device
    config.cached = [tuple(t.to(device) for t in batch) for batch in config.feed.steps(count)]


def verdict(fed: float, synthetic: float, loader: float) -> str:
    """GPU-bound when fed is within 10% of synthetic; loader-bound when within 10% of the loader alone (and below 90%
    of synthetic); else mixed."""
    if abs(fed - synthetic) <= 0.1 * synthetic:
        return 'GPU-bound'
    if abs(fed - loader) <= 0.1 * loader and fed < 0.9 * synthetic:
        return 'loader-bound'
    return 'mixed'


def result_table(results: Dict[str, Dict[str, List[float]]], mixers: Dict[str, str]) -> List[str]:
    """Markdown rows: medians over rounds, fed / synthetic (of the medians, and its range over same-round pairs)."""
    lines = ['| configuration | mixer | fed img/s | synthetic img/s | loader alone img/s | fed / synthetic '
             '| same-round fed / synthetic | verdict |', '|---|---|---|---|---|---|---|---|']
    for name, rates in results.items():
        fed, synthetic, loader = (statistics.median(rates[kind]) for kind in KINDS)
        pairs = [f / s for f, s in zip(rates['fed'], rates['synthetic'])]
        lines.append(f'| {name} | {mixers[name]} | {fed:.1f} | {synthetic:.1f} | {loader:.1f} | '
                     f'{fed / synthetic:.3f} | {min(pairs):.3f}-{max(pairs):.3f} | {verdict(fed, synthetic, loader)} |')
    return lines


def link_copies(source: str, out: str, copies: int) -> str:
    """`out`: an ImageFolder whose train split links every file of `source`'s train split `copies` times (built
    under `out.partial` and renamed, as tools/make_jpeg_data.py builds its folders)."""
    if os.path.isdir(out):
        return out
    partial = out.rstrip(os.sep) + '.partial'
    train = os.path.join(source, 'train')
    for folder in sorted(os.listdir(train)):
        os.makedirs(os.path.join(partial, 'train', folder), exist_ok=True)
        for file in sorted(os.listdir(os.path.join(train, folder))):
            stem, ext = os.path.splitext(file)
            for copy in range(copies):
                link = os.path.join(partial, 'train', folder, f'{stem}_{copy:03d}{ext}')
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(train, folder, file)), link)
    os.replace(partial, out)
    return out


def random_teacher(path: str, model: str, num_classes: int) -> str:
    """`path`: a checkpoint of teacher `model` with random weights (written once; the rates do not depend on the
    weights' values)."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.manual_seed(0)
        torch.save({'state_dict': timm.create_model(model, num_classes=num_classes).state_dict()}, path + '.tmp')
        os.replace(path + '.tmp', path)
    return path


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    """The benchmark's flags, and the rest (train.py flags for every configuration)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-c', '--config', default=os.path.join(ROOT, DEFAULT_RECIPE), help='recipe YAML')
    parser.add_argument('--data-dir', default='', help='ImageFolder of JPEG files (default: generated, --images)')
    parser.add_argument('--images', type=int, default=256, help='distinct JPEG files to generate (default: 256)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'output', 'bench_fed'),
                        help='folder for the generated files, teacher weights and map store')
    parser.add_argument('--teacher-model', default='resnet50', help='teacher of the online and stored rows')
    parser.add_argument('--teacher-checkpoint', default='', help='its weights (default: random, under --out)')
    parser.add_argument('--teacher-amp', action='store_true', help='online teacher under autocast (--amp-dtype)')
    parser.add_argument('--teacher-maps', default='', metavar='STORE', help='map store (default: precomputed)')
    parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=CONFIGS, metavar='NAME',
                        help=f'configurations to measure (default: all of {", ".join(CONFIGS)})')
    parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds, median reported (default: 3)')
    parser.add_argument('--steps', type=int, default=56, help='timed steps a measurement (default: 56)')
    parser.add_argument('--warmup-steps', type=int, default=None, help='untimed steps first (default: 2 x workers + 2)')
    parser.add_argument('--synthetic-batches', type=int, default=4, help='loader batches kept for synthetic steps')
    parser.add_argument('--seed', type=int, default=0, help='seed of the generated data')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch threads of the training process (default: torch's; 1 on a shared CPU)")
    args, extra = parser.parse_known_args(argv)
    positive = (args.rounds, args.steps, args.images, args.synthetic_batches, args.threads or 1)
    if min(positive) < 1 or (args.warmup_steps or 0) < 0:
        parser.error('--rounds, --steps, --images, --synthetic-batches and --threads must be positive, '
                     '--warmup-steps >= 0')
    return args, [a for a in extra if a != '--']


def prepare_inputs(args: argparse.Namespace, extra: List[str]) -> Tuple[argparse.Namespace, str, str, str]:
    """The recipe's train args (over the data), the data folder, the teacher checkpoint and the map store, each
    generated under --out when not given."""
    data_dir = args.data_dir or ensure_image_folder(
        os.path.join(args.out, f'jpeg-{args.images}-seed{args.seed}'), args.images, seed=args.seed)
    train_args, _, _ = parse_train_args(['-c', args.config, '--data-dir', data_dir, *extra])
    args.warmup_steps = 2 * train_args.workers + 2 if args.warmup_steps is None else args.warmup_steps
    if not args.data_dir:  # a pass must hold warm-up + timed steps
        copies = math.ceil((args.warmup_steps + args.steps) * train_args.batch_size / args.images)
        data_dir = link_copies(data_dir, f'{data_dir}-x{copies}', copies)
        train_args, _, _ = parse_train_args(['-c', args.config, '--data-dir', data_dir, *extra])
    num_classes = resolve_num_classes(train_args.num_classes, build_dataset(
        train_args, train_args.train_split, '--train-split', is_training=True), 'the train split')
    store, stored = args.teacher_maps, 'tokenmix-stored' in args.configs
    checkpoint = args.teacher_checkpoint
    if not checkpoint and ('tokenmix-teacher' in args.configs or (stored and not store)):
        checkpoint = random_teacher(os.path.join(args.out, f'teacher-{args.teacher_model}-{num_classes}.pth.tar'),
                                    args.teacher_model, num_classes)
    if stored and not store:
        store = os.path.join(args.out, f'store-{args.teacher_model}-{os.path.basename(data_dir.rstrip(os.sep))}')
        device = ['--device', train_args.device] if train_args.device else []
        if precompute_teacher_maps.main(['--data-dir', data_dir, '--split', train_args.train_split, '--teacher-model',
                                         args.teacher_model, '--teacher-checkpoint', checkpoint, '--num-classes',
                                         str(num_classes), '--out', store, '--workers', str(train_args.workers),
                                         *device]) != 0:
            raise ConfigError(f"could not precompute the map store '{store}'")
    return train_args, data_dir, checkpoint, store


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, extra = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_args, data_dir, checkpoint, store = prepare_inputs(args, extra)
    configs = []
    for name in args.configs:
        flags = config_flags(name, args.teacher_model, checkpoint, store, args.teacher_amp)
        config = build_config(name, ['-c', args.config, '--data-dir', data_dir, *extra, *flags])
        if len(config.feed.loader) < args.warmup_steps + args.steps:
            raise ConfigError(f"--data-dir '{data_dir}': a pass of its train split makes {len(config.feed.loader)} "
                              f"batches of -b {train_args.batch_size}, fewer than --warmup-steps + --steps = "
                              f"{args.warmup_steps + args.steps}")
        keep_batches(config, args.synthetic_batches)
        configs.append(config)
    load = os.getloadavg()[0]
    results = {c.name: {kind: [] for kind in KINDS} for c in configs}
    with quiet_steps():
        for index in range(args.rounds):  # turn about: every other round backwards
            forward = index % 2 == 0
            for config in configs if forward else configs[::-1]:
                for kind in KINDS if forward else KINDS[::-1]:
                    results[config.name][kind].append(measure(config, kind, args.warmup_steps, args.steps))
    device = configs[0].run.device
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'
    print(f'{date.today()}, {where}, {os.cpu_count()} cores, load {load:.1f} -> {os.getloadavg()[0]:.1f}; '
          f'torch {torch.__version__}, timm {timm.__version__}; {args.config} {" ".join(extra)}; '
          f'model {train_args.model}, batch {train_args.batch_size}, workers {train_args.workers}; '
          f'{len(configs[0].feed.loader)} batches a pass from {data_dir}; {args.rounds} rounds of '
          f'{args.warmup_steps} warm-up + {args.steps} timed steps; teacher {args.teacher_model}')
    print('\n'.join(result_table(results, {c.name: c.mixer for c in configs})))
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main, 'bench_fed.py'))
