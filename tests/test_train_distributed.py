"""Two processes with torchrun (gloo, CPU): one writer, metrics over all ranks, every val image counted once."""
import argparse
import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch
from timm.data import resolve_data_config

from conftest import ROOT, TINY_STUDENT
from tokenmix_train.data import build_dataset
from tokenmix_train.evaluate import build_eval_loader, evaluate
from tokenmix_train.model import build_student

pytestmark = pytest.mark.slow  # torchrun with two processes


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')
def test_torchrun_two_processes(easy_data, easy_teacher_checkpoint, tmp_path):
    data = tmp_path / 'colours'
    shutil.copytree(easy_data, data)
    os.remove(data / 'val' / '0' / '00000.png')  # 19 val images: 10 + 9 over two ranks, no padding
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(ROOT, 'train.py'), '--data-dir', str(data), *TINY_STUDENT, '-b', '8', '--epochs', '2',
           '--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '0', '--workers', '0', '--output', str(out),
           '--tokenmix', '--cutmix', '1.0', '--teacher-model', 'tokenmix_cnn_teacher_64',
           '--teacher-checkpoint', easy_teacher_checkpoint, '--log-interval', '1', '--aug-repeats', '3']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    runs = os.listdir(out)
    assert len(runs) == 1  # only rank 0 made a folder (the default name is a timestamp)
    run = out / runs[0]
    assert sorted(os.listdir(run)) == ['args.yaml', 'checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'last.pth.tar',
                                       'log.txt', 'model_best.pth.tar', 'summary.csv', 'tensorboard']
    log = (run / 'log.txt').read_text()
    assert log.count('output folder') == 1
    assert log.count('eval epoch 1: top-1') == 1 and '(19 images)' in log
    # 60 train images, 8 per rank and step: 3 steps an epoch on each of the two ranks (with --aug-repeats 3, timm's
    # RepeatAugSampler: each image 3 times, 30 of the 180 draws per rank); evaluation still counts each image once
    assert 'train epoch 1 [3/3] loss ' in log and '[4/' not in log
    with open(run / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert float(rows[-1]['eval_top1']) >= 90  # colour classes, chance 25%: the two ranks really trained one model

    checkpoint = _load(run / 'last.pth.tar')
    assert len(checkpoint['rng_states']) == 2  # each rank's streams, restored per rank on resume
    gen0, gen1 = (s['generator'] for s in checkpoint['rng_states'])
    assert not torch.equal(gen0, gen1)  # ranks draw different masks
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])

    # the all-reduced top-1 equals a single-process evaluation of the same weights on all 19 images
    args = argparse.Namespace(**checkpoint['args'])  # stored as plain data
    model = build_student(args, 4)
    model.load_state_dict(checkpoint['state_dict'])
    dataset = build_dataset(args, 'validation', '--val-split', is_training=False)
    loader = build_eval_loader(dataset, resolve_data_config(vars(args), model=model), 8, 0, False)
    single = evaluate(model, loader, torch.device('cpu'))
    assert single['count'] == 19
    assert float(rows[-1]['eval_top1']) == pytest.approx(single['top1'], abs=1e-6)
    assert float(rows[-1]['eval_loss']) == pytest.approx(single['loss'], rel=1e-4)
