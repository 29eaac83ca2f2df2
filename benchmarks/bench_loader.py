"""Per-core speed of a recipe's train input pipeline on JPEG files, stage by stage, and faster decode/augment paths.

(a) The pipeline train.py builds from `-c RECIPE` (tokenmix_train.data's `build_dataset` / `build_train_loader`, as
    train.py's main builds them) over an ImageFolder of JPEG files, run in this process as one loader worker runs
    it: `dataset[i]` for a batch of indices, then the loader's collate. Printed: the worker's img/s on one core,
    each stage's time (read bytes, decode, each step of the train transform, collate; with timm's prefetcher the
    normalisation and random erasing run on the device, shown apart), and the worker cores that feed `--feed`
    img/s. With `--teacher-maps STORE` the same worker job runs again on the dataset train.py wraps for stored maps
    (which only records each sample's geometry and reads its stored scores), and the cut of the batch's maps from
    those records (`record_maps`, on the device in training) is timed apart; their ratios to the plain job are
    taken within each round.
(b) Candidate decode/augment paths, each from the file's bytes to the uint8 image tensor timm's prefetcher takes,
    with the recipe's steps in the recipe's order (timm's: crop, flip, RandAugment; the authors': flip, RandAugment,
    crop), against timm's PIL path on the same images. Each path runs on an image after the random streams are
    reseeded for that image, so all draw the same crop box, flip and RandAugment ops; the mean absolute pixel
    difference from timm's output shows what each changes. A DCT-scaled decode draws timm's box on the full image
    size before decoding, so it runs only where the crop is the first step.
(c) RandAugment's ops on the images it receives (224 px crops in timm's order, whole images in the authors'):
    timm's PIL op against a torchvision tensor counterpart.

A round takes `--round-images` images drawn afresh; on each image the worker's `dataset[i]`, the stage split and
every candidate take turns, in an order reversed from one image to the next, so the shared machine's changes of
speed hit all alike. Ratios are taken within a round; the median over rounds and the range are printed. One torch
thread, as in a loader worker.

Usage: python benchmarks/bench_loader.py [-c RECIPE] [--data-dir DIR | --images N] [--rounds R]
           [--round-images N] [--feed IMG_S] [--teacher-maps STORE] [-- extra train.py flags]
"""
import argparse
import io
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as TF
import torchvision.transforms.functional as F
import torchvision.transforms.v2.functional as F2
from PIL import Image
from timm.data import resolve_data_config
from timm.data.loader import PrefetchLoader
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, 'tools')):  # run as a file from a checkout that was not pip-installed
    if path not in sys.path:
        sys.path.insert(0, path)

from make_jpeg_data import ensure_image_folder  # noqa: E402
from tokenmix_train.args import parse_train_args  # noqa: E402
from tokenmix_train.data import build_dataset, build_train_loader, resolve_num_classes  # noqa: E402
from tokenmix_train.distributed import init_device, run_cli  # noqa: E402
from tokenmix_train.errors import ConfigError  # noqa: E402
from tokenmix_train.model import build_student, token_size_of  # noqa: E402
from tokenmix_train.teacher_maps import record_maps, wrap_train_dataset  # noqa: E402
from tokenmix_train.transforms import augment_ops, faster_augment  # noqa: E402

DEFAULT_RECIPE = 'configs/imagenet/deit_small_tokenmix_stored_maps_300ep.yaml'
H200_DEIT_S = 3527  # img/s of one H200 training DeiT-S with timm's CutMix (docs/benchmarks.md, gpu_check.sh)
STAGE_NAMES = {'RandomResizedCropAndInterpolation': 'crop-resize', 'RandomHorizontalFlip': 'flip',
               'RandomVerticalFlip': 'vertical flip', 'RandAugment': 'RandAugment', 'AutoAugment': 'AutoAugment',
               'MaybePILToTensor': 'to-tensor', 'MaybeToTensor': 'to-tensor', 'ToTensor': 'to-tensor',
               'Normalize': 'normalize', 'RandomErasing': 'random erasing'}


CLOCKS = {'wall': time.perf_counter, 'cpu': time.thread_time}  # --clock: wall time, or this thread's CPU time


class Timer:
    """Seconds spent by name, summed over calls, on `clock` (wall time; CPU time keeps a paired ratio readable on a
    machine shared with other work, and a worker core's budget is CPU time)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.spent: Dict[str, float] = {}
        self.clock = clock

    def __call__(self, name: str, fn: Callable, *args: Any) -> Any:
        start = self.clock()
        out = fn(*args)
        self.spent[name] = self.spent.get(name, 0.0) + self.clock() - start
        return out


@dataclass
class Pipeline:
    """The train dataset and loader train.py builds, and what one loader worker does with them."""
    dataset: Any
    loader: Any
    paths: List[str]
    mode: str

    @property
    def steps(self) -> List[Any]:
        return list(self.dataset.transform.transforms)

    @property
    def collate(self) -> Callable:
        return (self.loader.loader if isinstance(self.loader, PrefetchLoader) else self.loader).collate_fn

    def load_stages(self, index: int, timer: Timer) -> Tuple[Any, int]:
        """Sample `index` as the dataset makes it, each stage timed: read bytes, decode, each transform step."""
        with open(self.paths[index], 'rb') as f:
            data = timer('read bytes', f.read)
        img = timer('decode', decode, data, self.mode)
        for step in self.steps:
            img = timer(STAGE_NAMES.get(type(step).__name__, type(step).__name__), step, img)
        return img, 0

    def collate_stages(self, samples: List[Tuple[Any, int]], timer: Timer) -> None:
        """Collate `samples` as the loader does, then time timm's prefetcher work on the batch (on the device in
        training, so not a worker core's)."""
        batch, _ = timer('collate', self.collate, samples)
        if isinstance(self.loader, PrefetchLoader):
            prefetch = self.loader
            batch = timer('normalize (prefetcher)', lambda x: x.float().sub_(prefetch.mean).div_(prefetch.std), batch)
            if prefetch.random_erasing is not None:
                timer('random erasing (prefetcher)', prefetch.random_erasing, batch)


def build_pipeline(recipe: str, data_dir: str, extra: Sequence[str] = ()) -> Pipeline:
    """The train split's dataset and loader of `recipe` (a -c YAML) over `data_dir`, built as train.py's main builds
    them (dataset, student for the data config, stored-maps wrapper, loader), on the CPU without workers."""
    args, _, _ = parse_train_args(['-c', recipe, '--data-dir', data_dir, '--device', 'cpu', '--workers', '0',
                                   *extra])
    device = init_device(args)
    dataset = build_dataset(args, args.train_split, '--train-split', is_training=True)
    model = build_student(args, resolve_num_classes(args.num_classes, dataset, 'the train split'))
    data_config = resolve_data_config(vars(args), model=model)
    dataset = wrap_train_dataset(args, dataset, data_config['input_size'], token_size_of(model,
                                                                                         args.tokenmix_patch_size))
    loader = build_train_loader(dataset, args, data_config, device)
    paths = [dataset.reader.filename(i, absolute=True) for i in range(len(dataset))]
    return Pipeline(dataset, loader, paths, 'L' if data_config['input_size'][0] == 1 else 'RGB')


def seed_all(seed: int) -> None:
    """Seed the three streams timm's train transform draws from (crop: random, RandAugment: random and NumPy,
    flip and erasing: torch)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def decode(data: bytes, mode: str) -> Image.Image:
    """The dataset's decode: open, then convert to the input mode (a full decode)."""
    return Image.open(io.BytesIO(data)).convert(mode)


# ---- candidate decode / crop-resize / augment paths ------------------------------------------------------------

def dct_scale(box_size: Tuple[int, int], output_size: Tuple[int, int]) -> int:
    """The largest JPEG DCT scale-down (1, 2, 4 or 8) that keeps the crop box (h, w) at least the output size."""
    scale = 1
    while scale < 8 and all(side // (2 * scale) >= out for side, out in zip(box_size, output_size)):
        scale *= 2
    return scale


def dct_scale_shares(sizes: Sequence[Tuple[int, int]], crop: RandomResizedCropAndInterpolation, draws: int = 20,
                     seed: int = 0) -> Dict[int, float]:
    """Share of timm's crop boxes, `draws` on each image size (width, height), that allow each DCT scale-down."""
    rng_state = random.getstate()
    random.seed(seed)
    scales = [dct_scale(crop.get_params(torch.empty(0, height, width), crop.scale, crop.ratio)[2:], crop.size)
              for width, height in sizes for _ in range(draws)]
    random.setstate(rng_state)
    return {scale: scales.count(scale) / len(scales) for scale in (1, 2, 4, 8)}


def draft_decode(data: bytes, mode: str, crop: RandomResizedCropAndInterpolation
                 ) -> Tuple[Image.Image, Tuple[float, float, float, float]]:
    """Draw timm's crop box on the full image size, then decode at the largest DCT scale-down (Pillow's
    `Image.draft`, libjpeg's scaled IDCT) that keeps the box at least the output size.

    Returns the decoded image and the box as (left, top, right, bottom) in its pixels.
    """
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    top, left, h, w = crop.get_params(img, crop.scale, crop.ratio)
    scale = dct_scale((h, w), crop.size)
    if scale > 1:
        img.draft(mode, (width // scale, height // scale))
    img = img.convert(mode)
    sx, sy = img.size[0] / width, img.size[1] / height
    return img, (left * sx, top * sy, (left + w) * sx, (top + h) * sy)


@dataclass(frozen=True)
class Candidate:
    """One way from a file's bytes to the uint8 image tensor: a decoder, a crop-resize, the recipe's other steps.

    decode: 'pil' (full decode, as the dataset), 'draft' (DCT-scaled when the box allows), 'torchvision'
    (`torchvision.io.decode_jpeg` on the CPU), 'simplejpeg'. resize: 'crop' (timm's step: crop, then resize),
    'box' (Pillow resizes straight from the box), 'reduce' (the same with `reducing_gap=1`: Pillow's `reduce` by
    the box's whole ratio first), 'tensor' (torch's antialiased resize of the cropped tensor). translate: whole-
    pixel translate ops in RandAugment; resample: Pillow filter for its rotate and shear ops (None: timm's).
    """
    name: str
    decode: str = 'pil'
    resize: str = 'crop'
    translate: bool = False
    resample: Optional[int] = None


CANDIDATES = (
    Candidate("timm: PIL decode, crop then resize (train.py's path)"),
    Candidate('Pillow resize from the box (no crop copy)', resize='box'),
    Candidate('Pillow reduce first (resize reducing_gap=1)', resize='reduce'),
    Candidate('PIL draft: DCT-scaled decode when the box allows', decode='draft', resize='box'),
    Candidate('torchvision decode_jpeg + torch antialiased resize', decode='torchvision', resize='tensor'),
    Candidate('simplejpeg decode', decode='simplejpeg', resize='box'),
    Candidate('RandAugment: whole-pixel translate', translate=True),
    Candidate('RandAugment: whole-pixel translate, bilinear rotate/shear', translate=True, resample=Image.BILINEAR),
    Candidate('draft + resize from the box + whole-pixel translate', decode='draft', resize='box', translate=True),
)


def simplejpeg_module() -> Any:
    """simplejpeg when installed (it is not a requirement of this project), else None."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def available_candidates() -> List[Candidate]:
    """CANDIDATES less those whose decoder is not installed here."""
    return [c for c in CANDIDATES if c.decode != 'simplejpeg' or simplejpeg_module() is not None]


def _decode(candidate: Candidate, data: bytes, mode: str) -> Any:
    """The candidate's full decode: a PIL image in `mode`, or a C x H x W uint8 tensor from torchvision."""
    if candidate.decode == 'torchvision':
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if candidate.decode == 'simplejpeg':
        return Image.fromarray(simplejpeg_module().decode_jpeg(data, 'RGB'))
    return decode(data, mode)


def _interpolation(crop: RandomResizedCropAndInterpolation) -> F.InterpolationMode:
    """The crop's interpolation, drawn as timm draws it when it is random."""
    modes = crop.interpolation
    return random.choice(modes) if isinstance(modes, (tuple, list)) else modes


def _resize(candidate: Candidate, img: Any, box: Tuple[float, float, float, float],
            crop: RandomResizedCropAndInterpolation) -> Image.Image:
    """The crop box (left, top, right, bottom) of `img` resized to the crop's output size, as a PIL image."""
    mode = _interpolation(crop)
    height, width = crop.size
    if candidate.resize == 'tensor':
        tensor = img if isinstance(img, torch.Tensor) else F2.pil_to_tensor(img)
        left, top, right, bottom = (int(v) for v in box)
        out = TF.interpolate(tensor[None, :, top:bottom, left:right], size=(height, width), mode=mode.value,
                             antialias=True)[0]
        return tensor_to_pil(out)
    gap = 1.0 if candidate.resize == 'reduce' else None
    return img.resize((width, height), F.pil_modes_mapping[mode], box=box, reducing_gap=gap)


def _crop_resize(candidate: Candidate, img: Any, crop: RandomResizedCropAndInterpolation) -> Image.Image:
    """timm's random-resized crop of `img` along the candidate's resize (timm's own step for 'crop')."""
    if candidate.resize == 'crop':
        return crop(img if isinstance(img, Image.Image) else tensor_to_pil(img))
    top, left, h, w = crop.get_params(img, crop.scale, crop.ratio)
    return _resize(candidate, img, (left, top, left + w, top + h), crop)


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """A 3 x H x W uint8 tensor as an RGB PIL image (one copy)."""
    return Image.fromarray(np.ascontiguousarray(tensor.permute(1, 2, 0).numpy()))


def make_path(candidate: Candidate, steps: Sequence[Any], mode: str) -> Optional[Callable[[bytes], torch.Tensor]]:
    """bytes -> uint8 C x H x W tensor along `candidate`, with the recipe's transform `steps` (timm's objects, in
    the recipe's order: timm's crop first, or the authors' flip and RandAugment first) up to the tensor conversion.

    None for a DCT-scaled decode when the crop is not the first step: the box must be known before the decode, and
    drawing it first would change the draws.
    """
    crop_at = next((i for i, step in enumerate(steps) if isinstance(step, RandomResizedCropAndInterpolation)), None)
    if crop_at is None:
        raise ConfigError('the candidates need the random-resized-crop train pipeline (not --no-aug or '
                          '--train-crop-mode rkrc/rkrr)')
    if candidate.decode == 'draft' and crop_at > 0:
        return None
    end = next((i for i, step in enumerate(steps) if STAGE_NAMES.get(type(step).__name__) in
                ('to-tensor', 'normalize', 'random erasing')), len(steps))
    swap = candidate.translate or candidate.resample is not None
    pil_steps = [faster_augment(step, candidate.translate, candidate.resample) if swap and augment_ops(step) else step
                 for step in steps[:end]]
    crop = steps[crop_at]
    before, after = pil_steps[:crop_at], pil_steps[crop_at + 1:]

    def path(data: bytes) -> torch.Tensor:
        if candidate.decode == 'draft':
            img = _resize(candidate, *draft_decode(data, mode, crop), crop)
        else:
            img = _decode(candidate, data, mode)
            if before and isinstance(img, torch.Tensor):
                img = tensor_to_pil(img)
            for step in before:
                img = step(img)
            img = _crop_resize(candidate, img, crop)
        for step in after:
            img = step(img)
        return F2.pil_to_tensor(img)
    return path


# ---- RandAugment's ops: PIL against tensors --------------------------------------------------------------------

def tensor_ops() -> Dict[str, Callable]:
    """torchvision tensor counterparts of timm's augment ops (by timm's name less 'Increasing'), for timing only:
    torchvision's tensor affine ops have no bicubic filter, so rotate, shear and translate use bilinear."""
    bilinear = F2.InterpolationMode.BILINEAR

    def affine(t: torch.Tensor, shear: Tuple[float, float] = (0., 0.), shift: Tuple[int, int] = (0, 0)):
        return F2.affine(t, angle=0., translate=list(shift), scale=1., shear=list(shear), interpolation=bilinear)

    def shear_degrees(factor: float) -> float:
        return math.degrees(math.atan(factor))

    return {
        'AutoContrast': F2.autocontrast, 'Equalize': F2.equalize, 'Invert': F2.invert,
        'Rotate': lambda t, degrees: F2.rotate(t, degrees, interpolation=bilinear),
        'Posterize': F2.posterize, 'Solarize': F2.solarize,
        'SolarizeAdd': lambda t, add, thresh=128: torch.where(t < thresh, (t.int() + add).clamp(0, 255).byte(), t),
        'Color': F2.adjust_saturation, 'Contrast': F2.adjust_contrast, 'Brightness': F2.adjust_brightness,
        'Sharpness': F2.adjust_sharpness,
        'ShearX': lambda t, f: affine(t, shear=(shear_degrees(f), 0.)),
        'ShearY': lambda t, f: affine(t, shear=(0., shear_degrees(f))),
        'TranslateX': lambda t, px: affine(t, shift=(round(px), 0)),
        'TranslateY': lambda t, px: affine(t, shift=(0, round(px))),
        'TranslateXRel': lambda t, pct: affine(t, shift=(round(pct * t.shape[-1]), 0)),
        'TranslateYRel': lambda t, pct: affine(t, shift=(0, round(pct * t.shape[-2]))),
    }


def augment_op_seconds(augment: Any, images: Sequence[Image.Image]) -> List[Tuple[str, float, float, float]]:
    """(op name, seconds an application on PIL, on a tensor (nan: no counterpart), expected applications an image)
    for each op of a timm RandAugment at its magnitude (no magnitude noise) over `images`; the PIL op and its
    tensor counterpart take turns image by image."""
    ops = tensor_ops()
    tensors = [F2.pil_to_tensor(img) for img in images]
    rows = []
    for op in augment.ops:
        args = op.level_fn(op.magnitude, op.hparams) if op.level_fn is not None else ()
        counterpart = ops.get(op.name.replace('Increasing', ''))
        timer = Timer()
        for k, (img, tensor) in enumerate(zip(images, tensors)):
            turns = [('pil', lambda: op.aug_fn(img, *args, **op.kwargs))]
            if counterpart is not None:
                turns.append(('tensor', lambda: counterpart(tensor, *args)))
            for name, fn in turns if k % 2 == 0 else turns[::-1]:
                timer(name, fn)
        rows.append((op.name, timer.spent['pil'] / len(images), timer.spent.get('tensor', math.nan) / len(images),
                     augment.num_layers * op.prob / len(augment.ops)))
    return rows


# ---- rounds --------------------------------------------------------------------------------------------------

def run_round(pipeline: Pipeline, stored: Optional[Pipeline], paths: Dict[str, Callable], indices: List[int],
              datas: Sequence[bytes], seed: int, clock: Callable[[], float] = time.perf_counter) -> Dict[str, Any]:
    """One round over the images `indices` (`datas`: their bytes), image by image: the worker's `dataset[i]` (and
    with stored maps), the stage split and every candidate path take turns on each image, in an order reversed
    every other image, each after reseeding the streams (so all draw the same crop, flip and augment ops); then
    the collates. Returns seconds an image by name, 'stages' (seconds an image by stage) and 'diff' (mean absolute
    difference of each candidate's output from the first candidate's, in 8-bit levels)."""
    workers = {'worker': pipeline, 'worker, stored maps': stored}
    timer, stages = Timer(clock), Timer(clock)
    samples: Dict[str, List[Any]] = {name: [] for name in [*workers, 'stages']}
    outputs: Dict[str, List[torch.Tensor]] = {name: [] for name in paths}
    jobs: List[Tuple[str, Callable[[int, bytes], Any]]] = [
        (name, lambda index, _, name=name: samples[name].append(timer(name, workers[name].dataset.__getitem__,
                                                                      index)))
        for name in workers if workers[name] is not None]
    jobs.append(('stages', lambda index, _: samples['stages'].append(pipeline.load_stages(index, stages))))
    jobs += [(name, lambda _, data, name=name: outputs[name].append(timer(name, paths[name], data))) for name in paths]
    for k, (index, data) in enumerate(zip(indices, datas)):
        for _, job in jobs if k % 2 == 0 else jobs[::-1]:
            seed_all(seed * 1_000_003 + index)
            job(index, data)
    for name, worker in workers.items():
        if worker is not None:
            _, targets = timer(name, worker.collate, samples[name])
    if stored is not None:  # the batch's maps cut from the records: on the device in training, here one CPU thread
        timer('maps cut (batch)', record_maps, targets, stored.dataset.grid)
    pipeline.collate_stages(samples['stages'], stages)
    out: Dict[str, Any] = {name: seconds / len(indices) for name, seconds in timer.spent.items()}
    out['stages'] = {name: seconds / len(indices) for name, seconds in stages.spent.items()}
    baseline = outputs.get(CANDIDATES[0].name, [])
    out['diff'] = {name: float(np.mean([(a.float() - b.float()).abs().mean() for a, b in zip(images, baseline)]))
                   for name, images in outputs.items()}
    return out


# ---- report --------------------------------------------------------------------------------------------------

def spread(values: Sequence[float]) -> str:
    """'median (min-max)' of per-round values."""
    return f'{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})'


def cores_needed(feed: float, per_core: float) -> int:
    """Worker cores that together make `feed` img/s at `per_core` img/s each."""
    return math.ceil(feed / per_core - 1e-9)


def worker_table(rounds: List[Dict[str, Any]], feed: float) -> List[str]:
    """Markdown rows: each stage's ms an image and share of the worker's time, then the measured worker job."""
    stages = list(rounds[0]['stages'])
    worker_sum = [sum(v for k, v in r['stages'].items() if '(prefetcher)' not in k) * 1e3 for r in rounds]
    lines = ['| stage | ms an image: median (range) | share of the worker |', '|---|---|---|']
    for stage in stages:
        ms = [r['stages'][stage] * 1e3 for r in rounds]
        share = '' if '(prefetcher)' in stage else f'{statistics.median(ms) / statistics.median(worker_sum):.0%}'
        lines.append(f'| {stage} | {spread(ms)} | {share or "on the device in training"} |')
    lines.append(f'| sum of the worker stages | {spread(worker_sum)} | 100% |')
    lines += ['', f'| worker job (dataset[i] + collate), one core | ms an image | img/s | cores for {feed:.0f} img/s |',
              '|---|---|---|---|']
    for name, label in (('worker', "train.py's loader"), ('worker, stored maps', 'with stored maps (--teacher-maps)')):
        if name not in rounds[0]:
            lines.append(f'| {label} | not measured: pass --teacher-maps STORE | | |')
            continue
        seconds = statistics.median(r[name] for r in rounds)
        lines.append(f'| {label} | {spread([r[name] * 1e3 for r in rounds])} | {1 / seconds:.0f} | '
                     f'{cores_needed(feed, 1 / seconds)} |')
    if 'maps cut (batch)' in rounds[0]:
        lines += ['', '| stored maps against the plain loader, same round | median (range) |', '|---|---|',
                  '| worker img/s, stored / plain | '
                  f"{spread([r['worker'] / r['worker, stored maps'] for r in rounds])} |",
                  f"| the batch's maps cut (`record_maps`; on the device in training), ms an image on this core | "
                  f"{spread([r['maps cut (batch)'] * 1e3 for r in rounds])} |",
                  '| worker + that cut on this core, stored / plain | '
                  f"{spread([r['worker'] / (r['worker, stored maps'] + r['maps cut (batch)']) for r in rounds])} |"]
    return lines


def candidate_table(rounds: List[Dict[str, Any]], names: Sequence[str], feed: float,
                    skipped: Sequence[str] = ()) -> List[str]:
    """Markdown rows: each candidate's ms an image, speed-up over the baseline within each round, the worker's
    img/s with it (read + path + collate, from the same round's stages), cores to feed `feed`, pixel difference;
    then the `skipped` candidates (a DCT-scaled decode where the crop comes after RandAugment)."""
    base = names[0]
    lines = [f'| path (bytes -> uint8 tensor) | ms an image | speed-up over timm, same round | worker img/s '
             f'| cores for {feed:.0f} img/s | mean abs. difference from timm (levels) |', '|---|---|---|---|---|---|']
    for name in names:
        worker = statistics.median(1 / (r[name] + r['stages']['read bytes'] + r['stages']['collate']) for r in rounds)
        lines.append(f'| {name} | {spread([r[name] * 1e3 for r in rounds])} | '
                     f'{spread([r[base] / r[name] for r in rounds])} | {worker:.0f} | {cores_needed(feed, worker)} | '
                     f'{statistics.median(r["diff"][name] for r in rounds):.2f} |')
    lines += [f'| {name} | n/a: the crop box is drawn after RandAugment here, a DCT-scaled decode needs it before '
              f'| | | | |' for name in skipped]
    return lines


def augment_table(rows: List[Tuple[str, float, float, float]]) -> List[str]:
    """Markdown rows of `augment_op_seconds`, with each op's expected ms an image and the totals."""
    lines = ['| op | PIL ms | tensor ms | applications an image | PIL ms an image |', '|---|---|---|---|---|']
    for name, pil, tensor, rate in rows:
        lines.append(f'| {name} | {pil * 1e3:.3f} | {tensor * 1e3:.3f} | {rate:.3f} | {pil * rate * 1e3:.3f} |')
    total_pil = sum(pil * rate for _, pil, _, rate in rows) * 1e3
    best = sum(min(pil, pil if math.isnan(tensor) else tensor) * rate for _, pil, tensor, rate in rows) * 1e3
    lines.append(f'| all ops, expected | | | {sum(r[3] for r in rows):.2f} | {total_pil:.3f} '
                 f'(faster of the two per op: {best:.3f}) |')
    return lines


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    """The benchmark's flags, and the rest (train.py flags for the recipe)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-c', '--config', default=os.path.join(ROOT, DEFAULT_RECIPE), help='recipe YAML')
    parser.add_argument('--data-dir', default='', help='ImageFolder of JPEG files (default: generated, --images)')
    parser.add_argument('--images', type=int, default=800, help='images to generate without --data-dir')
    parser.add_argument('--seed', type=int, default=0, help='seed of the generated data and of the draws')
    parser.add_argument('--rounds', type=int, default=9, help='rounds, their median reported (default: 9)')
    parser.add_argument('--round-images', type=int, default=64, help='images a round (default: 64)')
    parser.add_argument('--feed', type=float, default=H200_DEIT_S,
                        help=f'img/s to feed for the cores projection (default: {H200_DEIT_S}, one H200, DeiT-S)')
    parser.add_argument('--teacher-maps', default='', metavar='STORE', help='also measure with this map store')
    parser.add_argument('--ra-images', type=int, default=32, help='crops to time RandAugment ops on')
    parser.add_argument('--clock', choices=list(CLOCKS), default='wall',
                        help="wall time (default) or the thread's CPU time (for a machine busy with other work)")
    parser.add_argument('--workers-only', action='store_true',
                        help='(a) only: the worker job and its stages, without the candidates and the ops')
    args, extra = parser.parse_known_args(argv)
    if min(args.rounds, args.round_images, args.images, args.ra_images) < 1 or args.feed <= 0:
        parser.error('--rounds, --round-images, --images, --ra-images and --feed must be positive')
    return args, [a for a in extra if a != '--']


def augment_inputs(pipeline: Pipeline, datas: Sequence[bytes], at: int) -> List[Image.Image]:
    """The images the transform's step number `at` receives for `datas` (decoded, through the steps before it)."""
    images = []
    for data in datas:
        img = decode(data, pipeline.mode)
        for step in pipeline.steps[:at]:
            img = step(img)
        images.append(img)
    return images


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, extra = parse_args(argv)
    torch.set_num_threads(1)  # as in a loader worker
    data_dir = args.data_dir or ensure_image_folder(
        os.path.join(ROOT, 'output', 'bench_loader', f'jpeg-{args.images}-seed{args.seed}'), args.images,
        val_images=10, seed=args.seed)
    pipeline = build_pipeline(args.config, data_dir, extra)
    stored = build_pipeline(args.config, data_dir, [*extra, '--teacher-maps', args.teacher_maps]) \
        if args.teacher_maps else None
    made = {} if args.workers_only else {c.name: make_path(c, pipeline.steps, pipeline.mode)
                                         for c in available_candidates()}
    paths = {name: path for name, path in made.items() if path is not None}
    load = os.getloadavg()[0]
    rng = random.Random(args.seed)
    rounds = []
    for r in range(args.rounds):
        indices = rng.sample(range(len(pipeline.paths)), min(args.round_images, len(pipeline.paths)))
        datas = []
        for index in indices:
            with open(pipeline.paths[index], 'rb') as f:
                datas.append(f.read())
        rounds.append(run_round(pipeline, stored, paths, indices, datas, args.seed + r, CLOCKS[args.clock]))
    order = ', '.join(STAGE_NAMES.get(type(s).__name__, type(s).__name__) for s in pipeline.steps)
    print(f'{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load '
          f'{load:.1f} -> {os.getloadavg()[0]:.1f}; torch {torch.__version__}, Pillow {Image.__version__}; '
          f'{args.config} {" ".join(extra)}; {len(pipeline.paths)} images in {data_dir}; {args.rounds} rounds of '
          f'{len(indices)} images, one torch thread, {args.clock} clock; transform: {order}')
    print('\n(a) the recipe\'s train pipeline, one worker core\n')
    print('\n'.join(worker_table(rounds, args.feed)))
    if args.workers_only:
        return 0
    print('\n(b) decode/augment candidates, same images and draws as timm\'s path, one core\n')
    print('\n'.join(candidate_table(rounds, list(paths), args.feed, [n for n in made if n not in paths])))
    crop = next(s for s in pipeline.steps if isinstance(s, RandomResizedCropAndInterpolation))
    sizes = []
    for path in pipeline.paths:
        with Image.open(path) as img:
            sizes.append(img.size)
    shares = dct_scale_shares(sizes, crop, seed=args.seed)
    print('\nCrop boxes that allow a DCT scale-down (20 draws an image): ' +
          ', '.join(f'1/{scale}: {share:.1%}' for scale, share in shares.items() if scale > 1))
    at = next((i for i, s in enumerate(pipeline.steps) if type(s).__name__ == 'RandAugment'), None)
    if at is not None:
        seed_all(args.seed)
        images = augment_inputs(pipeline, datas[:args.ra_images], at)
        print(f'\n(c) RandAugment ops on the {len(images)} images it receives (first: {images[0].size[0]} x '
              f'{images[0].size[1]} px), one application each\n')
        print('\n'.join(augment_table(augment_op_seconds(pipeline.steps[at], images))))
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main, 'bench_loader.py'))
