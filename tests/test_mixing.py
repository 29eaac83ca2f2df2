"""tokenmix_train.mixing: every mixing, teacher and loss flag reaches the object built from parsed arguments.

Each row sets one flag to a value other than its default and names the attribute it must change, so a builder that
hard-wires a keyword (say `mask_type='block'`) fails here even when a whole run still trains well.
"""
import pytest
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mixup_ext import TokenMix
from tokenmix_train.args import parse_train_args
from tokenmix_train.errors import ConfigError
from tokenmix_train.mixing import (build_criterion, build_mixer, build_teacher_from_args, mixer_generator,
                                   mixing_enabled)
from tokenmix_train.teacher_maps import StoredMapsMixer

TOKENMIX = ['--data-dir', 'd', '--tokenmix', '--cutmix', '1.0']


def _mixer(argv, token_size=8, teacher=None):
    args = parse_train_args(argv)[0]
    return build_mixer(args, num_classes=10, token_size=token_size, teacher=teacher,
                       generator=mixer_generator(args.seed, 0))


# (flags, attribute of the built TokenMix, value it must take); every value differs from the default
TOKENMIX_FLAGS = [
    (['--tokenmix-mask', 'random'], 'mask_type', 'random'),
    (['--tokenmix-min-tokens', '3'], 'min_tokens', 3),
    (['--tokenmix-lam', 'beta'], 'lam_mode', 'beta'),
    (['--tokenmix-target', 'area'], 'target', 'area'),
    (['--tokenmix-target-norm', 'none'], 'target_norm', 'none'),  # soft-target CE's default is 'sum'
    (['--teacher-topk', '5', '--teacher-model', 'resnet18'], 'teacher_topk', 5),
    (['--mixup', '0.3'], 'mixup_alpha', 0.3),
    (['--cutmix', '0.7'], 'cutmix_alpha', 0.7),
    (['--cutmix-minmax', '0.2', '0.6'], 'cutmix_minmax', [0.2, 0.6]),
    (['--mixup-prob', '0.4'], 'mix_prob', 0.4),
    (['--mixup-switch-prob', '0.25'], 'switch_prob', 0.25),
    (['--mixup-mode', 'elem'], 'mode', 'elem'),
    (['--smoothing', '0.2'], 'label_smoothing', 0.2),
]


@pytest.mark.parametrize('flags,attribute,value', TOKENMIX_FLAGS, ids=[row[0][0] for row in TOKENMIX_FLAGS])
def test_each_tokenmix_flag_reaches_the_mixer(flags, attribute, value):
    default = _mixer(TOKENMIX)
    mixer = _mixer(TOKENMIX + flags)
    assert isinstance(mixer, TokenMix)
    assert getattr(mixer, attribute) == value != getattr(default, attribute)


def test_mixer_takes_the_class_count_token_size_teacher_and_generator():
    teacher = torch.nn.Identity()
    args = parse_train_args(TOKENMIX + ['--seed', '7'])[0]
    generator = mixer_generator(args.seed, 1)
    mixer = build_mixer(args, num_classes=13, token_size=4, teacher=teacher, generator=generator)
    assert (mixer.num_classes, mixer.patch_size) == (13, 4)
    assert mixer.teacher is teacher and mixer.generator is generator


def test_default_tokenmix_flags_are_the_authors_settings():
    mixer = _mixer(TOKENMIX)
    assert (mixer.mask_type, mixer.min_tokens, mixer.lam_mode, mixer.target, mixer.teacher_topk) == (
        'block', 14, 'constant', 'auto', 0)


def test_target_norm_follows_the_loss_unless_given():
    assert _mixer(TOKENMIX + ['--bce-loss']).target_norm == 'none'
    assert _mixer(TOKENMIX).target_norm == 'sum'
    assert _mixer(TOKENMIX + ['--bce-loss', '--tokenmix-target-norm', 'sum']).target_norm == 'sum'


TIMM_MIXUP_FLAGS = [
    (['--mixup', '0.3'], 'mixup_alpha', 0.3),
    (['--cutmix', '0.7'], 'cutmix_alpha', 0.7),
    (['--mixup-prob', '0.4'], 'mix_prob', 0.4),
    (['--mixup-switch-prob', '0.25'], 'switch_prob', 0.25),
    (['--mixup-mode', 'pair'], 'mode', 'pair'),
    (['--smoothing', '0.2'], 'label_smoothing', 0.2),
]


@pytest.mark.parametrize('flags,attribute,value', TIMM_MIXUP_FLAGS, ids=[row[0][0] for row in TIMM_MIXUP_FLAGS])
def test_each_mixup_flag_reaches_timms_mixup(flags, attribute, value):
    base = ['--data-dir', 'd', '--mixup', '0.8', '--cutmix', '1.0']
    mixer = _mixer(base + flags)
    assert type(mixer) is Mixup and mixer.num_classes == 10
    assert getattr(mixer, attribute) == value != getattr(_mixer(base), attribute)


def test_no_mixing_flags_build_no_mixer_and_stored_maps_wrap_tokenmix():
    assert _mixer(['--data-dir', 'd']) is None and not mixing_enabled(parse_train_args(['--data-dir', 'd'])[0])
    assert mixing_enabled(parse_train_args(['--data-dir', 'd', '--cutmix-minmax', '0.2', '0.8'])[0])
    stored = _mixer(TOKENMIX + ['--teacher-maps', 'store', '--tokenmix-mask', 'random'])
    assert isinstance(stored, StoredMapsMixer) and stored.tokenmix.mask_type == 'random'
    assert stored.tokenmix.target == 'auto'  # the maps come with each batch


def test_mixer_generators_differ_by_rank_and_seed_and_repeat():
    draws = {(s, r): torch.rand(4, generator=mixer_generator(s, r)) for s in (0, 1) for r in (0, 1)}
    assert len({tuple(d.tolist()) for d in draws.values()}) == 4
    assert torch.equal(draws[0, 1], torch.rand(4, generator=mixer_generator(0, 1)))


def test_teacher_flags_reach_the_teacher(teacher_checkpoint):
    argv = ['--data-dir', 'd', '--tokenmix', '--cutmix', '1', '--teacher-model', 'tokenmix_cnn_teacher_64',
            '--teacher-checkpoint', teacher_checkpoint]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = build_teacher_from_args(parse_train_args(argv)[0], 10, mean, std, torch.device('cpu'))
    assert plain.img_size is None and plain.amp_dtype is None and plain.renormalizes
    checkpoint = torch.load(teacher_checkpoint, map_location='cpu')['state_dict']
    name, weight = next(iter(checkpoint.items()))
    assert torch.equal(plain.model.state_dict()[name], weight)
    cheap = build_teacher_from_args(parse_train_args(argv + ['--teacher-img-size', '48', '--teacher-amp',
                                                             '--amp-dtype', 'bfloat16'])[0],
                                    10, mean, std, torch.device('cpu'))
    assert cheap.img_size == (48, 48) and cheap.amp_dtype == torch.bfloat16
    stored = parse_train_args(argv[:5] + ['--teacher-maps', 'store'])[0]
    assert build_teacher_from_args(stored, 10, mean, std, torch.device('cpu')) is None


# (flags, loss class, attributes it must carry)
CRITERIA = [
    (['--smoothing', '0'], torch.nn.CrossEntropyLoss, {}),
    ([], LabelSmoothingCrossEntropy, {'smoothing': 0.1}),  # timm's default smoothing
    (['--smoothing', '0.2'], LabelSmoothingCrossEntropy, {'smoothing': 0.2}),
    (['--smoothing', '0.2', '--bce-loss'], BinaryCrossEntropy, {'smoothing': 0.2}),
    (['--mixup', '0.8'], SoftTargetCrossEntropy, {}),
    (['--mixup', '0.8', '--bce-loss', '--bce-target-thresh', '0.3'], BinaryCrossEntropy, {'target_threshold': 0.3}),
    (['--mixup', '0.8', '--bce-loss', '--bce-sum'], BinaryCrossEntropy, {'sum_classes': True}),
    (['--aug-splits', '3', '--jsd-loss', '--smoothing', '0.15'], JsdCrossEntropy,
     {'num_splits': 3, 'cross_entropy_loss.smoothing': 0.15}),
]


@pytest.mark.parametrize('flags,loss_class,attributes', CRITERIA, ids=[' '.join(row[0]) or 'defaults' for row in CRITERIA])
def test_loss_flags_choose_timms_loss_and_its_options(flags, loss_class, attributes):
    loss = build_criterion(parse_train_args(['--data-dir', 'd'] + flags)[0])
    assert type(loss) is loss_class
    for path, value in attributes.items():
        owner = loss
        for name in path.split('.'):
            owner = getattr(owner, name)
        assert owner == pytest.approx(value)


def test_every_bce_option_and_the_jsd_split_count_reach_the_loss():
    """--bce-pos-weight with mixing, all three BCE options beside --smoothing, and an --aug-splits other than
    JsdCrossEntropy's default 3 (mutation testing: each was dropped by a surviving mutant)."""
    mixed = build_criterion(parse_train_args(['--data-dir', 'd', '--mixup', '0.8', '--bce-loss', '--bce-pos-weight',
                                              '2.5'])[0])
    assert type(mixed) is BinaryCrossEntropy and mixed.pos_weight.item() == 2.5
    smoothed = build_criterion(parse_train_args(['--data-dir', 'd', '--smoothing', '0.2', '--bce-loss',
                                                 '--bce-target-thresh', '0.3', '--bce-sum', '--bce-pos-weight',
                                                 '2'])[0])
    assert type(smoothed) is BinaryCrossEntropy and smoothed.pos_weight.item() == 2.0
    assert (smoothed.smoothing, smoothed.target_threshold, smoothed.sum_classes) == (0.2, 0.3, True)
    jsd = build_criterion(parse_train_args(['--data-dir', 'd', '--aug-splits', '2', '--jsd-loss'])[0])
    assert type(jsd) is JsdCrossEntropy and jsd.num_splits == 2


def test_a_teacher_checkpoint_for_another_class_count_is_refused(teacher_checkpoint):
    """The teacher is built for the student's classes: a 10-class checkpoint under a 7-class dataset names the flag
    and both counts instead of loading a head for the wrong classes."""
    args = parse_train_args(['--data-dir', 'd', '--tokenmix', '--cutmix', '1', '--teacher-model',
                             'tokenmix_cnn_teacher_64', '--teacher-checkpoint', teacher_checkpoint])[0]
    with pytest.raises(ConfigError, match=r'^--teacher-checkpoint: .*10.*num_classes=7'):
        build_teacher_from_args(args, 7, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device('cpu'))


def test_the_teacher_follows_channels_last_and_is_moved_to_the_device(teacher_checkpoint):
    """--channels-last reaches the teacher too, and the teacher is put on the run's device (the `meta` device stands
    for an accelerator here: on a CPU-only machine a teacher left on the CPU looks placed)."""
    args = parse_train_args(['--data-dir', 'd', '--tokenmix', '--cutmix', '1', '--teacher-model',
                             'tokenmix_cnn_teacher_64', '--teacher-checkpoint', teacher_checkpoint,
                             '--channels-last'])[0]
    teacher = build_teacher_from_args(args, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device('meta'))
    assert teacher.channels_last is True
    assert {t.device.type for t in list(teacher.parameters()) + list(teacher.buffers())} == {'meta'}


def test_stored_maps_make_tokenmix_weigh_by_them_whatever_the_target_flag():
    """With --teacher-maps there is no online teacher: TokenMix takes target 'auto' (the maps that come with each
    batch), also under --tokenmix-target teacher, which alone would refuse to build without a teacher."""
    stored = _mixer(TOKENMIX + ['--teacher-maps', 'store', '--tokenmix-target', 'teacher'])
    assert isinstance(stored, StoredMapsMixer) and stored.tokenmix.target == 'auto'
