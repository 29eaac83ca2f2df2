"""Command line of train.py: `parse_train_args(argv)` puts together the flag tables (`train_flags`), the YAML file
given with `-c` (`config_file`) and the rules across flags (`flag_rules`).

Bad values (wrong type, out of range, unknown choice, flags that exclude each other) end in `parser.error`: one
line naming the flag or key, exit code 2.
"""
import argparse
import math
from typing import List, Optional, Sequence, Tuple

import yaml

from .config_file import Note, parse_with_config
from .flag_rules import check_train_args
from .train_flags import build_train_parser

__all__ = ['parse_train_args', 'args_to_yaml', 'resolve_lr']


def parse_train_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str, List[Note]]:
    """Parse train.py's command line (`sys.argv[1:]` when `argv` is None), YAML defaults first.

    Returns the arguments (derived defaults resolved), the YAML text for `args.yaml` (what the user set, before
    any derived default is resolved, so a re-launch with other flags resolves them afresh), and notes for the
    log as (level, message).
    """
    parser, args, notes = parse_with_config(build_train_parser, argv)
    text = args_to_yaml(args)
    check_train_args(parser, args)
    return args, text, notes


def args_to_yaml(args: argparse.Namespace) -> str:
    """The flags of a run as YAML that `-c` reads back (only parser keys, so it reloads without a warning)."""
    values = vars(args)
    keys = list(dict.fromkeys(a.dest for a in build_train_parser()._actions if a.dest != 'help'))
    return yaml.safe_dump({k: values[k] for k in keys if k in values}, default_flow_style=False, sort_keys=False)


def resolve_lr(args: argparse.Namespace, world_size: int, batch_size: Optional[float] = None) -> float:
    """timm's rule: --lr when given, else --lr-base scaled by the global batch over --lr-base-size.

    `batch_size` replaces --batch-size (the policy-average batch of scheduled resolution training).
    """
    if args.lr is not None:
        return args.lr
    global_batch = (batch_size or args.batch_size) * world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    return args.lr_base * (math.sqrt(ratio) if scale == 'sqrt' else ratio)
