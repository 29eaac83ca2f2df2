"""Mutation testing of the core modules with mutmut (`make mutation`): score per module and the surviving mutants.

Each module is mutated in its own scratch copy of the repository (default output/mutation/<module>), so the working
tree is never touched, and tested with the suites listed for it in MODULES: mutmut runs them once instrumented, then
for each mutant only the tests that call the mutated function. Lines that only build error-message text or log
lines are not mutated (tests pin what a message names, not its wording). mutmut leaves decorated functions alone,
so in the scratch copy a grad-mode decorator (`@torch.no_grad()`: `evaluate`, `Teacher.forward`,
`Teacher.own_class_maps`) becomes a `with` block around the function's body, which mutmut then mutates.
"""
import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
import tokenize
from collections import Counter
from typing import Dict, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> (the files mutated for it, the test files that cover it); its score is over all of its files
MODULES = {
    'models/teacher.py': (['models/teacher.py'],
                          ['tests/test_teacher.py', 'tests/test_tiny_models.py', 'tests/test_models_checkpoint_io.py',
                           'tests/test_teacher_maps.py']),
    'models/checkpoint_io.py': (['models/checkpoint_io.py'],
                                ['tests/test_models_checkpoint_io.py', 'tests/test_teacher.py',
                                 'tests/test_faults.py']),
    'tokenmix_train/checkpoint.py': (['tokenmix_train/checkpoint.py'],
                                     ['tests/test_checkpoint.py', 'tests/test_train_relaunch.py',
                                      'tests/test_engine.py', 'tests/test_train_resume.py', 'tests/test_faults.py']),
    'tokenmix_train/evaluate.py': (['tokenmix_train/evaluate.py'],
                                   ['tests/test_evaluate.py', 'tests/test_validate.py',
                                    'tests/test_validate_flags.py']),
    'tokenmix_train/occlusion.py': (['tokenmix_train/occlusion.py'], ['tests/test_validate.py']),
    'tokenmix_train/fidelity.py': (['tokenmix_train/fidelity.py'], ['tests/test_fidelity.py']),
    'tokenmix_train/mixing.py': (['tokenmix_train/mixing.py'],
                                 ['tests/test_mixing.py', 'tests/test_flag_coverage.py', 'tests/test_train_mixing.py']),
    'tokenmix_train/model.py': (['tokenmix_train/model.py'],
                                ['tests/test_model.py', 'tests/test_flag_coverage.py', 'tests/test_train_flags.py',
                                 'tests/test_train_initial_checkpoint.py']),
    'tokenmix_train/data.py': (['tokenmix_train/data.py'],
                               ['tests/test_data.py', 'tests/test_flag_coverage.py', 'tests/test_validate_flags.py']),
    'tokenmix_train/engine.py': (['tokenmix_train/engine.py'],
                                 ['tests/test_engine.py', 'tests/test_train_flags.py',
                                  'tests/test_train_accumulation.py', 'tests/test_faults.py']),
    'tokenmix_train/teacher_maps.py': (['tokenmix_train/teacher_maps.py'],
                                       ['tests/test_map_store.py', 'tests/test_aug_order.py',
                                        'tests/test_fast_augment.py', 'tests/test_mixing.py', 'tests/test_data.py',
                                        'tests/test_teacher_maps.py']),
    'tokenmix_train/results.py': (['tokenmix_train/results.py'],
                                  ['tests/test_results.py', 'tests/test_validate_flags.py', 'tests/test_validate.py']),
    'tokenmix_train/sampling.py': (['tokenmix_train/sampling.py'],
                                   ['tests/test_sampling.py', 'tests/test_preemption.py']),
    'tokenmix_train/preemption.py': (['tokenmix_train/preemption.py'], ['tests/test_preemption.py']),
    'mixup_ext': (['mixup_ext/masks.py', 'mixup_ext/targets.py', 'mixup_ext/tokenmix.py', 'mixup_ext/maps.py',
                   'mixup_ext/_rng.py'],
                  ['tests/test_mixup_ext.py', 'tests/test_fidelity.py', 'tests/test_teacher_maps.py']),
}
# modules tested without the tests marked slow: their whole runs (subprocesses aside, which mutmut does not count) cost
# a minute a surviving mutant, and the module's own in-process tests reach every function they reach
FAST_TESTS_ONLY = {'tokenmix_train/engine.py', 'tokenmix_train/model.py', 'tokenmix_train/data.py'}
GOALS = {'mixup_ext': 90.0, 'tokenmix_train/mixing.py': 85.0, 'tokenmix_train/model.py': 85.0,
         'tokenmix_train/data.py': 85.0, 'tokenmix_train/engine.py': 85.0, 'tokenmix_train/teacher_maps.py': 85.0,
         'tokenmix_train/results.py': 85.0, 'tokenmix_train/sampling.py': 85.0, 'tokenmix_train/preemption.py': 85.0}
DEFAULT_GOAL = 80.0
# the packages mutmut copies (with tests/) into its mutants folder, and what the tests load besides them
SOURCE_PATHS = ['mixup_ext', 'models', 'tokenmix_train']
ALSO_COPY = ['train.py', 'validate.py', 'tools', 'configs', 'scripts', 'benchmarks']
# decorators that only set torch's grad mode for the call: the same as a `with` block around the body
IN_BODY_DECORATORS = ('torch.no_grad()', 'torch.inference_mode()', 'torch.enable_grad()')
# lines that only hold message text: a raise with its message, a string continuation line, a log call
NO_MUTATE_LINES = [r'^\s*raise \w+\(', r'^\s*f?[\'"].*[\'"],?\)*( from \w+)?$', r'_logger\.\w+\(']


def tracked_files() -> List[str]:
    """Files git tracks plus untracked ones it does not ignore (new tests in a working tree)."""
    out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [p for p in out.split('\0') if p and os.path.isfile(os.path.join(ROOT, p))]


def write_config(work: str, module: str) -> None:
    mutated, tests = MODULES[module]
    tests = [t for t in tests if os.path.isfile(os.path.join(work, t))]  # a suite another branch may add

    def listed(values: List[str]) -> str:
        return ''.join(f'\n    {v}' for v in values)

    with open(os.path.join(work, 'setup.cfg'), 'w') as f:
        f.write('[mutmut]\n'
                f'source_paths ={listed(SOURCE_PATHS)}\n'
                f'only_mutate ={listed(mutated)}\n'
                f'pytest_add_cli_args_test_selection ={listed(tests)}\n'
                + (f'pytest_add_cli_args ={listed(["-m", "not slow"])}\n' if module in FAST_TESTS_ONLY else '') +
                f'do_not_mutate_patterns ={listed(NO_MUTATE_LINES)}\n'
                f'also_copy ={listed(ALSO_COPY)}\n'
                'process_isolation = forkserver\n')


def _string_inner_lines(source: str) -> Set[int]:
    """Line numbers (1-based) inside a multi-line string after its first line: indenting them would change the text."""
    inner = set()
    for tok in tokenize.generate_tokens(iter(source.splitlines(keepends=True)).__next__):
        inner.update(range(tok.start[0] + 1, tok.end[0] + 1))
    return inner


def _after_docstring(node: ast.FunctionDef) -> List[ast.stmt]:
    """The statements of a function's body after its docstring."""
    return node.body[1:] if ast.get_docstring(node, clean=False) is not None else node.body


def _movable(node: ast.AST, lines: List[str]) -> bool:
    """A function whose one decorator is a grad-mode decorator on its own line, with statements on lines of their
    own after an optional docstring, and no `yield` (a decorated generator re-enters the mode at each resume; a
    `with` block would leave it set for the caller between yields)."""
    if not isinstance(node, ast.FunctionDef) or len(node.decorator_list) != 1:
        return False
    deco = node.decorator_list[0]
    if deco.lineno != deco.end_lineno or lines[deco.lineno - 1].strip() not in {'@' + d for d in IN_BODY_DECORATORS}:
        return False
    body = _after_docstring(node)
    return (bool(body) and body[0].lineno > node.lineno and body[0].col_offset > node.col_offset and
            not any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in ast.walk(node)))


def decorators_into_body(source: str) -> str:
    """`source` with each grad-mode decorator (IN_BODY_DECORATORS) of a function moved into its body as a `with`
    block after the docstring, so that mutmut 3, which skips decorated functions, mutates them; the call behaves
    the same. Functions that `_movable` refuses are left as they are."""
    while True:
        lines = source.splitlines(keepends=True)
        node = next((n for n in ast.walk(ast.parse(source)) if _movable(n, lines)), None)
        if node is None:
            return source
        body = _after_docstring(node)
        first = body[0].lineno - 1
        indent = lines[first][:body[0].col_offset]
        inner = _string_inner_lines(source)
        block = ['    ' + line if line.strip() and i + 1 not in inner else line
                 for i, line in enumerate(lines[first:node.end_lineno], start=first)]
        with_line = f'{indent}with {lines[node.decorator_list[0].lineno - 1].strip()[1:]}:\n'
        lines[first:node.end_lineno] = [with_line] + block
        del lines[node.decorator_list[0].lineno - 1]
        source = ''.join(lines)


def prepare(work: str, module: str) -> None:
    if os.path.isdir(work):
        shutil.rmtree(work)
    for rel in tracked_files():
        dst = os.path.join(work, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dst)
    with open(os.path.join(work, 'pyproject.toml')) as f:  # mutmut reads pyproject's [tool.mutmut] before setup.cfg
        if '[tool.mutmut]' in f.read():
            raise SystemExit('pyproject.toml has a [tool.mutmut] table: tools/mutation.py writes its own setup.cfg')
    for rel in MODULES[module][0]:
        with open(os.path.join(work, rel)) as f:
            source = f.read()
        with open(os.path.join(work, rel), 'w') as f:
            f.write(decorators_into_body(source))
    write_config(work, module)


def statuses(work: str, module: str) -> Dict[str, str]:
    """mutant name -> status, read from mutmut's result files."""
    from mutmut.stats import status_by_exit_code
    out = {}
    for path in MODULES[module][0]:
        meta = os.path.join(work, 'mutants', path + '.meta')
        if os.path.isfile(meta):
            with open(meta) as f:
                out.update({name: status_by_exit_code[code] for name, code in json.load(f)['exit_code_by_key'].items()})
    return out


def run_module(module: str, work: str, jobs: int) -> Optional[Dict[str, str]]:
    """Mutate one module in its own scratch folder and test it with its own tests; None when mutmut fails."""
    prepare(work, module)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH='')
    with open(os.path.join(work, 'mutmut.log'), 'w') as log:
        code = subprocess.run([sys.executable, '-m', 'mutmut', 'run', '--max-children', str(jobs)], cwd=work, env=env,
                              stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f'{module}: mutmut failed (exit code {code}); see {os.path.join(work, "mutmut.log")}', file=sys.stderr)
        return None
    return statuses(work, module)


def tally(by_name: Dict[str, str]) -> Dict[str, int]:
    """Counts of one module's mutants: killed (a test failed; a type check counts too), timeout (a test ran past
    mutmut's limit: an endless loop, or a slow machine), survived, other (no test reaches the function, segfault,
    not checked), all."""
    counts = Counter(by_name.values())
    out = {'killed': counts['killed'] + counts['caught by type check'], 'timeout': counts['timeout'],
           'survived': counts['survived'], 'all': len(by_name)}
    out['other'] = out['all'] - out['killed'] - out['timeout'] - out['survived']
    return out


def report(results: Dict[str, Dict[str, str]], works: Dict[str, str], minutes: Dict[str, float], path: str) -> bool:
    """Print the score table and write the surviving mutants' diffs to `path`; True when every module meets its goal.

    The score is killed / all: a timeout is shown apart and not counted, since on a loaded machine a correct
    mutant can time out too."""
    ok = True
    print('\nmutation scores (mutmut; score = killed / all; other: no test reaches the function, segfault, ...):')
    print(f'{"module":30s} {"mutants":>7s} {"killed":>7s} {"timeout":>7s} {"survived":>8s} {"other":>6s} '
          f'{"score":>7s} {"goal":>5s} {"minutes":>7s}')
    survivors = []
    for module, by_name in results.items():
        counts = tally(by_name)
        score = 100.0 * counts['killed'] / counts['all'] if counts['all'] else float('nan')
        goal = GOALS.get(module, DEFAULT_GOAL)
        ok &= counts['all'] > 0 and score >= goal
        print(f'{module:30s} {counts["all"]:7d} {counts["killed"]:7d} {counts["timeout"]:7d} {counts["survived"]:8d} '
              f'{counts["other"]:6d} {score:6.1f}% {goal:4.0f}% {minutes[module]:7.1f}')
        survivors += [(module, name) for name, status in sorted(by_name.items()) if status != 'killed' and
                      status != 'timeout']
    with open(path, 'w') as f:
        for module, name in survivors:
            diff = subprocess.run([sys.executable, '-m', 'mutmut', 'show', name], cwd=works[module],
                                  capture_output=True, text=True).stdout
            f.write(diff + '\n')
    print(f'{len(survivors)} mutants not killed; their diffs: {path}')
    return ok


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--modules', nargs='+', choices=list(MODULES), default=list(MODULES))
    parser.add_argument('--work', default=os.path.join(ROOT, 'output', 'mutation'),
                        help='scratch folder (its module folders are deleted and rewritten)')
    parser.add_argument('--jobs', type=int, default=os.cpu_count() or 1, help='mutants tested at once')
    args = parser.parse_args(argv)
    results, works, minutes = {}, {}, {}
    for module in args.modules:
        works[module] = os.path.join(os.path.abspath(args.work), module.replace('/', '_').replace('.py', ''))
        start = time.perf_counter()
        print(f'{module}: mutating in {works[module]}', flush=True)
        by_name = run_module(module, works[module], args.jobs)
        minutes[module] = (time.perf_counter() - start) / 60
        if by_name is None:
            return 1
        results[module] = by_name
        counts = tally(by_name)
        print(f'{module}: {counts["killed"]} killed, {counts["timeout"]} timed out of {counts["all"]} in '
              f'{minutes[module]:.1f} min', flush=True)
    return 0 if report(results, works, minutes, os.path.join(os.path.abspath(args.work), 'survivors.txt')) else 1


if __name__ == '__main__':
    sys.exit(main())
