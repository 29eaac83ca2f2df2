#!/usr/bin/env python3
"""Compare this repository's train.py flags with timm's train.py, and dump timm's defaults as an args.yaml.

timm's train.py is not an installed module: pass its file (e.g. `git show HEAD:train.py > /tmp/timm_train.py` in
a clone of huggingface/pytorch-image-models). Its module level builds the parser; `main()` is not run.

    python tools/timm_parity.py diff /tmp/timm_train.py          # flags of timm's parser missing here
    python tools/timm_parity.py yaml /tmp/timm_train.py OUT.yaml  # timm's defaults, as its args.yaml holds them
    python tools/timm_parity.py flags /tmp/timm_train.py OUT.txt  # timm's option strings, one a line

tests/data/timm_train_defaults_args.yaml and tests/data/timm_train_flags.txt were made this way.
"""
import argparse
import os
import runpy
import sys
from typing import List, Optional, Sequence

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenmix_train.train_flags import build_train_parser  # noqa: E402


def timm_parser(path: str) -> argparse.ArgumentParser:
    """The `parser` that timm's train.py builds at module level."""
    return runpy.run_path(path, run_name='timm_train')['parser']


def option_strings(parser: argparse.ArgumentParser) -> List[str]:
    return sorted({s for a in parser._actions for s in a.option_strings if s not in ('-h', '--help')})


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('command', choices=('diff', 'yaml', 'flags'))
    parser.add_argument('timm_train', help="path to timm's train.py")
    parser.add_argument('out', nargs='?', help='output file (yaml and flags commands)')
    args = parser.parse_args(argv)
    theirs = timm_parser(args.timm_train)
    if args.command != 'diff' and not args.out:
        parser.error(f'{args.command} needs an output file')
    if args.command == 'flags':
        with open(args.out, 'w') as f:
            f.write(''.join(f'{s}\n' for s in option_strings(theirs)))
        return 0
    if args.command == 'yaml':
        defaults = vars(theirs.parse_args([]))
        with open(args.out, 'w') as f:
            yaml.safe_dump(defaults, f, default_flow_style=False)  # as timm's _parse_args writes args.yaml
        print(f'{len(defaults)} keys written to {args.out}')
        return 0
    ours = set(option_strings(build_train_parser()))
    timm_flags = option_strings(theirs)
    missing = [s for s in timm_flags if s not in ours]
    print(f"timm's train.py: {len(timm_flags)} option strings ({len(theirs._actions) - 1} arguments); "
          f'accepted here: {len(timm_flags) - len(missing)}; missing: {len(missing)}')
    for s in missing:
        print(f'  missing {s}')
    return 1 if missing else 0


if __name__ == '__main__':
    sys.exit(main())
