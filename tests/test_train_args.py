"""tokenmix.args: timm flag names, YAML defaults, checks that name the flag, args.yaml round trip."""
import pytest
import yaml

from tokenmix.args import args_to_yaml, parse_args, resolve_lr

DEIT_S = ('--data-dir /data/imagenet --model deit_small_patch16_224 --sched cosine --epochs 300 --opt adamw -j 8 '
          '--warmup-lr 1e-6 --warmup-epochs 5 --min-lr 1e-5 --mixup .8 --cutmix 1.0 --model-ema '
          '--model-ema-decay 0.99996 --aa rand-m9-mstd0.5-inc1 --remode pixel --reprob 0.25 --amp --lr 5e-4 '
          '--weight-decay .05 --drop-path .1 -b 128 --smoothing 0.1 --color-jitter 0.4 --train-interpolation bicubic '
          '--bce-loss --mixup-prob 1.0 --mixup-switch-prob 0.5 --drop 0.0 --dist-bn reduce')


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_deit_recipe_with_timm_flags_parses():
    args = parse_args(DEIT_S.split() + ['--tokenmix'])
    assert (args.model, args.opt, args.lr, args.weight_decay, args.batch_size) == \
        ('deit_small_patch16_224', 'adamw', 5e-4, 0.05, 128)
    assert (args.mixup, args.cutmix, args.reprob, args.drop_path, args.model_ema_decay) == \
        (0.8, 1.0, 0.25, 0.1, 0.99996)
    assert args.aa == 'rand-m9-mstd0.5-inc1' and args.workers == 8 and args.amp
    assert args.tokenmix_target_norm == 'none'  # BCE: the authors' raw weights
    assert parse_args(['/data/imagenet']).data_dir == '/data/imagenet'  # timm's deprecated positional


def test_yaml_defaults_and_command_line_override(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('data_dir: /d\nlr: 5e-4\nbatch-size: 64\nmixup: 0.8\ntokenmix: true\ncutmix: 1.0\n'
                   'model_kwargs: {patch_size: 8}\n')
    args = parse_args(['-c', str(cfg), '-b', '32'])
    assert args.lr == 5e-4 and isinstance(args.lr, float)  # PyYAML reads 5e-4 as a string
    assert args.batch_size == 32 and args.mixup == 0.8 and args.tokenmix
    assert args.model_kwargs == {'patch_size': 8}
    assert args.tokenmix_target_norm == 'sum'  # soft-target CE: weights sum to 1


@pytest.mark.parametrize('text, message', [
    ('data_dir: /d\nmixpu: 0.8\n', 'unknown key "mixpu"'),
    ('data_dir: /d\nmixup-mode: sometimes\n', 'config key "mixup-mode"'),
    ('data_dir: /d\nlr: fast\n', 'config key "lr": cannot read'),
    ('- a\n- b\n', 'expected a mapping'),
])
def test_bad_yaml_names_the_key(tmp_path, capsys, text, message):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(text)
    assert message in _error(capsys, ['-c', str(cfg)])


@pytest.mark.parametrize('argv, message', [
    ([], '--data-dir is required'),
    (['--data-dir', 'd', '--mixup', '0.8', '-b', '7'], '-b/--batch-size must be even'),
    (['--data-dir', 'd', '--tokenmix'], '--tokenmix needs --cutmix > 0'),
    (['--data-dir', 'd', '--teacher-checkpoint', 't.pth'], '--teacher-checkpoint needs --teacher-model'),
    (['--data-dir', 'd', '--teacher-model', 'resnet18', '--teacher-pretrained'], 'used by TokenMix only'),
    (['--data-dir', 'd', '--tokenmix', '--cutmix', '1', '--tokenmix-target', 'teacher'],
     '--tokenmix-target teacher needs --teacher-model'),
    (['--data-dir', 'd', '--img-size', '0'], '--img-size must be >= 1'),
    (['--data-dir', 'd', '--cutmix-minmax', '0.2'], '--cutmix-minmax takes two values'),
    (['--data-dir', 'd', '--tokenmix-mask', 'stripes'], "invalid choice: 'stripes'"),
    (['--data-dir', 'd', '--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
])
def test_bad_flags_exit_2_naming_the_flag(capsys, argv, message):
    assert message in _error(capsys, argv)


def test_args_yaml_round_trip(tmp_path):
    args = parse_args(DEIT_S.split() + ['--tokenmix', '--model-kwargs', 'patch_size=8'])
    path = tmp_path / 'args.yaml'
    path.write_text(args_to_yaml(args))
    assert 'data' in yaml.safe_load(path.read_text())
    again = parse_args(['-c', str(path)])
    assert vars(again) == dict(vars(args), config=str(path))


def test_lr_from_base_follows_timm():
    args = parse_args(['--data-dir', 'd', '-b', '128', '--opt', 'sgd'])
    assert resolve_lr(args, world_size=4) == pytest.approx(0.1 * 512 / 256)
    args = parse_args(['--data-dir', 'd', '-b', '128', '--opt', 'adamw', '--lr-base', '5e-4'])
    assert resolve_lr(args, world_size=4) == pytest.approx(5e-4 * (512 / 256) ** 0.5)
    args = parse_args(['--data-dir', 'd', '--lr', '0.3'])
    assert resolve_lr(args, world_size=8) == 0.3
