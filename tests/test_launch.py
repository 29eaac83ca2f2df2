"""The launch commands README shows, run from a fresh clone: they use the project's environment, not python3.

The clone is `git clone` of this checkout (so it holds the committed files only: commit before running this file
while developing). `make setup` is not run here (it would install packages); its result, `.venv`, is a symlink to
the environment running the tests, which has everything `make setup` installs.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, TINY_STUDENT

pytestmark = pytest.mark.slow  # fresh clones and scripts in subprocesses

# Variables that would choose the interpreter behind the scripts' back.
ENV_CHOOSERS = ('PYTHON', 'VIRTUAL_ENV', 'CONDA_PREFIX', 'PYTHONPATH', 'PYTHONHOME')


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_CHOOSERS}
    return dict(env, OMP_NUM_THREADS='1', **extra)


@pytest.fixture(scope='module')
def clone(tmp_path_factory) -> str:
    """A fresh clone of this checkout with `.venv` pointing at the test environment (what `make setup` makes)."""
    if not os.path.exists(os.path.join(ROOT, '.git')):
        pytest.skip('not a git checkout')
    dest = str(tmp_path_factory.mktemp('clone') / 'tokenmix')
    subprocess.run(['git', 'clone', '--quiet', ROOT, dest], check=True)
    if sys.prefix != sys.base_prefix:  # a virtualenv: the same layout as make setup's, activate script included
        os.symlink(sys.prefix, os.path.join(dest, '.venv'))
    else:
        os.makedirs(os.path.join(dest, '.venv', 'bin'))
        os.symlink(sys.executable, os.path.join(dest, '.venv', 'bin', 'python'))
    return dest


@pytest.mark.parametrize('chooser,expected', [
    ({}, '{repo}/.venv/bin/python'),
    ({'VIRTUAL_ENV': '{venv}'}, '{venv}/bin/python'),
    ({'VIRTUAL_ENV': '{venv}', 'PYTHON': '/opt/py'}, '/opt/py'),
    ({'CONDA_PREFIX': '{venv}'}, '{repo}/.venv/bin/python'),
])
def test_python_env_picks_the_project_environment(chooser, expected, tmp_path):
    repo, venv = tmp_path / 'repo', tmp_path / 'venv'
    for python in (repo / '.venv' / 'bin' / 'python', venv / 'bin' / 'python'):
        python.parent.mkdir(parents=True)
        python.write_text('#!/bin/sh\n')
        python.chmod(0o755)
    env = _clean_env(**{k: v.format(venv=venv) for k, v in chooser.items()}, REPO=str(repo))
    lib = os.path.join(ROOT, 'scripts', 'python_env.sh')
    proc = subprocess.run(['bash', '-c', f'source {lib}; echo "$PYTHON"'], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected.format(repo=repo, venv=venv)


def test_without_an_environment_the_scripts_stop_with_one_line(tmp_path):
    repo = tmp_path / 'repo'
    repo.mkdir()
    for script in ('distributed_train.sh', os.path.join('scripts', 'deit_main_table.sh')):
        (repo / script).parent.mkdir(exist_ok=True)
        (repo / script).write_text(open(os.path.join(ROOT, script)).read())
    for lib in ('lib.sh', 'python_env.sh'):
        (repo / 'scripts' / lib).write_text(open(os.path.join(ROOT, 'scripts', lib)).read())
    for script in ('distributed_train.sh', 'scripts/deit_main_table.sh'):
        proc = subprocess.run(['bash', str(repo / script), '1', '/data'], env=_clean_env(), capture_output=True,
                              text=True)
        assert proc.returncode == 2
        assert proc.stderr.count('\n') == 1 and 'no Python environment' in proc.stderr and 'make setup' in proc.stderr


def test_distributed_train_from_a_fresh_clone_as_readme_shows(clone, tiny_data, tmp_path):
    """README: `. .venv/bin/activate`, then `./distributed_train.sh 2 --data-dir ...` (2 processes, gloo, CPU)."""
    out = tmp_path / 'out'
    train = ['./distributed_train.sh', '2', '--data-dir', tiny_data, *TINY_STUDENT, '-b', '8', '--epochs', '1',
             '--warmup-epochs', '0', '--workers', '0', '--device', 'cpu', '--output', str(out),
             '--experiment', 'run', '--log-interval', '1']
    activate = '. .venv/bin/activate && ' if os.path.exists(os.path.join(clone, '.venv', 'bin', 'activate')) else ''
    proc = subprocess.run(['bash', '-c', activate + shlex.join(train)], cwd=clone, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (out / 'run' / 'log.txt').read_text()
    assert 'train epoch 0 [3/3] loss ' in log  # 60 images, 8 per process and step, 2 processes: 3 steps (1 process: 7)
    assert (out / 'run' / 'last.pth.tar').exists()


def test_table_script_from_a_fresh_clone_uses_its_venv(clone):
    """README: `DRY_RUN=1 scripts/<table>.sh NUM_GPUS DATA_DIR` after make setup, without activating .venv."""
    proc = subprocess.run(['scripts/deit_small_400ep.sh', '8', '/data/imagenet', '/runs'], cwd=clone,
                          env=_clean_env(DRY_RUN='1'), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith('+ ')]
    python = os.path.join(clone, '.venv', 'bin', 'python')
    train, validate = commands[0], commands[1]
    assert train[:3] == ['env', f'PYTHON={python}', os.path.join(clone, 'distributed_train.sh')]
    assert validate[:2] == [python, os.path.join(clone, 'validate.py')]


ENTRY_POINTS = ['train.py', 'validate.py', 'benchmarks/attention_entropy.py', 'benchmarks/bench_mixup.py',
                'benchmarks/bench_train.py', 'benchmarks/map_fidelity.py', 'tools/precompute_teacher_maps.py',
                'tools/show_cam.py', 'tools/show_mix.py', 'tools/timm_parity.py']


# One interpreter runs every entry point in turn (one import of torch and timm, not ten): before each, sys.path is put
# back and every module loaded from this checkout (not its .venv) is dropped, so each script finds the project's modules
# by itself.
HELP_RUNNER = """
import contextlib, io, json, os, runpy, sys
root, site_dir, scripts = sys.argv[1], sys.argv[2], sys.argv[3:]
base_path, results = list(sys.path) + [site_dir], {}
for script in scripts:
    path = os.path.join(root, script)
    sys.path[:] = [os.path.dirname(path)] + base_path
    sys.argv = [path, '--help']
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name='__main__')
        except SystemExit as e:
            code = e.code
        except Exception as e:
            code, err = 1, io.StringIO(repr(e))
    results[script] = [code, out.getvalue()[:6], err.getvalue()[-2000:]]
    for name, module in list(sys.modules.items()):
        file = os.path.abspath(getattr(module, '__file__', None) or os.sep)
        if file.startswith(root + os.sep) and 'site-packages' not in file.split(os.sep):
            del sys.modules[name]
print(json.dumps(results))
"""


def test_scripts_run_from_a_checkout_that_was_not_pip_installed():
    """As on a machine that has the packages but not `pip install -e .` (the GPU machine): the interpreter starts
    without site's .pth files, so the editable install's import hook is absent, and runs each file as `python FILE`."""
    site_dirs = [p for p in sys.path if p.endswith('site-packages')]
    proc = subprocess.run([sys.executable, '-S', '-c', HELP_RUNNER, ROOT, site_dirs[0], *ENTRY_POINTS],
                          capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert list(results) == ENTRY_POINTS
    for script, (code, start, err) in results.items():
        assert code == 0 and start == 'usage:', f'{script}: exit {code}, {err}'


def test_help_runner_drops_the_checkouts_modules_between_scripts(tmp_path):
    """A script that imports a module beside another script only finds it when its own folder is on the path."""
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    (tmp_path / 'a' / 'helper.py').write_text('')
    for folder in ('a', 'b'):
        (tmp_path / folder / 'main.py').write_text('import argparse, helper\nargparse.ArgumentParser().parse_args()\n')
    proc = subprocess.run([sys.executable, '-S', '-c', HELP_RUNNER, str(tmp_path), '', 'a/main.py', 'b/main.py'],
                          capture_output=True, text=True, timeout=60)
    results = json.loads(proc.stdout.splitlines()[-1])
    assert results['a/main.py'][:2] == [0, 'usage:']
    assert results['b/main.py'][0] == 1 and 'helper' in results['b/main.py'][2]
