"""tokenmix_train.flag_rules: flag names as typed, the teacher rules of train.py, derived defaults, unsupported
combinations and the output folder check."""
import pytest

from tokenmix_train.flag_rules import check_train_args, flag_names, output_problem, unsupported_flags
from tokenmix_train.train_flags import build_train_parser


def _checked(argv):
    parser = build_train_parser()
    args = parser.parse_args(argv)
    check_train_args(parser, args)
    return args


def test_flag_names_are_the_options_users_type():
    names = flag_names(build_train_parser())
    assert (names['batch_size'], names['amp'], names['no_prefetcher'], names['decay_rate']) == \
        ('-b/--batch-size', '--amp', '--no-prefetcher', '--decay-rate/--dr')
    assert 'help' in names and 'data' not in names  # positionals have no flag


@pytest.mark.parametrize('argv, message', [
    (['--tokenmix', '--cutmix', '1', '--teacher-maps', 'm', '--teacher-amp'],
     '--teacher-amp is for an online teacher; --teacher-maps reads stored maps'),
    (['--teacher-maps', 'm'], '--teacher-maps gives TokenMix its label weights'),
    (['--tokenmix', '--cutmix', '1', '--teacher-maps', 'm', '--tokenmix-target', 'area'],
     '--teacher-maps gives TokenMix its label weights'),
    (['--teacher-topk', '5'], '--teacher-topk needs --teacher-model'),
    (['--tokenmix', '--cutmix', '1', '--teacher-model', 'resnet18', '--tokenmix-target', 'area'],
     '--tokenmix-target area ignores the teacher'),
    (['--tokenmix', '--cutmix', '1', '--teacher-model', 'resnet18', '--teacher-checkpoint', 't.pth',
      '--teacher-pretrained'], '--teacher-checkpoint and --teacher-pretrained exclude each other'),
    (['--lr', '-1', '--teacher-topk', '5'], '--lr must be > 0, got -1.0'),  # values come before the teacher
])
def test_teacher_rules_name_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        _checked(['--data-dir', 'd', *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f'train.py: error: {message}') and len(err.splitlines()) == 1


def test_derived_defaults_are_set_after_the_rules():
    args = _checked(['d', '--drop-connect', '0.2', '--bce-loss'])
    assert (args.data_dir, args.drop_path, args.tokenmix_target_norm) == ('d', 0.2, 'none')
    args = _checked(['--data-dir', 'e', '--drop-connect', '0.2', '--drop-path', '0.1'])
    assert (args.data_dir, args.drop_path, args.tokenmix_target_norm) == ('e', 0.1, 'sum')


def test_unsupported_flags_and_combinations():
    parser = build_train_parser()
    assert unsupported_flags(parser.parse_args(['--tta', '1'])) is None
    assert unsupported_flags(parser.parse_args(['--split-bn', '--sync-bn', '--resplit'])) == \
        '--split-bn and --sync-bn exclude each other'
    assert unsupported_flags(parser.parse_args(['--use-multi-epochs-loader', '--train-img-sizes', '32'])) == \
        '--use-multi-epochs-loader and --train-img-sizes exclude each other (timm: not supported together)'


def test_output_problem_names_the_flag_and_the_folder(tmp_path):
    assert output_problem(str(tmp_path / 'new' / 'deeper')) is None  # missing folders are made in tmp_path
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    assert output_problem(str(blocker / 'run'), '--out', 'shown') == \
        f"--out 'shown': '{blocker}' is a file, not a folder"
