"""tools/mutation.py: what the scratch copy holds for mutmut and the configuration it writes (no mutants are run)."""
import os
import re

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
