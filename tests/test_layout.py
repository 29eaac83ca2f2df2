"""The house stays easy to see: short functions, shell scripts only in scripts/, entry points that only wire."""
import ast
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 80
FLAG_TABLES = ('tokenmix_train/train_flags.py', 'tokenmix_train/validate_flags.py')  # one add_argument a line


def _tracked(pattern: str) -> list:
    out = subprocess.run(['git', 'ls-files', pattern], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def _long_functions(path: str, root: str = ROOT) -> list:
    with open(os.path.join(root, path)) as f:
        tree = ast.parse(f.read(), path)
    return [f'{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)'
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_is_longer_than_80_lines_outside_the_flag_tables():
    code = [p for p in _tracked('*.py') if not p.startswith('tests/') and p not in FLAG_TABLES]
    assert len(code) > 30 and 'train.py' in code and 'mixup_ext/masks.py' in code
    assert [problem for path in code for problem in _long_functions(path)] == []


def test_the_length_check_finds_a_long_function(tmp_path):
    body = '\n'.join(f'    x{i} = {i}' for i in range(MAX_FUNCTION_LINES))
    (tmp_path / 'long.py').write_text(f'def short():\n    pass\n\n\ndef long():\n{body}\n')
    assert _long_functions('long.py', str(tmp_path)) == [f'long.py:5 long ({MAX_FUNCTION_LINES + 1} lines)']


def test_scripts_holds_shell_scripts_only():
    scripts = _tracked('scripts/*')
    assert scripts and all(path.endswith('.sh') for path in scripts), scripts
