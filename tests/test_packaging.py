"""pyproject.toml and the requirements files ask for the same packages with the same constraints."""
import os

import pytest

tomllib = pytest.importorskip('tomllib')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements(name: str) -> set:
    with open(os.path.join(ROOT, name)) as f:
        return {line.strip() for line in f if line.strip() and not line.lstrip().startswith('#')}


def test_pyproject_and_requirements_ask_for_the_same_constraints():
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        project = tomllib.load(f)['project']
    extras = project['optional-dependencies']
    assert 'pillow<13' in project['dependencies']
    assert _requirements('requirements.txt') == set(project['dependencies']) | set(extras['analysis']) | {'pytest'}
    assert _requirements('requirements-dev.txt') == set(extras['dev']) - {'pytest'}
