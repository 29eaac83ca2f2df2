"""Shared fixtures for the training tests: tiny generated data, a tiny student and a tiny teacher checkpoint."""
import importlib.util
import os
import sys
from typing import Callable, List

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# A 1-block ViT at 32 px (4 x 4 tokens of 8 px): seconds per run on a CPU.
TINY_STUDENT = ['--model', 'tokenmix_vit_tiny_p8_64', '--img-size', '32',
                '--model-kwargs', 'embed_dim=32', 'depth=1', 'num_heads=2']
TINY_TEACHER = 'tokenmix_cnn_teacher_64'  # output stride 8: a 4 x 4 map at 32 px, the student's grid


def load_script(relpath: str):
    """Import a script that is not in a package (tools/*.py, train.py) as a module."""
    path = os.path.join(ROOT, relpath)
    name = '_script_' + os.path.splitext(relpath)[0].replace(os.sep, '_')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """torch's thread count as each test found it: a benchmark run in-process sets one thread (as a loader worker),
    and a later in-process run compared bit for bit with a subprocess would round differently."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def demo_tool():
    return load_script(os.path.join('tools', 'make_demo_data.py'))


@pytest.fixture(scope='session')
def train_script():
    return load_script('train.py')


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory, demo_tool) -> str:
    """60 train / 30 val cluttered digits at 32 px (read-only: copy it before changing it)."""
    out = str(tmp_path_factory.mktemp('data') / 'digits')
    assert demo_tool.main(['--out', out, '--size', '32', '--train-per-class', '6', '--val-per-class', '3',
                           '--seed', '3']) == 0
    return out


@pytest.fixture(scope='session')
def teacher_checkpoint(tmp_path_factory) -> str:
    """Random weights of the tiny CNN teacher for 10 classes, saved as a timm-style checkpoint."""
    import timm
    import models  # noqa: F401  registers the tiny models
    torch.manual_seed(0)
    teacher = timm.create_model(TINY_TEACHER, num_classes=10)
    path = str(tmp_path_factory.mktemp('teacher') / 'teacher.pth.tar')
    torch.save({'state_dict': teacher.state_dict(), 'epoch': 0}, path)
    return path


# Four classes a tiny ViT separates within one or two epochs, even through RandAugment and mixing: chance is 25%.
EASY_COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 230)]


@pytest.fixture(scope='session')
def easy_data(tmp_path_factory) -> str:
    """60 train / 20 val images at 32 px whose class is their colour (red, green, blue, white) under pixel noise."""
    import numpy as np
    from PIL import Image
    out = tmp_path_factory.mktemp('easy') / 'colours'
    rng = np.random.default_rng(0)
    for split, per_class in (('train', 15), ('val', 5)):
        for label, rgb in enumerate(EASY_COLOURS):
            os.makedirs(out / split / str(label))
            for i in range(per_class):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(out / split / str(label) / f'{i:05d}.png')
    return str(out)


@pytest.fixture(scope='session')
def easy_teacher_checkpoint(tmp_path_factory) -> str:
    """Random weights of the tiny CNN teacher for the 4 classes of `easy_data`."""
    import timm
    import models  # noqa: F401  registers the tiny models
    torch.manual_seed(0)
    teacher = timm.create_model(TINY_TEACHER, num_classes=len(EASY_COLOURS))
    path = str(tmp_path_factory.mktemp('teacher4') / 'teacher.pth.tar')
    torch.save({'state_dict': teacher.state_dict(), 'epoch': 0}, path)
    return path


@pytest.fixture
def train_argv(tiny_data, tmp_path) -> Callable[..., List[str]]:
    """argv for a seconds-long CPU run of train.py on the tiny data, writing under tmp_path/out/<experiment>."""
    def build(*extra: str, experiment: str = 'run', data: str = tiny_data) -> List[str]:
        return ['--data-dir', data, *TINY_STUDENT, '-b', '8', '--epochs', '2', '--opt', 'adamw', '--lr', '1e-3',
                '--warmup-epochs', '0', '--workers', '0', '--seed', '0', '--log-interval', '2',
                '--output', str(tmp_path / 'out'), '--experiment', experiment, *extra]
    return build


class StopRun(Exception):
    """Raised into a train.py run to stop it as a kill between epochs would."""


def run_until_epoch(train_script, monkeypatch, argv: List[str], epoch: int) -> None:
    """Run train.py with `argv` and stop it as epoch `epoch` starts, so its newest checkpoint is of epoch - 1."""
    import tokenmix_train.engine as engine
    train_one_epoch = engine.train_one_epoch

    def stop_at(run, at_epoch, loader, start=None):
        if at_epoch == epoch:
            raise StopRun()
        return train_one_epoch(run, at_epoch, loader, start)

    monkeypatch.setattr(engine, 'train_one_epoch', stop_at)
    with pytest.raises(StopRun):
        train_script.run_main(argv)
    monkeypatch.setattr(engine, 'train_one_epoch', train_one_epoch)
