"""Mutation testing of the core modules with mutmut (`make mutation`): score per module and the surviving mutants.

Each module is mutated in its own scratch copy of the repository (default output/mutation/<module>), so the working
tree is never touched, and tested with the suites listed for it in MODULES: mutmut runs them once instrumented, then
for each mutant only the tests that call the mutated function. Lines that only build error-message text or log
lines are not mutated (tests pin what a message names, not its wording). mutmut leaves decorated functions alone
(`@torch.no_grad()`: `evaluate`, `Teacher.forward`, `Teacher.own_class_maps`); docs/mutation.md lists the
hand-made mutants that cover them.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> (the files mutated for it, the test files that cover it); its score is over all of its files
MODULES = {
    'models/teacher.py': (['models/teacher.py'],
                          ['tests/test_teacher.py', 'tests/test_tiny_models.py', 'tests/test_models_checkpoint_io.py',
                           'tests/test_teacher_maps.py']),
    'models/checkpoint_io.py': (['models/checkpoint_io.py'],
                                ['tests/test_models_checkpoint_io.py', 'tests/test_teacher.py', 'tests/test_faults.py']),
    'tokenmix_train/checkpoint.py': (['tokenmix_train/checkpoint.py'],
                               ['tests/test_checkpoint.py', 'tests/test_train_resume.py', 'tests/test_faults.py']),
    'tokenmix_train/evaluate.py': (['tokenmix_train/evaluate.py'],
                             ['tests/test_evaluate.py', 'tests/test_validate.py', 'tests/test_validate_flags.py']),
    'tokenmix_train/occlusion.py': (['tokenmix_train/occlusion.py'], ['tests/test_validate.py']),
    'tokenmix_train/fidelity.py': (['tokenmix_train/fidelity.py'], ['tests/test_fidelity.py']),
    'mixup_ext': (['mixup_ext/masks.py', 'mixup_ext/targets.py', 'mixup_ext/tokenmix.py', 'mixup_ext/maps.py',
                   'mixup_ext/_rng.py'],
                  ['tests/test_mixup_ext.py', 'tests/test_fidelity.py', 'tests/test_teacher_maps.py']),
}
GOALS = {'mixup_ext': 90.0}
DEFAULT_GOAL = 80.0
# the packages mutmut copies (with tests/) into its mutants folder, and what the tests load besides them
SOURCE_PATHS = ['mixup_ext', 'models', 'tokenmix_train']
ALSO_COPY = ['train.py', 'validate.py', 'tools', 'configs', 'scripts', 'benchmarks']
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
                f'do_not_mutate_patterns ={listed(NO_MUTATE_LINES)}\n'
                f'also_copy ={listed(ALSO_COPY)}\n'
                'process_isolation = forkserver\n')


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


def report(results: Dict[str, Dict[str, str]], works: Dict[str, str], minutes: Dict[str, float], path: str) -> bool:
    """Print the score table and write the surviving mutants' diffs to `path`; True when every module meets its goal."""
    ok = True
    print(f'\nmutation scores (mutmut; killed includes timeouts; other: no test reaches the function):')
    print(f'{"module":26s} {"mutants":>7s} {"killed":>7s} {"survived":>8s} {"other":>6s} {"score":>7s} {"goal":>5s} '
          f'{"minutes":>7s}')
    survivors = []
    for module, by_name in results.items():
        counts = Counter(by_name.values())
        killed = counts['killed'] + counts['timeout'] + counts['caught by type check']
        total = len(by_name)
        score = 100.0 * killed / total if total else float('nan')
        goal = GOALS.get(module, DEFAULT_GOAL)
        ok &= total > 0 and score >= goal
        other = total - killed - counts['survived']
        print(f'{module:26s} {total:7d} {killed:7d} {counts["survived"]:8d} {other:6d} {score:6.1f}% {goal:4.0f}% '
              f'{minutes[module]:7.1f}')
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
        counts = Counter(by_name.values())
        print(f'{module}: {counts["killed"] + counts["timeout"]} of {len(by_name)} killed in {minutes[module]:.1f} min',
              flush=True)
    return 0 if report(results, works, minutes, os.path.join(os.path.abspath(args.work), 'survivors.txt')) else 1


if __name__ == '__main__':
    sys.exit(main())
