"""Reading `-c FILE.yaml`: its values become the parser's defaults, and the command line still overrides them.

Any `args.yaml` written by timm's train.py or by this one loads. `IGNORED_KEYS` are the keys of every earlier timm
train.py parser (from the history of huggingface/pytorch-image-models' train.py) that the current one dropped, plus
values a timm-derived script stores about the run itself: they are ignored with one note; other unknown keys with
one warning naming them all. A value of the wrong type, outside the flag's choices, or null where the flag needs a
value ends in `parser.error` naming the key (one line, exit code 2). Booleans are only true/false.
"""
import argparse
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import yaml
from timm.utils import ParseKwargs

__all__ = ['Note', 'IGNORED_KEYS', 'WEIGHT_SOURCES', 'parse_with_config']

Note = Tuple[str, str]  # (log level, message): what the file's keys changed or left out, for the run's log

OLD_TIMM_KEYS = frozenset((
    'alpha_kd', 'amp_impl', 'aot_autograd', 'aug_repeat', 'bn_tf', 'dynamo', 'dynamo_backend', 'initial_batch_size',
    'iters_to_accum', 'jsd', 'milestones', 'mixup_elem', 'native_amp', 'num_gpu', 'reduce_bn', 'repp',
    'use_kd_only_loss', 'use_wandb', 'validation_batch_size_multiplier', 'wandb_project_name',
))
RUN_STATE_KEYS = frozenset(('prefetcher', 'distributed', 'world_size', 'rank'))
IGNORED_KEYS = OLD_TIMM_KEYS | RUN_STATE_KEYS

# model -> the flags that each give it weights; one given on the command line switches off the others from -c
WEIGHT_SOURCES: Dict[str, Tuple[str, ...]] = {
    'student': ('initial_checkpoint', 'pretrained'),
    'teacher': ('teacher_checkpoint', 'teacher_pretrained', 'teacher_maps'),
}


class _StrictLoader(yaml.SafeLoader):
    """YAML whose booleans are only true/false (YAML 1.1 also reads yes/no/on/off as booleans)."""


_BOOL_TAG = 'tag:yaml.org,2002:bool'
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r'^(?:true|True|TRUE|false|False|FALSE)$'), list('tTfF'))


def _is_bool_action(action: argparse.Action) -> bool:
    return isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction))


def _coerce(action: argparse.Action, value: Any) -> Tuple[Any, Optional[str]]:
    """A YAML value as the flag would have parsed it, or (None, what is wrong).

    null is taken only where the flag's own default is None (timm writes those flags as null in its args.yaml).
    """
    if value is None:
        return None, (None if action.default is None else f'needs a value, got null (default: {action.default!r})')
    if _is_bool_action(action):
        return (value, None) if isinstance(value, bool) else (None, f'expects true or false, got {value!r}')
    if isinstance(action, ParseKwargs):
        return (value, None) if isinstance(value, dict) else (None, f'expects a mapping of key: value, got {value!r}')
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if many != isinstance(value, list):
        return None, (f'expects a list, got {value!r}' if many else f'expects one value, got a list {value!r}')
    kind = action.type or str
    name = {int: 'an integer', float: 'a number', str: 'text'}.get(kind, getattr(kind, '__name__', 'a value'))

    def one(v: Any) -> Any:
        if isinstance(v, (bool, list, dict)) or (kind is int and isinstance(v, float)):
            raise ValueError
        return kind(v)

    try:
        value = [one(v) for v in value] if many else one(value)
    except (TypeError, ValueError):
        return None, f'expects {name}, got {value!r}'
    if isinstance(action.nargs, int) and len(value) != action.nargs:
        return None, f'expects {action.nargs} values, got {len(value)}'
    for v in value if many else [value]:
        if action.choices is not None and v not in action.choices:
            return None, f'{v!r} is not one of {sorted(action.choices)}'
    return value, None


def _read_yaml(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            cfg = yaml.load(f, Loader=_StrictLoader) or {}
    except OSError as e:
        parser.error(f'--config {path}: {e.strerror}')
    except yaml.YAMLError as e:
        parser.error(f'--config {path}: not valid YAML ({" ".join(str(e).split())})')
    if not isinstance(cfg, dict):
        parser.error(f'--config {path}: expected a mapping of flag names to values')
    return cfg


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> Tuple[Dict[str, Any], List[Note]]:
    """Flag defaults from a YAML file, and notes on the keys it ignores (one line per kind)."""
    actions: Dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest != 'help':
            actions.setdefault(action.dest, action)
    defaults, legacy, unknown = {}, [], []
    for key, value in _read_yaml(parser, path).items():
        dest = str(key).replace('-', '_')
        if dest in actions:
            defaults[dest], problem = _coerce(actions[dest], value)
            if problem:
                parser.error(f'--config {path}: key "{key}" {problem}')
        elif dest in IGNORED_KEYS:
            legacy.append(str(key))
        else:
            unknown.append(str(key))
    notes: List[Note] = []
    if legacy:
        notes.append(('info', f'--config {path}: ignored keys of older timm versions or set by the run: '
                              f'{", ".join(legacy)}'))
    if unknown:
        notes.append(('warning', f'--config {path}: unknown keys (not {parser.prog} flags, ignored): '
                                 f'{", ".join(unknown)}'))
    return defaults, notes


def _given_on_command_line(build_parser: Callable[[], argparse.ArgumentParser],
                           argv: Optional[Sequence[str]]) -> Set[str]:
    """The dests that `argv` itself sets (not the YAML, not the defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(parser.parse_known_args(argv)[0]))


def _prefer_command_line_weights(args: argparse.Namespace, given: Set[str], from_yaml: Set[str]) -> List[Note]:
    """A weights source given on the command line switches off another source set by the YAML for that model."""
    notes: List[Note] = []
    for model, sources in WEIGHT_SOURCES.items():
        chosen = [s for s in sources if s in given and getattr(args, s)]
        for other in sources:
            if chosen and other not in chosen and other in from_yaml and other not in given and getattr(args, other):
                setattr(args, other, False if isinstance(getattr(args, other), bool) else '')
                notes.append(('info', f'{model} weights: --{chosen[0].replace("_", "-")} on the command line replaces '
                                      f'"{other}" of the config file'))
    return notes


def parse_with_config(build_parser: Callable[[], argparse.ArgumentParser], argv: Optional[Sequence[str]]
                      ) -> Tuple[argparse.ArgumentParser, argparse.Namespace, List[Note]]:
    """Parse `argv` (`sys.argv[1:]` when None) with a parser from `build_parser`, the values of the file given with
    `-c/--config` as its defaults.

    Returns the parser (its `error` serves the rules checked next), the arguments and notes on the file's ignored
    keys and on the weight sources that the command line put in place of the file's.
    """
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str)
    known, _ = config_parser.parse_known_args(argv)
    notes: List[Note] = []
    from_yaml: Dict[str, Any] = {}
    if known.config:
        from_yaml, notes = _yaml_defaults(parser, known.config)
        parser.set_defaults(**from_yaml)
    args = parser.parse_args(argv)
    if known.config:
        notes += _prefer_command_line_weights(args, _given_on_command_line(build_parser, argv), set(from_yaml))
    return parser, args, notes
