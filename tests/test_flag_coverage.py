"""Every flag of train.py and validate.py reaches what it sets (issue 23): a flag that silently does nothing fails here.

Each row runs the script's own `main` on the tiny data up to the point where everything is built: train.py's `fit`
and validate.py's `evaluate` are replaced by recorders of what they are handed (the run's objects, the loaders, the
network), so the objects are the ones the scripts build, from their own parsed arguments, in their own order. A row
builds once without its flags (the defaults, or the row's `base`) and once with them, and names what the flags must
change and to what; the default must differ, so a builder that hard-wires a value fails its row.

The meta-test holds every option of both parsers to account: it sets something a row (here or in test_mixing.py)
reads, it is proven by a named test elsewhere, or it is listed with the reason it builds nothing.
"""
import ast
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import pytest
import timm
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from timm.optim import create_optimizer_v2
from torchvision.transforms import InterpolationMode

import tokenmix_train.model as model_module
from tests.conftest import ROOT, TINY_STUDENT, load_script
from tests.test_mixing import CRITERIA, TIMM_MIXUP_FLAGS, TOKENMIX_FLAGS
from tokenmix_train.args import parse_train_args
from tokenmix_train.errors import ConfigError
from tokenmix_train.mixing import mixer_generator
from tokenmix_train.occlusion import occlusion_masks
from tokenmix_train.train_flags import build_train_parser
from tokenmix_train.sampling import SeededBatches
from tokenmix_train.validate_flags import build_validate_parser


class Row(NamedTuple):
    """`flags` (the first is the flag under test) must turn `read(built)` into `value`; `base` is what they are
    compared against, given in both builds (a flag that only acts beside another one)."""
    flags: List[str]
    read: Callable[[Any], Any]
    value: Any
    base: Sequence[str] = ()


@dataclass
class TrainBuild:
    """What train.py's `main` hands to `fit`, or the ConfigError that stopped it first."""
    run: Any = None
    train_loader: Any = None
    eval_loader: Any = None
    saver: Any = None
    start_epoch: Optional[int] = None
    num_epochs: Optional[int] = None
    eval_metric: Optional[str] = None
    calls: Dict[str, List[tuple]] = field(default_factory=dict)  # process-wide switches: name -> arguments
    error: Optional[str] = None


@dataclass
class Evaluation:
    """One call of validate.py's `evaluate`: the network and loader of a checkpoint at one occlusion ratio."""
    net: torch.nn.Module
    loader: Any
    amp_dtype: Optional[torch.dtype]
    input_dtype: Optional[torch.dtype]


@dataclass
class ValidateBuild:
    """Every `evaluate` call of one validate.py run (the last one read by default) and the run's own folder."""
    evaluations: List[Evaluation]
    folder: str
    calls: Dict[str, List[tuple]]

    @property
    def net(self) -> torch.nn.Module:
        return self.evaluations[-1].net

    @property
    def loader(self) -> Any:
        return self.evaluations[-1].loader


def _spy_switches(patch: pytest.MonkeyPatch) -> Dict[str, List[tuple]]:
    """Record, instead of applying, the process-wide switches the model builder sets (--fuser, --fast-norm)."""
    calls: Dict[str, List[tuple]] = defaultdict(list)
    for name in ('set_jit_fuser', 'set_fast_norm'):
        patch.setattr(model_module, name, lambda *args, _name=name: calls[_name].append(args))
    return calls


def _one_rank_group(init_device: Callable, store: str) -> Callable:
    """train.py's `init_device`, then a one-process gloo group: the run builds what a torchrun launch builds."""
    def init(args):
        device = init_device(args)
        dist.init_process_group('gloo', init_method=f'file://{store}', rank=0, world_size=1)
        args.distributed = True
        return device
    return init


def _run_train(train_script, argv: List[str], one_rank: bool, folder: str) -> TrainBuild:
    built = TrainBuild()

    def fit(run, train_loader, eval_loader, saver, *, start_epoch, start, num_epochs, eval_metric, on_epoch_end):
        built.run, built.train_loader, built.eval_loader, built.saver = run, train_loader, eval_loader, saver
        built.start_epoch, built.num_epochs, built.eval_metric = start_epoch, num_epochs, eval_metric

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_script, 'fit', fit)
        built.calls = _spy_switches(patch)
        if one_rank:
            patch.setattr(train_script, 'init_device',
                          _one_rank_group(train_script.init_device, os.path.join(folder, 'store')))
        try:
            assert train_script.main(argv) == 0
        except ConfigError as e:
            built.error = str(e)
        finally:
            if one_rank and dist.is_initialized():
                dist.destroy_process_group()
    return built


def _run_validate(validate_script, argv: List[str], folder: str) -> ValidateBuild:
    evaluations: List[Evaluation] = []

    def evaluate(net, meter, device, *, amp_dtype, input_dtype, **hooks):
        evaluations.append(Evaluation(net, meter.loader, amp_dtype, input_dtype))
        return dict(top1=0., top5=0., loss=0., count=0, seconds=0.)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(validate_script, 'evaluate', evaluate)
        calls = _spy_switches(patch)
        assert validate_script.main(argv) == 0
    return ValidateBuild(evaluations, folder, calls)


def _tiny_vit(**changes: Any) -> torch.nn.Module:
    """The student of TINY_STUDENT for 10 classes, with `changes` to its arguments."""
    return timm.create_model('tokenmix_vit_tiny_p8_64', **dict(dict(img_size=32, num_classes=10, embed_dim=32, depth=1,
                                                                    num_heads=2), **changes))


@pytest.fixture(scope='module')
def paths(tiny_data, teacher_checkpoint, tmp_path_factory) -> Dict[str, str]:
    """The files rows name as {key}: the data, a class map, the teacher, a checkpoint to resume and validate.py's
    checkpoints (one for each model shape a row asks for)."""
    folder = tmp_path_factory.mktemp('files')
    found = dict(data=tiny_data, teacher=teacher_checkpoint, class_map=str(folder / 'reversed.txt'),
                 resume=str(folder / 'resume.pth.tar'))
    (folder / 'reversed.txt').write_text(''.join(f'{c}\n' for c in reversed(range(10))))
    torch.manual_seed(0)
    student = _tiny_vit()
    optimizer = create_optimizer_v2(student, opt='sgd', lr=0.1, weight_decay=2e-5, momentum=0.5)
    torch.save(dict(state_dict=student.state_dict(), optimizer=optimizer.state_dict(), epoch=2, version=2),
               found['resume'])
    shapes = dict(vit={}, vit_12_classes=dict(num_classes=12), vit_1_channel=dict(in_chans=1),
                  vit_48px=dict(img_size=48), vit_2_blocks=dict(depth=2), vit_avg_pool=dict(global_pool='avg'))
    for name, changes in shapes.items():
        found[name] = str(folder / f'{name}.pth')
        torch.save(_tiny_vit(**changes).state_dict(), found[name])
    found['repghost'] = str(folder / 'repghost.pth')
    torch.save(timm.create_model('repghostnet_050', num_classes=10).state_dict(), found['repghost'])
    return found


def _builder(run: Callable, paths: Dict[str, str], tmp_path_factory) -> Callable:
    """run(argv, folder, **options) with the rows' {keys} filled in, once per distinct command line."""
    cache: Dict[tuple, Any] = {}

    def build(argv: Sequence[str], **options: Any):
        key = (tuple(argv), tuple(sorted(options.items())))
        if key not in cache:
            folder = str(tmp_path_factory.mktemp('run'))
            cache[key] = run([arg.format(**paths, tmp=folder) for arg in argv], folder=folder, **options)
        return cache[key]
    return build


@pytest.fixture(scope='module')
def build_train(train_script, paths, tmp_path_factory) -> Callable[..., TrainBuild]:
    return _builder(lambda argv, folder, one_rank=False: _run_train(train_script, argv, one_rank, folder), paths,
                    tmp_path_factory)


@pytest.fixture(scope='module')
def build_validate(paths, tmp_path_factory) -> Callable[..., ValidateBuild]:
    validate_script = load_script('validate.py')
    return _builder(lambda argv, folder: _run_validate(validate_script, argv, folder), paths, tmp_path_factory)


def _loader(loader) -> torch.utils.data.DataLoader:
    """The DataLoader, behind timm's prefetcher or not."""
    return getattr(loader, 'loader', loader)


def _dataset(loader):
    """The loader's dataset (inside the seeding view train.py's training loader serves it through)."""
    dataset = _loader(loader).dataset
    return dataset.dataset if isinstance(dataset, SeededBatches) else dataset


def _ops(loader) -> list:
    return list(_dataset(loader).transform.transforms)


def _names(loader) -> List[str]:
    return [type(op).__name__ for op in _ops(loader)]


def _op(loader, name: str) -> Any:
    """The loader's transform step of class `name` (None without one)."""
    return next((op for op in _ops(loader) if type(op).__name__ == name), None)


def _p(loader, name: str) -> Optional[float]:
    """The probability of step `name`, wrapped in a RandomApply or not (1 for a step always taken, None without
    the step)."""
    for op in _ops(loader):
        inner = [type(t).__name__ for t in op.transforms] if type(op).__name__ == 'RandomApply' else []
        if type(op).__name__ == name or name in inner:
            return getattr(op, 'p', 1.0)
    return None


def _crop(b: TrainBuild) -> Any:
    return _op(b.train_loader, 'RandomResizedCropAndInterpolation')


def _erasing(b: TrainBuild, name: str) -> Any:
    return getattr(b.train_loader.random_erasing, name, None)


def _affine_ops(b: TrainBuild) -> Dict[str, Any]:
    """The type of the function and the filter of RandAugment's Rotate and TranslateXRel ops."""
    return {op.name: (type(op.aug_fn).__name__, op.kwargs['resample']) for op in _op(b.train_loader, 'RandAugment').ops
            if op.name in ('Rotate', 'TranslateXRel')}


def _initial_lr(b: TrainBuild) -> float:
    return b.run.optimizer.param_groups[0]['initial_lr']


def _lr_scales(b: TrainBuild) -> List[float]:
    return sorted({group.get('lr_scale', 1.0) for group in b.run.optimizer.param_groups})


def _sampler(b: TrainBuild) -> Any:
    """timm's batch sampler, inside the resumable one train.py wraps it in."""
    return _loader(b.train_loader).batch_sampler.batch_sampler


def _normalisation(b: TrainBuild, name: str) -> List[List[float]]:
    return [getattr(loader, name).flatten().tolist() for loader in (b.train_loader, b.eval_loader)]


def _last_drop_path(b: TrainBuild) -> float:
    return getattr(b.run.model.blocks[-1].drop_path1, 'drop_prob', 0.)


def _teacher_weights_fetched(b: TrainBuild) -> bool:
    """Whether the run stopped asking timm for the teacher's pretrained weights (the tiny teacher has none)."""
    return "could not load timm's pretrained weights for teacher" in str(b.error)


def _is_channels_last(net: torch.nn.Module) -> bool:
    return net.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)


TRAIN_ARGV = ['--data-dir', '{data}', *TINY_STUDENT, '-b', '8', '-j', '0', '--device', 'cpu', '--output', '{tmp}',
              '--experiment', 'run']
ADAMW = ['--opt', 'adamw']
DEPTH_2 = ['--model-kwargs', 'embed_dim=32', 'depth=2', 'num_heads=2']  # timm's drop path rises from 0 at block 1
TOKENMIX = ['--tokenmix', '--cutmix', '1']
SIZES = ['--train-img-sizes', '32', '48']

TRAIN_FLAGS = [
    # dataset and model
    Row(['--train-split', 'val'], lambda b: len(_dataset(b.train_loader)), 30),
    Row(['--val-split', 'train'], lambda b: len(_dataset(b.eval_loader)), 60),
    Row(['--class-map', '{class_map}'], lambda b: _dataset(b.train_loader).reader.class_to_idx['0'], 9),
    Row(['--input-img-mode', 'L'], lambda b: _dataset(b.train_loader).input_img_mode, 'L'),
    Row(['--skip-bad-images'], lambda b: _dataset(b.train_loader).skip_bad, True),
    Row(['--resume', '{resume}'], lambda b: (b.start_epoch, b.run.optimizer.param_groups[0]['momentum']), (3, 0.5)),
    Row(['--no-resume-opt'], lambda b: b.run.optimizer.param_groups[0]['momentum'], 0.9, ['--resume', '{resume}']),
    Row(['--num-classes', '12'], lambda b: b.run.model.num_classes, 12),
    Row(['--gp', 'avg'], lambda b: b.run.model.global_pool, 'avg'),
    Row(['--img-size', '48'], lambda b: (b.run.model.patch_embed.img_size, _crop(b).size), ((48, 48), (48, 48))),
    Row(['--in-chans', '1'], lambda b: (b.run.model.patch_embed.proj.in_channels,
                                        _dataset(b.train_loader).input_img_mode), (1, 'L')),
    Row(['--input-size', '3', '48', '48'], lambda b: _crop(b).size, (48, 48)),
    Row(['--crop-pct', '0.5'], lambda b: _op(b.eval_loader, 'Resize').size, 64),
    Row(['--mean', '0.5'], lambda b: _normalisation(b, 'mean'), [[127.5] * 3] * 2),
    Row(['--std', '0.25'], lambda b: _normalisation(b, 'std'), [[63.75] * 3] * 2),
    Row(['--interpolation', 'bicubic'], lambda b: _op(b.eval_loader, 'Resize').interpolation,
        InterpolationMode.BICUBIC),
    Row(['-b', '4'], lambda b: _sampler(b).batch_size, 4),
    Row(['-vb', '6'], lambda b: _loader(b.eval_loader).batch_size, 6),
    Row(['--channels-last'], lambda b: (b.run.channels_last, _is_channels_last(b.run.model)), (True, True)),
    Row(['--fuser', 'te'], lambda b: b.calls['set_jit_fuser'], [('te',)]),
    Row(['--grad-accum-steps', '2'], lambda b: b.run.grad_accum_steps, 2),
    Row(['--grad-checkpointing'], lambda b: b.run.model.grad_checkpointing, True),
    Row(['--fast-norm'], lambda b: b.calls['set_fast_norm'], [()]),
    Row(['--model-kwargs', 'embed_dim=16', 'depth=2', 'num_heads=2'], lambda b: (len(b.run.model.blocks),
                                                                                b.run.model.embed_dim), (2, 16)),
    Row(['--head-init-scale', '0'], lambda b: b.run.model.head.weight.abs().sum().item(), 0.0),
    Row(['--head-init-bias', '-2'], lambda b: b.run.model.head.bias.tolist(), [-2.0] * 10),
    Row(['--torchcompile', 'eager'], lambda b: type(b.run.model).__name__, 'OptimizedModule'),
    Row(['--torchcompile-mode', 'max-autotune'], lambda b: b.run.model.get_compiler_config()['max_autotune'], True,
        ['--torchcompile']),
    Row(['--drop', '0.1'], lambda b: b.run.model.head_drop.p, 0.1),
    Row(['--drop-path', '0.1'], _last_drop_path, pytest.approx(0.1), DEPTH_2),
    Row(['--drop-connect', '0.1'], _last_drop_path, pytest.approx(0.1), DEPTH_2),
    # precision
    Row(['--amp'], lambda b: (b.run.amp_dtype, type(b.run.loss_scaler).__name__), (torch.float16, 'NativeScaler')),
    Row(['--amp-dtype', 'bfloat16'], lambda b: (b.run.amp_dtype, b.run.loss_scaler), (torch.bfloat16, None),
        ['--amp']),
    Row(['--model-dtype', 'bfloat16'], lambda b: (b.run.model_dtype, b.run.model.head.weight.dtype),
        (torch.bfloat16, torch.bfloat16)),
    Row(['--synchronize-step'], lambda b: b.run.synchronize_step, True),
    # optimizer and learning rate
    Row(['--opt', 'adamw'], lambda b: type(b.run.optimizer).__name__, 'AdamW'),
    Row(['--opt-eps', '1e-6'], lambda b: b.run.optimizer.defaults['eps'], 1e-6, ADAMW),
    Row(['--opt-betas', '0.8', '0.9'], lambda b: b.run.optimizer.defaults['betas'], (0.8, 0.9), ADAMW),
    Row(['--momentum', '0.5'], lambda b: b.run.optimizer.defaults['momentum'], 0.5),
    Row(['--weight-decay', '0.05'], lambda b: max(g['weight_decay'] for g in b.run.optimizer.param_groups), 0.05),
    Row(['--opt-kwargs', 'nesterov=False'], lambda b: b.run.optimizer.defaults['nesterov'], False),
    Row(['--clip-grad', '1'], lambda b: b.run.clip_grad, 1.0),
    Row(['--clip-mode', 'value'], lambda b: b.run.clip_mode, 'value'),
    Row(['--layer-decay', '0.5'], _lr_scales, [0.25, 0.5, 1.0]),  # patch embedding, the block, the head
    Row(['--layer-decay-min-scale', '0.4'], _lr_scales, [0.4, 0.5, 1.0], ['--layer-decay', '0.5']),
    Row(['--layer-decay-no-opt-scale', '0.3'], lambda b: sum(len(g['params']) for g in b.run.optimizer.param_groups),
        16, ['--layer-decay', '0.5']),  # the 4 tensors at scale 0.25 (patch embedding, tokens) are frozen
    Row(['--lr', '0.05'], _initial_lr, 0.05),
    Row(['--lr-base', '0.2'], _initial_lr, 0.2 * 8 / 256),
    Row(['--lr-base-size', '128'], _initial_lr, 0.1 * 8 / 128),
    Row(['--lr-base-scale', 'sqrt'], _initial_lr, pytest.approx(0.1 * (8 / 256) ** 0.5)),
    # schedule
    Row(['--sched', 'step'], lambda b: type(b.run.scheduler).__name__, 'StepLRScheduler'),
    Row(['--sched-on-updates'], lambda b: b.run.scheduler.t_in_epochs, False),
    Row(['--epochs', '10'], lambda b: (b.num_epochs, b.run.scheduler.t_initial), (10, 10)),
    Row(['--cooldown-epochs', '10'], lambda b: b.num_epochs, 310),
    Row(['--start-epoch', '3'], lambda b: b.start_epoch, 3),
    Row(['--warmup-epochs', '2'], lambda b: b.run.scheduler.warmup_t, 2),
    Row(['--warmup-lr', '1e-4'], lambda b: b.run.scheduler.warmup_lr_init, 1e-4),
    Row(['--warmup-prefix'], lambda b: b.run.scheduler.warmup_prefix, True),
    Row(['--min-lr', '1e-5'], lambda b: b.run.scheduler.lr_min, 1e-5),
    Row(['--lr-noise', '0.5'], lambda b: b.run.scheduler.noise_range_t, 150),
    Row(['--lr-noise-pct', '0.1'], lambda b: b.run.scheduler.noise_pct, 0.1, ['--lr-noise', '0.5']),
    Row(['--lr-noise-std', '0.5'], lambda b: b.run.scheduler.noise_std, 0.5, ['--lr-noise', '0.5']),
    Row(['--lr-cycle-mul', '2'], lambda b: b.run.scheduler.cycle_mul, 2.0),
    Row(['--lr-cycle-decay', '0.25'], lambda b: b.run.scheduler.cycle_decay, 0.25),
    Row(['--lr-cycle-limit', '2'], lambda b: b.run.scheduler.cycle_limit, 2),
    Row(['--lr-k-decay', '2'], lambda b: b.run.scheduler.k_decay, 2.0),
    Row(['--decay-milestones', '10', '20'], lambda b: b.run.scheduler.decay_t, [10, 20], ['--sched', 'multistep']),
    Row(['--decay-epochs', '30'], lambda b: b.run.scheduler.decay_t, 30, ['--sched', 'step']),
    Row(['--decay-rate', '0.5'], lambda b: b.run.scheduler.decay_rate, 0.5, ['--sched', 'step']),
    Row(['--patience-epochs', '3'], lambda b: b.run.scheduler.lr_scheduler.patience, 3, ['--sched', 'plateau']),
    # augmentation
    Row(['--no-aug'], lambda b: _names(b.train_loader)[:2], ['Resize', 'CenterCrop']),
    Row(['--train-crop-mode', 'rkrc'], lambda b: _names(b.train_loader)[0], 'ResizeKeepRatio'),
    Row(['--scale', '0.5', '1'], lambda b: _crop(b).scale, (0.5, 1.0)),
    Row(['--ratio', '0.5', '2'], lambda b: _crop(b).ratio, (0.5, 2.0)),
    Row(['--hflip', '0.2'], lambda b: _p(b.train_loader, 'RandomHorizontalFlip'), 0.2),
    Row(['--vflip', '0.3'], lambda b: _p(b.train_loader, 'RandomVerticalFlip'), 0.3),
    Row(['--color-jitter', '0.2'], lambda b: _op(b.train_loader, 'ColorJitter').brightness,
        (1 - 0.2, 1 + 0.2)),
    Row(['--color-jitter-prob', '0.5'], lambda b: _p(b.train_loader, 'ColorJitter'), 0.5),
    Row(['--grayscale-prob', '0.3'], lambda b: _p(b.train_loader, 'RandomGrayscale'), 0.3),
    Row(['--gaussian-blur-prob', '0.3'], lambda b: _p(b.train_loader, 'GaussianBlur'), 0.3),
    Row(['--aa', 'rand-m9-mstd0.5'], lambda b: _names(b.train_loader)[2], 'RandAugment'),  # in place of ColorJitter
    Row(['--aug-order', 'authors'], lambda b: _names(b.train_loader)[:3],  # timm's: crop, flip, colour
        ['RandomHorizontalFlip', 'ColorJitter', 'RandomResizedCropAndInterpolation']),
    Row(['--fast-augment'], _affine_ops,  # timm's: its functions, each drawing bilinear or bicubic
        dict(Rotate=('function', (Image.BILINEAR,) * 2), TranslateXRel=('WholePixelTranslate', (Image.NEAREST,) * 2)),
        ['--aa', 'rand-m9-mstd0.5']),
    Row(['--aug-repeats', '3'], lambda b: (type(_sampler(b).sampler).__name__,
                                           getattr(_sampler(b).sampler, 'num_repeats', None)),
        ('RepeatAugSampler', 3)),
    Row(['--reprob', '0.25'], lambda b: _erasing(b, 'probability'), 0.25),
    Row(['--remode', 'const'], lambda b: _erasing(b, 'mode'), 'const', ['--reprob', '0.25']),
    Row(['--recount', '2'], lambda b: _erasing(b, 'max_count'), 2, ['--reprob', '0.25']),
    Row(['--resplit'], lambda b: _erasing(b, 'num_splits'), 2, ['--reprob', '0.25', '--aug-splits', '2']),
    Row(['--train-interpolation', 'bicubic'], lambda b: _crop(b).interpolation, InterpolationMode.BICUBIC),
    # mixing (the mixer's and the loss's own flags: test_mixing.py's tables)
    Row(['--tokenmix'], lambda b: type(b.run.mixer).__name__, 'TokenMix', ['--cutmix', '1']),
    Row(['--tokenmix-patch-size', '16'], lambda b: b.run.mixer.patch_size, 16, TOKENMIX),
    Row(['--mixup-off-epoch', '5'], lambda b: b.run.mixup_off_epoch, 5),
    Row(['--teacher-pretrained', '--teacher-checkpoint', ''], _teacher_weights_fetched, True,
        [*TOKENMIX, '--teacher-model', 'tokenmix_cnn_teacher_64', '--teacher-checkpoint', '{teacher}']),
    # batch norm, EMA, seed, loader
    Row(['--dist-bn', 'broadcast'], lambda b: b.run.dist_bn, 'broadcast'),
    Row(['--model-ema'], lambda b: type(b.run.model_ema).__name__, 'ModelEmaV3'),
    Row(['--model-ema-force-cpu'], lambda b: (b.run.model_ema.device, b.run.ema_eval), ('cpu', False), ['--model-ema']),
    Row(['--model-ema-decay', '0.5'], lambda b: b.run.model_ema.decay, 0.5, ['--model-ema']),
    Row(['--model-ema-warmup'], lambda b: b.run.model_ema.use_warmup, True, ['--model-ema']),
    Row(['--seed', '7'], lambda b: (b.run.mix_generator.initial_seed(), b.run.scheduler.noise_seed),
        (mixer_generator(7, 0).initial_seed(), 7)),
    Row(['--worker-seeding', 'part'],
        lambda b: _loader(b.train_loader).worker_init_fn.init_fn.keywords['worker_seeding'], 'part'),
    Row(['-j', '2'], lambda b: (_loader(b.train_loader).num_workers, _loader(b.eval_loader).num_workers), (2, 2)),
    Row(['--pin-mem'], lambda b: (_loader(b.train_loader).pin_memory, _loader(b.eval_loader).pin_memory),
        (True, True)),
    Row(['--no-prefetcher'], lambda b: (type(b.train_loader).__name__, type(b.eval_loader).__name__),
        ('DataLoader', 'DataLoader')),
    Row(['--use-multi-epochs-loader'], lambda b: type(_loader(b.train_loader)).__name__, 'MultiEpochsDataLoader'),
    # evaluation and checkpoints
    Row(['--val-interval', '2'], lambda b: b.run.val_interval, 2),
    Row(['--eval-metric', 'loss'], lambda b: (b.eval_metric, b.saver.decreasing), ('loss', True)),
    Row(['--checkpoint-hist', '3'], lambda b: b.saver.max_history, 3),
    Row(['--recovery-interval', '5'], lambda b: (b.run.recovery_interval, b.run.recovery_saver is b.saver), (5, True)),
    # scheduled resolution
    Row(['--train-img-sizes', '32', '48'], lambda b: type(_sampler(b)).__name__, 'ScheduledBatchSampler'),
    Row(['--train-batch-sizes', '8', '4'], lambda b: _sampler(b).batch_sizes, (8, 4), SIZES),
    Row(['--train-size-probs', '1', '3'], lambda b: _sampler(b).choice_weights.tolist(), [0.25, 0.75], SIZES),
    Row(['--train-size-schedule', 'progressive'], lambda b: (_sampler(b).choice_schedule, _sampler(b).schedule_epochs),
        ('progressive', 300), SIZES),
    Row(['--train-size-schedule-spread', '0.3'], lambda b: _sampler(b).schedule_spread, 0.3, SIZES),
    Row(['--train-size-random-mix', '0.2'], lambda b: _sampler(b).schedule_random_mix, 0.2, SIZES),
    Row(['--train-batches-per-epoch', '5'], lambda b: _sampler(b).num_batches, 5, SIZES),
    Row(['--variable-batch-loss-scale', 'sqrt'], lambda b: b.run.batch_loss_scale, 'sqrt', SIZES),
]

# rows of a run that joined a (one-process) process group, as a torchrun launch does
DISTRIBUTED_TRAIN_FLAGS = [
    Row(['--no-ddp-bb'], lambda b: (type(b.run.model).__name__, b.run.model.broadcast_buffers),
        ('DistributedDataParallel', False)),
]

# train.py flags that build nothing: where output goes, what is logged, how processes meet (option -> why)
TRAIN_RUN_CONTROL = {
    '--output': 'output path: the folder the run folder is made in',
    '--experiment': 'output path: the name of the run folder',
    '--log-interval': 'logging: batches between progress lines',
    '--save-images': 'logging: input batches saved as images into the run folder',
    '--log-wandb': 'logging: metrics also to Weights & Biases',
    '--wandb-project': 'logging: the W&B project',
    '--wandb-tags': 'logging: the W&B tags',
    '--wandb-resume-id': 'logging: the W&B run continued',
    '--device': 'run control: the device everything is placed on (cpu is the only one here)',
    '--dist-backend': 'run control: how the processes of a torchrun launch meet',
    '--dist-url': 'run control: where the processes of a torchrun launch meet',
    '--local-rank': "run control: torch.distributed.launch's rank of the process on its node",
}
# accepted so timm command lines run, but their only reader is refused here (--naflex-loader, --kd-model-name
# stop the run with one line: tests/test_args.py::test_flags_that_cannot_apply_say_why)
TRAIN_TIMM_ONLY = {
    '--naflex-train-seq-lens': "timm's NaFlex loader only (--naflex-loader is refused)",
    '--naflex-max-seq-len': "timm's NaFlex loader only (--naflex-loader is refused)",
    '--naflex-patch-sizes': "timm's NaFlex loader only (--naflex-loader is refused)",
    '--naflex-patch-size-probs': "timm's NaFlex loader only (--naflex-loader is refused)",
    '--naflex-loss-scale': "timm's NaFlex loader only (--naflex-loader is refused)",
    '--naflex-patchify-channels-first': "timm's NaFlex loader only (--naflex-loader is refused)",
    '--kd-distill-type': "timm's distillation loss only (--kd-model-name is refused)",
    '--kd-loss-type': "timm's distillation loss only (--kd-model-name is refused)",
    '--distill-loss-weight': "timm's distillation loss only (--kd-model-name is refused)",
    '--task-loss-weight': "timm's distillation loss only (--kd-model-name is refused)",
    '--kd-temperature': "timm's distillation loss only (--kd-model-name is refused)",
    '--kd-student-feature-dim': "timm's distillation loss only (--kd-model-name is refused)",
    '--kd-teacher-feature-dim': "timm's distillation loss only (--kd-model-name is refused)",
    '--kd-token-distill-type': "timm's distillation loss only (--kd-model-name is refused)",
}
_TRAIN_FLAGS_TEST = 'tests/test_train_flags.py::'
_CANNOT_APPLY = 'tests/test_args.py::test_flags_that_cannot_apply_say_why'
_INITIAL = 'tests/test_train_initial_checkpoint.py::test_initial_checkpoint_gives_the_starting_weights'
# train.py flags proven by a test elsewhere (option -> the test, checked to exist)
TRAIN_PROVEN = {
    '--config': 'tests/test_flag_coverage.py::test_a_yaml_key_reaches_what_its_flag_reaches',
    '--preempt-signal': 'tests/test_preemption.py::test_preempt_signal_none_leaves_the_signal_alone_and_usr2_can_be_'
                        'chosen',
    '--data-dir': 'tests/test_train_inputs.py::test_missing_data_dir',
    '--dataset': _TRAIN_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--train-num-samples': _TRAIN_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--val-num-samples': _TRAIN_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--dataset-download': _TRAIN_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--input-key': _TRAIN_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--target-key': _TRAIN_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--dataset-trust-remote-code': _TRAIN_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--epoch-repeats': _TRAIN_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--model': _TRAIN_FLAGS_TEST + 'test_model_flags_reach_the_model',
    '--pretrained': _TRAIN_FLAGS_TEST + 'test_model_flags_reach_the_model',
    '--pretrained-path': _TRAIN_FLAGS_TEST + 'test_model_flags_reach_the_model',
    '--drop-block': _TRAIN_FLAGS_TEST + 'test_model_flags_reach_the_model',
    '--bn-momentum': _TRAIN_FLAGS_TEST + 'test_model_flags_reach_the_model',
    '--bn-eps': _TRAIN_FLAGS_TEST + 'test_model_flags_reach_the_model',
    '--split-bn': _TRAIN_FLAGS_TEST + 'test_split_bn_gives_each_split_its_batchnorm',
    '--sync-bn': 'tests/test_train_distributed_faults.py::test_sync_bn_on_cpu_ranks_is_a_one_line_error',
    '--bce-pos-weight': _TRAIN_FLAGS_TEST + 'test_bce_sum_and_pos_weight_reach_timms_loss',
    '--initial-checkpoint': _INITIAL,
    '--teacher-model': 'tests/test_mixing.py::test_teacher_flags_reach_the_teacher',
    '--teacher-checkpoint': 'tests/test_mixing.py::test_teacher_flags_reach_the_teacher',
    '--teacher-img-size': 'tests/test_mixing.py::test_teacher_flags_reach_the_teacher',
    '--teacher-amp': 'tests/test_mixing.py::test_teacher_flags_reach_the_teacher',
    '--teacher-maps': 'tests/test_mixing.py::test_teacher_flags_reach_the_teacher',
    '--apex-amp': 'tests/test_train_inputs.py::test_apex_amp_without_apex',
    '--device-modules': _TRAIN_FLAGS_TEST + 'test_bad_device_module_is_one_line',
    '--torchscript': _CANNOT_APPLY,
    '--naflex-loader': _CANNOT_APPLY,
    '--kd-model-name': _CANNOT_APPLY,
    '--tta': _CANNOT_APPLY,
}


def _ids(rows: Sequence[Row]) -> List[str]:
    return [' '.join(row.flags) for row in rows]


def _assert_changed(row: Row, default: Any, changed: Any) -> None:
    """The row's value with its flags, another one without them (a ConfigError only where the row reads it)."""
    errors = [getattr(built, 'error', None) for built in (default, changed)]
    assert row.read is _teacher_weights_fetched or errors == [None, None], errors
    assert row.read(changed) == row.value
    assert row.read(default) != row.value


@pytest.mark.parametrize('row', TRAIN_FLAGS, ids=_ids(TRAIN_FLAGS))
def test_each_train_flag_changes_what_train_py_builds(build_train, row):
    _assert_changed(row, build_train([*TRAIN_ARGV, *row.base]), build_train([*TRAIN_ARGV, *row.base, *row.flags]))


@pytest.mark.parametrize('row', DISTRIBUTED_TRAIN_FLAGS, ids=_ids(DISTRIBUTED_TRAIN_FLAGS))
def test_each_distributed_train_flag_changes_what_train_py_builds(build_train, row):
    _assert_changed(row, build_train([*TRAIN_ARGV, *row.base], one_rank=True),
                    build_train([*TRAIN_ARGV, *row.base, *row.flags], one_rank=True))


YAML_ROWS = [row for row in TRAIN_FLAGS if row.flags[0] in (
    '--opt-betas', '--opt-kwargs', '--model-ema-decay', '--sched-on-updates', '--no-prefetcher', '--scale',
    '--eval-metric', '--checkpoint-hist', '--aa', '--aug-order')]


@pytest.mark.parametrize('row', YAML_ROWS, ids=_ids(YAML_ROWS))
def test_a_yaml_key_reaches_what_its_flag_reaches(build_train, row, tmp_path):
    """-c FILE.yaml with the key of the row's flag (the value the flag parses to) builds what the flag builds."""
    argv = [*TRAIN_ARGV, *row.base]
    dest = build_train_parser()._option_string_actions[row.flags[0]].dest
    config = tmp_path / 'flag.yaml'
    config.write_text(yaml.safe_dump({dest: getattr(parse_train_args([*argv, *row.flags])[0], dest)}))
    from_yaml, from_flag = build_train(['-c', str(config), *argv]), build_train([*argv, *row.flags])
    assert row.read(from_yaml) == row.read(from_flag) == row.value


VALIDATE_ARGV = ['--data-dir', '{data}', *TINY_STUDENT, '--checkpoint', '{vit}', '-b', '8', '-j', '0', '--device',
                 'cpu']
OCCLUDED = ['--occlusion', '0.5']
# RepGhost's training-time BatchNorm branches (fusion_bn) are folded into its convolutions by reparameterisation
REPGHOST = ['--model', 'repghostnet_050', '--model-kwargs', '--checkpoint', '{repghost}']


def _occluded(v: ValidateBuild, name: str) -> Any:
    """An attribute of the occluded images validate.py evaluates (None for clean ones)."""
    return getattr(_dataset(v.loader), name, None)


def _dropped(evaluation: Evaluation) -> float:
    """The share of patches dropped from the images of one evaluation (0 for clean ones)."""
    masks = getattr(_dataset(evaluation.loader), 'masks', None)
    return 0.0 if masks is None else masks.float().mean().item()


def _results_text(v: ValidateBuild) -> str:
    with open(os.path.join(v.folder, 'results.txt')) as f:
        return f.read()


def _masks(mode: str = 'random', seed: int = 42) -> list:
    """The masks of OCCLUDED on the 30 val images (4 x 4 patches of 8 px): seed * 1000 + ratio * 1000 seeds them,
    so every model and process count sees the same occluded inputs."""
    return occlusion_masks(30, (4, 4), 0.5, mode, seed=seed * 1000 + 500).tolist()


VALIDATE_FLAGS = [
    Row(['--split', 'train'], lambda v: len(_dataset(v.loader)), 60),
    Row(['--class-map', '{class_map}'], lambda v: _dataset(v.loader).reader.class_to_idx['0'], 9),
    Row(['--input-img-mode', 'L'], lambda v: _dataset(v.loader).input_img_mode, 'L'),
    Row(['--skip-bad-images'], lambda v: _dataset(v.loader).skip_bad, True),
    Row(['--num-classes', '12', '--checkpoint', '{vit_12_classes}'], lambda v: v.net.num_classes, 12),
    Row(['--gp', 'avg', '--checkpoint', '{vit_avg_pool}'], lambda v: v.net.global_pool, 'avg'),
    Row(['--in-chans', '1', '--checkpoint', '{vit_1_channel}'], lambda v: v.net.patch_embed.proj.in_channels, 1),
    Row(['--img-size', '48', '--checkpoint', '{vit_48px}'], lambda v: (v.net.patch_embed.img_size,
                                                                       _op(v.loader, 'CenterCrop').size),
        ((48, 48), (48, 48))),
    Row(['--input-size', '3', '48', '48'], lambda v: _op(v.loader, 'CenterCrop').size, (48, 48)),
    Row(['--model-kwargs', 'embed_dim=32', 'depth=2', 'num_heads=2', '--checkpoint', '{vit_2_blocks}'],
        lambda v: len(v.net.blocks), 2),
    Row(['--crop-pct', '0.5'], lambda v: _op(v.loader, 'Resize').size, 64),
    Row(['--crop-mode', 'squash'], lambda v: _op(v.loader, 'Resize').size, (32, 32)),
    Row(['--crop-border-pixels', '3'], lambda v: getattr(_op(v.loader, 'TrimBorder'), 'border_size', None), 3),
    Row(['--mean', '0.5'], lambda v: v.loader.mean.flatten().tolist(), [127.5] * 3),
    Row(['--std', '0.25'], lambda v: v.loader.std.flatten().tolist(), [63.75] * 3),
    Row(['--interpolation', 'bicubic'], lambda v: _op(v.loader, 'Resize').interpolation, InterpolationMode.BICUBIC),
    Row(['--reparam'], lambda v: sum(len(getattr(m, 'fusion_bn', ())) for m in v.net.modules()), 0, REPGHOST),
    Row(['-b', '4'], lambda v: _loader(v.loader).batch_size, 4),
    Row(['-j', '2'], lambda v: _loader(v.loader).num_workers, 2),
    Row(['--no-prefetcher'], lambda v: type(v.loader).__name__, 'DataLoader'),
    Row(['--pin-mem'], lambda v: _loader(v.loader).pin_memory, True),
    Row(['--channels-last'], lambda v: _is_channels_last(v.net), True),
    Row(['--amp'], lambda v: v.evaluations[-1].amp_dtype, torch.float16),
    Row(['--amp-dtype', 'bfloat16'], lambda v: v.evaluations[-1].amp_dtype, torch.bfloat16, ['--amp']),
    Row(['--model-dtype', 'bfloat16'], lambda v: (v.evaluations[-1].input_dtype, v.net.head.weight.dtype),
        (torch.bfloat16, torch.bfloat16)),
    Row(['--fuser', 'te'], lambda v: v.calls['set_jit_fuser'], [('te',)]),
    Row(['--fast-norm'], lambda v: v.calls['set_fast_norm'], [()]),
    Row(['--torchscript'], lambda v: type(v.net).__name__, 'RecursiveScriptModule'),
    Row(['--torchcompile', 'eager'], lambda v: type(v.net).__name__, 'OptimizedModule'),
    Row(['--torchcompile-mode', 'max-autotune'], lambda v: v.net.get_compiler_config()['max_autotune'], True,
        ['--torchcompile']),
    Row(['--aot-autograd'], lambda v: type(v.net).__name__, 'AOTModule'),
    Row(['--occlusion', '0', '0.5'], lambda v: [_dropped(e) for e in v.evaluations], [0.0, 0.5]),
    Row(['--occlusion-mode', 'block'], lambda v: _occluded(v, 'masks').tolist(), _masks('block'), OCCLUDED),
    Row(['--seed', '7'], lambda v: _occluded(v, 'masks').tolist(), _masks(seed=7), OCCLUDED),
    Row(['--patch-size', '16'], lambda v: _occluded(v, 'patch_size'), 16, OCCLUDED),
    Row(['--results-format', 'json'], lambda v: _results_text(v)[0], '[',
        ['--results-file', '{tmp}/results.txt']),
]

# validate.py flags that build nothing (option -> why)
VALIDATE_RUN_CONTROL = {
    '--results-file': 'output path: the file the rows are written to (its format: --results-format)',
    '--log-freq': 'logging: batches between progress lines',
    '--device': 'run control: the device everything is placed on (cpu is the only one here)',
    '--dist-backend': 'run control: how the processes of a torchrun launch meet',
    '--dist-url': 'run control: where the processes of a torchrun launch meet',
    '--local-rank': "run control: torch.distributed.launch's rank of the process on its node",
}
VALIDATE_TIMM_ONLY = {
    '--naflex-max-seq-len': "timm's NaFlex loader only (--naflex-loader is refused)",
}
_VALIDATE_FLAGS_TEST = 'tests/test_validate_flags.py::'
# validate.py flags proven by a test elsewhere (option -> the test, checked to exist)
VALIDATE_PROVEN = {
    '--data-dir': 'tests/test_validate.py::test_bad_input_exits_2_with_a_clear_message',
    '--dataset': _VALIDATE_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--num-samples': _VALIDATE_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--dataset-download': _VALIDATE_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--input-key': _VALIDATE_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--target-key': _VALIDATE_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--dataset-trust-remote-code': _VALIDATE_FLAGS_TEST + 'test_dataset_flags_reach_timms_create_dataset',
    '--model': _VALIDATE_FLAGS_TEST + 'test_use_train_size_and_input_size',
    '--use-train-size': _VALIDATE_FLAGS_TEST + 'test_use_train_size_and_input_size',
    '--pretrained': _VALIDATE_FLAGS_TEST + 'test_every_timm_flag_is_accepted',
    '--checkpoint': 'tests/test_validate.py::test_every_checkpoint_format_and_a_folder',
    '--use-ema': 'tests/test_validate.py::test_ema_weights_are_chosen_and_required',
    '--test-pool': _VALIDATE_FLAGS_TEST + 'test_test_pool_takes_the_whole_image',
    '--tf-preprocessing': _VALIDATE_FLAGS_TEST + 'test_bulk_names_missing_weights_and_tensorflow_stop_with_one_line',
    '--retry': _VALIDATE_FLAGS_TEST + 'test_retry_decays_the_batch_size_on_out_of_memory',
    '--real-labels': _VALIDATE_FLAGS_TEST + 'test_real_labels_replace_the_folder_labels',
    '--valid-labels': _VALIDATE_FLAGS_TEST + 'test_valid_labels_restrict_the_classes',
    '--metrics-avg': _VALIDATE_FLAGS_TEST + 'test_metrics_avg_and_results_format',
    '--num-gpu': _VALIDATE_FLAGS_TEST + 'test_flags_that_cannot_apply_stop_with_one_line',
    '--naflex-loader': _VALIDATE_FLAGS_TEST + 'test_flags_that_cannot_apply_stop_with_one_line',
    '--amp-impl': _VALIDATE_FLAGS_TEST + 'test_flags_that_cannot_apply_stop_with_one_line',
}


@pytest.mark.parametrize('row', VALIDATE_FLAGS, ids=_ids(VALIDATE_FLAGS))
def test_each_validate_flag_changes_what_validate_py_builds(build_validate, row):
    _assert_changed(row, build_validate([*VALIDATE_ARGV, *row.base]),
                    build_validate([*VALIDATE_ARGV, *row.base, *row.flags]))


def _tested_options(tables: Sequence[Sequence[tuple]], every_option: Sequence[Sequence[tuple]] = ()) -> List[str]:
    """The flags under test: the first of each row's flags (every option of the rows of `every_option`)."""
    options = [row[0][0] for table in tables for row in table]
    return options + [arg for table in every_option for row in table for arg in row[0] if arg.startswith('-')]


SCRIPTS = {
    'train.py': (build_train_parser, _tested_options([TRAIN_FLAGS, DISTRIBUTED_TRAIN_FLAGS, TOKENMIX_FLAGS,
                                                      TIMM_MIXUP_FLAGS], [CRITERIA]),
                 [TRAIN_RUN_CONTROL, TRAIN_TIMM_ONLY, TRAIN_PROVEN]),
    'validate.py': (build_validate_parser, _tested_options([VALIDATE_FLAGS]),
                    [VALIDATE_RUN_CONTROL, VALIDATE_TIMM_ONLY, VALIDATE_PROVEN]),
}


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_option_is_in_a_table_or_listed_with_its_reason(script):
    """An option counts as covered through the value it sets (its dest): its aliases and --no- forms with it."""
    build_parser, tested, lists = SCRIPTS[script]
    options = build_parser()._option_string_actions
    listed = [option for entries in lists for option in entries]
    assert not [o for o in tested + listed if o not in options], 'rows or lists name options the parser lacks'
    assert not set(tested) & set(listed), 'an option is both in a table and listed'
    assert len(listed) == len(set(listed)), 'an option is listed twice'
    covered = {options[option].dest for option in tested + listed}
    missing = sorted({option for option, action in options.items()
                      if action.dest not in covered and action.dest != 'help'})
    assert not missing, f'{script} options in no table and no list (add a row, or list them with why): {missing}'


PROVEN = sorted({test for proven in (TRAIN_PROVEN, VALIDATE_PROVEN) for test in proven.values()})


@pytest.mark.parametrize('test_id', PROVEN)
def test_each_test_named_as_proof_exists(test_id):
    path, name = test_id.split('::')
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    assert name in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, test_id
