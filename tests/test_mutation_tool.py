"""tools/mutation.py: what the scratch copy holds for mutmut and the configuration it writes (no mutants are run)."""
import os
import re

import torch
from conftest import ROOT, load_script

mutation = load_script(os.path.join('tools', 'mutation.py'))


def test_every_file_the_module_suites_open_is_copied_next_to_the_mutants():
    """A suite that runs a script of the repository (scripts/*.sh, benchmarks/*.py) fails mutmut's clean run when the
    script is not in mutmut's copy: then the whole module reports 'failed to collect stats' and no score."""
    suites = {test for _, tests in mutation.MODULES.values() for test in tests}
    needed = set()
    for test in suites:
        with open(os.path.join(ROOT, test)) as f:
            text = f.read()
        needed |= set(re.findall(r"os\.path\.join\(ROOT, '([^'/]+)'", text))
        needed |= set(re.findall(r"load_script\(os\.path\.join\('([^']+)'", text))
    assert {'scripts', 'tools'} <= needed  # what the suites open today
    missing = needed - set(mutation.SOURCE_PATHS) - {'tests'} - set(mutation.ALSO_COPY)
    assert not missing, f'add {sorted(missing)} to ALSO_COPY'


def test_config_names_the_module_its_tests_and_the_copied_files(tmp_path):
    (tmp_path / 'tests').mkdir()
    for name in ('test_teacher.py', 'test_tiny_models.py'):  # the other listed suites are absent from this copy
        (tmp_path / 'tests' / name).write_text('')
    mutation.write_config(str(tmp_path), 'models/teacher.py')
    text = (tmp_path / 'setup.cfg').read_text()
    assert text.startswith('[mutmut]\n')
    assert '\nonly_mutate =\n    models/teacher.py\n' in text
    assert '\npytest_add_cli_args_test_selection =\n    tests/test_teacher.py\n    tests/test_tiny_models.py\n' in text
    assert ''.join(f'\n    {p}' for p in mutation.ALSO_COPY) in text
    assert '\nsource_paths =\n    mixup_ext\n    models\n    tokenmix_train\n' in text
    assert text.endswith('process_isolation = forkserver\n')


GRAD_MODE_SOURCE = '''import torch


class Net(torch.nn.Module):
    @torch.no_grad()
    def forward(self, x):
        """Doubles a positive batch, negates another.
        Its multi-line text must not move."""
        text = """a
b"""
        if x.sum() > 0:
            return x * 2, text, torch.is_grad_enabled()
        return -x, text, torch.is_grad_enabled()


@torch.inference_mode()
def plain(x):
    return x + 1, torch.is_inference_mode_enabled()


@torch.no_grad()
def one_line(x): return x


@torch.no_grad()
def steps(x):
    yield torch.is_grad_enabled()
'''


def _load(source: str) -> dict:
    space = {}
    exec(compile(source, '<source>', 'exec'), space)
    return space


def test_grad_mode_decorators_become_a_with_block_that_behaves_the_same():
    """mutmut 3 skips decorated functions: in the scratch copy `@torch.no_grad()` turns into a `with` block after the
    docstring, so the function is mutated and still runs without autograd; a generator and a one-line body keep it."""
    rewritten = mutation.decorators_into_body(GRAD_MODE_SOURCE)
    assert '    def forward(self, x):\n        """Doubles' in rewritten
    assert 'move."""\n        with torch.no_grad():\n            text = """a\nb"""\n' in rewritten
    assert '\n            if x.sum() > 0:\n                return x * 2,' in rewritten
    assert 'def plain(x):\n    with torch.inference_mode():\n        return x + 1,' in rewritten
    assert '@torch.no_grad()\ndef one_line(x): return x\n' in rewritten
    assert '@torch.no_grad()\ndef steps(x):\n    yield' in rewritten
    before, after = _load(GRAD_MODE_SOURCE), _load(rewritten)
    x = torch.ones(2, requires_grad=True)
    for space in (before, after):
        assert space['Net'].forward.__doc__.endswith('another.\n        Its multi-line text must not move.')
        y, text, grad = space['Net']()(x)
        assert torch.equal(y, torch.full((2,), 2.0)) and not y.requires_grad and text == 'a\nb' and grad is False
        y, _, _ = space['Net']()(torch.full((2,), -3.0, requires_grad=True))
        assert torch.equal(y, torch.full((2,), 3.0)) and not y.requires_grad
        assert space['plain'](x)[1] is True
        assert list(space['steps'](x)) == [False]
    assert torch.is_grad_enabled()


def test_the_decorated_functions_of_the_mutated_files_are_rewritten():
    """evaluate and the teacher's two forwards are mutated: no grad-mode decorator is left in their scratch copy."""
    files = {path for paths, _ in mutation.MODULES.values() for path in paths if path.endswith('.py')}
    rewritten = 0
    for path in sorted(files):
        with open(os.path.join(ROOT, path)) as f:
            source = f.read()
        new = mutation.decorators_into_body(source)
        compile(new, path, 'exec')
        assert not any(line.strip() in {'@' + d for d in mutation.IN_BODY_DECORATORS} for line in new.splitlines())
        rewritten += new != source
    assert rewritten == 2  # tokenmix_train/evaluate.py and models/teacher.py


def test_fast_only_modules_leave_the_slow_tests_out(tmp_path):
    (tmp_path / 'tests').mkdir()
    (tmp_path / 'tests' / 'test_engine.py').write_text('')
    mutation.write_config(str(tmp_path), 'tokenmix_train/engine.py')
    assert '\npytest_add_cli_args =\n    -m\n    not slow\n' in (tmp_path / 'setup.cfg').read_text()
    mutation.write_config(str(tmp_path), 'tokenmix_train/checkpoint.py')  # its resume trials are whole runs
    assert 'pytest_add_cli_args =' not in (tmp_path / 'setup.cfg').read_text()
