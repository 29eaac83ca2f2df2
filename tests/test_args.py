"""tokenmix_train.args (flag tables, YAML file, rules together): timm flag names, YAML defaults (timm's and
third-party args.yaml), bad values named, --no- forms."""
import argparse
import os

import pytest
import yaml

from tokenmix_train.args import args_to_yaml, parse_train_args, resolve_lr
from tokenmix_train.train_flags import build_train_parser

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')

DEIT_S = ('--data-dir /data/imagenet --model deit_small_patch16_224 --sched cosine --epochs 300 --opt adamw -j 8 '
          '--warmup-lr 1e-6 --warmup-epochs 5 --min-lr 1e-5 --mixup .8 --cutmix 1.0 --model-ema '
          '--model-ema-decay 0.99996 --aa rand-m9-mstd0.5-inc1 --remode pixel --reprob 0.25 --amp --lr 5e-4 '
          '--weight-decay .05 --drop-path .1 -b 128 --smoothing 0.1 --color-jitter 0.4 --train-interpolation bicubic '
          '--bce-loss --mixup-prob 1.0 --mixup-switch-prob 0.5 --drop 0.0 --dist-bn reduce')


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        parse_train_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_deit_recipe_with_timm_flags_parses():
    args = parse_train_args(DEIT_S.split() + ['--tokenmix'])[0]
    assert (args.model, args.opt, args.lr, args.weight_decay, args.batch_size) == \
        ('deit_small_patch16_224', 'adamw', 5e-4, 0.05, 128)
    assert (args.mixup, args.cutmix, args.reprob, args.drop_path, args.model_ema_decay) == \
        (0.8, 1.0, 0.25, 0.1, 0.99996)
    assert args.aa == 'rand-m9-mstd0.5-inc1' and args.workers == 8 and args.amp
    assert args.tokenmix_target_norm == 'none'  # BCE: the authors' raw weights
    assert parse_train_args(['/data/imagenet'])[0].data_dir == '/data/imagenet'  # timm's deprecated positional


def test_yaml_defaults_and_command_line_override(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('data_dir: /d\nlr: 5e-4\nbatch-size: 64\nmixup: 0.8\ntokenmix: true\ncutmix: 1.0\n'
                   'model_kwargs: {patch_size: 8}\n')
    args = parse_train_args(['-c', str(cfg), '-b', '32'])[0]
    assert args.lr == 5e-4 and isinstance(args.lr, float)  # PyYAML reads 5e-4 as a string
    assert args.batch_size == 32 and args.mixup == 0.8 and args.tokenmix
    assert args.model_kwargs == {'patch_size': 8}
    assert args.tokenmix_target_norm == 'sum'  # soft-target CE: weights sum to 1


@pytest.mark.parametrize('text, message', [
    ('epochs: 2.5\n', 'key "epochs" expects an integer, got 2.5'),
    ('lr: [1, 2]\n', 'key "lr" expects one value, got a list [1, 2]'),
    ('scale: 0.5\n', 'key "scale" expects a list, got 0.5'),
    ('tokenmix: "no"\n', "key \"tokenmix\" expects true or false, got 'no'"),
    ('tokenmix: no\n', "key \"tokenmix\" expects true or false, got 'no'"),  # YAML 1.1 would read False
    ('amp: yes\n', "key \"amp\" expects true or false, got 'yes'"),
    ('mixup: true\n', 'key "mixup" expects a number, got True'),
    ('lr: fast\n', "key \"lr\" expects a number, got 'fast'"),
    ('mixup-mode: sometimes\n', "key \"mixup-mode\" 'sometimes' is not one of"),
    ('input_size: [3, 32]\n', 'key "input_size" expects 3 values, got 2'),
    ('model_kwargs: patch_size=8\n', 'key "model_kwargs" expects a mapping'),
    ('experiment: [a]\n', 'key "experiment" expects one value'),
    ('lr: -1\n', '--lr must be > 0, got -1.0'),
    ('scale: [0.9, 0.1]\n', '--scale takes two values 0 < min <= max <= 1'),
    ('opt: nosuch\n', '--opt nosuch: unknown optimizer'),
    ('- a\n- b\n', 'expected a mapping'),
    ('lr: [1\n', 'not valid YAML'),
    ('epochs:\n', 'key "epochs" needs a value, got null (default: 300)'),
    ('opt: ~\n', "key \"opt\" needs a value, got null (default: 'sgd')"),
    ('model_kwargs: null\n', 'key "model_kwargs" needs a value, got null (default: {})'),
])
def test_bad_yaml_value_is_one_line_naming_the_key(tmp_path, capsys, text, message):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(text if text.startswith('-') else 'data_dir: /d\n' + text)
    err = _error(capsys, ['-c', str(cfg)])
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith('train.py: error: ')


@pytest.mark.parametrize('argv, message', [
    ([], '--data-dir is required'),
    (['--data-dir', 'd', '--mixup', '0.8', '-b', '7'], '-b/--batch-size must be even'),
    (['--data-dir', 'd', '--mixup', '0.8', '--train-img-sizes', '32', '48', '--train-batch-sizes', '8', '5'],
     '--train-batch-sizes must be even when mixing'),
    (['--data-dir', 'd', '--tokenmix'], '--tokenmix needs --cutmix > 0'),
    (['--data-dir', 'd', '--teacher-checkpoint', 't.pth'], '--teacher-checkpoint needs --teacher-model'),
    (['--data-dir', 'd', '--teacher-model', 'resnet18', '--teacher-pretrained'], 'used by TokenMix only'),
    (['--data-dir', 'd', '--tokenmix', '--cutmix', '1', '--tokenmix-target', 'teacher'],
     '--tokenmix-target teacher needs --teacher-model'),
    (['--data-dir', 'd', '--img-size', '0'], '--img-size must be >= 1'),
    (['--data-dir', 'd', '--cutmix-minmax', '0.2'], '--cutmix-minmax takes two values'),
    (['--data-dir', 'd', '--tokenmix-mask', 'stripes'], "invalid choice: 'stripes'"),
    (['--data-dir', 'd', '--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
    (['--data-dir', 'd', '--lr', '-1'], '--lr must be > 0, got -1.0'),
    (['--data-dir', 'd', '--lr', 'nan'], '--lr must be > 0, got nan'),
    (['--data-dir', 'd', '--opt', 'nosuch'], '--opt nosuch: unknown optimizer'),
    (['--data-dir', 'd', '--sched', 'nosuch'], '--sched nosuch: unknown scheduler'),
    (['--data-dir', 'd', '--epochs', '2.5'], "argument --epochs: invalid int value: '2.5'"),
    (['--data-dir', 'd', '--hflip', '1.5'], '--hflip must be in [0, 1], got 1.5'),
    (['--data-dir', 'd', '--smoothing', '1'], '--smoothing must be in [0, 1), got 1.0'),
    (['--data-dir', 'd', '--scale', '0.5'], '--scale takes two values'),
    (['--data-dir', 'd', '--mixup', '-1'], '--mixup must be >= 0'),
    (['--data-dir', 'd', '--model-ema-decay', '2'], '--model-ema-decay must be in [0, 1]'),
    (['--data-dir', 'd', '--decay-milestones', '30', '10'], '--decay-milestones must be increasing'),
    (['--data-dir', 'd', '--aa', 'nosuch'], '--aa nosuch: Unknown AA policy'),
    (['--data-dir', 'd', '--remode', 'x'], '--remode must be one of'),
    (['--data-dir', 'd', '--train-interpolation', 'x'], '--train-interpolation x: unknown interpolation'),
    (['--data-dir', 'd', '--train-crop-mode', 'x'], '--train-crop-mode must be one of'),
    (['--data-dir', 'd', '--aug-splits', '1'], '--aug-splits must be 0 or >= 2'),
    (['--data-dir', 'd', '-j', '-1'], '-j/--workers must be >= 0'),
    (['--data-dir', 'd', '--val-interval', '0'], '--val-interval must be >= 1'),
    (['--data-dir', 'd', '--worker-seeding', 'x'], "invalid choice: 'x'"),
    (['--data-dir', 'd', '--mean', '0.5', '0.5'], '--mean takes 1 or 3 values'),
    (['--data-dir', 'd', '--in-chans', '1', '--std', '0.2', '0.2', '0.2'], '--std takes 1 value (1 input channel)'),
    (['--data-dir', 'd', '--train-img-sizes', '32', '48', '--train-batch-sizes', '4'],
     '--train-batch-sizes takes one value per --train-img-sizes size (2), got 1'),
    (['--data-dir', 'd', '--input-img-mode', 'XYZ'], '--input-img-mode XYZ: not a PIL image mode'),
    (['--data-dir', 'd', '--fuser', 'x'], "argument --fuser: invalid choice: 'x'"),
    (['--data-dir', 'd', '--torchcompile', 'nosuch'], '--torchcompile nosuch: unknown backend'),
])
def test_bad_flags_exit_2_naming_the_flag(capsys, argv, message):
    assert message in _error(capsys, argv)


@pytest.mark.parametrize('argv, message', [
    (['--torchscript'], '--torchscript: TorchScript is not supported here'),
    (['--naflex-loader'], '--naflex-loader: NaFlex batches'),
    (['--kd-model-name', 'resnet50'], "--kd-model-name: timm's knowledge distillation"),
    (['--tta', '2'], '--tta: evaluation here counts every val image once'),
    (['--model-dtype', 'bfloat16', '--amp'], '--model-dtype bfloat16 excludes --amp'),
    (['--wandb-resume-id', 'abc'], '--wandb-resume-id needs --resume'),
    (['--jsd-loss'], '--jsd-loss needs --aug-splits >= 2'),
    (['--split-bn'], '--split-bn needs --aug-splits >= 2 or --resplit'),
    (['--aug-splits', '3', '--mixup', '0.8'], '--aug-splits cannot be mixed'),
    (['--aug-splits', '3', '--no-prefetcher'], '--aug-splits needs the prefetcher'),
])
def test_flags_that_cannot_apply_say_why(capsys, argv, message):
    assert message in _error(capsys, ['--data-dir', 'd', *argv])


def test_no_op_values_of_unsupported_flags_pass():
    args = parse_train_args(['--data-dir', 'd', '--tta', '1', '--model-dtype', 'float32', '--amp',
                             '--no-torchscript', '--opt', 'lookahead_adamw', '--sched', 'step'])[0]
    assert args.tta == 1 and args.opt == 'lookahead_adamw'


def _boolean_dests(parser):
    return {a.dest for a in parser._actions
            if isinstance(a, (argparse.BooleanOptionalAction, argparse._StoreTrueAction))}


def test_every_boolean_flag_can_be_switched_off_after_the_yaml_set_it():
    parser = build_train_parser()
    dests = _boolean_dests(parser)
    assert {'amp', 'model_ema', 'bce_loss', 'tokenmix', 'teacher_pretrained', 'no_aug', 'no_prefetcher'} <= dests
    off = {}  # dest -> an option that sets it False
    for action in parser._actions:
        for option in action.option_strings:
            if action.dest in dests and parser.parse_args([option]).__dict__[action.dest] is False:
                off.setdefault(action.dest, option)
    assert set(off) == dests
    assert off['amp'] == '--no-amp' and off['no_aug'] == '--aug' and off['no_prefetcher'] == '--prefetcher'
    with_yaml = build_train_parser()
    with_yaml.set_defaults(**{d: True for d in dests})  # what -c does with a YAML setting every one to true
    switched = with_yaml.parse_args(list(off.values()))
    assert all(getattr(switched, d) is False for d in dests)


def test_command_line_weights_win_over_the_yaml_with_a_note(tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('data_dir: /d\ntokenmix: true\ncutmix: 1.0\nteacher_model: resnet18\nteacher_pretrained: true\n'
                   'pretrained: true\n')
    args, _, notes = parse_train_args(['-c', str(cfg), '--teacher-checkpoint', 'local.pth',
                                       '--initial-checkpoint', 'student.pth'])
    assert args.teacher_checkpoint == 'local.pth' and args.teacher_pretrained is False
    assert args.initial_checkpoint == 'student.pth' and args.pretrained is False
    assert notes == [
        ('info', 'student weights: --initial-checkpoint on the command line replaces "pretrained" of the config file'),
        ('info', 'teacher weights: --teacher-checkpoint on the command line replaces "teacher_pretrained" of the '
                 'config file')]
    # both on the command line: still an error, nothing is guessed
    assert 'exclude each other' in _error(capsys, ['-c', str(cfg), '--teacher-checkpoint', 'x.pth',
                                                   '--teacher-pretrained'])
    # the YAML alone keeps its source
    assert parse_train_args(['-c', str(cfg)])[0].teacher_pretrained is True


def test_teacher_maps_on_the_command_line_replace_the_yaml_teacher_weights(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('data_dir: /d\ntokenmix: true\ncutmix: 1.0\nteacher_model: resnet18\nteacher_pretrained: true\n')
    args, _, notes = parse_train_args(['-c', str(cfg), '--teacher-maps', 'store'])
    assert args.teacher_maps == 'store' and args.teacher_pretrained is False
    assert notes == [('info', 'teacher weights: --teacher-maps on the command line replaces "teacher_pretrained" of '
                              'the config file')]


def test_timm_defaults_yaml_loads_without_notes():
    """tests/data/timm_train_defaults_args.yaml: timm's own parser defaults (tools/timm_parity.py yaml)."""
    args, text, notes = parse_train_args(['-c', os.path.join(DATA, 'timm_train_defaults_args.yaml'),
                                          '--data-dir', 'd'])
    assert notes == []
    timm_defaults = yaml.safe_load(open(os.path.join(DATA, 'timm_train_defaults_args.yaml')))
    assert len(timm_defaults) == 172
    ours = vars(args)
    differs = {k for k, v in timm_defaults.items() if ours[k] != v and k not in ('data_dir', 'device')}
    assert differs == set()  # every timm key is a flag here, read with timm's value


def test_third_party_yaml_notes_old_keys_and_warns_once_about_unknown_ones():
    args, _, notes = parse_train_args(['-c', os.path.join(DATA, 'third_party_args.yaml')])
    assert args.model == 'deit_small_patch16_224' and args.model_ema and args.lr == 1e-3
    assert [level for level, _ in notes] == ['info', 'warning']
    assert notes[0][1].endswith('ignored keys of older timm versions or set by the run: bn_tf, distributed, jsd, '
                                'native_amp, num_gpu, prefetcher, rank, validation_batch_size_multiplier, world_size')
    assert notes[1][1].endswith('unknown keys (not train.py flags, ignored): distillation_alpha, distillation_tau, '
                                'distillation_type, repeated_aug, teacher_path')


def test_args_yaml_records_what_was_set_not_derived_values(tmp_path):
    args, text, _ = parse_train_args(['--data-dir', 'd', '--tokenmix', '--cutmix', '1', '--bce-loss'])
    assert args.tokenmix_target_norm == 'none'  # resolved for this run ...
    assert yaml.safe_load(text)['tokenmix_target_norm'] is None  # ... but stored unresolved
    cfg = tmp_path / 'args.yaml'
    cfg.write_text(text)
    again = parse_train_args(['-c', str(cfg), '--no-bce-loss'])[0]
    assert again.tokenmix_target_norm == 'sum'  # resolved afresh for the re-launch


def test_args_yaml_round_trip(tmp_path):
    args = parse_train_args(DEIT_S.split() + ['--tokenmix', '--model-kwargs', 'patch_size=8'])[0]
    path = tmp_path / 'args.yaml'
    path.write_text(args_to_yaml(args))
    assert 'data' in yaml.safe_load(path.read_text())
    again = parse_train_args(['-c', str(path)])[0]
    assert vars(again) == dict(vars(args), config=str(path))


def test_lr_from_base_follows_timm():
    args = parse_train_args(['--data-dir', 'd', '-b', '128', '--opt', 'sgd'])[0]
    assert resolve_lr(args, world_size=4) == pytest.approx(0.1 * 512 / 256)
    args = parse_train_args(['--data-dir', 'd', '-b', '128', '--opt', 'adamw', '--lr-base', '5e-4'])[0]
    assert resolve_lr(args, world_size=4) == pytest.approx(5e-4 * (512 / 256) ** 0.5)
    args = parse_train_args(['--data-dir', 'd', '--lr', '0.3'])[0]
    assert resolve_lr(args, world_size=8) == 0.3


def test_every_flag_of_timms_train_py_is_accepted():
    """tests/data/timm_train_flags.txt: the option strings of timm's train.py (tools/timm_parity.py flags)."""
    with open(os.path.join(DATA, 'timm_train_flags.txt')) as f:
        timm_flags = f.read().split()
    ours = {s for a in build_train_parser()._actions for s in a.option_strings}
    assert len(timm_flags) == 176 and [s for s in timm_flags if s not in ours] == []


def test_only_the_batches_that_are_mixed_must_be_even():
    """With --train-batch-sizes, -b only sizes the (unmixed) validation batches."""
    args = parse_train_args(['--data-dir', 'd', '--mixup', '0.8', '-b', '7', '--train-img-sizes', '32', '48',
                             '--train-batch-sizes', '8', '6'])[0]
    assert (args.batch_size, args.train_batch_sizes) == (7, [8, 6])
