#!/usr/bin/env python3
"""Training throughput of TokenMix against timm's Mixup/CutMix, measured in one run.

Each configuration runs the training loop of train.py (`tokenmix_train.engine.train_one_epoch`: mixing on the
device, forward, backward, optimiser step) on synthetic batches already on the device, so data loading is left
out. Configurations are measured in interleaved rounds (turn about: every other round backwards) and the median is
reported, with the ratio to the first configuration (timm's Mixup/CutMix unless --configs says otherwise):

  timm-mixup-cutmix   timm.data.Mixup, mixup 0.8 / CutMix 1.0, switch prob 0.5 (the DeiT recipe)
  tokenmix-area       TokenMix, token branch with area (token count) targets
  tokenmix-teacher    TokenMix with the frozen teacher at the student's resolution
  tokenmix-teacher-lo TokenMix with the teacher at --teacher-img-size (reduced resolution)
  tokenmix-teacher-top5  TokenMix with the teacher, own-class maps truncated to the top 5 (--teacher-topk 5)
  tokenmix-stored     TokenMix with stored maps (--teacher-maps): the batch carries each image's record (its stored
                      18 x 18 top-5 entry and augmentation geometry, written in the loader workers, timed apart
                      below); the maps are cut from them on the device inside the step, no teacher runs

CPU defaults use the demo's tiny models; benchmarks/gpu_check.sh runs DeiT-S + ResNet-50 at 224 px.
Figures on a shared machine are noisy: compare ratios from one run, not absolute numbers across runs.
"""
import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import timm
import torch
from timm.data import Mixup
from timm.data.auto_augment import rotate
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ParseKwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file from a checkout that was not pip-installed
    sys.path.insert(0, ROOT)

import models  # noqa: F401,E402  registers the tiny models
from mixup_ext import TokenMix  # noqa: E402
from models import Teacher  # noqa: E402
from tokenmix_train.engine import Training, train_one_epoch  # noqa: E402
from tokenmix_train.teacher_maps import GeometryLog, StoredMapsMixer, geometry_matrices, pack_record  # noqa: E402
from tokenmix_train.model import token_size_of  # noqa: E402


class SyntheticLoader:
    """`steps` batches cycling over a few random batches that live on the device."""

    batch_sampler = None  # no sampler: the engine starts each pass at its first batch

    def __init__(self, batches: List[tuple], steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='tokenmix_vit_tiny_p8_64', help='student (timm name)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='student arguments')
    parser.add_argument('--teacher-model', default='tokenmix_cnn_teacher_64', help='teacher (timm name)')
    parser.add_argument('--img-size', type=int, default=64, help='student input size (default: 64)')
    parser.add_argument('--teacher-img-size', type=int, default=None,
                        help='reduced teacher input size (default: half of --img-size)')
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=20, help='timed steps per configuration and round')
    parser.add_argument('--warmup-steps', type=int, default=3, help='untimed steps before each measurement')
    parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds; the median is reported')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'),
                        help='autocast dtype for student and teacher (default: float32)')
    parser.add_argument('--channels-last', action='store_true', default=False)
    parser.add_argument('--configs', nargs='+', default=None, metavar='NAME',
                        help='measure only these configurations (default: all; the first is the ratios\' base)')
    args = parser.parse_args(argv)
    if args.batch_size % 2:
        parser.error(f'-b/--batch-size must be even for mixing, got {args.batch_size}')
    if args.steps < 1 or args.rounds < 1 or args.warmup_steps < 0:
        parser.error('--steps and --rounds must be >= 1, --warmup-steps >= 0')
    return args


def build_mixers(args: argparse.Namespace, student: torch.nn.Module, device: torch.device) -> Dict[str, object]:
    """The four configurations, each a mixer with the DeiT recipe's mixing flags."""
    common = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1,
                  num_classes=args.num_classes)
    token = dict(patch_size=token_size_of(student), target_norm='sum',
                 generator=torch.Generator().manual_seed(0))
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else None
    teacher_net = timm.create_model(args.teacher_model, num_classes=args.num_classes)
    low = args.teacher_img_size or args.img_size // 2

    def teacher(img_size: Optional[int]) -> Teacher:
        return Teacher(teacher_net, img_size=img_size, amp_dtype=amp_dtype,
                       channels_last=args.channels_last).to(device)
    return {
        'timm-mixup-cutmix': Mixup(**common),
        'tokenmix-area': TokenMix(**common, **token, target='area'),
        'tokenmix-teacher': TokenMix(**common, **token, teacher=teacher(None)),
        f'tokenmix-teacher-{low}px': TokenMix(**common, **token, teacher=teacher(low)),
        'tokenmix-teacher-top5': TokenMix(**common, **token, teacher=teacher(None), teacher_topk=5),
        'tokenmix-stored': StoredMapsMixer(TokenMix(**common, **token)),
    }


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(run: Training, loader: SyntheticLoader, warmup: SyntheticLoader) -> float:
    """Images per second of the training loop over `loader` (after `warmup` steps)."""
    if len(warmup):
        train_one_epoch(run, 0, warmup)
    synchronize(run.device)
    start = time.perf_counter()
    train_one_epoch(run, 0, loader)
    synchronize(run.device)
    return len(loader) * loader.batches[0][0].shape[0] / (time.perf_counter() - start)


def teacher_cost(teacher: Teacher, loader: SyntheticLoader, warmup: int) -> float:
    """Images per second of the teacher's own-class maps alone (what TokenMix adds to a step)."""
    for i, (images, labels) in enumerate(loader):
        if i == warmup:
            synchronize(images.device)
            start = time.perf_counter()
        teacher.own_class_maps(images, labels)
    synchronize(loader.batches[0][0].device)
    return (len(loader) - warmup) * loader.batches[0][0].shape[0] / (time.perf_counter() - start)


def stored_record(label: int, img_size: int, turned: bool, generator: torch.Generator, map_size: int = 18,
                  k: int = 5) -> torch.Tensor:
    """A --teacher-maps loader's record of one sample (loader-worker work): a random top-`k` entry of `map_size` cells
    with the label among them, a random crop of a 500 x 375 px image, flipped, `turned` by a RandAugment rotation."""
    values = torch.rand(k, map_size, map_size, generator=generator)
    indices = torch.randint(0, 1000, (k, map_size, map_size), generator=generator)
    indices[0] = label
    top, left = (int(v) for v in torch.randint(0, 150, (2,), generator=generator))
    log = GeometryLog(image_size=(500, 375), crop=(top, left, 200, 300), output_size=(img_size, img_size),
                      hflip=True, ops=[(rotate, (15.,))] if turned else [], slots=2)
    to_map, checks = geometry_matrices(log, (map_size, map_size), 'whole')
    return pack_record(label, label, torch.stack([values, indices.float()]).numpy(), to_map, checks, log.slots,
                       log.output_size)


def stored_batches(batches: List[tuple], img_size: int) -> List[tuple]:
    """The same batches with the targets a --teacher-maps loader gives: each sample's record (one in three turned)."""
    generator = torch.Generator().manual_seed(0)
    return [(images, torch.stack([stored_record(label, img_size, i % 3 == 0, generator)
                                  for i, label in enumerate(labels.tolist())]).to(labels.device))
            for images, labels in batches]


def mixer_cost(mixer, batches: List[tuple], repeats: int) -> float:
    """Seconds per batch of the mixer call alone: the minimum (robust on a shared machine) over the calls that took
    the region / token branch (all calls for a mixer that does not say which branch it took)."""
    times = {True: [], False: []}
    for i in range(repeats):
        images, targets = batches[i % len(batches)]
        images = images.clone()
        synchronize(images.device)
        start = time.perf_counter()
        mixer(images, targets)
        synchronize(images.device)
        times[getattr(mixer, 'last_mask', True) is not None].append(time.perf_counter() - start)
    return min(times[True] or times[False])


def record_cost(img_size: int, repeats: int = 2000) -> float:
    """Microseconds per sample to write a stored-map record (the loader workers' part of the stored-map path)."""
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i in range(repeats):
        stored_record(i % 1000, img_size, i % 3 == 0, generator)
    return (time.perf_counter() - start) / repeats * 1e6


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    student = timm.create_model(args.model, num_classes=args.num_classes, img_size=args.img_size,
                                **args.model_kwargs).to(device)
    if args.channels_last:
        student.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(student, 'adamw', lr=1e-5, weight_decay=0.05)
    mixers = build_mixers(args, student, device)
    if args.configs:
        unknown = [c for c in args.configs if c not in mixers]
        if unknown:
            raise SystemExit(f'--configs: unknown {unknown}; choose from {list(mixers)}')
        mixers = {name: mixers[name] for name in args.configs}
    batches = [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device),
                torch.randint(0, args.num_classes, (args.batch_size,), device=device)) for _ in range(4)]
    loader, warmup = SyntheticLoader(batches, args.steps), SyntheticLoader(batches, args.warmup_steps)
    patch = token_size_of(student)
    grid = (args.img_size // patch, args.img_size // patch)
    stored = stored_batches(batches, args.img_size)
    stored_loaders = SyntheticLoader(stored, args.steps), SyntheticLoader(stored, args.warmup_steps)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else None
    results: Dict[str, List[float]] = {name: [] for name in mixers}
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    peak: Dict[str, float] = {}
    for round_index in range(args.rounds):  # turn about: every other round runs the configurations backwards
        order = list(mixers.items())
        for name, mixer in (order if round_index % 2 == 0 else order[::-1]):
            run = Training(model=student, optimizer=optimizer, criterion=SoftTargetCrossEntropy(), device=device,
                           mixer=mixer, amp_dtype=amp_dtype, channels_last=args.channels_last,
                           log_interval=10 ** 9)
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            results[name].append(measure(run, *(stored_loaders if name == 'tokenmix-stored' else (loader, warmup))))
            if device.type == 'cuda':
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2 ** 30)
    name0 = next(iter(results))
    base = statistics.median(results[name0])
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    print(f'{args.model} @ {args.img_size}px, teacher {args.teacher_model}, batch {args.batch_size}, '
          f'{args.steps} steps x {args.rounds} rounds, amp {args.amp_dtype or "off"}, {where}')
    mix_ms = {name: 1e3 * mixer_cost(mixer, stored if name == 'tokenmix-stored' else batches, 8 * args.steps)
              for name, mixer in mixers.items()}
    print(f'{"configuration":<24}{"img/s (median)":>16}{"ratio":>8}{"min..max":>20}{"token-batch mixer ms":>22}' +
          (f'{"peak GiB":>10}' if peak else ''))
    for name, values in results.items():
        median = statistics.median(values)
        spread = f'{min(values):.1f}..{max(values):.1f}'
        line = f'{name:<24}{median:>16.1f}{median / base:>8.2f}{spread:>20}{mix_ms[name]:>22.2f}'
        print(line + (f'{peak[name]:>10.2f}' if peak else ''))
    if {'tokenmix-area', 'tokenmix-stored'} <= set(results):
        pairs = [s / a for s, a in zip(results['tokenmix-stored'], results['tokenmix-area'])]
        print(f'tokenmix-stored / tokenmix-area, same round: median {statistics.median(pairs):.3f} '
              f'(rounds {", ".join(f"{p:.3f}" for p in pairs)}; goal >= 0.98)')
        step_ms = 1e3 * args.batch_size / max(results['tokenmix-area'])  # the best round: the least disturbed
        extra = mix_ms['tokenmix-stored'] - mix_ms['tokenmix-area']
        print(f'from the mixers alone (min over token batches): stored costs {extra:+.2f} ms a batch over area, '
              f'{extra / step_ms:+.4f} of a best-round area step, i.e. stored at {step_ms / (step_ms + extra):.3f}x')
    print(f'stored maps: writing one image\'s record (its 18 x 18 top-5 entry and geometry) takes '
          f'{record_cost(args.img_size):.0f} us on one CPU thread (in the loader workers, not in the rows above; the '
          f'cut onto the {grid[0]} x {grid[1]} grid is in the tokenmix-stored step)')
    if 'tokenmix-teacher' in mixers:
        teacher = mixers['tokenmix-teacher'].teacher
        teacher_rate = teacher_cost(teacher, SyntheticLoader(batches, args.steps + args.warmup_steps),
                                    args.warmup_steps)
        print(f'teacher maps alone: {teacher_rate:.1f} img/s, i.e. {base / teacher_rate:.2f} of a baseline training '
              f'step\'s time (the goal of >= 0.9x assumes about 1/3)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
