"""tokenmix_train.config_file on a small parser of its own: file values as defaults, command line first, strict
booleans, notes on ignored keys, command-line weight sources replacing the file's."""
import argparse

import pytest

from tokenmix_train.config_file import parse_with_config
from tokenmix_train.errors import OneLineParser


def _tiny_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog='tiny.py')
    parser.add_argument('-c', '--config', default='')
    parser.add_argument('--lr', type=float, default=0.1)
    parser.add_argument('--name', default='')
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument('--initial-checkpoint', default='')
    return parser


def _parse(tmp_path, text, *argv):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(text)
    return parse_with_config(_tiny_parser, ['-c', str(cfg), *argv])


def test_file_values_are_defaults_and_the_command_line_wins(tmp_path):
    parser, args, notes = _parse(tmp_path, 'lr: 5e-4\nname: a\namp: true\n', '--name', 'b')
    assert (args.lr, args.name, args.amp) == (5e-4, 'b', True)
    assert notes == [] and parser.prog == 'tiny.py'
    assert parser.parse_args([]).lr == 5e-4  # the returned parser holds the file's defaults


def test_without_a_file_the_parser_defaults_hold():
    _, args, notes = parse_with_config(_tiny_parser, ['--amp'])
    assert (args.lr, args.name, args.amp, args.config) == (0.1, '', True, '') and notes == []


def test_yes_and_no_are_text_not_booleans(tmp_path, capsys):
    assert _parse(tmp_path, 'name: yes\n')[1].name == 'yes'
    with pytest.raises(SystemExit) as exc:
        _parse(tmp_path, 'amp: on\n')
    assert exc.value.code == 2
    assert capsys.readouterr().err.endswith("key \"amp\" expects true or false, got 'on' (see --help)\n")


def test_ignored_and_unknown_keys_are_one_note_each(tmp_path):
    _, args, notes = _parse(tmp_path, 'lr: 0.2\nnum_gpu: 2\nrank: 0\nfoo: 1\nbar: x\n')
    path = tmp_path / 'c.yaml'
    assert args.lr == 0.2
    assert notes == [('info', f'--config {path}: ignored keys of older timm versions or set by the run: num_gpu, rank'),
                     ('warning', f'--config {path}: unknown keys (not tiny.py flags, ignored): foo, bar')]


def test_a_weight_source_on_the_command_line_replaces_the_files(tmp_path):
    _, args, notes = _parse(tmp_path, 'pretrained: true\n', '--initial-checkpoint', 's.pth')
    assert (args.initial_checkpoint, args.pretrained) == ('s.pth', False)
    assert notes == [('info', 'student weights: --initial-checkpoint on the command line replaces "pretrained" of '
                              'the config file')]
    _, args, notes = _parse(tmp_path, 'pretrained: true\n', '--name', 'x')
    assert args.pretrained is True and notes == []
