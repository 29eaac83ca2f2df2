"""Mutation testing of the core modules with mutmut (`make mutation`): score per module and the surviving mutants.

The repository's tracked files are copied to a scratch folder (default output/mutation) where mutmut writes its
mutants, so the working tree is never touched. mutmut runs the tests that call a mutated function, found by one
instrumented run of the suites listed in TESTS, so each module is checked only by the tests that cover it. Lines
that only build error-message text or log lines are not mutated (tests pin what a message names, not its wording).
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

# module -> the files mutated for it; its score is over all of them
MODULES = {
    'mixup_ext': ['mixup_ext/masks.py', 'mixup_ext/targets.py', 'mixup_ext/tokenmix.py', 'mixup_ext/_rng.py'],
    'models/teacher.py': ['models/teacher.py'],
    'models/checkpoint_io.py': ['models/checkpoint_io.py'],
    'tokenmix/checkpoint.py': ['tokenmix/checkpoint.py'],
    'tokenmix/evaluate.py': ['tokenmix/evaluate.py'],
    'tokenmix/occlusion.py': ['tokenmix/occlusion.py'],
    'tokenmix/fidelity.py': ['tokenmix/fidelity.py'],
}
GOALS = {'mixup_ext': 90.0}
DEFAULT_GOAL = 80.0
# the in-process test suites that exercise those modules (the whole-pipeline runs in subprocesses add nothing here)
TESTS = ['tests/test_mixup_ext.py', 'tests/test_fidelity.py', 'tests/test_teacher.py',
         'tests/test_models_checkpoint_io.py', 'tests/test_tiny_models.py', 'tests/test_train_evaluate.py',
         'tests/test_train_resume.py', 'tests/test_validate.py']
# lines that only hold message text: a raise with its message, a string continuation line, a log call
NO_MUTATE_LINES = [r'^\s*raise \w+\(', r'^\s*f?[\'"].*[\'"],?\)*( from \w+)?$', r'_logger\.\w+\(']


def tracked_files() -> List[str]:
    """Files git tracks plus untracked ones it does not ignore (new tests in a working tree)."""
    out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [p for p in out.split('\0') if p and os.path.isfile(os.path.join(ROOT, p))]


def write_config(work: str, modules: List[str]) -> None:
    mutated = [path for m in modules for path in MODULES[m]]
    tests = [t for t in TESTS if os.path.isfile(os.path.join(work, t))]

    def listed(values: List[str]) -> str:
        return ''.join(f'\n    {v}' for v in values)

    with open(os.path.join(work, 'setup.cfg'), 'w') as f:
        f.write('[mutmut]\n'
                f'source_paths ={listed(["mixup_ext", "models", "tokenmix"])}\n'
                f'only_mutate ={listed(mutated)}\n'
                f'pytest_add_cli_args_test_selection ={listed(tests)}\n'
                f'do_not_mutate_patterns ={listed(NO_MUTATE_LINES)}\n'
                'process_isolation = forkserver\n')


def prepare(work: str, modules: List[str]) -> None:
    if os.path.isdir(work):
        shutil.rmtree(work)
    for rel in tracked_files():
        dst = os.path.join(work, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dst)
    with open(os.path.join(work, 'pyproject.toml')) as f:  # mutmut reads pyproject's [tool.mutmut] before setup.cfg
        if '[tool.mutmut]' in f.read():
            raise SystemExit('pyproject.toml has a [tool.mutmut] table: tools/mutation.py writes its own setup.cfg')
    write_config(work, modules)


def statuses(work: str, modules: List[str]) -> Dict[str, Dict[str, str]]:
    """mutant name -> status, per module, read from mutmut's result files."""
    from mutmut.stats import status_by_exit_code
    out = {}
    for module in modules:
        out[module] = {}
        for path in MODULES[module]:
            meta = os.path.join(work, 'mutants', path + '.meta')
            if not os.path.isfile(meta):
                continue
            with open(meta) as f:
                codes = json.load(f)['exit_code_by_key']
            out[module].update({name: status_by_exit_code[code] for name, code in codes.items()})
    return out


def report(results: Dict[str, Dict[str, str]], work: str, seconds: float) -> bool:
    """Print the score table and write the surviving mutants' diffs; True when every module meets its goal."""
    ok = True
    print(f'\nmutation scores (mutmut, {seconds / 60:.1f} min):')
    print(f'{"module":26s} {"mutants":>7s} {"killed":>7s} {"survived":>8s} {"other":>6s} {"score":>7s} {"goal":>5s}')
    survivors = []
    for module, by_name in results.items():
        counts = Counter(by_name.values())
        killed = counts['killed'] + counts['timeout'] + counts['caught by type check']
        total = len(by_name)
        score = 100.0 * killed / total if total else float('nan')
        goal = GOALS.get(module, DEFAULT_GOAL)
        ok &= total > 0 and score >= goal
        other = total - killed - counts['survived']
        print(f'{module:26s} {total:7d} {killed:7d} {counts["survived"]:8d} {other:6d} {score:6.1f}% {goal:4.0f}%')
        survivors += sorted(name for name, status in by_name.items() if status not in ('killed', 'timeout'))
    path = os.path.join(work, 'survivors.txt')
    with open(path, 'w') as f:
        for name in survivors:
            diff = subprocess.run([sys.executable, '-m', 'mutmut', 'show', name], cwd=work, capture_output=True,
                                  text=True).stdout
            f.write(diff + '\n')
    print(f'{len(survivors)} mutants not killed; their diffs: {path}')
    return ok


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--modules', nargs='+', choices=list(MODULES), default=list(MODULES))
    parser.add_argument('--work', default=os.path.join(ROOT, 'output', 'mutation'),
                        help='scratch folder (deleted and rewritten)')
    parser.add_argument('--jobs', type=int, default=os.cpu_count() or 1, help='mutants tested at once')
    args = parser.parse_args(argv)
    work = os.path.abspath(args.work)
    prepare(work, args.modules)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH='')
    start = time.perf_counter()
    with open(os.path.join(work, 'mutmut.log'), 'w') as log:
        code = subprocess.run([sys.executable, '-m', 'mutmut', 'run', '--max-children', str(args.jobs)], cwd=work,
                              env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        print(f'mutmut failed (exit code {code}); see {os.path.join(work, "mutmut.log")}', file=sys.stderr)
        return 1
    return 0 if report(statuses(work, args.modules), work, seconds) else 1


if __name__ == '__main__':
    sys.exit(main())
