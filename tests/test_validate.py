"""validate.py: accuracy on constructed cases, checkpoint formats, EMA, occlusion, distributed == single, errors."""
import argparse
import json
import os
import shutil
import subprocess
import sys

from typing import Optional

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

import models  # noqa: F401  registers the tiny models
from tests.conftest import ROOT, load_script
from tokenmix_train.occlusion import OccludedDataset, occlusion_masks

TINY = ['--model', 'tokenmix_vit_tiny_p8_64', '--img-size', '32', '--model-kwargs', 'embed_dim=32', 'depth=1',
        'num_heads=2']


def tiny_model(num_classes: int = 10) -> torch.nn.Module:
    return timm.create_model('tokenmix_vit_tiny_p8_64', img_size=32, num_classes=num_classes, embed_dim=32, depth=1,
                             num_heads=2)


def constant_predictor(order, num_classes: int = 10) -> dict:
    """Weights of a tiny ViT whose logits ignore the image: class order[0] first, order[1] second, ..."""
    torch.manual_seed(0)
    model = tiny_model(num_classes)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        for rank, cls in enumerate(order):
            model.head.bias[cls] = 10. - rank
    return model.state_dict()


@pytest.fixture(scope='module')
def validate():
    return load_script('validate.py')


@pytest.fixture(scope='module')
def skewed_data(tiny_data, tmp_path_factory) -> str:
    """The tiny val split with class 0 whole (3 images) and one image in each other class: 12 images."""
    root = str(tmp_path_factory.mktemp('skewed') / 'digits')
    shutil.copytree(os.path.join(tiny_data, 'val'), os.path.join(root, 'val'))
    for cls in sorted(os.listdir(os.path.join(root, 'val')))[1:]:
        folder = os.path.join(root, 'val', cls)
        for name in sorted(os.listdir(folder))[1:]:
            os.remove(os.path.join(folder, name))
    return root


def run(validate, capsys, *argv):
    code = validate.run_main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def results(path: str) -> list:
    with open(path) as f:
        return json.load(f)


def test_known_accuracy_of_a_constant_predictor(validate, skewed_data, tmp_path, capsys):
    ckpt = str(tmp_path / 'const.pth.tar')
    torch.save({'state_dict': constant_predictor([0, 1, 2, 3, 4])}, ckpt)
    out_file = str(tmp_path / 'res.json')
    code, out, _ = run(validate, capsys, '--data-dir', skewed_data, '--split', 'val', *TINY, '--checkpoint', ckpt,
                       '-j', '0', '-b', '5', '--results-file', out_file)
    assert code == 0
    [row] = results(out_file)
    # class 0 is 3 of 12 images; the top 5 (classes 0-4) hold 3 + 4 = 7 of 12
    assert row['top1'] == pytest.approx(25.0) and row['top5'] == pytest.approx(100 * 7 / 12, abs=1e-3)
    assert row['images'] == 12 and row['occlusion'] == 0 and row['checkpoint'] == ckpt
    assert 'top1' in out.splitlines()[0] and '25.0' in out


def test_every_checkpoint_format_and_a_folder(validate, skewed_data, tmp_path, capsys):
    state = constant_predictor([0])
    folder = tmp_path / 'ckpts'
    folder.mkdir()
    torch.save(state, folder / 'bare.pth')
    torch.save({'state_dict': {'module.' + k: v for k, v in state.items()}, 'epoch': 3}, folder / 'timm.pth.tar')
    torch.save({'model': {'_orig_mod.' + k: v for k, v in state.items()}}, folder / 'deit.pth')
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(folder / 'st.safetensors'))
    (folder / 'notes.txt').write_text('not a checkpoint')
    out_file = str(tmp_path / 'res.csv')
    code, _, _ = run(validate, capsys, '--data-dir', skewed_data, '--split', 'val', *TINY, '--checkpoint',
                     str(folder), '-j', '0', '--results-file', out_file)
    assert code == 0
    lines = open(out_file).read().splitlines()
    assert lines[0] == 'model,checkpoint,occlusion,top1,top5,images,seconds,error'
    rows = [line.split(',') for line in lines[1:]]
    assert sorted(os.path.basename(r[1]) for r in rows) == ['bare.pth', 'deit.pth', 'st.safetensors', 'timm.pth.tar']
    assert all(float(r[3]) == 25.0 and r[5] == '12' for r in rows)


def test_ema_weights_are_chosen_and_required(validate, skewed_data, tmp_path, capsys):
    ckpt = str(tmp_path / 'ema.pth.tar')
    torch.save({'state_dict': constant_predictor([0]), 'state_dict_ema': constant_predictor([1])}, ckpt)
    out_file = str(tmp_path / 'res.json')
    common = ['--data-dir', skewed_data, '--split', 'val', *TINY, '-j', '0', '--results-file', out_file]
    assert run(validate, capsys, *common, '--checkpoint', ckpt)[0] == 0
    assert results(out_file)[0]['top1'] == pytest.approx(25.0)
    assert run(validate, capsys, *common, '--checkpoint', ckpt, '--use-ema')[0] == 0
    row = results(out_file)[0]
    assert row['top1'] == pytest.approx(100 / 12, abs=1e-3) and row['checkpoint'].endswith('(EMA)')
    plain = str(tmp_path / 'plain.pth.tar')
    torch.save({'state_dict': constant_predictor([0])}, plain)
    code, _, err = run(validate, capsys, *common, '--checkpoint', plain, '--use-ema')
    assert code == 2 and 'no EMA weights' in err and plain in err


def by_hand(model: torch.nn.Module, data: str, drop: Optional[torch.Tensor] = None) -> tuple:
    """Top-1 / top-5 (%) of `model` on a 32 px val split read with PIL and normalised by hand (ImageNet statistics,
    no resize: the images are 32 px already), with the patches of `drop` (N x 4 x 4, 8 px patches) set to zero."""
    from PIL import Image
    files = [(os.path.join(data, 'val', c, f), int(c)) for c in sorted(os.listdir(os.path.join(data, 'val')))
             for f in sorted(os.listdir(os.path.join(data, 'val', c)))]
    mean, std = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    images = torch.stack([(torch.from_numpy(np.array(Image.open(f).convert('RGB'))).permute(2, 0, 1) / 255. - mean)
                          / std for f, _ in files])
    if drop is not None:
        images = images * ~drop.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    labels = torch.tensor([label for _, label in files])
    with torch.no_grad():
        top = model.eval()(images).topk(5, dim=1).indices
    return (100. * (top[:, 0] == labels).float().mean().item(),
            100. * (top == labels[:, None]).any(1).float().mean().item())


def test_occlusion_zero_is_clean_and_ratios_drop_that_share(validate, tiny_data, tmp_path, capsys):
    torch.manual_seed(1)
    model = tiny_model()
    ckpt = str(tmp_path / 'rand.pth.tar')
    torch.save(model.state_dict(), ckpt)
    out_file = str(tmp_path / 'res.json')
    common = ['--data-dir', tiny_data, '--split', 'val', *TINY, '--checkpoint', ckpt, '-j', '0',
              '--results-file', out_file]
    assert run(validate, capsys, *common)[0] == 0
    clean = results(out_file)[0]
    assert (clean['top1'], clean['top5']) == pytest.approx(by_hand(model, tiny_data), abs=1e-3)
    assert run(validate, capsys, *common, '--occlusion', '0', '0.5', '0.75')[0] == 0
    rows = results(out_file)
    assert [r['occlusion'] for r in rows] == [0, 0.5, 0.75]
    assert (rows[0]['top1'], rows[0]['top5']) == (clean['top1'], clean['top5'])
    for row, ratio in zip(rows[1:], (0.5, 0.75)):
        # the masks of seed 0 for that ratio: exactly 8 and 12 of the 16 patches of each image dropped
        masks = occlusion_masks(30, (4, 4), ratio, 'random', seed=round(ratio * 1000))
        assert masks.sum((1, 2)).unique().tolist() == [round(ratio * 16)]
        assert (row['top1'], row['top5']) == pytest.approx(by_hand(model, tiny_data, masks), abs=1e-3)
    assert rows[1]['top1'] != clean['top1'] or rows[1]['top5'] != clean['top5']


@pytest.mark.parametrize('mode', ['random', 'block'])
def test_occluded_inputs_change_by_the_requested_share(mode):
    images = torch.randn(6, 3, 32, 32) + 5.  # no pixel is zero before occlusion
    dataset = [(img, i) for i, img in enumerate(images)]

    class Listed(torch.utils.data.Dataset):
        transform = None

        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return dataset[i]

    masks = occlusion_masks(6, (4, 4), 0.5, mode, seed=3)
    assert torch.equal(masks, occlusion_masks(6, (4, 4), 0.5, mode, seed=3))
    occluded = OccludedDataset(Listed(), masks, patch_size=8)
    for i in range(6):
        image, target = occluded[i]
        dropped = (image == 0).all(0)
        assert target == i and torch.equal(image[:, ~dropped], images[i][:, ~dropped])
        share = dropped.float().mean().item()
        assert share == 0.5 if mode == 'random' else 0.25 <= share <= 0.5
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        occlusion_masks(2, (4, 4), 1.0, mode, seed=0)
    assert not occlusion_masks(2, (4, 4), 0., mode, seed=0).any()  # ratio 0: nothing dropped
    if mode == 'random':  # a 2 x 5 grid: half of its 10 patches
        assert occlusion_masks(3, (2, 5), 0.5, mode, seed=0).sum((1, 2)).tolist() == [5, 5, 5]


@pytest.mark.slow
def test_distributed_equals_single_process(tiny_data, tmp_path):
    data = str(tmp_path / 'odd')
    shutil.copytree(os.path.join(tiny_data, 'val'), os.path.join(data, 'val'))
    first = os.path.join(data, 'val', sorted(os.listdir(os.path.join(data, 'val')))[0])
    os.remove(os.path.join(first, sorted(os.listdir(first))[0]))  # 29 images: shards of 15 and 14
    torch.manual_seed(2)
    ckpt = str(tmp_path / 'rand.pth.tar')
    torch.save({'state_dict': tiny_model().state_dict()}, ckpt)
    common = ['validate.py', '--data-dir', data, '--split', 'val', *TINY, '--checkpoint', ckpt, '-j', '0', '-b', '4',
              '--occlusion', '0', '0.5', '--occlusion-mode', 'block']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    single, multi = str(tmp_path / 'single.json'), str(tmp_path / 'multi.json')
    subprocess.run([sys.executable, *common, '--results-file', single], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           *common, '--results-file', multi], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = results(single), results(multi)
    assert [r['images'] for r in two] == [29, 29]
    assert [(r['top1'], r['top5']) for r in one] == [(r['top1'], r['top5']) for r in two]
    assert proc.stdout.count('top1') == 1  # one table, from the primary process


def test_bad_input_exits_2_with_a_clear_message(validate, tiny_data, tmp_path, capsys):
    common = ['--data-dir', tiny_data, '--split', 'val', *TINY, '-j', '0']
    code, _, err = run(validate, capsys, *common, '--checkpoint', str(tmp_path / 'missing.pth'))
    assert code == 2 and 'missing.pth' in err and 'no such file' in err
    other = str(tmp_path / 'resnet.pth')
    torch.save(timm.create_model('resnet10t', num_classes=10).state_dict(), other)
    code, _, err = run(validate, capsys, *common, '--checkpoint', other)
    assert code == 2 and 'does not fit' in err and 'missing' in err
    twelve = str(tmp_path / 'twelve.pth')
    torch.save(tiny_model(12).state_dict(), twelve)
    code, _, err = run(validate, capsys, *common, '--checkpoint', twelve)
    assert code == 2 and '12 classes' in err and 'num_classes=10' in err
    empty = tmp_path / 'empty'
    (empty / 'val' / 'a').mkdir(parents=True)
    code, _, err = run(validate, capsys, '--data-dir', str(empty), '--split', 'val', *TINY, '--checkpoint', twelve)
    assert code == 2 and 'holds no images' in err
    with pytest.raises(SystemExit) as exit_info:
        validate.run_main([*common, '--checkpoint', twelve, '--occlusion', '1.0'])
    assert exit_info.value.code == 2 and '--occlusion' in capsys.readouterr().err


def test_a_deit_checkpoint_scores_as_its_bare_state_dicts(validate, tiny_data, tmp_path, capsys):
    """DeiT's (and the authors') training file, written with torch.save: `model`, `model_ema`, optimizer, scheduler
    and scaler states, the run's `args` as an argparse.Namespace, `epoch`."""
    torch.manual_seed(1)
    weights, ema = tiny_model().state_dict(), constant_predictor([1])
    optimizer = torch.optim.AdamW(tiny_model().parameters(), lr=5e-4)
    deit_args = argparse.Namespace(model='deit_tiny_patch16_224', input_size=224, batch_size=128, epochs=300,
                                   lr=5e-4, drop_path=0.1, model_ema=True, model_ema_decay=0.99996, mixup=0.8,
                                   cutmix=1.0, smoothing=0.1, data_path='/data/imagenet', output_dir='/runs/deit',
                                   device='cuda', seed=0, dist_url='env://')
    deit = tmp_path / 'checkpoint.pth'
    torch.save({'model': weights, 'optimizer': optimizer.state_dict(), 'lr_scheduler': {'last_epoch': 299},
                'epoch': 299, 'model_ema': ema, 'scaler': {'scale': 65536.0, '_growth_tracker': 0},
                'args': deit_args}, deit)
    torch.save(weights, tmp_path / 'model.pth')
    torch.save(ema, tmp_path / 'ema.pth')
    out_file = str(tmp_path / 'res.json')

    def scores(path, *extra: str) -> tuple:
        assert run(validate, capsys, '--data-dir', tiny_data, '--split', 'val', *TINY, '-j', '0', '--checkpoint',
                   str(path), '--results-file', out_file, *extra)[0] == 0
        [row] = results(out_file)
        assert row['images'] == 30
        return row['top1'], row['top5']

    model_scores = scores(deit)
    ema_scores = scores(deit, '--use-ema')
    assert model_scores == scores(tmp_path / 'model.pth')
    assert ema_scores == scores(tmp_path / 'ema.pth')
    assert ema_scores[0] == pytest.approx(10.0)  # always class 1: 3 of the 30 images
    assert model_scores[0] != ema_scores[0]  # measured: 13.3 (4 of 30) and 10.0
